import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from qualityguide.evaluation.datasets import shared_data_dir  # noqa: E402
from qualityguide.scorers.niqe_fit import DEMO_PHOTOS, bundled_photo  # noqa: E402

# Tiny models are dominated by per-op overhead: on a 2-core runner two intra-op threads contend with each other and
# with any other process (measured 10-60x slower per step under load), so tests run single-threaded by default.
torch.set_num_threads(int(os.environ.get("QUALITYGUIDE_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $QUALITYGUIDE_DATA); tests that need it skip with a visible reason when absent."""
    path = shared_data_dir()
    if path is None or not path.is_dir():
        pytest.skip("shared evaluation data not found: set QUALITYGUIDE_DATA or place ../shared/data beside the checkout")
    return path


@pytest.fixture(scope="session")
def params(shared_data) -> Path:
    path = shared_data / "params"
    if not (path / "niqe_pristine.mat").is_file():
        pytest.skip(f"reference NSS parameter files missing in {path}")
    return path


@pytest.fixture(scope="session")
def photo() -> torch.Tensor:
    """A real photograph (scikit-image's astronaut, 256x256) as [1,3,H,W] in [0,1]."""
    image = Image.open(bundled_photo(*DEMO_PHOTOS[0])).convert("RGB").resize((256, 256), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def blur(images: torch.Tensor, sigma: float = 3.0) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = int(2 * round(3 * sigma) + 1)
    return gaussian_blur(images, [k, k], [sigma, sigma])


def noise(images: torch.Tensor, std: float = 0.15, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images + std * torch.randn(images.shape, generator=g)).clamp(0, 1)


@pytest.fixture()
def hub_recorder(monkeypatch):
    """The hub's two network calls of a push (``create_repo``, ``upload_folder``) replaced by a recorder; the rest
    of huggingface_hub runs. Each upload records ``files``: name -> bytes, filtered by the call's allow/ignore
    patterns as ``upload_folder`` filters them, read while the folder exists."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append({"call": "create_repo", "repo_id": repo_id, "token": self.token, **kwargs})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        root = Path(folder_path)
        names = [p.relative_to(root).as_posix() for p in sorted(root.rglob("*")) if p.is_file()]
        kept = filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        calls.append({"call": "upload_folder", "repo_id": repo_id, "token": self.token, "folder": root,
                      "files": {name: (root / name).read_bytes() for name in kept}, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls
