"""The GPU fast paths (issue 23), proven equal to the plain model on the CPU.

- the switch: one master switch and three named fast paths, from the environment, the config and
  ``fast_paths.configure`` (what ``clipvip bench --fast-paths`` and gpu_check select with);
- ``patch_matmul``: the patch embedding as one matmul on every device (no longer CPU-only);
- ``proxy_attention``: every formulation of proxy-guided attention against the original one, fp32
  and bf16, forward and gradients, alone and in the whole model;
- ``weight_copies``: the low-precision weight copies of a step against plain autocast (losses,
  gradients of the fp32 masters, weights after optimizer steps with gradient accumulation, a
  frozen text tower, gradient checkpointing, evaluation), made once per step and never saved;
- ``compile``: the training step's forward + loss traced by dynamo as one graph (fullgraph) with
  bf16, the copies, the proxy attention of GPUs and the frozen-text cache, and not retraced.
"""
import dataclasses
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import clipvip
from clipvip.engine.optim import OptimizerSettings
from clipvip.engine.step import OptimizerStep, StepSettings, train_mode
from clipvip.loss import LossSettings, build_loss
from clipvip.model import attention, fast_paths, low_precision
from clipvip.model.attention import ProxyLayout
from tiny_models import random_text, tiny_cfg, write_hf_clip

VARIANTS = ("cat", "views", "buffer", "mask", "flex")
TRAINABLE_VARIANTS = ("cat", "views", "buffer", "mask")  # flex: torch has no CPU backward for it


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip") / "tiny")
    write_hf_clip(folder)
    return folder


@pytest.fixture
def switch():
    """``switch("...")`` sets the fast paths for the test; the previous state comes back after it."""
    previous = fast_paths.configure(fast_paths.current())
    yield fast_paths.configure
    fast_paths.restore(previous)


def build(clip_folder, *overrides, **extra):
    torch.manual_seed(0)
    model = clipvip.build_model(tiny_cfg(clip_folder, *overrides, **extra))
    with torch.no_grad():
        model.clipmodel.vision_model.embeddings.temporal_embedding.normal_()
    return model


def features_and_grads(model, video, ids, mask, dtype=None):
    """Unit video and text features (one tensor) and every parameter's gradient of a contrastive loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(video, ids, mask)
    v, t = out["vis_features"].float(), out["text_features"].float()
    loss = F.cross_entropy(model.logit_scale.exp() * v @ t.T, torch.arange(v.shape[0]))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat([v, t]).detach(), grads


def relative_error(grads, reference) -> float:
    assert grads.keys() == reference.keys()
    num = sum(((grads[n] - reference[n]) ** 2).sum() for n in reference)
    return float((num / sum((g ** 2).sum() for g in reference.values())) ** 0.5)


# ---------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------
def test_switch_values_parse_and_name_what_they_do_not_know():
    assert fast_paths.parse("0") == (False, fast_paths.FastPathSettings())
    assert fast_paths.parse("1") == fast_paths.parse("") == fast_paths.parse("on") == (True, fast_paths.FastPathSettings())
    enabled, settings = fast_paths.parse("weight_copies=0, proxy_attention=mask")
    assert enabled and settings == fast_paths.FastPathSettings(weight_copies=False, proxy_attention="mask")
    assert settings.spec() == "weight_copies=0,proxy_attention=mask"
    assert fast_paths.parse(settings.spec()) == (True, settings)
    for bad, match in (("weight_copy=0", "names patch_matmul, weight_copies, proxy_attention"),
                       ("patch_matmul=yes", "takes 0 or 1"), ("proxy_attention=fast", "auto, cat, views"),
                       ("patch_matmul", "expected 0, 1 or name=value")):
        with pytest.raises(ValueError, match=match):
            fast_paths.parse(bad)


def test_configure_and_restore(switch):
    previous = switch("patch_matmul=0")
    assert fast_paths.ENABLED and not fast_paths.SETTINGS.patch_matmul and fast_paths.current() == "patch_matmul=0"
    switch("0")
    assert not fast_paths.ENABLED and fast_paths.current() == "0"
    fast_paths.restore(previous)
    assert fast_paths.current() == "1"


def test_the_environment_variable_takes_a_list():
    code = ("import clipvip.model.fast_paths as f; "
            "assert f.current() == 'weight_copies=0,proxy_attention=views', f.current()")
    env = {**os.environ, fast_paths.SWITCH_ENV: "proxy_attention=views,weight_copies=0"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


def test_the_config_key_sets_the_switch_when_a_model_is_built(clip_folder, switch):
    build(clip_folder, "--fast_paths", "proxy_attention=buffer,patch_matmul=0")
    assert fast_paths.current() == "patch_matmul=0,proxy_attention=buffer"
    build(clip_folder)  # "" (the default): the process's setting stays
    assert fast_paths.current() == "patch_matmul=0,proxy_attention=buffer"
    with pytest.raises(clipvip.ConfigError, match="fast_paths: .*proxy_attention"):
        build(clip_folder, "--fast_paths", "proxy_attention=dense")


# ---------------------------------------------------------------------------------------------
# patch_matmul
# ---------------------------------------------------------------------------------------------
def test_the_patch_matmul_runs_on_any_device(clip_folder, switch, monkeypatch):
    """No longer CPU-only: on a device without data (meta) the convolution is never called, and
    with patch_matmul=0 it is."""
    model = build(clip_folder).to("meta")
    calls = []
    conv = model.clipmodel.vision_model.embeddings.patch_embedding
    monkeypatch.setattr(conv, "forward", lambda x: calls.append(1) or F.conv2d(x, conv.weight, None, 8, 0))
    video = torch.empty(2, 4, 3, 32, 32, device="meta")
    assert model.encode_video(video).shape == (2, 24) and calls == []
    switch("patch_matmul=0")
    model.encode_video(video)
    assert calls == [1]


# ---------------------------------------------------------------------------------------------
# proxy_attention
# ---------------------------------------------------------------------------------------------
def run_variant(name, q, k, v, layout):
    """One formulation on (B, H, S, hd) q, k, v. ``views`` and ``buffer`` take the projection's
    layouts: here the projection is the identity on (q, k, v) stacked per token."""
    B, H, S, hd = q.shape
    qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)  # (B, S, 3, H, hd)
    if name == "views":
        M, T, L = layout.num_proxies, layout.num_frames, layout.patches_per_frame
        frames = attention.frame_major_tokens(qkv.reshape(B, S, 3 * H * hd), layout)  # (B, T, M+L, 3*H*hd)
        return attention.frame_major_attention(frames.view(B, T, M + L, 3, H, hd), layout)
    if name == "buffer":
        return attention.buffer_proxy_attention(qkv, layout)
    fn = {"cat": attention.proxy_guided_attention, "mask": attention.masked_proxy_attention,
          "flex": attention.flex_proxy_attention}[name]
    return fn(q, k, v, layout)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_proxy_attention_is_the_original(name, dtype):
    """Each formulation against the original (repeat + bmm), forward and gradients of q, k, v; bf16
    within twice the original's own bf16 error from the fp32 result."""
    torch.manual_seed(0)
    layout = ProxyLayout(num_proxies=4, num_frames=3, patches_per_frame=5)
    q, k, v = (torch.randn(2, 4, 4 + 15, 8) for _ in range(3))
    g = torch.randn(2, 4, 19, 8)

    backward = name != "flex"  # torch has no CPU backward for FlexAttention

    def result(fn, dtype):
        inputs = [t.to(dtype).requires_grad_(backward) for t in (q, k, v)]
        out = fn(*inputs, layout)
        if not backward:
            return out.float(), []
        return out.float(), [t.float() for t in torch.autograd.grad(out, inputs, g.to(dtype))]

    ref_out, ref_grads = result(attention.eager_proxy_guided_attention, torch.float32)
    out, grads = result(lambda *a: run_variant(name, *a), dtype)
    if dtype == torch.float32:
        tolerance = [1e-5] * 4
    else:  # the original formulation's own error in bf16, twice, as the bound
        own_out, own_grads = result(attention.eager_proxy_guided_attention, dtype)
        tolerance = [2 * (a - b).abs().max().item() + 1e-3 for a, b in zip([own_out, *own_grads], [ref_out, *ref_grads])]
    for got, want, tol in zip([out, *grads], [ref_out, *ref_grads], tolerance):
        assert (got - want).abs().max().item() <= tol


