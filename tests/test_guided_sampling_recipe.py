"""recipes/guided_sampling.py's prompt file: a binary or non-UTF-8 file is refused in one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qualityguide.errors import InputError
from qualityguide.guidance.runner import read_prompts

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "guided_sampling.py"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01"


def test_read_prompts_names_a_binary_file_and_the_encoding(tmp_path):
    (tmp_path / "ok.txt").write_text("# comment\n a fox \n\ncafé\n", encoding="utf-8")
    assert read_prompts(tmp_path / "ok.txt") == ["a fox", "café"]
    (tmp_path / "image.png").write_bytes(PNG)
    with pytest.raises(InputError, match=r"prompt file .*image\.png is not UTF-8 text \(byte 0 .*binary"):
        read_prompts(tmp_path / "image.png")
    (tmp_path / "utf16.txt").write_text("a fox\n", encoding="utf-16-le")  # valid UTF-8 bytes, with NULs
    with pytest.raises(InputError, match=r"utf16\.txt holds NUL bytes.*UTF-8 text"):
        read_prompts(tmp_path / "utf16.txt")


def test_the_recipe_exits_2_with_one_line_for_a_binary_prompts_file(tmp_path):
    (tmp_path / "prompts.png").write_bytes(PNG)
    result = subprocess.run([sys.executable, str(RECIPE), "--model", "tiny:sd", "--prompts",
                             str(tmp_path / "prompts.png"), "--scorer", "niqe-embedded@192", "--scale", "0.1",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "prompts.png is not UTF-8 text" in lines[0] and "one prompt per line" in lines[0]


def test_both_recipes_read_a_prompt_file_by_one_rule(tmp_path):
    """Guided sampling and ACPO's self samples read the same file the same way: a Windows byte-order mark is not
    part of the first prompt, `#` lines are comments, an absurd line is refused by its number."""
    from qualityguide.files import MAX_PROMPT_CHARS
    from qualityguide.train.self_samples import read_prompts as acpo_read_prompts

    path = tmp_path / "p.txt"
    path.write_text("# portraits\n a fox \n\n#2 skipped\ncafé\n", encoding="utf-8-sig")  # starts with a BOM
    assert read_prompts(path) == acpo_read_prompts(path) == ["a fox", "café"]
    path.write_text("a fox\n" + "y" * (MAX_PROMPT_CHARS + 1) + "\n", encoding="utf-8")
    for read in (read_prompts, acpo_read_prompts):
        with pytest.raises(InputError, match=rf"p\.txt, line 2: {MAX_PROMPT_CHARS + 1} characters"):
            read(path)


def test_acpo_reads_the_repositorys_prompt_file_without_its_comment_line():
    """The README trains ACPO on evals/prompts.txt, whose first line is a `#` comment, not a prompt."""
    from qualityguide.train.self_samples import read_prompts as acpo_read_prompts

    prompts = acpo_read_prompts(Path(__file__).resolve().parents[1] / "evals" / "prompts.txt")
    assert len(prompts) == 50 and not any(p.startswith("#") for p in prompts)
    assert prompts[0] == "a red fox sitting in fresh snow at dawn"
