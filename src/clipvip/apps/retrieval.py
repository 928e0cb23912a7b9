"""Text-to-video retrieval: fine-tune (``--is_train``) or evaluate a CLIP-ViP model.

    python -m clipvip retrieval --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
        --blob_mount_dir /data --e2e_weights_path pretrain_clipvip_base_32.pt [--is_train]
    torchrun --nproc_per_node 8 -m clipvip retrieval --config ... --is_train
    accelerate launch -m clipvip retrieval --config ... --is_train

Without ``--is_train`` it evaluates ``e2e_weights_path`` (or plain ``clip_weights``: zero-shot) on
``inference_datasets`` and writes ``<output_dir>/eval_results.json``. Training validates on
``inference_datasets`` too, as the original does.
"""
from __future__ import annotations

from typing import Sequence

from clipvip.apps import runner
from clipvip.apps.cli import run_config_app
from clipvip.data.loader import LoaderSettings, LoaderStream
from clipvip.data.retrieval_dataset import VideoRetrievalDataset
from clipvip.data.shards import ShardStream, is_sharded
from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger

LOGGER = get_logger("retrieval")

# The seed README's flags first; every key in it is checked against config.DEFAULTS by a test.
HELP = """\
usage: {prog} --config FILE [--key value ...]

Text-to-video retrieval with CLIP-ViP: fine-tune (--is_train) or evaluate a model.

options:
  --config FILE            the JSON config (required): configs/<task>/*_retrieval_vip_base_{{16,32}}.json,
                           or configs/demo/vip.json (paths relative to the demo's output folder)
  --blob_mount_dir DIR     joined in front of the config's data paths, e2e_weights_path and output_dir
  --e2e_weights_path FILE  a released or fine-tuned CLIP-ViP .pt to start from or to evaluate
                           (none: start from clip_weights)
  --clip_weights DIR       the image CLIP (HF folder) used without e2e_weights_path (none: random weights)
  --is_train               fine-tune on train_datasets; without it, evaluate on inference_datasets
  --output_dir DIR         run folder: config.json, log/, ckpt/model_best.pt, eval_results.json
  --num_train_epochs N     fine-tuning epochs
  --train_batch_size N     clips per process and step
  -h, --help               show this help

{overrides}

examples:
  {prog} --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
      --blob_mount_dir /data --e2e_weights_path pretrain_clipvip_base_32.pt --is_train
  {prog} --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
      --blob_mount_dir /data --e2e_weights_path output/ckpt/model_best.pt      # evaluate
  torchrun --nproc_per_node 8 -m clipvip retrieval --config ... --is_train
  accelerate launch -m clipvip retrieval --config ... --is_train
"""


def run(cfg) -> dict:
    """Fine-tune and/or evaluate as ``cfg`` says; returns the last evaluation results."""
    if cfg.is_train and not cfg.train_datasets:
        raise ConfigError("--is_train needs train_datasets in the config")
    # Before the model is built: a config without evaluation sets has nothing to do without --is_train.
    if not cfg.is_train and not (cfg.inference_datasets or cfg.val_datasets):
        raise ConfigError("nothing to evaluate: the config has no inference_datasets or val_datasets "
                          "(add --is_train to fine-tune)")
    run_ = runner.start(cfg)
    eval_sets = runner.build_eval_sets(run_, cfg.inference_datasets or cfg.val_datasets)
    return runner.train_or_evaluate(run_, eval_sets, lambda: train_stream(run_))


def train_stream(run_: runner.Run):
    """The batches fine-tuning trains on: the first of ``train_datasets``, streamed from tar shards
    or read by a shuffled loader (also what ``clipvip bench --mode e2e`` times)."""
    cfg = run_.cfg
    if len(cfg.train_datasets) > 1:
        LOGGER.warning("retrieval fine-tuning uses the first of %d train_datasets", len(cfg.train_datasets))
    entry = cfg.train_datasets[0]
    if is_sharded(entry):  # WebDataset tar shards, streamed (clipvip.data.shards)
        return ShardStream.from_config(cfg, entry, run_.tokenizer, run_.env.rank, run_.env.world_size)
    train_set = VideoRetrievalDataset.from_config(cfg, entry, run_.tokenizer, training=True)
    return LoaderStream(train_set, LoaderSettings.from_config(cfg), run_.env.rank, run_.env.world_size)


def main(argv: Sequence[str]) -> int:
    return run_config_app(argv, "retrieval", HELP, run)

