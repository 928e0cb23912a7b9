"""The fast model path (sdpa, fused QKV, folded quick_gelu, oneDNN matmuls, fused AdamW, compile)
computes what the original formulation (``attn_implementation: eager``) computes."""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

import clipvip
from clipvip.model import fast_paths
from clipvip.model.fast_paths import quick_gelu_mlp
from clipvip.model.layers import ProxyLayout, eager_proxy_guided_attention, quick_gelu
from test_model import eager_proxy_attention
from tiny_models import random_text, tiny_cfg, write_hf_clip

ATOL = 1e-5


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip") / "tiny")
    write_hf_clip(folder)
    return folder


def build(clip_folder, *overrides, **extra):
    torch.manual_seed(0)
    model = clipvip.build_model(tiny_cfg(clip_folder, *overrides, **extra))
    with torch.no_grad():
        if hasattr(model.clipmodel.vision_model.embeddings, "temporal_embedding"):
            model.clipmodel.vision_model.embeddings.temporal_embedding.normal_()
    return model


def both(model, fn):
    """fn() under eager, then under sdpa."""
    out = []
    for impl in ("eager", "sdpa"):
        model.set_attention(impl)
        out.append(fn())
    return out


def test_library_eager_is_the_original_formulation():
    torch.manual_seed(0)
    layout = ProxyLayout(num_proxies=4, num_frames=3, patches_per_frame=5)
    q, k, v = (torch.randn(2, 4, 4 + 15, 8) for _ in range(3))
    assert torch.allclose(eager_proxy_guided_attention(q, k, v, layout), eager_proxy_attention(q, k, v, layout),
                          atol=1e-6)


def test_default_is_sdpa_and_config_switch(clip_folder):
    assert build(clip_folder).clipmodel.attention_implementation == "sdpa"
    model = build(clip_folder, "--attn_implementation", "eager")
    assert model.clipmodel.attention_implementation == "eager"
    assert not any(layer.mlp.fold_activation for layer in model.clipmodel.vision_model.encoder.layers)
    with pytest.raises(clipvip.ConfigError, match="attn_implementation"):
        build(clip_folder, "--attn_implementation", "flash")
    with pytest.raises(ValueError, match="unknown attention"):
        model.set_attention("flash")


def test_eager_never_calls_sdpa(clip_folder, monkeypatch):
    model = build(clip_folder, "--attn_implementation", "eager").eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("the eager formulation must not use SDPA")

    monkeypatch.setattr(F, "scaled_dot_product_attention", forbidden)
    ids, mask = random_text(2, 10)
    with torch.no_grad():
        model(torch.randn(2, 3, 3, 32, 32), ids, mask)


@pytest.mark.parametrize("frames", [1, 4])
def test_video_and_text_towers_equal_through_the_switch(clip_folder, frames):
    model = build(clip_folder).eval()
    video = torch.randn(3, frames, 3, 32, 32)
    ids, mask = random_text(4, 12, lengths=[12, 5, 2, 8])  # padded captions: the mask matters
    with torch.no_grad():
        (v_eager, t_eager), (v_fast, t_fast) = both(
            model, lambda: (model.encode_video(video), model.encode_text(ids, mask)))
    assert torch.allclose(v_eager, v_fast, atol=ATOL), (v_eager - v_fast).abs().max()
    assert torch.allclose(t_eager, t_fast, atol=ATOL), (t_eager - t_fast).abs().max()


def test_meanpool_baseline_equal_through_the_switch(clip_folder):
    model = build(clip_folder, type="meanpool").eval()
    video = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        slow, fast = both(model, lambda: model.encode_video(video))
    assert torch.allclose(slow, fast, atol=ATOL)


def test_gradients_equal_through_the_switch(clip_folder):
    model = build(clip_folder).train()
    video = torch.randn(2, 4, 3, 32, 32)
    ids, mask = random_text(2, 10, lengths=[10, 6])

    def grads():
        model.zero_grad()
        out = model(video, ids, mask)
        loss = F.cross_entropy(model.logit_scale.exp() * out["vis_features"] @ out["text_features"].T,
                               torch.arange(2))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    slow, fast = both(model, grads)
    assert slow.keys() == fast.keys() and len(slow) > 50
    scale = max(g.abs().max() for g in slow.values())
    for name, g in slow.items():
        assert torch.allclose(g, fast[name], atol=1e-5 * scale, rtol=1e-4), name


