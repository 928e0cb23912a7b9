"""``clipvip convert``: a released or fine-tuned checkpoint -> a Hugging Face model folder.

    python -m clipvip convert --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
        --weights pretrain_clipvip_base_32.pt --out clipvip-b32 [--results eval_results.json] \\
        [--push_to_hub owner/name]

The config says the architecture (``clip_config``, ``clip_vision_additional_config``) and how
evaluation reads a clip (``test_n_clips``, ``test_num_frms``, ``sample_rate``, ``input_res``,
``resize_antialias``, ``max_txt_len``); the folder then loads with
``transformers.AutoModel.from_pretrained`` after ``import clipvip`` (docs/hf.md).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

from clipvip.apps.cli import OVERRIDES_HELP, HelpFormatter, prog_name
from clipvip.config import load_config
from clipvip.engine.checkpoints import BEST_MODEL, checkpoint_step
from clipvip.errors import ClipvipError
from clipvip.hf.convert import convert_checkpoint
from clipvip.hf.hub import push_folder
from clipvip.hf.processing import VideoInputSettings
from clipvip.logging_utils import get_logger
from clipvip.model.clip_vip import VideoSettings
from clipvip.model.factory import resolve_clip_config
from clipvip.tokenizer import build_tokenizer

LOGGER = get_logger("convert")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog_name("convert"), formatter_class=HelpFormatter, allow_abbrev=False,
        description="Write a checkpoint as a Hugging Face model folder: config.json, model.safetensors,\n"
                    "the tokenizer, preprocessor_config.json and a model card README.md (docs/hf.md).",
        epilog=OVERRIDES_HELP)
    p.add_argument("--config", required=True, help="the config the checkpoint was trained or evaluated with")
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="a released CLIP-ViP .pt (clipmodel.* keys) or a checkpoint this project wrote")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--results", metavar="JSON", help="an eval_results.json, shown as a table in the model card")
    p.add_argument("--push_to_hub", metavar="OWNER/NAME", help="then upload the folder to this Hub repository")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: create the repository private")
    return p


def _read_results(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        raise ClipvipError(f"--results {path}: {e}") from None
    if not isinstance(results, dict):
        raise ClipvipError(f"--results {path}: not a JSON object ({{dataset: eval block}})")
    return results


BEST_MODEL_HF = "model_best_hf"


def check_results_match(results: dict, weights: str, step: int | None) -> None:
    """Refuse results that say they score another training step than ``weights`` holds (a card
    would show the last step's numbers beside the best step's weights); unlabelled ones pass."""
    scored = {block.get("step") for block in results.values() if isinstance(block, dict)} - {None}
    if step is not None and scored and scored != {step}:
        raise ClipvipError(
            f"--results scores step {', '.join(map(str, sorted(scored)))}, but {weights} holds step {step}: pass "
            f"the results of these weights (clipvip retrieval --e2e_weights_path {weights} writes them)")


def convert_with_config(cfg, weights: str, out: str, results: dict | None = None, replace: bool = False) -> None:
    """``weights`` converted into ``out`` with the architecture and input settings of ``cfg``; the
    card names the weights' training step where it is known (:func:`checkpoint_step`)."""
    step = checkpoint_step(weights)
    if results:
        check_results_match(results, weights, step)
    convert_checkpoint(weights, resolve_clip_config(cfg.clip_config),
                       VideoSettings.from_config(cfg.clip_vision_additional_config),
                       VideoInputSettings.from_config(cfg), build_tokenizer(cfg), out, results, replace=replace,
                       step=step)


def save_best_as_hf(cfg, results: dict | None = None) -> str | None:
    """``--save_hf 1``: the run's ``ckpt/model_best.pt`` also as ``ckpt/model_best_hf``, replacing
    that of an earlier attempt, its card showing ``results`` (the run's, of that model); its path,
    or None where the run kept no best model."""
    ckpt = os.path.join(cfg.output_dir, "ckpt")
    best = os.path.join(ckpt, BEST_MODEL)
    if not os.path.isfile(best):
        LOGGER.warning("save_hf: no %s (if_model_saver 0, or no validation ran): nothing to convert", best)
        return None
    out = os.path.join(ckpt, BEST_MODEL_HF)
    convert_with_config(cfg, best, out, results or None, replace=True)
    LOGGER.info("the best model (step %s) as a Hugging Face folder: %s", checkpoint_step(best), out)
    return out


def main(argv: Sequence[str]) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(list(argv))
    if overrides and not overrides[0].startswith("--"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    cfg = load_config(args.config, overrides)
    convert_with_config(cfg, args.weights, args.out, _read_results(args.results) if args.results else None)
    print(f"wrote {args.out}")
    if args.push_to_hub:
        print(f"uploaded: {push_folder(args.out, args.push_to_hub, private=args.private or None)}")
    return 0
