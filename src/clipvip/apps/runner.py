"""What every training/evaluation app does around the loop: set up, train or evaluate, report.

The apps (``clipvip.apps.retrieval``, ``clipvip.apps.pretrain``) only choose their data; this module builds
the process group, the run folder, the model, and runs :class:`~clipvip.engine.trainer.Trainer` or a
plain evaluation, writing ``eval_results.json``.
"""
from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from clipvip import distributed
from clipvip.apps.convert import save_best_as_hf
from clipvip.config import save_config
from clipvip.data.loader import LoaderSettings
from clipvip.data.retrieval_dataset import VideoRetrievalDataset
from clipvip.data.shards import is_sharded
from clipvip.errors import ConfigError
from clipvip.logging_utils import add_log_file, get_logger
from clipvip.loss import LossSettings, build_loss
from clipvip.model import ModelSettings, build_model
from clipvip.tokenizer import build_tokenizer
from clipvip.engine.evaluate import evaluate_all, format_results_table, write_results
from clipvip.engine.schedule import TrainPlan
from clipvip.engine.trainer import Trainer, TrainerSettings
from clipvip.precision import precision_from_config

LOGGER = get_logger("runner")


@dataclass
class Run:
    cfg: object
    env: distributed.DistEnv
    device: torch.device
    precision: str
    tokenizer: object
    model: torch.nn.Module


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


def start(cfg) -> Run:
    """Process group, seeds, run folder, tokenizer and model (weights loaded as the config says)."""
    env = distributed.init_distributed()
    seed_everything(int(cfg.seed))
    prepare_output_dir(cfg, env)
    device = torch.device(env.device)
    precision = precision_from_config(cfg, device.type, "training" if cfg.is_train else "evaluation")
    tokenizer = build_tokenizer(cfg)
    model = build_model(ModelSettings.from_config(cfg))
    return Run(cfg, env, device, precision, tokenizer, model)


def build_eval_sets(run: Run, entries, rule_for: Callable[[dict], str | None] = lambda entry: None) -> list:
    """Retrieval evaluation sets for config ``entries``, unreadable videos dropped up front."""
    sets = []
    for entry in entries:
        if is_sharded(entry):
            raise ConfigError(f"{entry.name or entry.shards}: vis_format 'webdataset' is for training sets; evaluation "
                              "reads an annotation file and its videos (txt, vis)")
        dataset = VideoRetrievalDataset.from_config(run.cfg, entry, run.tokenizer, training=False, rule=rule_for(entry))
        dataset.scan_readable()
        sets.append(dataset)
    return sets


def build_trainer(run: Run, stream, evaluate: Callable, plan: TrainPlan | None = None) -> Trainer:
    """The :class:`Trainer` of a training run: ``run``'s model fitted on ``stream``, validated with
    ``evaluate``; ``plan`` (default: the config's) sets the steps (``clipvip bench --mode e2e`` sets its own)."""
    cfg = run.cfg
    plan = plan or TrainPlan.from_config(cfg, stream.num_examples, run.env.world_size)
    loss_fn = build_loss(LossSettings.from_config(cfg), run.env)
    return Trainer(TrainerSettings.from_config(cfg), run.model, loss_fn, stream, plan, evaluate, run.env,
                   run.precision)


def selection_sets(cfg, eval_sets: list) -> list[str]:
    """The evaluation sets whose scores are not held out: the first set validated chooses
    ``model_best.pt`` (``Trainer``), and so does any set with the same videos and captions.
    None where no checkpoint was chosen (a zero-shot evaluation: no ``e2e_weights_path``): ``[]``."""
    if not eval_sets or not (cfg.is_train or cfg.e2e_weights_path):
        return []
    first = eval_sets[0]
    return [d.name for d in eval_sets if d.videos == first.videos and d.texts == first.texts]


def train_or_evaluate(run: Run, eval_sets: list, make_stream: Callable[[], object] | None) -> dict:
    """Fine-tune/pretrain on ``make_stream()`` when ``is_train``, else evaluate; report the results."""
    cfg, env = run.cfg, run.env

    eval_loader = LoaderSettings.from_config(cfg)
    selected = selection_sets(cfg, eval_sets)

    def note_selection():  # once the run's log file is open; the official configs validate on their test file
        for name in selected if env.is_main else ():
            LOGGER.info("[%s] %s model_best.pt by text-to-video R@1 on this set and is scored on it: not a held-out "
                        "score (eval_results.json: protocol.selected_on_this_set)", name,
                        "this run chooses" if cfg.is_train else "training with this config chooses")

    def evaluate(model):
        return evaluate_all(model, eval_sets, eval_loader, run.precision, run.device, selected_on=selected)

    if cfg.is_train:
        trainer = build_trainer(run, make_stream(), evaluate)
        note_selection()
        trainer.fit()
        if cfg.save_hf and env.is_main:
            save_best_as_hf(cfg)
        results = trainer.last_results
        del trainer  # DDP must be gone before its process group is destroyed (else an abort at exit)
        gc.collect()
    else:
        if not eval_sets:
            raise ConfigError("nothing to evaluate: the config has no inference_datasets or val_datasets")
        if env.is_main and cfg.if_log2file:
            add_log_file(os.path.join(cfg.output_dir, "log", "log.txt"))
        note_selection()
        run.model.to(run.device)
        results = evaluate(run.model)
    if env.is_main and results:
        path = write_results(results, cfg.output_dir)
        print(format_results_table(results))
        LOGGER.info("results written to %s", path)
    distributed.barrier()  # nobody tears the group down while rank 0 still writes
    distributed.cleanup()
    return results
