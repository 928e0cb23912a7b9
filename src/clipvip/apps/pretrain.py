"""Post-pretraining with Omnisource Cross-modal Learning (HD-VILA videos, subtitles, captions).

    python -m clipvip pretrain --config configs/pretrain/pretrain_vip_base_32.json --blob_mount_dir /data
    torchrun --nnodes 4 --nproc_per_node 8 ... -m clipvip pretrain --config ...
    horovodrun -np 8 python -m clipvip pretrain --config ...   # where horovod is installed

The same loop as retrieval fine-tuning (:mod:`clipvip.engine.trainer`): training sets mixed by
``ratio`` (one set per optimizer step, the same on every process), the OCL loss named in
``loss_config`` fed with video, middle-frame, subtitle and caption features, validation on
``val_datasets`` (zero-shot at step 0). ``ckpt/model_step_N.pt`` is in the released layout and
loads into retrieval fine-tuning as ``--e2e_weights_path``.
"""
from __future__ import annotations

import os
from typing import Sequence

from clipvip.apps import runner
from clipvip.apps.cli import run_config_app
from clipvip.data.loader import LoaderSettings, LoaderStream, MixedStream
from clipvip.data.pretrain_dataset import PretrainDataset
from clipvip.data.shards import ShardStream, is_sharded
from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger

LOGGER = get_logger("pretrain")

# Every key in it is checked against config.DEFAULTS by a test.
HELP = """\
usage: {prog} --config FILE [--key value ...]

Post-pretraining of CLIP-ViP with Omnisource Cross-modal Learning (videos, subtitles, captions).
It trains (--is_train is implied; --is_train 0 only validates on val_datasets).

options:
  --config FILE            the JSON config (required): configs/pretrain/pretrain_vip_base_{{16,32}}.json
  --blob_mount_dir DIR     joined in front of the config's data paths, e2e_weights_path and output_dir
  --clip_weights DIR       the image CLIP (HF folder) to start from (none: random weights)
  --e2e_weights_path FILE  a CLIP-ViP .pt to start from instead (none: unset)
  --output_dir DIR         run folder: config.json, log/, ckpt/model_step_N.pt (loads into
                           retrieval fine-tuning as --e2e_weights_path)
  --num_train_epochs N     pretraining epochs
  --train_batch_size N     clips per process and step
  --is_train 0             validate only
  -h, --help               show this help

{overrides}

examples:
  {prog} --config configs/pretrain/pretrain_vip_base_32.json --blob_mount_dir /data
  torchrun --nnodes 4 --nproc_per_node 8 ... -m clipvip pretrain --config ...
  horovodrun -np 8 python -m clipvip pretrain --config ...      # where horovod is installed
"""


def validation_rule(cfg):
    """How a validation set's clip ids map to files.

    Validation sets that read the HD-VILA clip folder of a training set (the official configs'
    ``how2`` and ``ours``) keep HD-VILA's layout ``{vis}/{video}/{clip_id}``; others (MSR-VTT)
    use their own dataset's rule.
    """
    hdvila_folders = {os.path.normpath(d.vis) for d in cfg.train_datasets if d.vis}

    def rule_for(entry):
        return "hdvila" if entry.vis and os.path.normpath(entry.vis) in hdvila_folders else None

    return rule_for


def run(cfg) -> dict:
    if cfg.is_train is False and not cfg.val_datasets:
        raise ConfigError("nothing to do: pretraining needs --is_train or val_datasets to evaluate")
    if not cfg.train_datasets:
        raise ConfigError("pretraining needs train_datasets in the config")
    run_ = runner.start(cfg)
    eval_sets = runner.build_eval_sets(run_, cfg.val_datasets, validation_rule(cfg))

    def make_stream():
        streams, ratios = {}, {}
        # Every set's loader keeps its workers: the CPUs' share (n_workers -1) is split among them.
        loader = LoaderSettings.from_config(cfg).shared_by(len(cfg.train_datasets))
        for entry in cfg.train_datasets:
            if is_sharded(entry):  # WebDataset tar shards, streamed (clipvip.data.shards)
                streams[entry.name] = ShardStream.from_config(cfg, entry, run_.tokenizer, run_.env.rank,
                                                              run_.env.world_size, kind="pretrain", loader=loader)
            else:
                dataset = PretrainDataset.from_config(cfg, entry, training=True, tokenizer=run_.tokenizer)
                streams[entry.name] = LoaderStream(dataset, loader, run_.env.rank, run_.env.world_size)
            ratios[entry.name] = entry.ratio
        return MixedStream(streams, ratios, seed=int(cfg.seed), accumulation=int(cfg.gradient_accumulation_steps))

    return runner.train_or_evaluate(run_, eval_sets, make_stream)


def main(argv: Sequence[str]) -> int:
    # Pretraining trains unless told otherwise (the original's run_pretrain.py always trained).
    return run_config_app(argv, "pretrain", HELP, run, implied=["--is_train"])

