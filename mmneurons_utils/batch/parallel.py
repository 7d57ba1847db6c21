"""Data-parallel batch runs: ``accelerate launch … -m mmneurons_utils.cli find …``.

Under ``accelerate launch`` (or ``torchrun``) with ``P > 1`` processes, ``mmneurons find``:

1. the main process plans: the images of the run not yet done — neither in ``--out`` nor in a
   part file left beside it by an interrupted parallel run — and broadcasts that list (in
   image order) to every process;
2. accelerate's ``PartialState.split_between_processes`` gives each process a contiguous
   share of it; each identifies its share batch by batch into its own part file,
   ``<out>.part-<rank>-of-<P>.parquet`` beside ``--out`` (a :class:`~.results.ResultFile`:
   rewritten atomically after every batch, resumable). Every image keeps its index in the
   whole run, which is what ``find_neurons(image_indices=…)`` writes and keys the random
   draws with, so a process computes exactly what one process would for that image;
3. after ``wait_for_everyone`` the main process merges every part file into ``--out`` in
   one atomic write — the rows already there first, then the new images' rows in image
   order, as one process appends them — and deletes the parts.

``--out`` is only ever written by that merge, so it holds the old complete file or the new
one: a run killed before the merge leaves the part files (the images they hold are not
identified again) and an untouched ``--out``. A finished output is not recomputed: a rerun
finds nothing to do and does not rewrite it. A one-process ``mmneurons find`` that finds part
files beside its ``--out`` goes through the same path (one part, then the merge), so a
parallel run can be finished on one device.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from ..store.results import ResultFile, done_images

# how long the processes that finished first wait for the others at the merge (NCCL's
# default, 10 minutes, is less than the imbalance a long run on many GPUs can have)
BARRIER_TIMEOUT_S = 24 * 3600
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher (``accelerate launch``, ``torchrun``, ``mpirun``) started:
    1 for a plain ``python -m mmneurons_utils.cli``. Reads the environment only."""
    sizes = []
    for name in _WORLD_SIZE_VARIABLES:
        text = os.environ.get(name, "").strip()
        if text:
            try:
                sizes.append(int(text))
            except ValueError:
                raise ValueError(f"environment variable {name}={text!r} is not a number of "
                                 "processes") from None
    return max(sizes, default=1)


def launched_state():
    """accelerate's ``PartialState`` when launched with several processes, else ``None`` (and
    accelerate is not imported). Processes without a GPU (``accelerate launch --cpu``, or no
    accelerator on the machine) join over gloo."""
    if launched_processes() <= 1:
        return None
    from datetime import timedelta

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or PartialState.default_device.fget(None).type in ("cpu", "mps")
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
    return state if state.num_processes > 1 else None


def process_device(state, device: str | None) -> str | None:
    """The device of this process: ``--device`` as given, except that none (the default) is
    accelerate's device for the process (``cuda:<local rank>``, or ``cpu`` with ``--cpu``) and a
    bare ``cuda`` / ``xpu`` / ``npu`` is that type's device of the local rank."""
    if device is None:
        return "cpu" if state.device.type == "cpu" else str(state.device)
    if device in ("cuda", "xpu", "npu", "mlu", "musa"):
        return f"{device}:{state.local_process_index}"
    return device


