"""Training samples that cannot be used: warned about once per run, counted, listed at the end.

Every training dataset kind replaces a sample it cannot use (an unreadable or missing video file,
an empty caption, a key missing from the LMDB, a corrupt shard member, the rest of a truncated
shard) and says so in what it returns: ``item["bad_samples"]`` / ``batch["bad_samples"]``, a list
of :class:`BadSample` with one entry per skip, present only when something was skipped (beside
``num_skipped``, their count). The list travels with the batch because the DataLoader workers that
meet the samples are restarted every epoch (shard streams) or run apart from each other: none of
them can know what another has already reported.

The process that trains hands every batch to its rank's :class:`BadSampleLog`: the first skip of a
sample is a warning (naming the rank when there are several), later ones are only counted. Rank 0
merges every rank's log (:func:`merge`) into ``log/bad_samples.json`` (:data:`FILE_NAME`; a list of
``{"dataset", "sample", "reason", "skips", "ranks"}``, sorted by dataset and sample) and lists them
in the log at the end of the run.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, NamedTuple, Sequence

from clipvip.files import atomic_write_json
from clipvip.logging_utils import get_logger

LOGGER = get_logger(__name__)

KEY = "bad_samples"  # the item's / batch's list of BadSample
FILE_NAME = "bad_samples.json"  # in the run's log/ folder
LISTED_IN_LOG = 20  # entries the end-of-run log lists; the file holds them all
FIELDS = ("dataset", "sample", "reason", "skips", "ranks")


class BadSample(NamedTuple):
    """One skip: the dataset's name, the sample (a file, ``shard.tar:KEY``, or a shard whose rest
    is unreadable) and why it could not be used."""

    dataset: str
    sample: str
    reason: str


def carry(target: dict, bad: Iterable[BadSample]) -> dict:
    """``target`` (an item or a batch) with ``bad`` as its ``bad_samples``; the key only when there are any."""
    bad = list(bad)
    if bad:
        target[KEY] = bad
    return target


def carry_from_items(batch: dict, items: Iterable[dict]) -> dict:
    """A collator's share: the batch carries its items' bad samples, in order."""
    return carry(batch, [bad for item in items for bad in item.get(KEY, ())])


class BadSampleLog:
    """One rank's bad training samples: the first skip of each is a warning, every skip is counted.

    ``known``: the rows (:func:`merge`) of an earlier part of the same run (before a resume); their
    samples are counted again but not warned about again.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, known: Iterable[dict] = ()):
        self.prefix = f"rank {rank}: " if world_size > 1 else ""
        self.skips: dict[tuple[str, str], list] = {}  # (dataset, sample) -> [reason, skips]
        self.known = {(row["dataset"], row["sample"]) for row in known}

    def add(self, samples: Iterable[BadSample]) -> None:
        for dataset, sample, reason in samples:
            entry = self.skips.get((dataset, sample))
            if entry is not None:
                entry[1] += 1
                continue
            self.skips[(dataset, sample)] = [reason, 1]
            if (dataset, sample) not in self.known:
                LOGGER.warning("%s[%s] skipping %s (%s); another sample takes its place, and its later skips are "
                               "counted, not logged", self.prefix, dataset, sample, reason)

    def entries(self) -> list[tuple[str, str, str, int]]:
        """(dataset, sample, reason, skips) of this rank, picklable for a gather across ranks."""
        return [(dataset, sample, reason, skips) for (dataset, sample), (reason, skips) in self.skips.items()]


def merge(per_rank: Sequence[Sequence[tuple[str, str, str, int]]], earlier: Sequence[dict] = ()) -> list[dict]:
    """One row per sample of every rank's :meth:`BadSampleLog.entries` (index = rank), added to the
    rows of an earlier part of the run: skips summed, ranks joined, the first reason kept."""
    rows = {(r["dataset"], r["sample"]): {**r, "ranks": list(r["ranks"])} for r in earlier}
    for rank, entries in enumerate(per_rank):
        for dataset, sample, reason, skips in entries:
            row = rows.setdefault((dataset, sample), {"dataset": dataset, "sample": sample, "reason": reason,
                                                      "skips": 0, "ranks": []})
            row["skips"] += skips
            if rank not in row["ranks"]:
                row["ranks"] = sorted(row["ranks"] + [rank])
    return [rows[key] for key in sorted(rows)]


def write(path: str, rows: Sequence[dict]) -> None:
    atomic_write_json(path, list(rows), indent=1)


def read(path: str) -> list[dict]:
    """The rows of a ``bad_samples.json``; none when there is no file, or one this code did not write."""
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        if isinstance(rows, list) and all(isinstance(r, dict) and set(r) == set(FIELDS) for r in rows):
            return rows
        problem = "not a list of " + "/".join(FIELDS) + " objects"
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    LOGGER.warning("%s: %s; its earlier bad samples are not carried into this run's list", path, problem)
    return []


def carried_over(path: str, resumed: bool, is_main: bool) -> list[dict]:
    """The rows of the part of the run before a resume; none for a fresh run, whose main process
    also removes a previous run's file (it would list samples this run never met)."""
    if resumed:
        return read(path)
    if is_main and os.path.isfile(path):
        os.remove(path)
    return []


def describe(rows: Sequence[dict], where: str, show_ranks: bool = False) -> str:
    """The end-of-run lines: how many bad samples, where the list is, the first of them (with the
    ranks that met each, for a run of several processes)."""
    skips = sum(r["skips"] for r in rows)
    lines = [f"{len(rows)} bad training sample{'s' if len(rows) != 1 else ''} (skipped {skips} time"
             f"{'s' if skips != 1 else ''} in all), listed in {where}; repair or remove them:"]
    for r in rows[:LISTED_IN_LOG]:
        ranks = f" on rank{'s' if len(r['ranks']) > 1 else ''} {','.join(map(str, r['ranks']))}" if show_ranks else ""
        lines.append(f"  [{r['dataset']}] {r['sample']}: {r['reason']} (skipped {r['skips']}x{ranks})")
    if len(rows) > LISTED_IN_LOG:
        lines.append(f"  ... and {len(rows) - LISTED_IN_LOG} more in {where}")
    return "\n".join(lines)
