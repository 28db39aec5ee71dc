"""The IQA-Adapter learns a condition: a few hundred steps on a tiny U-Net, checked against a shuffled-label twin.

The tasks make the condition the image itself: flat images whose brightness is the label (low frequency,
decided at high noise), and white noise on grey whose pixel std is the label (high frequency, decided at low
noise; the adapter only sits at 1/4 and 1/8 of the side, as in ``evals/adapter_control.py``'s quality base).
A tiny pixel-space base (``UNet2DConditionModel``, null text) is trained on the images first; then the
adapter is trained on the frozen base with the library's :class:`AdapterTrainer`, once with the true labels
and once with the labels permuted. Only the true-label adapter may steer the samples' attribute. Reference mode
(:class:`ReferenceIQAAdapter`, conditioned on a reference image's BRISQUE vector) is tested the same way on the
noise task, with the vectors permuted for its twin.

The base is v-prediction on purpose. With epsilon prediction a model this small spends its error on copying
the noise at high noise levels, where a global attribute is decided and where epsilon's loss discounts the
clean image by the SNR; neither the base nor any adapter then learns the attribute (measured: sample
brightness 0.499 / 0.500 / 0.501 at targets 0.1 / 0.5 / 0.9, training loss equal with true and shuffled labels).
"""

from __future__ import annotations

import pytest
import torch

from qualityguide.adapter import IQAAdapter, ReferenceIQAAdapter, ScoreQuantiles
from qualityguide.adapter.training import AdapterTrainer
from qualityguide.diffusion import add_noise, noise_prediction_loss, sample_timesteps, training_target

SIZE, COUNT, BATCH = 16, 256, 16
GAP_THRESHOLD = 0.12  # reference mode: the least rise beyond the twin's, as a share of the references' span


