"""Work sharded over ``accelerate launch`` processes, shared by LGDM extraction and the recipes."""

from __future__ import annotations

from typing import Sequence


def process_state(cpu: bool = False):
    """accelerate's per-process state; CPU processes (``--device cpu`` or ``ACCELERATE_USE_CPU=1``) join a gloo
    group when launched with several processes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def split_for_process(state, items: Sequence) -> list:
    """This process's contiguous share of ``items`` (accelerate's ``split_between_processes``).

    No padding: a process with nothing left gets an empty list rather than a repeat of the last item,
    so no image or prompt is done twice. One process gets everything.
    """
    with state.split_between_processes(list(items)) as mine:
        return list(mine)