def test_the_proxy_mask_is_proxy_guided_attention():
    """Patches of frame 0 never see frame 1; proxies see everything, and everything sees them."""
    mask = attention.proxy_mask(2, 2, 3, torch.device("cpu"))  # S = 2 + 2*3
    assert mask[:2].all() and mask[:, :2].all()
    assert mask[2:5, 2:5].all() and not mask[2:5, 5:].any() and not mask[5:, 2:5].any()


@pytest.mark.parametrize("name", TRAINABLE_VARIANTS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_every_proxy_attention_in_the_whole_model(clip_folder, switch, name, dtype):
    """The whole model, both towers, features and every parameter's gradient, with each
    formulation asked for by name, against the original formulation (fp32: within 1e-5 as
    tests/test_fast_model.py; bf16: within twice the original's own bf16 error)."""
    model = build(clip_folder).train()
    video = torch.randn(2, 4, 3, 32, 32)
    ids, mask = random_text(2, 10, lengths=[10, 6])
    model.set_attention("eager")
    ref_feats, ref_grads = features_and_grads(model, video, ids, mask)
    own_feats, own_grads = features_and_grads(model, video, ids, mask, dtype) if dtype else (ref_feats, ref_grads)
    model.set_attention("sdpa")
    switch(f"proxy_attention={name}")
    feats, grads = features_and_grads(model, video, ids, mask, dtype)
    if dtype is None:
        assert (feats - ref_feats).abs().max() < 1e-5
        assert relative_error(grads, ref_grads) < 1e-5
    else:
        assert (feats - ref_feats).abs().max() <= 2 * (own_feats - ref_feats).abs().max() + 1e-3
        assert relative_error(grads, ref_grads) <= 2 * relative_error(own_grads, ref_grads) + 1e-3


def test_flex_in_the_whole_model_forward(clip_folder, switch):
    model = build(clip_folder).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        model.set_attention("eager")
        ref = model.encode_video(video)
        model.set_attention("sdpa")
        switch("proxy_attention=flex")
        out = model.encode_video(video)
    assert (out - ref).abs().max() < 1e-5


def test_auto_is_cat_on_cpus_and_views_on_gpus(switch):
    switch("1")
    assert fast_paths.proxy_attention_variant(torch.device("cpu")) == "cat"
    assert fast_paths.proxy_attention_variant(torch.device("cuda")) == "views"
    switch("proxy_attention=mask")
    assert fast_paths.proxy_attention_variant(torch.device("cuda")) == "mask"


# ---------------------------------------------------------------------------------------------
# weight_copies
# ---------------------------------------------------------------------------------------------
def make_step(model, **settings) -> OptimizerStep:
    """The engine's step on ``model`` in bf16 (learning rate 1e-3, constant)."""
    cfg = clipvip.load_config(None, ["--learning_rate", "1e-3"])
    step_settings = dataclasses.replace(StepSettings.from_config(cfg), **settings)
    train_mode(model, step_settings)
    optimizer = dataclasses.replace(OptimizerSettings.from_config(cfg), warmup_ratio=0.0, decay="constant")
    return OptimizerStep(model, build_loss(LossSettings("NCELearnableTempLoss", gather=False)), step_settings,
                         optimizer, "bf16", "cpu", total_steps=10)


def run_steps(step, batches, accumulate: int = 2, first: int = 1) -> torch.Tensor:
    """Optimizer steps of ``accumulate`` micro-batches each; their losses."""
    return torch.stack([step(first + i // accumulate, batches[i:i + accumulate]).loss
                        for i in range(0, len(batches), accumulate)])


def train_steps(model, batches, copies: bool, switch, accumulate: int = 2, **settings) -> torch.Tensor:
    """``run_steps`` on a fresh step, the weight copies on or off."""
    switch("1" if copies else "weight_copies=0")
    return run_steps(make_step(model, **settings), batches, accumulate)


def some_batches(n: int = 6, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids, mask = random_text(batch, 10, seed=i)
        out.append({"video": torch.randn(batch, 4, 3, 32, 32, generator=g), "text_input_ids": ids,
                    "text_input_mask": mask})
    return out


def test_weight_copies_train_as_autocast_does(clip_folder, switch, monkeypatch):
    """Two optimizer steps of two micro-batches each, bf16, with and without the copies: the same
    losses and the same fp32 weights afterwards (a copy is the cast autocast makes; its gradient
    reaches the fp32 master as autocast's does), with the copies really in use."""
    batches = some_batches(4)
    plain = build(clip_folder)
    plain_losses = train_steps(plain, batches, False, switch)
    used = []
    real_apply = low_precision.LowPrecisionCopy.apply
    monkeypatch.setattr(low_precision.LowPrecisionCopy, "apply", lambda *a: used.append(1) or real_apply(*a))
    model = build(clip_folder)
    losses = train_steps(model, batches, True, switch)
    assert len(used) == 4 * 11  # per micro-batch: 2 x 2 layers x (attention, MLP), the patches, 2 projections
    assert torch.allclose(losses, plain_losses, rtol=1e-5, atol=1e-6), (losses, plain_losses)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.dtype == torch.float32 and torch.allclose(p, q, rtol=1e-5, atol=1e-6), name


def test_weight_copies_with_a_frozen_text_tower(clip_folder, switch):
    """The frozen tower's copies carry quick_gelu's scalings where autocast's path for frozen
    weights passes them to addmm: the same function within bf16's own error (twice autocast's
    distance from fp32, as the bound); its copies are made once and never rewritten by a step."""
    model = build(clip_folder)
    model.freeze_text_encoder()
    ids, mask = random_text(8, 10)
    with torch.no_grad():
        exact = model.encode_text(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model.encode_text(ids, mask).float()
        with fast_paths.weight_copies(model, torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
            copies = model.encode_text(ids, mask).float()
    assert (copies - exact).abs().max() <= 2 * (autocast - exact).abs().max() + 1e-3
    text = low_precision.WeightCopies(model.clipmodel.text_model, torch.bfloat16)
    assert len(text) == 16 and text.refresh() == 0  # made above, still fresh
    train_steps(model, some_batches(2), True, switch, accumulate=1, freeze_text_encoder=True, frozen_text_cache=64)
    assert text.refresh() == 0


def test_weight_copies_give_autocasts_gradients(clip_folder, switch):
    """One forward and backward: the masters' fp32 gradients, with and without gradient
    checkpointing (whose recomputation reads the same copies)."""
    video = torch.randn(2, 4, 3, 32, 32)
    ids, mask = random_text(2, 10, lengths=[10, 6])
    for checkpointing in (False, True):
        model = build(clip_folder).train()
        model.set_grad_checkpointing(checkpointing)
        feats, grads = features_and_grads(model, video, ids, mask, torch.bfloat16)
        with fast_paths.weight_copies(model, torch.bfloat16) as copies:
            assert len(copies) == 35  # 2 x 2 layers x (4 attention + 4 MLP), the patch weight, 2 projections
            copy_feats, copy_grads = features_and_grads(model, video, ids, mask, torch.bfloat16)
        assert torch.allclose(copy_feats, feats, atol=1e-6)
        assert relative_error(copy_grads, grads) < 1e-6


def test_copies_are_made_once_per_step_and_never_saved(clip_folder, switch):
    model = build(clip_folder)
    keys = {k: v.dtype for k, v in model.state_dict().items()}
    train_mode(model, StepSettings.from_config(clipvip.load_config(None, ["--freeze_text_encoder", "1"])))
    copies = low_precision.WeightCopies(model, torch.bfloat16)
    assert copies.refresh() == 35 and copies.refresh() == 0  # nothing changed in between
    copies.release()
    with torch.no_grad():
        model.clipmodel.vision_model.encoder.layers[0].mlp.fc1.weight.add_(1.0)  # what an optimizer does
    assert low_precision.WeightCopies(model, torch.bfloat16).refresh() == 1
    train_steps(model, some_batches(2), True, switch)
    # What the step's optimizer changed is stale (the fused AdamW's changes included), the frozen
    # text tower's 16 copies are not.
    assert low_precision.WeightCopies(model, torch.bfloat16).refresh() == 35 - 16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.0)  # bumps every version counter
    assert low_precision.WeightCopies(model, torch.bfloat16).refresh() == 35
    assert {k: v.dtype for k, v in model.state_dict().items()} == keys
    assert not any(b.dtype == torch.bfloat16 for b in model.buffers())


def test_copies_only_inside_the_block_and_only_for_their_dtype(clip_folder, switch):
    model = build(clip_folder).eval()
    video = torch.randn(2, 4, 3, 32, 32)
    attn = model.clipmodel.vision_model.encoder.layers[0].self_attn
    with fast_paths.weight_copies(model, None) as none:  # fp32: nothing to copy
        assert none is None
    with fast_paths.weight_copies(model, torch.bfloat16):
        assert low_precision.active(attn, video) is None  # no autocast here
        with torch.autocast("cpu", dtype=torch.float16):
            assert low_precision.active(attn, video) is None  # another dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            weights = low_precision.active(attn, video)
            assert weights["qkv_weight"].dtype == torch.bfloat16 and weights["qkv_weight"].shape == (96, 32)
    assert low_precision.active(attn, video) is None
    switch("weight_copies=0")
    with fast_paths.weight_copies(model, torch.bfloat16) as off:
        assert off is None


def test_evaluation_casts_once_and_encodes_as_autocast(clip_folder):
    model = build(clip_folder).eval()
    video = torch.randn(3, 4, 3, 32, 32)
    ids, mask = random_text(3, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = (model.encode_video(video), model.encode_text(ids, mask))
    with torch.inference_mode():
        copies = low_precision.WeightCopies(model, torch.bfloat16)
        copies.refresh()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = (model.encode_video(video), model.encode_text(ids, mask))
        copies.release()
        assert low_precision.WeightCopies(model, torch.bfloat16).refresh() == 0  # the next batch: no cast
    for a, b in zip(out, ref):  # the MLP folds its scalings into the copies (autocast: addmm's alpha)
        assert (a.float() - b.float()).abs().max() < 2e-2
    # Copies made under inference_mode still serve a training step afterwards.
    model.train()
    with fast_paths.weight_copies(model, torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_video(video).float().sum().backward()
    assert model.clipmodel.vision_model.encoder.layers[0].self_attn.q_proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# compile: the whole training step in one graph
# ---------------------------------------------------------------------------------------------
def test_the_compiled_step_is_one_graph_and_trains_as_the_eager_one(clip_folder, switch):
    """bf16 with the weight copies, the GPUs' proxy attention (views), the frozen text tower and its
    cache: dynamo captures forward + loss whole (fullgraph=True: a graph break would raise), the
    next steps reuse the graph (a retrace would raise), and the weights equal the eager step's.
    ``eager`` backend: the capture is the point; CLIPVIP_TEST_COMPILE_BACKEND=aot_eager or
    inductor also traces the backward / generates code (slower)."""
    backend = os.environ.get("CLIPVIP_TEST_COMPILE_BACKEND", "eager")
    batches = some_batches(3)
    settings = {"freeze_text_encoder": True, "frozen_text_cache": 64}
    switch("proxy_attention=views")
    eager = build(clip_folder)
    eager_losses = run_steps(make_step(eager, **settings), batches, accumulate=1)
    torch._dynamo.reset()
    model = build(clip_folder)
    step = make_step(model, compile=True, compile_backend=backend, **settings)
    try:
        first = run_steps(step, batches[:1], accumulate=1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            rest = run_steps(step, batches[1:], accumulate=1, first=2)
    finally:
        torch._dynamo.reset()
    assert model.text_cache is not None and len(model.text_cache) == 0  # bypassed inside the graph
    # Capture-only backends run the same kernels; inductor fuses the bf16 elementwise work in fp32
    # (another rounding, as any change of kernels): bf16's tolerance there.
    close = {"rtol": 1e-5, "atol": 1e-6} if backend != "inductor" else {"rtol": 5e-2, "atol": 1e-2}
    assert torch.allclose(torch.cat([first, rest]), eager_losses, **close)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.allclose(p, q, **close), name


# ---------------------------------------------------------------------------------------------
# clipvip bench: what gpu_check selects the fast paths with
# ---------------------------------------------------------------------------------------------
def test_bench_times_each_fast_path_by_name_and_names_the_fastest():
    """One process, the variants alternating: the defaults (sdpa) against one fast path changed each,
    by --fast-paths switch values and by --variants' paths: token alike."""
    from test_bench import TINY, run_bench

    report = run_bench("--mode", "both", *TINY, "--precision", "bf16", "--attn", "sdpa", "--fast-paths", "on",
                       "weight_copies=0", "proxy_attention=views")
    assert "errors" not in report, report.get("errors")
    assert report["settings"]["fast_paths"]["measured"] == ["on", "weight_copies=0", "proxy_attention=views"]
    names = {"sdpa", "sdpa[weight_copies=0]", "sdpa[proxy_attention=views]"}
    assert {v: report["settings"]["variants"][v]["fast_paths"] for v in names} == {
        "sdpa": "1", "sdpa[weight_copies=0]": "weight_copies=0", "sdpa[proxy_attention=views]": "proxy_attention=views"}
    for mode in ("encode", "train"):
        for block in report["results"][mode].values():  # one block per batch size
            assert names <= set(block) and block["fastest"] in names
            for name in names - {"sdpa"}:
                assert block[f"speedup_{name}_vs_sdpa_paired"] > 0
    assert fast_paths.current() == "1"  # this process: untouched by the subprocess


def test_bench_refuses_an_unknown_switch_value_before_running():
    from clipvip.apps import bench

    args = bench.build_parser().parse_args(["--fast-paths", "on", "proxy_attention=dense"])
    with pytest.raises(ValueError, match="proxy_attention takes one of"):
        bench.bench_variants(args)
    args = bench.build_parser().parse_args(["--variants", "sdpa+paths:proxy_attention=dense"])
    with pytest.raises(ValueError, match="proxy_attention takes one of"):
        bench.bench_variants(args)


def test_bench_variant_tokens_select_a_switch_value():
    from clipvip.apps import bench

    args = bench.build_parser().parse_args(["--variants", "sdpa+paths:weight_copies=0@2", "bf16+eager", "--batch", "2"])
    copies_off, eager = bench.bench_variants(args)
    assert copies_off.name == "sdpa+paths:weight_copies=0"
    assert (copies_off.fast_paths, copies_off.batches) == ("weight_copies=0", (2,))
    assert (eager.attn, eager.fast_paths, eager.precision) == ("eager", "0", "bf16")


# ---------------------------------------------------------------------------------------------
# DDP: the copies' gradients reach the fp32 masters, which DDP all-reduces
# ---------------------------------------------------------------------------------------------
def _ddp_worker(rank, port, folder, out_dir):
    from clipvip import distributed as D

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    D.init_distributed(backend="gloo", device="cpu")
    try:
        batches = some_batches(4)[2 * rank:2 * rank + 2]  # each rank its own micro-batches
        for copies in (False, True):
            fast_paths.configure("1" if copies else "weight_copies=0")
            model = build(folder)
            ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            cfg = clipvip.load_config(None, ["--learning_rate", "1e-3"])
            settings = StepSettings.from_config(cfg)
            train_mode(model, settings)
            optimizer = dataclasses.replace(OptimizerSettings.from_config(cfg), warmup_ratio=0.0, decay="constant")
            step = OptimizerStep(model, build_loss(LossSettings("NCELearnableTempLoss", gather=True), D.get_env()),
                                 settings, optimizer, "bf16", "cpu", total_steps=10, forward_model=ddp)
            for i, batch in enumerate(batches):
                step(i + 1, [batch])
            torch.save({n: p.detach() for n, p in model.named_parameters()},
                       os.path.join(out_dir, f"rank{rank}_copies{int(copies)}.pt"))
            del ddp, step
    finally:
        D.cleanup()
    sys.stdout.flush()
    os._exit(0)  # as tests/test_distributed.py: only the checks decide


def test_ddp_with_weight_copies_trains_as_without(clip_folder, tmp_path):
    """Two gloo processes, bf16, two optimizer steps: with the copies the ranks stay identical (DDP
    saw every master's gradient) and equal to the run without them."""
    from test_distributed import _free_port, run_spawned

    run_spawned(_ddp_worker, (_free_port(), clip_folder, str(tmp_path)), timeout=300)
    runs = {(r, c): torch.load(tmp_path / f"rank{r}_copies{c}.pt", weights_only=True) for r in (0, 1) for c in (0, 1)}
    for name, value in runs[(0, 1)].items():
        assert torch.equal(value, runs[(1, 1)][name]), name  # DDP: the same update on both ranks
        assert torch.allclose(value, runs[(0, 0)][name], rtol=1e-5, atol=1e-6), name
    start = build(clip_folder)
    assert not torch.equal(runs[(0, 1)]["clipmodel.visual_projection.weight"], start.clipmodel.visual_projection.weight)