def tiny_pixel_unet(size: int = SIZE, levels: int = 3):
    """Cross-attention on the two lowest of ``levels`` levels (widths 16, 32, 64, 64 ...)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    attention = [level >= levels - 2 for level in range(levels)]
    return UNet2DConditionModel(sample_size=size, in_channels=3, out_channels=3,
                                block_out_channels=(16, 32, 64, 64)[:levels],
                                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                                                       for a in attention),
                                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                                                     for a in reversed(attention)),
                                layers_per_block=1, attention_head_dim=8, norm_num_groups=8, cross_attention_dim=32)


def null_text(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, 32)


def train_base(images: torch.Tensor, unet):
    """400 steps of the v-prediction MSE, written out here (independent of evals.toy's training code)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="v_prediction",
                              clip_sample=True)
    alphas = scheduler.alphas_cumprod.float()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    for step in range(400):
        generator = torch.Generator().manual_seed(step)
        x0 = images[torch.randint(0, len(images), (BATCH,), generator=generator)] * 2 - 1
        t = sample_timesteps(BATCH, 1000, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        out = unet(add_noise(x0, noise, t, alphas), t, encoder_hidden_states=null_text(BATCH)).sample
        loss = noise_prediction_loss(out, training_target(x0, noise, t, alphas, "v_prediction"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return unet.eval().requires_grad_(False), scheduler


@pytest.fixture(scope="module")
def task():
    brightness = torch.rand(COUNT, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    images = brightness.view(-1, 1, 1, 1).expand(COUNT, 3, SIZE, SIZE).contiguous()
    return (*train_base(images, tiny_pixel_unet()), images, brightness.double())


def pixel_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(dim=(-2, -1)).mean(-1)


def fit_adapter(adapter, unet, scheduler, images, conditions: torch.Tensor, steps: int, lr: float):
    """Train ``adapter`` on the frozen ``unet`` with :class:`AdapterTrainer`: image ``i`` with input row ``i`` of
    ``conditions`` (``adapter.condition(...)`` of all images), batches and noise from fixed seeds."""
    adapter.attach(unet, dtype=torch.float32)
    trainer = AdapterTrainer(adapter, unet, scheduler)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=1e-2)
    for step in range(steps):
        generator = torch.Generator().manual_seed(10_000 + step)
        index = torch.randint(0, len(images), (BATCH,), generator=generator)
        loss = trainer(images[index] * 2 - 1, null_text(BATCH), conditions[index], generator=generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapter.detach(unet)
    return adapter


def train_adapter(unet, scheduler, images, labels, steps: int = 300, lr: float = 1e-3) -> IQAAdapter:
    torch.manual_seed(0)
    adapter = IQAAdapter.for_unet(unet, ["attribute"], num_tokens=4)
    adapter.set_quantiles(ScoreQuantiles.fit({"attribute": labels}))
    return fit_adapter(adapter, unet, scheduler, images, adapter.condition(labels[:, None]), steps, lr)


def measure_samples(unet, scheduler, adapter, percentile: float, measure=None, n: int = 8) -> float:
    """DDIM samples (same seeds for every target) at one target percentile; their mean ``measure`` (default: the
    mean brightness in [0,1])."""
    embeds = adapter.embeds(percentiles={"attribute": percentile}, do_cfg=False)[0]  # [1, 1, d]: one target
    images = sample(unet, scheduler, adapter, embeds, n)
    return float(images.mean() if measure is None else measure(images).mean())


def sample(unet, scheduler, adapter, embeds: torch.Tensor, n: int = 8) -> torch.Tensor:
    """``n`` DDIM samples (20 steps, initial noise from seed 7: the same for every condition) with the adapter's
    ``embeds`` ``[1, 1, d]`` (one condition for all), in [0, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(20)
    size = unet.config.sample_size
    x = torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(7))
    adapter.attach(unet)
    try:
        with torch.no_grad():
            for t in ddim.timesteps:
                out = unet(x, t, encoder_hidden_states=null_text(n),
                           added_cond_kwargs={"image_embeds": [embeds.expand(n, -1, -1)]}).sample
                x = ddim.step(out, t, x).prev_sample
    finally:
        adapter.detach(unet)
    return (x / 2 + 0.5).clamp(0, 1)


def test_adapter_learns_a_condition_a_shuffled_adapter_cannot(task):
    unet, scheduler, images, labels = task
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    true_adapter = train_adapter(unet, scheduler, images, labels)
    control = train_adapter(unet, scheduler, images, shuffled)
    targets = (0.1, 0.5, 0.9)
    learned = [measure_samples(unet, scheduler, true_adapter, p) for p in targets]
    blind = [measure_samples(unet, scheduler, control, p) for p in targets]
    wanted = [float(v) for v in true_adapter.quantiles.score_at("attribute", targets)]  # 0.18, 0.48, 0.80
    # The true-label adapter orders its samples by target over a good part of the requested range (measured:
    # 0.39 / 0.57 / 0.73 for 0.18 / 0.48 / 0.80) ...
    assert learned[0] < learned[1] < learned[2], (learned, wanted)
    assert learned[2] - learned[0] > 0.3 * (wanted[2] - wanted[0]), (learned, wanted)
    # ... the shuffled one, with the same training, cannot: its target says nothing about the image (measured:
    # 0.63 / 0.62 / 0.62).
    assert abs(blind[2] - blind[0]) < 0.25 * (learned[2] - learned[0]), (blind, learned)


def noise_images(amplitude: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """White noise of the given amplitudes on mid-grey, ``[len(amplitude), 3, 32, 32]`` in [0, 1]."""
    return (0.5 + amplitude.view(-1, 1, 1, 1) * torch.randn(len(amplitude), 3, 32, 32, generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def noise_task():
    """White noise on grey, 32 px, label = each image's pixel std: an attribute of single pixels, while the
    adapter only reaches the 8 and 4 px levels (the layout of the eval's quality base)."""
    generator = torch.Generator().manual_seed(0)
    images = noise_images(torch.rand(COUNT, generator=generator) * 0.23 + 0.02, generator)
    return (*train_base(images, tiny_pixel_unet(size=32, levels=4)), images, pixel_std(images).double())


def test_adapter_steers_pixel_level_detail_from_the_lowest_levels(noise_task):
    unet, scheduler, images, labels = noise_task
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    # lr 3e-3: at 1e-3 the learned span was 1.0x to 2.3x the threshold below, depending on the CPU and the base's
    # initialisation (0.014 / 0.022 / 0.033); at 3e-3, 4.3x to 7x (0.061 to 0.098 over two bases and four
    # adapter seeds), in the same 300 steps.
    true_adapter = train_adapter(unet, scheduler, images, labels, lr=3e-3)
    control = train_adapter(unet, scheduler, images, shuffled, lr=3e-3)
    targets = (0.1, 0.5, 0.9)
    learned = [measure_samples(unet, scheduler, true_adapter, p, pixel_std) for p in targets]
    blind = [measure_samples(unet, scheduler, control, p, pixel_std) for p in targets]
    wanted = [float(v) for v in true_adapter.quantiles.score_at("attribute", targets)]
    # Ordered by target, over part of the requested range after 300 steps (measured: 0.101 / 0.110 / 0.199 for
    # 0.042 / 0.130 / 0.217, a span of 56% of the wanted one; the eval's EMA'd base gets 35% at lr 1e-3) ...
    assert learned[0] < learned[1] < learned[2], (learned, wanted)
    assert learned[2] - learned[0] > 0.08 * (wanted[2] - wanted[0]), (learned, wanted)
    # ... while the shuffled twin stays flat (measured: 0.1110 / 0.1109 / 0.1108; three shuffles moved 0.0002 to
    # 0.0012, at most 1/80 of the learned span).
    assert abs(blind[2] - blind[0]) < 0.25 * (learned[2] - learned[0]), (blind, learned)


def reference_samples(unet, scheduler, images, features, references, seed: int = 0, n: int = 16) -> torch.Tensor:
    """Pixel std ``[references, n]`` of samples from a reference adapter trained (300 steps, lr 3e-3, the
    pixel-level test's settings) on image ``i`` with BRISQUE vector ``features[i]``; column ``j`` starts from the
    same noise for every reference."""
    torch.manual_seed(seed)
    adapter = ReferenceIQAAdapter.for_unet(unet, "brisque", num_tokens=4)
    adapter.fit_feature_stats(features, resolution=images.shape[-1])
    fit_adapter(adapter, unet, scheduler, images, adapter.condition(features), steps=300, lr=3e-3)
    return torch.stack([pixel_std(sample(unet, scheduler, adapter, adapter.embeds_from_reference(
        reference[None], do_cfg=False)[0], n)) for reference in references])


def reference_task(images):
    """BRISQUE vectors of the training images, and three fresh references of low / mid / high noise."""
    from qualityguide.scorers.features import build_image_psi

    with torch.no_grad():
        features = build_image_psi("brisque")(images)
    references = noise_images(torch.tensor([0.05, 0.135, 0.22]), torch.Generator().manual_seed(99))
    return features, references


def test_reference_adapter_steers_toward_its_reference_a_shuffled_twin_cannot(noise_task):
    """Reference mode on the noise task: the condition is a reference image's BRISQUE vector (it tracks the noise
    amplitude: most of its 36 entries correlate with the pixel std at |r| 0.7 to 0.95 on these images), and the
    samples' pixel std should follow the reference's. Tested as ``evals/adapter_control.py`` tests an adapter:
    per sample seed, the rise from the lowest to the highest reference, against the same rise of the twin trained
    on the same images with the feature vectors permuted (one-sided Wilcoxon over the seeds)."""
    from evals.adapter_control import versus_shuffled

    unet, scheduler, images, _ = noise_task
    features, references = reference_task(images)
    shuffled = features[torch.randperm(len(features), generator=torch.Generator().manual_seed(1))]
    true = reference_samples(unet, scheduler, images, features, references)
    twin = reference_samples(unet, scheduler, images, shuffled, references)
    wanted = pixel_std(references).tolist()
    versus = versus_shuffled(wanted, true.numpy(), twin.numpy())
    means = true.mean(1).tolist()
    # The samples follow the reference (measured: 0.102 / 0.112 / 0.174 for references 0.049 / 0.137 / 0.214; on a
    # base trained from other data 0.131 / 0.129 / 0.182: the low and middle references are not told apart there,
    # so only the ends are compared) ...
    assert means[0] < means[2], (means, wanted)
    # ... and the twin stays flat (0.112 / 0.109 / 0.114; four permutations' twins rose -0.0014 to +0.0019). The
    # true adapter's rise beyond its twin's, per seed: +0.070 +- 0.0006, 0.43 of the references' span, all 16 seeds
    # positive (p 1.5e-5); adapter seeds 1 and 2: 0.42, 0.41; the other data's base: 0.33 (p 1.5e-5), 2.8x the
    # threshold. Reversed references give -0.44, a second shuffled twin as the "true" one -0.016.
    assert versus["gap"] > GAP_THRESHOLD * (wanted[2] - wanted[0]), (versus, wanted)
    assert versus["wilcoxon_p"] < 1e-3, versus