def test_quick_gelu_mlp_is_the_written_formula(monkeypatch):
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)
    x = torch.randn(3, 7, 16, requires_grad=True)
    ref = fc2(quick_gelu(fc1(x)))
    for onednn in (False, True):
        monkeypatch.setattr(fast_paths, "onednn_linear_faster", lambda: onednn and fast_paths._onednn_op() is not None)
        out = quick_gelu_mlp(x, fc1, fc2)
        assert torch.allclose(out, ref, atol=1e-6)
        g_ref = torch.autograd.grad(ref.sum(), [x, fc1.weight, fc2.bias], retain_graph=True)
        g_out = torch.autograd.grad(out.sum(), [x, fc1.weight, fc2.bias])
        for a, b in zip(g_ref, g_out):
            assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # evaluation: silu in place
        assert torch.allclose(quick_gelu_mlp(x, fc1, fc2), ref, atol=1e-6)
    # Frozen weights, a gradient for x only (a frozen layer below a learning one): the addmm scalings.
    monkeypatch.setattr(fast_paths, "onednn_linear_faster", lambda: False)
    fc1.requires_grad_(False), fc2.requires_grad_(False)
    out = quick_gelu_mlp(x, fc1, fc2)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0], atol=1e-5)


@pytest.mark.parametrize("size, patch, bias", [(32, 8, False), (48, 16, True), (36, 8, False)])
def test_patch_embedding_is_the_convolution(size, patch, bias):
    """One matmul over the cut-out patches = the patchifying convolution, forward and gradients
    (36 px at patch 8 does not divide: the convolution itself, which drops the remainder)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel_size=patch, stride=patch, bias=bias)
    frames = torch.randn(5, 3, size, size, requires_grad=True)
    ref = conv(frames).flatten(2).transpose(1, 2)  # (N, L, D)
    out = fast_paths.patch_embedding(frames, conv)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    params = [frames, conv.weight] + ([conv.bias] if bias else [])
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        assert torch.allclose(a, b, atol=1e-4)


def test_eager_embeds_patches_with_the_convolution(clip_folder, monkeypatch):
    model = build(clip_folder)
    calls = []
    monkeypatch.setattr(fast_paths, "patch_embedding",
                        lambda f, c, w=None: calls.append(1) or c(f).flatten(2).transpose(1, 2))
    video = torch.randn(1, 4, 3, 32, 32)
    model.encode_video(video)
    assert calls == [1]
    model.set_attention("eager")
    model.encode_video(video)
    assert calls == [1]  # the original formulation: the convolution
    model.set_attention("sdpa")
    model.encode_video(video)
    assert calls == [1, 1]


@pytest.mark.skipif(fast_paths._onednn_op() is None, reason="torch without oneDNN's dense linear op")
def test_onednn_linear_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 24, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    out = fast_paths.OneDNNLinear.apply(x, w, b)
    ref = F.linear(x, w, b)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, w, b], g)
    want = torch.autograd.grad(ref, [x, w, b], g)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-4)
    # without bias, and only some inputs needing a gradient
    w.requires_grad_(False)
    out = fast_paths.OneDNNLinear.apply(x, w, None)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    assert torch.allclose(gx, F.linear(torch.ones(2, 9, 40), w.t()), atol=1e-4)
    # bf16 autocast and other dtypes stay with F.linear (autocast would not see our Function)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast_paths.uses_onednn(x, w)
    assert not fast_paths.uses_onednn(x.double(), w.double())


def test_fused_adamw_on_cpu_skips_a_nonfinite_update(clip_folder):
    from clipvip.engine.optim import OptimizerSettings, build_optimizer

    model = build(clip_folder)
    cfg = clipvip.load_config(None, ["--learning_rate", "1e-3"])
    opt = build_optimizer(model, OptimizerSettings.from_config(cfg))
    if not opt.defaults.get("fused"):
        pytest.skip("no fused AdamW for CPU in this torch")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.found_inf = torch.ones(())  # what GradScaler hands a fused optimizer: skip, on the device
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    del opt.found_inf
    opt.step()
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_compile_keeps_outputs_and_checkpoint_keys(clip_folder):
    """torch.compile on the encoder layers: dynamo captures each layer whole (fullgraph) for both
    towers in train and eval, same outputs, same state-dict keys. ``aot_eager`` checks the
    capture quickly; CLIPVIP_TEST_INDUCTOR=1 also runs inductor's code generation (minutes)."""
    if not hasattr(torch, "compile"):
        pytest.skip("no torch.compile")
    backend = "inductor" if os.environ.get("CLIPVIP_TEST_INDUCTOR") == "1" else "aot_eager"
    model = build(clip_folder)
    keys = list(model.state_dict())
    video = torch.randn(2, 4, 3, 32, 32)
    ids, mask = random_text(2, 10, lengths=[10, 6])
    with torch.no_grad():
        ref = model.eval()(video, ids, mask)
    torch._dynamo.reset()
    clipvip.model.compile_model(model, backend=backend, fullgraph=True)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(video, ids, mask)
    for k in ref:
        assert torch.allclose(ref[k], out[k], atol=ATOL), k
    model.train()
    out = model(video, ids, mask)
    (out["vis_features"].sum() + out["text_features"].sum()).backward()
    assert all(p.grad is not None for p in model.clipmodel.vision_model.encoder.parameters())
    torch._dynamo.reset()