def part_path(out: str | Path, rank: int, n_processes: int) -> Path:
    """``<out>.part-<rank>-of-<P>.parquet`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.part-{rank}-of-{n_processes}.parquet")


def part_files(out: str | Path) -> list[Path]:
    """The part files beside ``out`` (of any number of processes), ordered by (P, rank)."""
    out = Path(out)
    pattern = re.compile(re.escape(out.name) + r"\.part-(\d+)-of-(\d+)\.parquet")
    found = []
    for path in out.parent.glob(f"{glob.escape(out.name)}.part-*-of-*.parquet"):
        match = pattern.fullmatch(path.name)
        if match and path.is_file():
            found.append(((int(match[2]), int(match[1])), path))
    return [path for _, path in sorted(found)]


def checked_part_files(out: str | Path) -> list[Path]:
    """:func:`part_files`, each checked to be a readable result file (else a one-line
    ``ValueError`` naming it), so that a foreign file stops a run before any work."""
    parts = part_files(out)
    for path in parts:
        done_images(path)
    return parts


def merge_parts(out: str | Path, names: list[str]) -> int:
    """Merge the part files beside ``out`` into it, atomically, then delete them; returns the
    number of images added.

    The images already in ``out`` keep their rows; each other image finished in a part file
    (the first that has it) adds its rows, in the order of ``names`` (the run's images; one
    not among them goes last), after those already there — the table one process writes.
    """
    import numpy as np
    import pandas as pd

    parts = part_files(out)
    if not parts:
        return 0
    results = ResultFile(out)
    owner: dict[str, int] = {n: -1 for n in results.done}   # image → the part that supplies it
    tables = []
    for number, path in enumerate(parts):
        part = ResultFile(path)
        if part.settings is not None:     # the parts' settings and image hashes go with their rows
            results.expect(part.settings, part.images)
        if len(part.table.columns) and "image_id" not in part.table.columns:
            raise ValueError(f"{path} is not a part file of mmneurons find (no image_id column); "
                             "remove it")
        for name in part.done:
            owner.setdefault(name, number)
        if len(part.table.columns):
            tables.append(part.table[part.table["image_id"].map(owner).eq(number)])
    position = {name: i for i, name in enumerate(names)}
    new = [name for name, number in owner.items() if number >= 0]    # first seen first
    unknown = {name: len(names) + i for i, name in enumerate(n for n in new if n not in position)}
    key = {**position, **unknown}
    new.sort(key=key.__getitem__)
    if new:
        filled = [t for t in tables if len(t)]
        if filled:
            rows = pd.concat(filled, ignore_index=True) if len(filled) > 1 else filled[0]
            order = np.argsort(rows["image_id"].map(key).to_numpy(), kind="stable")
            rows = rows.iloc[order].reset_index(drop=True)
        else:                                  # images without nouns only: no rows, same columns
            rows = results.table.iloc[:0] if len(results.table.columns) else tables[0].iloc[:0]
        results.append(rows, new)
    for path in parts:
        path.unlink(missing_ok=True)
    return len(new)


class PartRun:
    """One process's share of a ``find`` run that goes through part files (see the module doc).

    ``state``: accelerate's ``PartialState`` (one process too: then it is the whole run).
    ``done``: the images already in ``--out`` (read by the main process before anything is
    written). After construction: ``todo`` (the run's image indices to identify, the same in
    every process), ``mine`` (this process's share) and ``part`` (its part file)."""

    def __init__(self, out: str | Path, names: list[str], done, state):
        self.out, self.names, self.state = Path(out), list(names), state
        self.n_processes = state.num_processes
        todo = None
        if state.is_main_process:
            finished = set(done)
            for path in part_files(self.out):
                finished.update(done_images(path))
            todo = [i for i, name in enumerate(self.names) if name not in finished]
        if self.n_processes > 1:
            from accelerate.utils import broadcast_object_list

            todo = broadcast_object_list([todo])[0]
        self.todo: list[int] = todo
        with state.split_between_processes(self.todo) as mine:
            self.mine: list[int] = list(mine)
        self.part = ResultFile(part_path(self.out, state.process_index, self.n_processes))

    def finish(self) -> ResultFile | None:
        """Wait for every process, then (main process) merge the parts into ``--out``: the
        merged :class:`ResultFile` on the main process, ``None`` on the others."""
        state = self.state
        reports = [(state.process_index, len(self.mine))]
        if self.n_processes > 1:
            from accelerate.utils import gather_object

            state.wait_for_everyone()
            reports = gather_object(reports)
        if not state.is_main_process:
            self._leave()                 # wait for the merge, then leave the group together
            return None
        try:
            for rank, count in reports:
                path = part_path(self.out, rank, self.n_processes)
                if count and not path.is_file():
                    raise ValueError(f"process {rank} identified {count} images into {path}, which the "
                                     "main process cannot see; put --out on a filesystem that every "
                                     "machine shares")
            merge_parts(self.out, self.names)
        finally:
            self._leave()
        return ResultFile(self.out)

    def _leave(self) -> None:
        """Every process leaves the process group at the same point: a process that exits while
        another still holds the group open can abort gloo's threads at exit ("terminate called
        without an active exception", seen once in a full test run)."""
        if self.n_processes > 1:
            self.state.wait_for_everyone()
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
