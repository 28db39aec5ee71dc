"""``qualityguide demo``: score real photographs at increasing distortion levels, offline.

The photographs ship inside scikit-image (held out of the embedded NIQE fit). Each is blurred,
noised and JPEG-compressed at three levels; a working scorer ranks every series clean > mild >
medium > strong. The report folder gets a contact sheet (PNG), the scores (CSV, JSON) and a
markdown table.
"""

from __future__ import annotations

import io
import json
import numbers
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..errors import InputError
from ..evaluation.stats import krcc
from ..images import load_image, make_grid
from ..scorers import DEFAULT_SCORER, QualityScorer, load_scorer
from ..scorers.base import SIZE_SEP
from ..scorers.niqe_fit import DEMO_PHOTOS, bundled_photo

# distortion -> the three levels (mild, medium, strong)
DISTORTIONS: dict[str, tuple[float, ...]] = {
    "blur": (1.0, 2.0, 4.0),        # Gaussian blur sigma, px
    "noise": (0.02, 0.05, 0.10),    # additive Gaussian noise std, [0,1] units
    "jpeg": (40, 15, 5),            # JPEG quality
}


def distort(image: Image.Image, kind: str, level: float, seed: int = 0) -> Image.Image:
    """Apply one distortion at one level to an RGB PIL image (deterministic for a seed)."""
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=level))
    if kind == "noise":
        array = np.asarray(image, dtype=np.float32) / 255.0
        noisy = array + np.random.default_rng(seed).normal(0.0, level, array.shape).astype(np.float32)
        return Image.fromarray((np.clip(noisy, 0, 1) * 255).round().astype(np.uint8))
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(level))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    raise ValueError(f"unknown distortion {kind!r}; known: {sorted(DISTORTIONS)}")


