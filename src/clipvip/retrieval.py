"""Text-to-video retrieval: fine-tune (``--is_train``) or evaluate a CLIP-ViP model.

    python -m clipvip.retrieval --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
        --blob_mount_dir /data --e2e_weights_path pretrain_clipvip_base_32.pt [--is_train]
    torchrun --nproc_per_node 8 -m clipvip.retrieval --config ... --is_train
    accelerate launch -m clipvip.retrieval --config ... --is_train

Without ``--is_train`` it evaluates ``e2e_weights_path`` (or plain ``clip_weights``: zero-shot) on
``inference_datasets`` and writes ``<output_dir>/eval_results.json``. Training validates on
``inference_datasets`` too, as the original does.
"""
from __future__ import annotations

import sys
from typing import Sequence

from .cli import run_main
from .config import load_config
from .data.loader import LoaderStream
from .data.retrieval import VideoRetrievalDataset
from .errors import ConfigError
from .logging_utils import get_logger
from .train import runner

LOGGER = get_logger("retrieval")


def run(cfg) -> dict:
    """Fine-tune and/or evaluate as ``cfg`` says; returns the last evaluation results."""
    if cfg.is_train and not cfg.train_datasets:
        raise ConfigError("--is_train needs train_datasets in the config")
    run_ = runner.start(cfg)
    eval_sets = runner.build_eval_sets(run_, cfg.inference_datasets or cfg.val_datasets)

    def make_stream():
        if len(cfg.train_datasets) > 1:
            LOGGER.warning("retrieval fine-tuning uses the first of %d train_datasets", len(cfg.train_datasets))
        train_set = VideoRetrievalDataset(cfg, cfg.train_datasets[0], run_.tokenizer, training=True)
        return LoaderStream(train_set, cfg, run_.env.rank, run_.env.world_size)

    return runner.train_or_evaluate(run_, eval_sets, make_stream)


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    run(load_config(None, argv))
    return 0


def entry() -> None:
    sys.exit(run_main(main))


if __name__ == "__main__":
    entry()
