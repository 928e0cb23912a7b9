"""Retrieval evaluation: every video and every caption encoded once, on every process, in order.

Each process encodes its contiguous block of the videos and of the captions (no padding, so no
duplicates); the blocks are gathered in rank order, which is dataset order, and checked against
the batches' dataset indices (:mod:`clipvip.engine.encode`). Metrics are computed on the gathered
features (identically on every process) with the multi-caption protocol: every caption is a
query, its video the target.

A video that passes the up-front scan but cannot be decoded (frame data cut behind an intact
header) does not stop the evaluation: the loader hands it back as a marker, every rank learns
every rank's failures, and each drops the same videos, with their captions, from its copy of the
dataset before the captions are encoded. The metrics then score exactly what the dataset without
those clips would score, and the results block lists them (``skipped_videos``, ``skip_reasons``).

Every block records what its numbers mean (``protocol``, :func:`protocol`): the query rule, that
DSL is transductive, and whether the set is the one that chooses ``model_best.pt``. A query's
plain rank depends on its own scores alone: neither the order of the test items nor another
video's missing captions change it (:mod:`clipvip.metrics`, tests/test_eval_protocol.py).
"""
from __future__ import annotations

import os
from typing import Collection

import torch

from clipvip import distributed
from clipvip.data.loader import LoaderSettings, build_eval_loader
from clipvip.engine.encode import encode_in_order, encode_readable_in_order
from clipvip.logging_utils import get_logger
from clipvip.metrics import evaluate_retrieval
from clipvip.model import fast_paths
from clipvip.precision import autocast, autocast_dtype
from clipvip.files import atomic_write_json

LOGGER = get_logger("evaluate")
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")
# What the numbers of an eval block mean, recorded beside them (its "protocol"); docs/leaderboards.md.
QUERIES = ("multi-caption: every caption is a text-to-video query, its video the target; every test video is a "
           "candidate, every video with a caption a video-to-text query")
DSL_NOTE = "transductive: a DSL score is normalised over all the test queries"


def protocol(selected_on_this_set: bool) -> dict:
    """The ``protocol`` entry of an eval block. ``selected_on_this_set``: ``model_best.pt`` is chosen
    by this set's text-to-video R@1 (the first set validated), so its scores here are not held out."""
    return {"queries": QUERIES, "dsl": DSL_NOTE, "selected_on_this_set": bool(selected_on_this_set)}


