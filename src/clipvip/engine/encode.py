"""The one ordered encoder: every item behind a loader -> features, in dataset order.

Evaluation, ``clipvip encode`` and search indexing all encode the same way. The loader is an
ordered, unpadded one (:func:`clipvip.data.loader.build_eval_loader`) over a view of the data:
the videos (:class:`clipvip.data.retrieval_dataset.VideoOnlyView` of a retrieval set or of plain
:class:`~clipvip.data.retrieval_dataset.VideoFiles`, built with ``mark_unreadable=True``) or the
captions (``dataset.text_view()``). A clip that cannot be decoded comes back as a marker, listed in
its batch's ``failed`` entry, and is not encoded; nothing raises in a DataLoader worker.

* :func:`iter_encoded`: this process's batches one after the other, each with its features and its
  failures (a resumable writer stores them as they come: ``clipvip encode``, ``clipvip index``;
  sentences, :class:`~clipvip.data.retrieval_dataset.Sentences`, and search queries too).
* :func:`encode_readable_in_order`: the whole dataset on every process: each rank's block gathered
  in rank order (which is dataset order, checked against the batches' ``indices``), the failures of
  every rank known to every rank (evaluation: each rank drops the same clips).
* :func:`encode_in_order`: the same where an unreadable item is an error (captions).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from clipvip import distributed
from clipvip.data.loader import DevicePrefetcher
from clipvip.errors import DataError


@dataclass
class EncodedBatch:
    """One batch of :func:`iter_encoded`."""

    batch: dict  # the loader's batch (``indices`` [b], ids, ...); its model inputs on the device
    features: torch.Tensor | None  # float [b, P] of the readable items, on the device; None when b == 0
    failed: list[tuple[int, str]]  # (dataset index, reason) of the items that could not be read


def _shows_progress() -> bool:
    # Only the main process draws a bar, and none under TQDM_DISABLE=1 (the demo's runs and logs):
    # read here, since tqdm reads its environment once, when it is imported (by transformers,
    # before a caller such as the demo has set it), and then only for arguments left unset.
    return distributed.get_env().is_main and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")


@torch.no_grad()
def iter_encoded(encode: Callable[[dict], torch.Tensor], loader, device: torch.device, desc: str,
                 progress: bool = True) -> Iterator[EncodedBatch]:
    """``encode(batch)`` of every batch of ``loader`` on this process, in loader order.

    ``encode`` gets each batch with its model inputs (:data:`clipvip.data.loader.MODEL_INPUTS`)
    already on ``device``: the next batch's inputs travel there while this one is encoded. The
    other entries (``indices``, ids, ``failed``) stay on the host, where reading them does not wait
    for the device. A batch of failures only (empty ``indices``) is not encoded. ``progress``:
    a bar named ``desc`` (main process only); off for what takes no time (a search query). It
    counts items (videos, texts), as the summaries after it do, not batches.
    """
    sampler = getattr(loader, "sampler", None)
    total = len(sampler) if hasattr(sampler, "__len__") else None  # this process's items
    with tqdm(total=total, desc=desc, unit=f" {desc.split()[-1]}" if desc else "it", leave=False,
              dynamic_ncols=True, disable=not (progress and _shows_progress())) as bar:
        for batch in DevicePrefetcher(loader, device):
            failed = [(int(i), str(reason)) for i, reason in batch.get("failed", ())]
            features = encode(batch).float() if len(batch["indices"]) else None
            bar.update(len(batch["indices"]) + len(failed))
            yield EncodedBatch(batch, features, failed)


@torch.no_grad()
def encode_readable_in_order(encode: Callable[[dict], torch.Tensor], loader, expected: int, device: torch.device,
                             desc: str) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    """``(features [expected - F, P], failed)`` of the dataset behind ``loader``, in dataset order.

    Every rank encodes its block (:func:`iter_encoded`). ``failed`` comes back with every rank's F
    failures in dataset order, the same list on every rank, and the features are those of the
    other items in dataset order, so dropping the failed indices from the dataset leaves both
    aligned.
    """
    feats, indices, failed = [], [], []
    for encoded in iter_encoded(encode, loader, device, desc):
        failed.extend(encoded.failed)
        if encoded.features is not None:
            feats.append(encoded.features)
            indices.append(encoded.batch["indices"])
    local = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    # The indices travel to the device once, at the end.
    local_indices = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)).to(device)
    gathered_indices = distributed.all_gather_variable(local_indices)
    # A rank with an empty block (more ranks than items, or every item failed) has no feature
    # width: learn it from the others.
    width = int(distributed.all_gather_variable(torch.tensor([local.shape[1]], device=device)).max())
    if local.shape[1] != width:
        local = local.new_zeros((0, width))
    gathered = distributed.all_gather_variable(local)
    # A few (index, reason) pairs: the object collective's pickling costs nothing here. Rank
    # order is dataset order, as for the features.
    failed = [f for part in distributed.gather_objects(sorted(failed)) for f in part]
    dropped = {i for i, _ in failed}
    readable = torch.tensor([i for i in range(expected) if i not in dropped], dtype=torch.long)
    if (len(dropped) != len(failed) or gathered.shape[0] != readable.numel()
            or not torch.equal(gathered_indices.cpu(), readable)):
        raise RuntimeError(f"{desc}: gathered {gathered.shape[0]} features and {len(failed)} failures "
                           f"for {expected} items out of order")
    return gathered, failed


@torch.no_grad()
def encode_in_order(encode: Callable[[dict], torch.Tensor], loader, expected: int, device: torch.device,
                    desc: str) -> torch.Tensor:
    """Features [expected, P] of the whole dataset behind ``loader`` (every rank's block), in order.

    An item that could not be read (a batch's ``failed`` entry) is an error here;
    :func:`encode_readable_in_order` leaves such items out instead.
    """
    features, failed = encode_readable_in_order(encode, loader, expected, device, desc)
    if failed:
        index, reason = failed[0]
        raise DataError(f"{desc}: {len(failed)} of {expected} items could not be read (first: #{index}: {reason})")
    return features
