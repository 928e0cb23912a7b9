"""What every training/evaluation app does around the loop: set up, train or evaluate, report.

The apps (``clipvip.apps.retrieval``, ``clipvip.apps.pretrain``) only choose their data; this module builds
the process group, the run folder, the model, and runs :class:`~clipvip.engine.trainer.Trainer` or a
plain evaluation, writing ``eval_results.json``.

The run folder appears only once every input was read (the weights, the annotation files, the
videos, the training data), so a command that fails on its inputs leaves nothing behind; a failure
after that is also the last line of the folder's ``log/log.txt``. An evaluation never writes over a
training run: when ``output_dir`` holds one (the config is that run's ``config.json``), the
evaluation writes into ``<output_dir>/eval/<weights name>/`` instead, and says so.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
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
from clipvip.errors import ClipvipError, ConfigError
from clipvip.logging_utils import get_logger, log_file, write_to_log_file
from clipvip.loss import LossSettings, build_loss
from clipvip.model import ModelSettings, build_model
from clipvip.tokenizer import build_tokenizer
from clipvip.engine.checkpoints import BEST_MODEL, checkpoint_step
from clipvip.engine.evaluate import evaluate_all, format_results_table, scored_by, scored_label, write_results
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


def check_output_dir(path: str) -> None:
    """Refuse an ``output_dir`` that cannot be created or written, before any work, creating nothing:
    the nearest part of the path that exists must be a folder this process may write in."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"output_dir {path} is not writable: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {path} is not writable: no permission to write in {existing}")


def prepare_output_dir(cfg, env) -> None:
    """Create ``output_dir`` and its ``log/`` and prove them writable (the resolved config is written
    by the caller, once it is known to be this run's)."""
    if env.is_main:
        probe = os.path.join(cfg.output_dir, f".write_test.{os.getpid()}")
        try:
            os.makedirs(os.path.join(cfg.output_dir, "log"), exist_ok=True)
            with open(probe, "w") as f:
                f.write("ok")
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"output_dir {cfg.output_dir} is not writable: {e.strerror or e}") from None
    distributed.barrier()


def is_training_run(folder: str) -> bool:
    """Whether ``folder`` holds a training run: a ``ckpt/`` folder, or a ``config.json`` that says
    ``is_train`` (or cannot be read: not ours to overwrite)."""
    if os.path.isdir(os.path.join(folder, "ckpt")):
        return True
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        return True
    return not isinstance(saved, dict) or bool(saved.get("is_train"))


def evaluation_output_dir(cfg) -> str:
    """Where an evaluation writes: ``output_dir``, or ``<output_dir>/eval/<weights name>`` (the
    weights' file or folder name without ``.pt``: ``eval/model_best``) when ``output_dir`` holds a
    training run, whose ``config.json``, log and ``eval_results.json`` stay as the run left them."""
    if not is_training_run(cfg.output_dir):
        return cfg.output_dir
    weights = cfg.e2e_weights_path or cfg.clip_weights
    name = os.path.splitext(os.path.basename(os.path.normpath(weights)))[0] if weights else "random_weights"
    return os.path.join(cfg.output_dir, "eval", name)


def start(cfg) -> Run:
    """Process group, seeds, tokenizer and model (weights loaded as the config says); the run
    folder is checked for writing, not created (:func:`train_or_evaluate` does, once the data is read)."""
    env = distributed.init_distributed()
    if not cfg.is_train:
        target = evaluation_output_dir(cfg)
        if target != cfg.output_dir:
            if env.is_main:
                LOGGER.info("%s holds a training run: this evaluation writes to %s (--output_dir DIR to choose)",
                            cfg.output_dir, target)
            cfg.output_dir = target
    check_output_dir(cfg.output_dir)
    seed_everything(int(cfg.seed))
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
    ``model_best.pt`` (``Trainer``), and so does any set with the same videos and captions. That
    holds for a training run and for an evaluation of a ``model_best.pt``; other weights (a step's
    checkpoint, post-pretrained or others' weights, none at all) were not chosen here: ``[]``."""
    chosen_here = cfg.is_train or os.path.basename(cfg.e2e_weights_path or "") == BEST_MODEL
    if not eval_sets or not chosen_here:
        return []
    first = eval_sets[0]
    return [d.name for d in eval_sets if d.videos == first.videos and d.texts == first.texts]


@contextlib.contextmanager
def failures_logged(cfg, env):
    """An error or interrupt that ends the run is also the last line of its ``log/log.txt``; the
    console has it already, from the command line's ``error: ...`` line."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as e:
        path = os.path.join(cfg.output_dir, "log", "log.txt")
        if env.is_main and cfg.if_log2file and os.path.isdir(os.path.dirname(path)):
            if isinstance(e, ClipvipError):
                write_to_log_file(path, LOGGER, logging.ERROR, f"error: {e}")
            elif isinstance(e, KeyboardInterrupt):
                write_to_log_file(path, LOGGER, logging.WARNING, str(e) or "interrupted")
            else:  # a bug: its traceback belongs in the log
                write_to_log_file(path, LOGGER, logging.ERROR, f"failed: {type(e).__name__}: {e}", exc_info=e)
        raise


def report_results(results: dict, output_dir: str) -> None:
    """``eval_results.json`` and the table, both saying which weights they score."""
    path = write_results(results, output_dir)
    label = scored_label(results)
    print((f"scores of {label}\n" if label else "") + format_results_table(results))
    LOGGER.info("results%s written to %s", f" of {label}" if label else "", path)


def train_or_evaluate(run: Run, eval_sets: list, make_stream: Callable[[], object] | None) -> dict:
    """Fine-tune/pretrain on ``make_stream()`` when ``is_train``, else evaluate; report the results.

    Training reports the validation of ``ckpt/model_best.pt``; an evaluation, the weights it was
    given (``e2e_weights_path``, else ``clip_weights``). Each results block names them and, where
    known, their training step."""
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

    if not cfg.is_train and not eval_sets:
        raise ConfigError("nothing to evaluate: the config has no inference_datasets or val_datasets")
    if cfg.is_train:
        stream = make_stream()
        plan = TrainPlan.from_config(cfg, stream.num_examples, env.world_size)
    # Every input has been read: only now does the run folder appear.
    prepare_output_dir(cfg, env)
    with failures_logged(cfg, env):
        if cfg.is_train:
            trainer = build_trainer(run, stream, evaluate, plan)
            if env.is_main:  # after the resume check: a refused resume leaves the run's config.json alone
                save_config(cfg)
            note_selection()
            trainer.fit()
            results = trainer.reported_results()
            if cfg.save_hf and env.is_main:
                save_best_as_hf(cfg, results)
            del trainer  # DDP must be gone before its process group is destroyed (else an abort at exit)
            gc.collect()
            if env.is_main and results:
                report_results(results, cfg.output_dir)
        else:
            if env.is_main:
                save_config(cfg)
            with log_file(os.path.join(cfg.output_dir, "log", "log.txt") if env.is_main and cfg.if_log2file
                          else None):
                note_selection()
                run.model.to(run.device)
                weights = cfg.e2e_weights_path or cfg.clip_weights
                results = scored_by(evaluate(run.model), weights, checkpoint_step(cfg.e2e_weights_path))
                if env.is_main:
                    report_results(results, cfg.output_dir)
    distributed.barrier()  # nobody tears the group down while rank 0 still writes
    distributed.cleanup()
    return results