def build_series(size: int = 384) -> list[dict]:
    """Every (photo, distortion, level) image: level 0 is the clean photo."""
    items = []
    for package, filename in DEMO_PHOTOS:
        photo = Image.open(bundled_photo(package, filename)).convert("RGB")
        scale = size / min(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
        name = Path(filename).stem
        for kind, levels in DISTORTIONS.items():
            items.append({"photo": name, "distortion": kind, "level": 0, "setting": 0, "image": photo})
            for k, level in enumerate(levels, start=1):
                items.append({"photo": name, "distortion": kind, "level": k, "setting": level,
                              "image": distort(photo, kind, level, seed=k)})
    return items


# The files a report folder holds; results.json marks a folder as a demo report (rerunning overwrites it).
REPORT_FILES = ("results.json", "results.csv", "report.md", "contact_sheet.png")


def check_report_folder(out: Path) -> None:
    """Refuse a report folder that is a file, or that holds report-named files a demo did not write."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder; pass a folder name for the report (created if "
                         "absent), e.g. --out qualityguide-demo")
    taken = [name for name in REPORT_FILES if (out / name).exists()]
    if taken and not _is_report(out / "results.json"):
        raise InputError(f"--out {out} already holds {', '.join(taken)}, not written by `qualityguide demo`; they "
                         "were left unchanged. Pass --out with a new folder")


def _is_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"scorers", "distortions", "items", "series"} <= data.keys()


def check_photo_size(size: object) -> int:
    """``size`` as an int if it is a positive whole number of pixels (the photographs' short side)."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise InputError(f"--size {size!r}: the photographs' short side must be a positive whole number of pixels, "
                         "e.g. --size 384")
    return int(size)


def run_demo(out: str | Path = "qualityguide-demo", scorers: list[str] | None = None, size: int = 384,
             progress: bool = True, weights: dict[str, str] | None = None) -> dict:
    """Score the distortion series with each scorer, write the report folder, return the results.

    Args:
        out: the report folder (created; a file, or a folder holding report-named files from elsewhere, is refused).
        scorers: scorer specs (default :data:`DEFAULT_SCORER`).
        size: short side of the photographs, px; at least every scorer's ``min_side`` (use ``SPEC@N`` to score at
            another size).
        weights: ``{spec: file}`` for scorers that take a weights file.

    Everything is checked and scored before the folder is created, so a refused run leaves nothing behind.
    """
    from tqdm import tqdm

    out = Path(out)
    size = check_photo_size(size)
    check_report_folder(out)
    specs = scorers or [DEFAULT_SCORER]
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(specs))
    if unknown:
        raise InputError(f"weights given for {', '.join(unknown)}, which is not among the scorers "
                         f"({', '.join(specs)}); name one of those")
    models: list[QualityScorer] = [load_scorer(spec, weights=weights.get(spec)) for spec in specs]
    for model in models:
        if size < model.min_side:
            raise InputError(f"--size {size} is below {model.name}'s minimum side of {model.min_side} px; use --size "
                             f"{model.min_side} or more, or score resized photographs with --scorer "
                             f"{model.name}{SIZE_SEP}{model.min_side}")
    items = build_series(size)
    for item in tqdm(items, desc="demo", unit="img", disable=not progress):
        x = load_image(item["image"])[None]
        with torch.no_grad():
            for model in models:
                score, native = model.score_with_native(x)  # validated, as any scoring is
                item[model.name] = float(score[0])
                item[f"{model.name} (native)"] = float(native[0])
    series = _series_checks(items, [m.name for m in models])
    result = {"scorers": [{"name": m.name, "native_lower_better": m.native_lower_better,
                           "source": getattr(m, "source", "")} for m in models],
              "distortions": {k: list(v) for k, v in DISTORTIONS.items()},
              "items": [{k: v for k, v in item.items() if k != "image"} for item in items],
              "series": series}
    table = format_table(items, series, models[0].name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    _write_csv(out / "results.csv", result["items"], [m.name for m in models])
    (out / "report.md").write_text(f"# qualityguide demo\n\nScores by `{models[0].name}` (higher is better).\n\n"
                                   f"{table}\n\n![contact sheet](contact_sheet.png)\n")
    contact_sheet(items, models[0].name).save(out / "contact_sheet.png")
    result["table"] = table
    return result


def _series_checks(items: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for photo in dict.fromkeys(i["photo"] for i in items):
        for kind in DISTORTIONS:
            chain = sorted((i for i in items if i["photo"] == photo and i["distortion"] == kind), key=lambda i: i["level"])
            row = {"photo": photo, "distortion": kind}
            for name in names:
                scores = [i[name] for i in chain]
                row[name] = {"scores": scores, "monotone": all(a > b for a, b in zip(scores, scores[1:])),
                             "kendall_tau": krcc(scores, [-i["level"] for i in chain])}
            rows.append(row)
    return rows


def format_table(items: list[dict], series: list[dict], name: str) -> str:
    """Markdown table: one row per (photo, distortion), scores from clean to strongest, and the order check."""
    header = "| photo | distortion | clean | mild | medium | strong | ranked correctly |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in series:
        check = row[name]
        cells = " | ".join(f"{s:.2f}" for s in check["scores"])
        verdict = "yes" if check["monotone"] else f"no (tau {check['kendall_tau']:.2f})"
        lines.append(f"| {row['photo']} | {row['distortion']} | {cells} | {verdict} |")
    good = sum(r[name]["monotone"] for r in series)
    lines.append("")
    lines.append(f"{good}/{len(series)} series ranked clean > mild > medium > strong by {name}.")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict], names: list[str]) -> None:
    import csv

    fields = ["photo", "distortion", "level", "setting"] + [c for n in names for c in (n, f"{n} (native)")]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def contact_sheet(items: list[dict], name: str, thumb: int = 160) -> Image.Image:
    """Grid of thumbnails: one row per (photo, distortion), clean to strong, each labelled with its score."""
    rows = [sorted(g, key=lambda i: i["level"]) for g in _group(items)]
    cells = [item["image"].copy() for chain in rows for item in chain]
    for cell in cells:
        cell.thumbnail((thumb, thumb))
    return make_grid(cells, columns=len(rows[0]), background="white",
                     captions=[f"L{item['level']}  {item[name]:.2f}" for chain in rows for item in chain],
                     row_labels=[f"{chain[0]['photo']}\n{chain[0]['distortion']}" for chain in rows])


def _group(items: list[dict]):
    keys = dict.fromkeys((i["photo"], i["distortion"]) for i in items)
    for key in keys:
        yield [i for i in items if (i["photo"], i["distortion"]) == key]