def encode_retrieval_set(model, dataset, loader: LoaderSettings, precision: str, device: torch.device,
                         video_workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(videos [n_videos, P], texts [n_texts, P])``: every video and caption of ``dataset``, in order.

    A video that cannot be decoded is dropped from ``dataset`` with its captions
    (:meth:`~clipvip.data.retrieval_dataset.VideoRetrievalDataset.drop_videos`, the same on every rank)
    before the captions are encoded, so ``n_videos``, ``n_texts`` and ``dataset.text_to_video()``
    describe what comes back. ``loader``: batch size, workers and seed of the evaluation loaders;
    ``video_workers``: loader workers for the videos (default ``loader.n_workers``).
    """
    device_type = device.type
    env = distributed.get_env()
    shard = {"rank": env.rank, "world_size": env.world_size}

    transform = dataset.reader.transform

    def encode_videos(batch):  # inputs already on the device (clipvip.engine.encode): uint8 frames made input there
        video = transform(batch["video"])  # (B, T, 3, h, w), float32 outside autocast
        with autocast(precision, device_type):
            return model.encode_video(video)

    def encode_texts(batch):
        with autocast(precision, device_type):
            return model.encode_text(batch["text_input_ids"], batch["text_input_mask"])

    # Marker items instead of exceptions: a DataLoader worker that raised would end the evaluation.
    video_loader = build_eval_loader(dataset.video_view(mark_unreadable=True), loader, **shard,
                                     n_workers=video_workers, persistent_workers=False)
    # bf16/fp16: the weights cast once for the whole set, not per batch (clipvip.model.low_precision).
    with fast_paths.weight_copies(model, autocast_dtype(precision)):
        videos, failed = encode_readable_in_order(encode_videos, video_loader, len(dataset.videos), device,
                                                  f"{dataset.name} videos")
        if failed:  # every rank holds the same list: every rank's copy of the dataset shrinks alike
            dataset.drop_videos(dict(failed), log=env.is_main)
        texts = encode_in_order(encode_texts, build_eval_loader(dataset.text_view(), loader, **shard, n_workers=0),
                                len(dataset.texts), device, f"{dataset.name} texts")
    return videos, texts


def evaluate_retrieval_set(model, dataset, loader: LoaderSettings, precision: str, device: torch.device,
                           selected_on_this_set: bool = False) -> dict:
    """The eval block of one retrieval dataset (see :func:`evaluate_all`).

    ``n_videos``/``n_texts`` count what was scored; ``skipped_videos`` lists the clip ids left out
    (unreadable up front or while encoding) and ``skip_reasons`` says why, per id.
    """
    videos, texts = encode_retrieval_set(model, dataset, loader, precision, device)
    metrics = evaluate_retrieval(texts, videos, dataset.text_to_video())
    return {"protocol": protocol(selected_on_this_set), "n_videos": len(dataset.videos), "n_texts": len(dataset.texts),
            "skipped_videos": dataset.skipped_clip_ids, "skip_reasons": dict(dataset.skip_reasons),
            **{d: metrics[d] for d in DIRECTIONS}}


def evaluate_all(model, datasets: list, loader: LoaderSettings, precision: str, device: torch.device,
                 selected_on: Collection[str] = ()) -> dict:
    """``{dataset name: eval block}`` for every evaluation dataset; ``model`` is put in eval mode.

    ``loader``: the evaluation loaders' batch size (``test_batch_size``), workers and seed.
    ``selected_on``: the names of the sets that choose ``model_best.pt`` (:func:`protocol`).
    """
    model.eval()
    results = {}
    for dataset in datasets:
        results[dataset.name] = block = evaluate_retrieval_set(model, dataset, loader, precision, device,
                                                               dataset.name in selected_on)
        LOGGER.info("[%s] t2v R@1 %.2f R@5 %.2f R@10 %.2f | v2t R@1 %.2f | DSL t2v R@1 %.2f",
                    dataset.name, block["t2v"]["R1"], block["t2v"]["R5"], block["t2v"]["R10"],
                    block["v2t"]["R1"], block["t2v_dsl"]["R1"])
    return results


def format_results_table(results: dict) -> str:
    """A plain-text table: one row per dataset and direction."""
    header = f"{'dataset':<24} {'direction':<9} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'MdR':>7} {'MnR':>8}"
    lines = [header, "-" * len(header)]
    for name, block in results.items():
        for direction in DIRECTIONS:
            m = block[direction]
            lines.append(f"{name:<24} {direction:<9} {m['R1']:7.2f} {m['R5']:7.2f} {m['R10']:7.2f} "
                         f"{m['MdR']:7.1f} {m['MnR']:8.2f}")
        extra = f"{block['n_videos']} videos, {block['n_texts']} texts"
        if block["skipped_videos"]:
            extra += f", {len(block['skipped_videos'])} unreadable videos left out"
        if block["protocol"]["selected_on_this_set"]:
            extra += "; model_best.pt is chosen on this set: not held out"
        lines.append(f"{'':<24} {extra}")
    return "\n".join(lines)


def scored_by(results: dict, checkpoint: str | None, step: int | None) -> dict:
    """``results`` with every eval block naming the weights it scored: ``checkpoint`` (a path as
    given, None where no file holds them) and the training ``step`` they are from (None: unknown)."""
    return {name: {**block, "checkpoint": checkpoint, "step": step} for name, block in results.items()}


def scored_label(results: dict) -> str | None:
    """``run/ckpt/model_best.pt (step 12)``: what the first block of ``results`` says it scored;
    None where it says nothing (random weights, or results written before blocks said it)."""
    block = next(iter(results.values()), {})
    checkpoint, step = block.get("checkpoint"), block.get("step")
    if checkpoint is None and step is None:
        return None
    checkpoint = checkpoint or "the weights in the training state (no model file kept)"
    return checkpoint if step is None else f"{checkpoint} (step {step})"


def write_results(results: dict, output_dir: str, name: str = "eval_results.json") -> str:
    path = os.path.join(output_dir, name)
    atomic_write_json(path, results, indent=2)
    return path
