"""``score`` and ``label`` over the processes of ``accelerate launch``: one part file per process, merged at the end.

The main process opens the scores CSV (holding its lock for the whole run), merges in any parts an earlier
sharded run left (a killed run's rows are kept, not redone) and lists what is left to score. Every process then
takes its contiguous share of that list (accelerate's ``split_between_processes``, :func:`split_for_process`) and
appends its rows to its own part, ``OUTPUT.parts/rank-K.csv``: a :class:`ScoreFile` like the output itself, flushed
batch by batch, its last row repaired if a kill cut it. When every process is done, the main process merges the
parts into the output with one atomic rewrite, in rank order, so the file holds the rows a single process writes,
in the same order; only then are the parts removed. A kill anywhere loses at most the batches in flight, and
merging twice adds nothing (rows already in the output are skipped).

A plain run (not launched) scores straight into the output and never imports accelerate.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..errors import InputError, QualityGuideError
from ..runtime import launched, process_state, split_for_process
from .scorefile import ScoreFile

R = TypeVar("R")
PART_PREFIX = "rank-"


def parts_folder(output: Path) -> Path:
    """Where the processes of a sharded run keep their parts of ``output``: ``OUTPUT.parts`` beside it."""
    return output.with_name(f"{output.name}.parts")


def part_path(output: Path, rank: int) -> Path:
    return parts_folder(output) / f"{PART_PREFIX}{rank}.csv"


def _rank(part: Path) -> int:
    digits = part.stem[len(PART_PREFIX):]
    return int(digits) if digits.isdigit() else -1


def merge_parts(table: ScoreFile) -> int:
    """Merge the parts of ``table``'s file into it (rank order, one atomic rewrite), then remove them.

    The parts are removed only after the merged file replaced the old one, and rows already in ``table`` are
    skipped, so a kill between the two merges nothing twice on the rerun. Returns the rows added.
    """
    folder = parts_folder(table.output)
    if not folder.is_dir():
        return 0
    parts = sorted((p for p in folder.glob(f"{PART_PREFIX}*.csv") if _rank(p) >= 0), key=_rank)
    rows: list[dict] = []
    for part in parts:  # each is checked as the output is: ours, these settings, a cut last row dropped
        with ScoreFile.open(part, table.settings) as opened:
            rows.extend(opened.rows.values())
    added = table.merge(rows)
    for part in parts:
        part.unlink()
    try:
        folder.rmdir()
    except OSError:  # something else was put there: leave it
        pass
    return added


class Processes:
    """This process among those of one ``accelerate launch`` (build it only when :func:`launched`).

    Args:
        device: where this process scores; CPU processes join a gloo group.
    """

    def __init__(self, device: torch.device):
        self.state = process_state(cpu=device.type == "cpu")

    @property
    def rank(self) -> int:
        return self.state.process_index

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    def agree(self, plan: Callable[[], R]) -> R:
        """``plan()``, run on the main process only, sent to every process. A :class:`QualityGuideError` it raises
        stops every process (the others would otherwise wait for the main one forever)."""
        from accelerate.utils import broadcast_object_list

        box: list = [None, None]  # the plan, or the main process's error message
        error = None
        if self.is_main:
            try:
                box[0] = plan()
            except QualityGuideError as exc:
                error, box[1] = exc, str(exc)
        broadcast_object_list(box)
        if error is not None:
            raise error
        if box[1] is not None:
            raise QualityGuideError(f"process {self.rank}: stopped, as the main process refused the run (its own "
                                    "error line says why); fix that and rerun")
        return box[0]

    def gather(self, value: R) -> list[R]:
        """Every process's ``value`` in rank order (on every process)."""
        from accelerate.utils import gather_object

        return gather_object([value])


def processes_for(device: torch.device) -> Processes | None:
    """The processes to shard over when launched, else None (one process, accelerate not imported)."""
    return Processes(device) if launched() else None


def process_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's own GPU (``LOCAL_RANK``) under ``accelerate launch``; a
    process without one is refused (several processes on one GPU would each hold a copy of the scorer)."""
    if not (launched() and device.type == "cuda" and device.index is None):
        return device
    rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if rank >= count:
        raise InputError(f"--device cuda under accelerate launch gives each process its own GPU, but process {rank} "
                         f"has none: this machine has {count} GPU(s); launch at most {count} process(es) "
                         "(--num_processes), or pass --device cpu")
    return torch.device("cuda", rank)


def score_into(output: str | os.PathLike, settings: str, prepare: Callable[[ScoreFile], list],
               work: Callable[[ScoreFile, list, bool], R],
               processes: Processes | None) -> tuple[dict[str, dict] | None, list[R]]:
    """Open the scores CSV ``output``, merge in parts left by an earlier sharded run, list the work with
    ``prepare(table)``, and do it with ``work(file, todo, is_main)``: into the output itself in one process, or each
    process's share into its own part, merged into the output once every process is done.

    Args:
        output: the scores CSV (locked by the main process for the whole run), as the user wrote it.
        settings: what its values depend on (:func:`~qualityguide.cli.scorefile.scorer_settings`).
        prepare: on the main process, with the output open: what is left to score (a list that can be pickled);
            it may rewrite the output first (``retry_failed``).
        work: appends the rows of the items it is given to the file it is given; what it returns is gathered.
        processes: None for one process.

    Returns:
        The output's rows after the run (None off the main process), and every process's ``work`` result.
    """
    if processes is None:
        with ScoreFile.open(output, settings) as table:
            merge_parts(table)
            result = work(table, prepare(table), True)
            return dict(table.rows), [result]
    with ExitStack() as stack:
        opened: list[ScoreFile] = []

        def plan() -> list:
            opened.append(stack.enter_context(ScoreFile.open(output, settings)))
            merge_parts(opened[0])
            return prepare(opened[0])

        mine = split_for_process(processes.state, processes.agree(plan))
        with ScoreFile.open(part_path(Path(output), processes.rank), settings) as part:
            result = work(part, mine, processes.is_main)
        processes.state.wait_for_everyone()
        results = processes.gather(result)
        if not processes.is_main:
            return None, results
        merge_parts(opened[0])
        return dict(opened[0].rows), results
