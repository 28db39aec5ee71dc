"""The CLIP text-image score: 100 x cosine of open-clip image and text embeddings (as in CLIPScore, Hessel et
al. 2021, without the clip at 0), which guided and fine-tuned images must not lose while their quality rises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qualityguide.errors import InputError
from qualityguide.images import to_pil


class ClipScore:
    """Scores (image, prompt) pairs; build it with :meth:`load` (weights required) or :meth:`load_or_random`.

    Args:
        model: the loaded open-clip model.
        preprocess: its image transform.
        tokenizer: its tokenizer.
        label: what was loaded, for the report.
    """

    def __init__(self, model, preprocess, tokenizer, label: str):
        self.model, self.preprocess, self.tokenizer, self.label = model.eval(), preprocess, tokenizer, label

    @classmethod
    def load(cls, arch: str, weights: str | None, device: torch.device) -> tuple[ClipScore | None, str]:
        """(scorer, note). ``weights``: a local file (``.safetensors``, or a ``.bin``/``.pt`` that open-clip reads with
        ``weights_only=True``) or a pretrained tag found in open-clip's local cache; None: skipped."""
        import open_clip

        if weights is None:
            return None, ("skipped: no --clip-weights given (offline runs cannot download open-clip weights); pass "
                          "--clip-weights FILE, or a pretrained tag such as 'openai' that is in the local cache")
        is_file = Path(weights).expanduser().is_file()
        if not is_file and weights not in open_clip.list_pretrained_tags_by_model(arch):
            raise InputError(f"--clip-weights {weights!r} is neither a file nor a pretrained tag of {arch} (tags: "
                             f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}); pass a local "
                             "weights file or a tag")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(Path(weights).expanduser()) if is_file else weights)
        except (OSError, RuntimeError) as exc:  # a tag that is not cached, offline
            if is_file:
                raise InputError(f"--clip-weights {weights!r} could not be loaded as {arch} weights ({exc}); pass "
                                 f"weights of --clip-model {arch}") from None
            return None, f"skipped: open-clip {arch}/{weights} is not available locally ({type(exc).__name__})"
        label = f"open-clip {arch} ({Path(weights).name if is_file else weights})"
        return cls(model.to(device), preprocess, open_clip.get_tokenizer(arch), label), label

    @classmethod
    def load_or_random(cls, weights: str | None, device: torch.device, arch: str = "ViT-B-32") -> ClipScore:
        """``weights`` (a file open-clip reads), or random weights labelled as such: the offline mechanics check
        of an eval that must report a CLIP column even without weights."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        label = f"open-clip {arch}" + (f" ({Path(weights).name})" if weights else
                                      " with RANDOM weights (offline mechanics check, not alignment)")
        return cls(model.to(device), preprocess, open_clip.get_tokenizer(arch), label)

    @torch.no_grad()
    def __call__(self, images: list | torch.Tensor, prompts: list[str]) -> np.ndarray:
        """Scores ``[N]`` float64 of ``images`` (PIL images, or ``[3,H,W]`` tensors in [0,1]) against ``prompts``,
        pair by pair."""
        device = next(self.model.parameters()).device
        pil = [image if isinstance(image, Image.Image) else to_pil(image) for image in images]
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in pil]).to(device)
        image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text = torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(prompts).to(device)).float(),
                                             dim=-1)
        return (100 * (image * text).sum(-1)).double().cpu().numpy()
