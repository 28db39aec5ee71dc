"""What our entry points (the CLI, the recipes, the evals' ``main``) set up before they import the model stack.

Library use (``import qualityguide``) calls none of this, so it changes no logging and no environment.
"""

from __future__ import annotations

import logging
import os
import warnings

# Packages whose warnings a command-line user cannot act on; library users (import qualityguide) keep them all.
THIRD_PARTY = ("bitsandbytes", "kernels", "diffusers", "transformers", "huggingface_hub")

# bitsandbytes' CPU backend fetches this kernel from the Hugging Face Hub at import on CPUs with AVX512-BF16
# (bitsandbytes/backends/cpu/ops.py); it serves only 4-bit CPU inference, which nothing here runs.
BNB_CPU_KERNEL = "kernels-community/quantization-bitsandbytes"


def keep_bitsandbytes_off_the_hub() -> None:
    """Point the ``kernels`` package's ``LOCAL_KERNELS`` override for bitsandbytes' CPU kernel at an empty path.

    diffusers and peft import bitsandbytes whenever it is installed, quantizing or not, and its import calls
    ``kernels.get_kernel`` for that kernel: online a hub query (publisher check, download), offline two log
    lines. With a local override ``kernels`` looks only at that path, finds no build there and raises, which
    bitsandbytes catches and logs; its other kernels (the 8-bit optimizers on CUDA) are untouched. Must run
    before bitsandbytes is first imported; an override the user set for the same kernel wins.
    """
    current = os.environ.get("LOCAL_KERNELS", "")
    if any(entry.split("=", 1)[0] == BNB_CPU_KERNEL for entry in current.split(":") if entry):
        return
    entry = f"{BNB_CPU_KERNEL}={os.devnull}"
    os.environ["LOCAL_KERNELS"] = f"{current}:{entry}" if current else entry


def quiet_third_party(quiet: bool = False) -> None:
    """Keep stderr for qualityguide's own lines: third-party warnings off (their errors still print).

    Seen here: bitsandbytes, which diffusers and peft import, and the ``kernels`` package it calls log about a
    CPU kernel at import (see :func:`keep_bitsandbytes_off_the_hub`, called here too); diffusers logs
    hub-connection notices for cached hub ids when offline. The Hugging Face libraries read their verbosity
    from the environment when first used (a value the user set wins); bitsandbytes and ``kernels`` log through
    plain ``logging``. Call it first thing in an entry point, before the model stack is imported.

    Args:
        quiet: also drop the progress bars of the model loaders (diffusers' "Loading pipeline components",
            transformers' "Loading weights") and of huggingface_hub's downloads.
    """
    keep_bitsandbytes_off_the_hub()
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(THIRD_PARTY)})(\.|$)")
    if quiet:
        from diffusers.utils import logging as diffusers_logging
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        disable_progress_bars()
