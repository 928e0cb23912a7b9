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
"""
from __future__ import annotations

import os

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
PROTOCOL = "multi-caption: every caption is a query, its video the target"
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")


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

    def encode_videos(batch):  # inputs already on the device (clipvip.engine.encode)
        with autocast(precision, device_type):
            return model.encode_video(batch["video"])

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


def evaluate_retrieval_set(model, dataset, loader: LoaderSettings, precision: str, device: torch.device) -> dict:
    """The eval block of one retrieval dataset (see :func:`evaluate_all`).

    ``n_videos``/``n_texts`` count what was scored; ``skipped_videos`` lists the clip ids left out
    (no caption, unreadable up front or while encoding) and ``skip_reasons`` says why, per id.
    """
    videos, texts = encode_retrieval_set(model, dataset, loader, precision, device)
    metrics = evaluate_retrieval(texts, videos, dataset.text_to_video())
    return {"protocol": PROTOCOL, "n_videos": len(dataset.videos), "n_texts": len(dataset.texts),
            "skipped_videos": dataset.skipped_clip_ids, "skip_reasons": dict(dataset.skip_reasons),
            **{d: metrics[d] for d in DIRECTIONS}}


def evaluate_all(model, datasets: list, loader: LoaderSettings, precision: str, device: torch.device) -> dict:
    """``{dataset name: eval block}`` for every evaluation dataset; ``model`` is put in eval mode.

    ``loader``: the evaluation loaders' batch size (``test_batch_size``), workers and seed.
    """
    model.eval()
    results = {}
    for dataset in datasets:
        results[dataset.name] = block = evaluate_retrieval_set(model, dataset, loader, precision, device)
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
        lines.append(f"{'':<24} {extra}")
    return "\n".join(lines)


def write_results(results: dict, output_dir: str, name: str = "eval_results.json") -> str:
    path = os.path.join(output_dir, name)
    atomic_write_json(path, results, indent=2)
    return path
