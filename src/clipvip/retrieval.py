"""Text-to-video retrieval: fine-tune (``--is_train``) or evaluate a CLIP-ViP model.

    python -m clipvip.retrieval --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
        --blob_mount_dir /data --e2e_weights_path pretrain_clipvip_base_32.pt [--is_train]
    torchrun --nproc_per_node 8 -m clipvip.retrieval --config ... --is_train
    accelerate launch -m clipvip.retrieval --config ... --is_train

Without ``--is_train`` it evaluates ``e2e_weights_path`` (or plain ``clip_weights``: zero-shot) on
``inference_datasets`` and writes ``<output_dir>/eval_results.json``.
"""
from __future__ import annotations

import os
import random
import sys
from typing import Sequence

import numpy as np
import torch

from . import distributed
from .cli import run_main
from .config import load_config, save_config
from .data.loader import LoaderStream
from .data.retrieval import VideoRetrievalDataset
from .errors import ConfigError
from .logging_utils import add_log_file, get_logger
from .loss import build_loss
from .model import build_model
from .tokenizer import build_tokenizer
from .train.evaluate import evaluate_all, format_results_table, write_results
from .train.loop import Trainer, TrainPlan
from .train.precision import precision_from_config

LOGGER = get_logger("retrieval")


def seed_everything(seed: int) -> None:
    # The same seed on every process: the random parts of the model (proxies) start equal.
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_output_dir(cfg, env) -> None:
    """Create ``output_dir`` and prove it writable before any work; write the resolved config."""
    if env.is_main:
        probe = os.path.join(cfg.output_dir, f".write_test.{os.getpid()}")
        try:
            os.makedirs(os.path.join(cfg.output_dir, "log"), exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"output_dir {cfg.output_dir} is not writable: {e.strerror or e}") from None
        save_config(cfg)
    distributed.barrier()


def build_eval_sets(cfg, tokenizer) -> list[VideoRetrievalDataset]:
    """The evaluation sets (``inference_datasets``, else ``val_datasets``), unreadable videos dropped."""
    entries = cfg.inference_datasets or cfg.val_datasets
    sets = []
    for entry in entries:
        dataset = VideoRetrievalDataset(cfg, entry, tokenizer, training=False)
        dataset.scan_readable()
        sets.append(dataset)
    return sets


def run(cfg) -> dict:
    """Fine-tune and/or evaluate as ``cfg`` says; returns the last evaluation results."""
    env = distributed.init_distributed()
    seed_everything(int(cfg.seed))
    prepare_output_dir(cfg, env)
    device = torch.device(env.device)
    precision = precision_from_config(cfg, device.type)
    tokenizer = build_tokenizer(cfg)
    model = build_model(cfg)
    eval_sets = build_eval_sets(cfg, tokenizer)

    def evaluate(m):
        return evaluate_all(m, eval_sets, cfg, precision, device)

    if cfg.is_train:
        if not cfg.train_datasets:
            raise ConfigError("--is_train needs train_datasets in the config")
        if len(cfg.train_datasets) > 1:
            LOGGER.warning("retrieval fine-tuning uses the first of %d train_datasets", len(cfg.train_datasets))
        train_set = VideoRetrievalDataset(cfg, cfg.train_datasets[0], tokenizer, training=True)
        stream = LoaderStream(train_set, cfg, env.rank, env.world_size)
        plan = TrainPlan.from_config(cfg, len(train_set), env.world_size)
        trainer = Trainer(cfg, model, build_loss(cfg.loss_config), stream, plan, evaluate, env, precision)
        trainer.fit()
        results = trainer.last_results
    else:
        if env.is_main and cfg.get("if_log2file", 1):
            add_log_file(os.path.join(cfg.output_dir, "log", "log.txt"))
        if not eval_sets:
            raise ConfigError("nothing to evaluate: the config has no inference_datasets or val_datasets")
        model.to(device)
        results = evaluate(model)
    if env.is_main and results:
        path = write_results(results, cfg.output_dir)
        print(format_results_table(results))
        LOGGER.info("results written to %s", path)
    distributed.cleanup()
    return results


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
