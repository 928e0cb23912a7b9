"""`make demo`: CLIP-ViP against the mean-pool CLIP baseline on the synthetic benchmark, end to end.

    python -m clipvip demo [--out demo_output] [--quick]

1. draws the synthetic benchmark (:mod:`clipvip.apps.synthetic`: moving shapes, 200 test clips
   with unique captions, 140 of them in time-reversed twin pairs) into ``OUT/data``; the training
   clips carry their canonical caption (``DemoSpec.n_paraphrases``);
2. times a few CLIP-ViP training steps and keeps the vision tower and the epochs that fit the
   time budget (:func:`fit_budget`: 4 layers and the configs' 40 epochs where they fit, else 3
   layers with half the MLP), and writes the tiny image CLIP both models start from (HF layout, ``OUT/clip_config``:
   ``config.json`` and ``model.safetensors``). No CLIP weights can be downloaded here, so its weights
   are random, drawn once with the demo's seed; the vision position embeddings are drawn at a larger
   scale (``DemoSpec.position_init_std``) so that a from-scratch ViT sees where the shape is;
   both runs load the same file through ``clip_weights``, as a real run loads OpenAI's CLIP;
3. fine-tunes CLIP-ViP (``configs/demo/vip.json``) and the frame-wise mean-pool CLIP baseline
   (``configs/demo/meanpool.json``, the same recipe with ``type`` "meanpool") with the same budget
   (twins share a batch, the random text tower stays fixed: ``freeze_text_encoder``), each
   through the retrieval app (``python -m clipvip retrieval --config ... --is_train``), the two
   side by side, one CPU thread each;
4. evaluates both runs' scored checkpoints (``ckpt/model_best.pt``) again through the library to
   rank every query, and reports text-to-video R@1 on the *direction-sensitive* queries: those
   whose clip has its time-reversed twin in the test set, which only frame order can tell apart;
5. prints a table and writes ``OUT/results.json`` and ``OUT/curves.png``.

``results.json``::

    {"vip": <eval block>, "meanpool": <eval block>,
     "direction_sensitive": {"vip": {"t2v_R1": x, ...}, "meanpool": {"t2v_R1": y, ...}},
     "wall_seconds": s, ...}

The eval blocks are the retrieval app's ``<run>/eval_results.json`` entries, unchanged.
``--quick`` shrinks everything (data, model, steps) to a smoke test of well under a minute.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig

from clipvip.apps import synthetic
from clipvip.apps.cli import prog_name
from clipvip.config import load_config
from clipvip.data.loader import LoaderSettings
from clipvip.data.retrieval_dataset import VideoRetrievalDataset
from clipvip.engine.evaluate import encode_retrieval_set, write_results
from clipvip.engine.optim import OptimizerSettings
from clipvip.engine.step import OptimizerStep, StepSettings, train_mode
from clipvip.logging_utils import get_logger
from clipvip.loss import LossSettings, build_loss
from clipvip.metrics import retrieval_ranks, similarity_chunked
from clipvip.model import build_model
from clipvip.model.clip_vip import CLIPViPTowers, VideoSettings
from clipvip.precision import precision_from_config
from clipvip.tokenizer import build_tokenizer

LOGGER = get_logger("demo")

MODELS = ("vip", "meanpool")
LABELS = {"vip": "CLIP-ViP", "meanpool": "mean-pool CLIP"}
TEST_SET = "synthetic-test"  # the name of the evaluation set in configs/demo/*.json


@dataclass(frozen=True)
class DemoSpec:
    """What the demo draws and builds; the training recipe itself is in ``configs/demo/*.json``."""

    n_train: int
    n_test: int
    video_size: int  # frames are drawn at the model's input_res, so no resize is needed
    video_frames: int
    architecture: dict  # the tiny CLIP (HF CLIPConfig keyword arguments)
    overrides: tuple[str, ...] = ()  # command-line overrides of the demo configs
    seed: int = 0
    twin_fraction: float = 0.7
    # Training captions: 0 = each clip's canonical caption (the test wording), n = n paraphrases.
    # With paraphrases a from-scratch text tower has to learn synonyms and word order before it
    # can name a motion consistently, which the demo's budget does not allow (docs/demo.md).
    n_paraphrases: int = 0
    # Standard deviation of the starting position embeddings (the usual init is 0.02). Measured
    # here (docs/demo.md): with 0.02 the 4x4-patch tower trained from scratch did not learn motion
    # even with direct supervision in 600 steps; with 0.5 it did (direction 96%).
    position_init_std: float = 0.5
    # Seconds of training steps the two side-by-side runs may take (None: the configs' epochs as
    # they are, no timing). The configs' 40 epochs of the 4-layer tower take about 370 s on an
    # AVX-512 EPYC but 800-900 s on AVX2-only ones (docs/demo.md), so the demo times a few steps
    # first (:func:`fit_budget`): the architecture where all 40 epochs fit, else the smaller
    # ``fallback_architecture`` with as many whole epochs as fit. The steps are timed alone; the
    # runs' steps side by side, with their validations and the first epoch's decoding, took
    # 1.02-1.19x as long (docs/demo.md), so 460 s of timed steps are 470-550 s of training. The
    # rest of the demo's 600 s: data, start CLIP, timing, app start-up, re-scoring, plot (~25 s).
    train_budget_s: float | None = 460.0
    # 3 vision layers with half the MLP (intermediate = 2 x width): the step time of 2 full layers
    # (about 0.6x the 4 full ones); on the demo's data t2v R@1 65.0-70.0 after 40 epochs where
    # 2 full layers reached 62.5-63.0 (docs/demo.md).
    fallback_architecture: dict | None = None


def _architecture(width: int, vision_layers: int, text_layers: int, heads: int, image_size: int,
                  patch_size: int, max_positions: int, vision_mlp_ratio: int = 4) -> dict:
    return {
        "projection_dim": width,
        # The real CLIP vocabulary: the demo uses the real CLIP BPE tokenizer.
        "text_config": {"vocab_size": 49408, "hidden_size": width, "intermediate_size": 4 * width,
                        "num_hidden_layers": text_layers, "num_attention_heads": heads,
                        "max_position_embeddings": max_positions, "hidden_act": "quick_gelu",
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        "vision_config": {"hidden_size": width, "intermediate_size": vision_mlp_ratio * width,
                          "num_hidden_layers": vision_layers, "num_attention_heads": heads,
                          "image_size": image_size, "patch_size": patch_size, "hidden_act": "quick_gelu"},
    }


FULL = DemoSpec(n_train=2000, n_test=200, video_size=64, video_frames=16,
                architecture=_architecture(128, 4, 3, 4, 64, 16, 32),
                fallback_architecture=_architecture(128, 3, 3, 4, 64, 16, 32, vision_mlp_ratio=2))
# A smoke test: every stage runs, nothing is learned to speak of.
QUICK = DemoSpec(n_train=48, n_test=24, video_size=32, video_frames=8,
                 architecture=_architecture(32, 1, 1, 2, 32, 16, 24), train_budget_s=None,
                 overrides=("--num_train_epochs", "6", "--train_batch_size", "8", "--test_batch_size", "24",
                            "--train_num_frms", "4", "--test_num_frms", "4", "--input_res", "32", "32",
                            "--max_txt_len", "24", "--only_valid_steps", "12", "--log_interval", "6"))


def find_config_dir() -> str:
    """``configs/demo`` of this checkout (the current directory first, then the source tree)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.getcwd(), os.path.dirname(os.path.dirname(here))):
        folder = os.path.join(root, "configs", "demo")
        if os.path.isfile(os.path.join(folder, "vip.json")):
            return folder
    raise FileNotFoundError("configs/demo/vip.json not found: run the demo from the repository root")


def write_start_clip(folder: str, architecture: dict, seed: int, position_init_std: float) -> str:
    """The image CLIP both demo models start from, as a HF folder (``config.json`` +
    ``model.safetensors``): random weights (the library's init, seeded), the vision position
    embeddings redrawn at ``position_init_std``. Loaded through ``clip_weights`` like real CLIP."""
    os.makedirs(folder, exist_ok=True)
    config = CLIPConfig(**architecture)
    config.to_json_file(os.path.join(folder, "config.json"))
    torch.manual_seed(seed)
    clip = CLIPViPTowers(config, VideoSettings(use_proxies=False, add_cls_num=0, use_temporal_embed=False))  # image CLIP
    with torch.no_grad():
        # Only the vision tower: its patch embeddings come out at std ~0.5 (768 pixel inputs at
        # std 0.02), which drown positions at 0.02; text tokens and positions are both at 0.02.
        clip.vision_model.embeddings.position_embedding.weight.normal_(std=position_init_std)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


# ------------------------------------------------------------------------------------------------
# Training through the retrieval app
# ------------------------------------------------------------------------------------------------
def train_overrides(out: str, clip_config: str) -> list[str]:
    """What every demo run adds to its config: paths under ``out`` and the written start CLIP."""
    return ["--blob_mount_dir", out, "--clip_config", clip_config, "--clip_weights", clip_config]


def train_command(config: str, out: str, clip_config: str, overrides: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "clipvip", "retrieval", "--config", config, "--is_train",
            *train_overrides(out, clip_config), *overrides]


def measure_step_seconds(cfg, threads: int, steps: int = 8, warmup: int = 3) -> float:
    """Seconds of one training step of the run ``cfg`` describes, on ``threads`` CPU threads.

    What a step of the run does, on its own data: a batch of ``train_batch_size`` training clips
    read and collated by the run's dataset (frames from the clip cache after the first pass,
    captions tokenized and padded as the run pads them), the model the run builds (its start
    weights, its frozen text tower), and the Trainer's own optimizer step with the run's settings
    (:class:`clipvip.engine.step.OptimizerStep`, what ``python -m clipvip bench`` times too). The
    median of ``steps`` timed steps: the run's speed includes its neighbours' load, so the budget
    follows the machine as it is now.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(cfg)
        step_settings = StepSettings.from_config(cfg)
        train_mode(model, step_settings)
        step = OptimizerStep(model, build_loss(LossSettings.from_config(cfg)), step_settings,
                             OptimizerSettings.from_config(cfg), "fp32", torch.device("cpu"),
                             total_steps=warmup + steps)
        dataset = VideoRetrievalDataset.from_config(cfg, cfg.train_datasets[0], build_tokenizer(cfg), training=True)
        batch_size = int(cfg.train_batch_size)
        seconds = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = dataset.collator([dataset[j % len(dataset)] for j in range(batch_size)])  # the first pass decodes
            step(i + 1, [batch])  # video (B, T, 3, H, W)
            if i >= warmup:
                seconds.append(time.perf_counter() - t0)
        return sorted(seconds)[len(seconds) // 2]
    finally:
        torch.set_num_threads(previous_threads)


def plan_epochs(step_seconds: float, budget_s: float, n_train: int, batch: int, max_epochs: int) -> int:
    """Whole epochs of ``n_train`` clips in batches of ``batch`` that fit in ``budget_s`` at
    ``step_seconds`` a step: at least 1, at most ``max_epochs`` (the config's own count)."""
    if step_seconds <= 0 or budget_s <= 0:
        raise ValueError(f"step_seconds and budget_s must be > 0, got {step_seconds} and {budget_s}")
    affordable_steps = budget_s / step_seconds
    return max(1, min(int(max_epochs), int(affordable_steps * batch // n_train)))


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "TQDM_DISABLE": "1"})  # progress bars would fill the logs; the demo prints its own
    return env


def _last_metrics(path: str) -> dict:
    """The latest training and validation values of a run's ``log/metrics.jsonl`` (for progress lines)."""
    out: dict = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    out.update(json.loads(line))
    except (OSError, ValueError):
        pass
    return out


def run_trainings(commands: dict[str, list[str]], run_dirs: dict[str, str], log_dir: str, parallel: bool,
                  threads: int, progress_every: float = 30.0) -> None:
    """Run the training commands (side by side when ``parallel``), printing progress; raise on failure."""
    os.makedirs(log_dir, exist_ok=True)
    pending = list(commands)
    running: dict[str, tuple[subprocess.Popen, object]] = {}
    last_report = time.perf_counter()
    try:
        while pending or running:
            while pending and (parallel or not running):
                name = pending.pop(0)
                log = open(os.path.join(log_dir, f"{name}.log"), "w", encoding="utf-8")
                LOGGER.info("training %s: %s (log: %s)", LABELS[name], " ".join(commands[name][1:]), log.name)
                running[name] = (subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT,
                                                  env=_child_env(threads)), log)
            time.sleep(0.5)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                if proc.returncode != 0:
                    with open(log.name, encoding="utf-8", errors="replace") as f:
                        tail = f.read()[-3000:]
                    raise RuntimeError(f"training {name} failed (exit {proc.returncode}); end of {log.name}:\n{tail}")
            if time.perf_counter() - last_report >= progress_every:
                last_report = time.perf_counter()
                for name in running:
                    m = _last_metrics(os.path.join(run_dirs[name], "log", "metrics.jsonl"))
                    if "step" in m:
                        r1 = m.get(f"val/{TEST_SET}/t2v_R1")
                        LOGGER.info("  %-14s step %5d  loss %.3f%s", LABELS[name], m["step"], m.get("loss", math.nan),
                                    f"  last t2v R@1 {r1:.1f}" if r1 is not None else "")
    finally:
        for proc, log in running.values():  # an error or Ctrl-C: do not leave orphans behind
            proc.kill()
            proc.wait()
            log.close()


# ------------------------------------------------------------------------------------------------
# Evaluation of the scored checkpoints, query by query
# ------------------------------------------------------------------------------------------------
def scored_checkpoint(run_dir: str) -> str:
    """The checkpoint the app's ``eval_results.json`` scored (``ckpt/model_best.pt``, which the
    results name), or ``ckpt/model_step_N.pt`` of the last step N for results that name none."""
    with open(os.path.join(run_dir, "eval_results.json"), encoding="utf-8") as f:
        named = json.load(f)[TEST_SET].get("checkpoint")
    if named:
        return named
    ckpt_dir = os.path.join(run_dir, "ckpt")
    steps = [int(n[len("model_step_"):-3]) for n in os.listdir(ckpt_dir)
             if n.startswith("model_step_") and n.endswith(".pt")]
    if not steps:
        raise FileNotFoundError(f"no model_step_*.pt in {ckpt_dir}")
    return os.path.join(ckpt_dir, f"model_step_{max(steps)}.pt")


def query_ranks(run_dir: str) -> tuple[list[int], list[bool]]:
    """Pessimistic text-to-video rank of every test caption under the checkpoint the run scored, and
    for each caption whether its clip's time-reversed twin is in the test set.

    The model is rebuilt from the run's resolved ``config.json`` and scored with the evaluator's
    own pieces (ordered loaders, the same precision and batch size, :func:`retrieval_ranks`), so
    the ranks are those behind the app's eval block.
    """
    cfg = load_config(os.path.join(run_dir, "config.json"), ["--e2e_weights_path", scored_checkpoint(run_dir)])
    device = torch.device("cpu")
    precision = precision_from_config(cfg, device.type)
    model = build_model(cfg).eval()
    entry = next(e for e in cfg.inference_datasets if e.name == TEST_SET)
    dataset = VideoRetrievalDataset.from_config(cfg, entry, build_tokenizer(cfg), training=False)
    dataset.scan_readable()

    videos, texts = encode_retrieval_set(model, dataset, LoaderSettings.from_config(cfg), precision, device,
                                         video_workers=0)
    targets = dataset.text_to_video()
    ranks = retrieval_ranks(similarity_chunked(texts, videos), targets)
    present = set(dataset.videos)
    has_twin = [dataset.records[v].extra.get("twin") in present for v in targets]
    return [int(r) for r in ranks], has_twin


def subset_r1(ranks: Sequence[int], keep: Sequence[bool]) -> float:
    picked = [r for r, k in zip(ranks, keep) if k]
    return 100.0 * sum(r == 1 for r in picked) / len(picked) if picked else math.nan


def direction_sensitive(ranks: Sequence[int], has_twin: Sequence[bool]) -> dict:
    """t2v R@1 on the queries whose clip has a time-reversed twin (and, for reference, the rest)."""
    rest = [not t for t in has_twin]
    return {"t2v_R1": subset_r1(ranks, has_twin), "n_queries": int(sum(has_twin)),
            "other_t2v_R1": subset_r1(ranks, rest), "n_other_queries": int(sum(rest)),
            "all_t2v_R1": subset_r1(ranks, [True] * len(ranks))}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def format_table(results: dict) -> str:
    rows = [("t2v", "text-to-video"), ("v2t", "video-to-text"),
            ("t2v_dsl", "text-to-video, DSL"), ("v2t_dsl", "video-to-text, DSL")]
    header = f"{'model':<16}{'direction':<20}{'R@1':>7}{'R@5':>7}{'R@10':>7}"
    lines = [header, "-" * len(header)]
    for name in MODELS:
        for i, (key, label) in enumerate(rows):
            m = results[name][key]
            lines.append(f"{LABELS[name] if i == 0 else '':<16}{label:<20}{m['R1']:7.1f}{m['R5']:7.1f}{m['R10']:7.1f}")
    lines.append("-" * len(header))
    ds = results["direction_sensitive"]
    n = ds["vip"]["n_queries"]
    lines.append(f"text-to-video R@1 on the {n} queries whose clip has its time-reversed twin in the test set:")
    for name in MODELS:
        lines.append(f"  {LABELS[name]:<16}{ds[name]['t2v_R1']:6.1f}   (other queries: {ds[name]['other_t2v_R1']:.1f})")
    budget = results.get("setup", {}).get("budget")
    if budget:
        lines.append(f"trained: {budget['vision_layers']} vision layers (MLP {budget['vision_mlp']}), "
                     f"{budget['epochs']} of the configs' "
                     f"{budget['config_epochs']} epochs ({budget['steps']} steps), as the step timing allowed")
    lines.append(f"wall time {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dirs: dict[str, str], path: str) -> str:
    """Training loss and test t2v R@1 over steps for both models, from their ``log/metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in run_dirs.items():
        records = read_metrics(os.path.join(run_dir, "log", "metrics.jsonl"))
        train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
        val = [(r["step"], r[f"val/{TEST_SET}/t2v_R1"]) for r in records if f"val/{TEST_SET}/t2v_R1" in r]
        if train:
            ax_loss.plot(*zip(*train), label=LABELS[name])
        if val:
            ax_r1.plot(*zip(*val), marker="o", label=LABELS[name])
    ax_loss.set(xlabel="step", ylabel="training loss", title="contrastive loss")
    ax_r1.set(xlabel="step", ylabel="R@1 (%)", title="text-to-video R@1, 200 test clips", ylim=(0, 100))
    for ax in (ax_loss, ax_r1):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------
def fit_budget(vip_config: str, out: str, spec: DemoSpec, parallel: bool, threads: int) -> tuple[str, dict]:
    """Write the start CLIP both runs load and choose their epochs: ``(clip folder, record)``.

    The first architecture (``spec.architecture``, then ``spec.fallback_architecture``) whose
    config epochs all fit in ``spec.train_budget_s``; the last one tried gets as many whole epochs
    as fit. Timed on CLIP-ViP, the slower of the two models (its proxies see every frame's
    patches); with the runs one after the other, each gets half the budget.
    """
    per_run = spec.train_budget_s if parallel else spec.train_budget_s / 2
    folder = os.path.join(out, "clip_config")
    candidates = [spec.architecture] + ([spec.fallback_architecture] if spec.fallback_architecture else [])
    tried = []
    for architecture in candidates:  # the last one tried is kept, whether or not all epochs fit
        clip_config = write_start_clip(folder, architecture, spec.seed, spec.position_init_std)
        cfg = load_config(vip_config, [*train_overrides(out, clip_config), *spec.overrides])
        step_s = measure_step_seconds(cfg, threads)
        config_epochs = int(cfg.num_train_epochs)
        epochs = plan_epochs(step_s, per_run, spec.n_train, int(cfg.train_batch_size), config_epochs)
        layers = int(architecture["vision_config"]["num_hidden_layers"])
        mlp = int(architecture["vision_config"]["intermediate_size"])
        tried.append({"vision_layers": layers, "vision_mlp": mlp, "step_ms": round(1000 * step_s, 1),
                      "epochs_that_fit": epochs})
        LOGGER.info("a CLIP-ViP training step with %d vision layers (MLP %d) takes %.0f ms here: %d of the config's "
                    "%d epochs fit in the %.0f s training budget", layers, mlp, 1000 * step_s, epochs, config_epochs,
                    per_run)
        if epochs == config_epochs:
            break
    steps = math.ceil(epochs * spec.n_train / int(cfg.train_batch_size))
    return clip_config, {"train_budget_s": per_run, "vision_layers": layers, "vision_mlp": mlp, "epochs": epochs,
                         "config_epochs": config_epochs, "steps": steps, "tried": tried}


def run_demo(out: str, quick: bool = False, parallel: bool | None = None, config_dir: str | None = None) -> dict:
    start = time.perf_counter()
    spec = QUICK if quick else FULL
    out = os.path.abspath(out)
    config_dir = config_dir or find_config_dir()
    for stale in ("data", "clip_config", "logs", *MODELS):  # a rerun starts afresh, never resumes
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
    os.makedirs(out, exist_ok=True)

    LOGGER.info("drawing the synthetic benchmark: %d training clips, %d test clips", spec.n_train, spec.n_test)
    synthetic.generate(os.path.join(out, "data"), n_train=spec.n_train, n_test=spec.n_test, seed=spec.seed,
                       size=spec.video_size, frames=spec.video_frames, twin_fraction=spec.twin_fraction,
                       n_paraphrases=spec.n_paraphrases, n_pretrain_videos=0, frame_folders=False)
    cpus = os.cpu_count() or 1
    if parallel is None:
        parallel = cpus >= 2
    threads = max(1, cpus // 2) if parallel else cpus
    run_dirs = {name: os.path.join(out, name) for name in MODELS}
    overrides = list(spec.overrides)
    budget = None
    if spec.train_budget_s is None:
        clip_config = write_start_clip(os.path.join(out, "clip_config"), spec.architecture, spec.seed,
                                       spec.position_init_std)
    else:
        clip_config, budget = fit_budget(os.path.join(config_dir, "vip.json"), out, spec, parallel, threads)
        overrides += ["--num_train_epochs", str(budget["epochs"])]
    commands = {name: train_command(os.path.join(config_dir, f"{name}.json"), out, clip_config,
                                    [*overrides, "--output_dir", name])
                for name in MODELS}
    run_trainings(commands, run_dirs, os.path.join(out, "logs"), parallel, threads)

    torch.set_num_threads(cpus)
    os.environ.setdefault("TQDM_DISABLE", "1")
    results: dict = {}
    ranks = {}
    for name in MODELS:
        with open(os.path.join(run_dirs[name], "eval_results.json"), encoding="utf-8") as f:
            results[name] = json.load(f)[TEST_SET]
        ranks[name] = query_ranks(run_dirs[name])
    results["direction_sensitive"] = {name: direction_sensitive(*ranks[name]) for name in MODELS}
    for name in MODELS:
        again, reported = results["direction_sensitive"][name]["all_t2v_R1"], results[name]["t2v"]["R1"]
        if abs(again - reported) > 1e-6:
            LOGGER.warning("%s: re-evaluating the scored checkpoint gives t2v R@1 %.2f, the run reported %.2f",
                           name, again, reported)
    plot_curves(run_dirs, os.path.join(out, "curves.png"))
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["setup"] = {"quick": quick, "parallel": parallel, "threads_per_run": threads, "cpus": cpus,
                        "n_train": spec.n_train, "n_test": spec.n_test, "budget": budget}
    write_results(results, out, "results.json")
    print(format_table(results))
    LOGGER.info("results: %s; curves: %s", os.path.join(out, "results.json"), os.path.join(out, "curves.png"))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("demo"), description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--quick", action="store_true", help="tiny data, model and budget: a smoke test")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--parallel", dest="parallel", action="store_true", default=None,
                       help="train both models at once, half the CPUs each (default with 2+ CPUs)")
    order.add_argument("--sequential", dest="parallel", action="store_false", help="one model after the other")
    args = parser.parse_args(argv)
    run_demo(args.out, quick=args.quick, parallel=args.parallel)
    return 0

