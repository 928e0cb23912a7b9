"""Retrieval evaluation: every video and every caption encoded once, on every process, in order.

Each process encodes its contiguous block of the videos and of the captions (no padding, so no
duplicates); the blocks are gathered in rank order, which is dataset order, and checked against
the batches' dataset indices. Metrics are computed on the gathered features (identically on
every process) with the multi-caption protocol: every caption is a query, its video the target.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch

from .. import distributed
from ..data.loader import DevicePrefetcher, build_eval_loader
from ..logging_utils import get_logger
from ..metrics import evaluate_retrieval
from .precision import autocast

LOGGER = get_logger("evaluate")
PROTOCOL = "multi-caption: every caption is a query, its video the target"
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")


@torch.no_grad()
def encode_in_order(encode: Callable[[dict], torch.Tensor], loader, expected: int, device: torch.device,
                    desc: str) -> torch.Tensor:
    """Features [expected, P] of the whole dataset behind ``loader`` (every rank's block), in order.

    ``encode(batch)`` gets each batch with its model inputs
    (:data:`clipvip.data.loader.MODEL_INPUTS`) already on ``device``; the batches carry their
    dataset ``indices``.
    """
    feats, indices = [], []
    show = distributed.get_env().is_main
    from tqdm.auto import tqdm

    # The next batch's inputs travel to the GPU while this one is encoded; the indices stay on the
    # host (reading a device tensor there would wait for the encoding) and travel once at the end.
    batches = DevicePrefetcher(loader, device)
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(batches, total=total, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
        feats.append(encode(batch).float())
        indices.append(batch["indices"])
    local = torch.cat(feats) if feats else torch.zeros(0, 0, device=device)
    local_indices = (torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)).to(device)
    gathered_indices = distributed.all_gather_variable(local_indices)
    # A rank with an empty block (more ranks than items) has no feature width: learn it from the others.
    width = int(distributed.all_gather_variable(torch.tensor([local.shape[1]], device=device)).max())
    if local.shape[1] != width:
        local = local.new_zeros((0, width))
    gathered = distributed.all_gather_variable(local)
    if gathered.shape[0] != expected or not torch.equal(gathered_indices.cpu(), torch.arange(expected)):
        raise RuntimeError(f"{desc}: gathered {gathered.shape[0]} features for {expected} items out of order")
    return gathered


def encode_retrieval_set(model, dataset, cfg, precision: str, device: torch.device,
                         video_workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(videos [n_videos, P], texts [n_texts, P])``: every video and caption of ``dataset``, in order.

    ``video_workers``: loader workers for the videos (default the config's ``n_workers``).
    """
    device_type = device.type

    def encode_videos(batch):  # inputs already on the device (encode_in_order)
        with autocast(precision, device_type):
            return model.encode_video(batch["video"])

    def encode_texts(batch):
        with autocast(precision, device_type):
            return model.encode_text(batch["text_input_ids"], batch["text_input_mask"])

    video_loader = build_eval_loader(dataset.video_view(), cfg, n_workers=video_workers, persistent_workers=False)
    videos = encode_in_order(encode_videos, video_loader, len(dataset.videos), device, f"{dataset.name} videos")
    texts = encode_in_order(encode_texts, build_eval_loader(dataset.text_view(), cfg, n_workers=0),
                            len(dataset.texts), device, f"{dataset.name} texts")
    return videos, texts


def evaluate_retrieval_set(model, dataset, cfg, precision: str, device: torch.device) -> dict:
    """The eval block of one retrieval dataset (see :func:`evaluate_all`)."""
    videos, texts = encode_retrieval_set(model, dataset, cfg, precision, device)
    metrics = evaluate_retrieval(texts, videos, dataset.text_to_video())
    return {"protocol": PROTOCOL, "n_videos": len(dataset.videos), "n_texts": len(dataset.texts),
            "skipped_videos": list(dataset.skipped_clip_ids), **{d: metrics[d] for d in DIRECTIONS}}


def evaluate_all(model, datasets: list, cfg, precision: str, device: torch.device) -> dict:
    """``{dataset name: eval block}`` for every evaluation dataset; ``model`` is put in eval mode."""
    model.eval()
    results = {}
    for dataset in datasets:
        results[dataset.name] = block = evaluate_retrieval_set(model, dataset, cfg, precision, device)
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
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path