def test_cpu_bf16_uses_the_bmm_kernels(clip_folder, monkeypatch):
    """bf16 on a CPU: the fast path takes bmm + softmax (faster there than torch's CPU SDPA kernel)
    and still computes what the eager formulation computes, within bf16 rounding."""
    model = build(clip_folder).eval()
    video = torch.randn(2, 3, 3, 32, 32)
    ids, mask = random_text(2, 10, lengths=[10, 4])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.set_attention("eager")
        slow = (model.encode_video(video), model.encode_text(ids, mask))
        model.set_attention("sdpa")
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: 1 / 0)
        fast = (model.encode_video(video), model.encode_text(ids, mask))
    for a, b in zip(slow, fast):
        assert torch.allclose(a.float(), b.float(), atol=2e-2)


# ---------------------------------------------------------------------------------------------
# The switch: each fast path only where it is faster here, and all of them off at once
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_onednn_decision():
    """The once-per-process oneDNN decision, measured again inside the test and after it."""
    fast_paths.onednn_linear_speedup.cache_clear()
    yield
    fast_paths.onednn_linear_speedup.cache_clear()


def forbid_onednn(monkeypatch):
    def forbidden(*args):
        raise AssertionError("oneDNN must not be used here")

    monkeypatch.setattr(fast_paths.OneDNNLinear, "apply", forbidden)


def test_onednn_measured_slower_is_not_used(monkeypatch, fresh_onednn_decision):
    monkeypatch.setattr(fast_paths, "_cpu_has_avx512", lambda: True)
    monkeypatch.setattr(fast_paths, "_probe_speedup", lambda op: 0.85)  # the AVX2 EPYC's ratio
    forbid_onednn(monkeypatch)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert not fast_paths.onednn_linear_faster()
    assert torch.allclose(fast_paths.linear(x, w), F.linear(x, w))


def test_onednn_needs_avx512_before_it_is_timed(monkeypatch, fresh_onednn_decision):
    monkeypatch.setattr(fast_paths, "_cpu_has_avx512", lambda: False)
    monkeypatch.setattr(fast_paths, "_probe_speedup", lambda op: 1 / 0)  # never measured
    forbid_onednn(monkeypatch)
    assert not fast_paths.onednn_linear_faster()
    fast_paths.linear(torch.randn(4, 8), torch.randn(6, 8))


@pytest.mark.skipif(fast_paths._onednn_op() is None, reason="torch without oneDNN's dense linear op")
def test_onednn_measured_faster_is_used_and_measured_once(monkeypatch, fresh_onednn_decision):
    calls = []
    monkeypatch.setattr(fast_paths, "_cpu_has_avx512", lambda: True)
    monkeypatch.setattr(fast_paths, "_probe_speedup", lambda op: calls.append(op) or 2.0)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert fast_paths.uses_onednn(x, w) and fast_paths.uses_onednn(x, w)
    assert len(calls) == 1
    assert torch.allclose(fast_paths.linear(x, w), F.linear(x, w), atol=1e-5)


def test_the_real_probe_compares_the_two_kernels():
    if fast_paths._onednn_op() is None:
        pytest.skip("torch without oneDNN's dense linear op")
    state = torch.random.get_rng_state()
    assert fast_paths._probe_speedup(fast_paths._onednn_op()) > 0
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random stream is untouched


def test_nothing_is_measured_at_import():
    code = ("import clipvip, clipvip.model.fast_paths as f; "
            "assert f.onednn_linear_speedup.cache_info().currsize == 0")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_one_switch_turns_every_fast_path_off(clip_folder, monkeypatch):
    model = build(clip_folder).eval()
    video = torch.randn(2, 3, 3, 32, 32)
    ids, mask = random_text(2, 10, lengths=[10, 4])
    with torch.no_grad():
        fast = (model.encode_video(video), model.encode_text(ids, mask))
        previous = fast_paths.set_enabled(False)
        try:
            for name in ("self_attention", "mlp", "embed_patches", "fused_qkv", "quick_gelu_mlp",
                         "linear", "prefers_bmm_attention"):
                monkeypatch.setattr(fast_paths, name, lambda *a, name=name: 1 / 0)
            plain = (model.encode_video(video), model.encode_text(ids, mask))
        finally:
            fast_paths.set_enabled(previous)
    assert model.clipmodel.attention_implementation == "sdpa"
    for a, b in zip(fast, plain):
        assert torch.allclose(a, b, atol=ATOL)
