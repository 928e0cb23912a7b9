"""``python -m clipvip bench``: every mode runs on a tiny shape and reports its fields; the
analytic FLOPs behind MFU match a count of the model's matmuls."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from clipvip.apps import bench

TINY = ["--arch", "b32", "--width", "32", "--heads", "2", "--layers", "1", "--text-width", "32",
        "--text-heads", "2", "--text-layers", "1", "--res", "64", "--frames", "3", "--batch", "2",
        "--text-len", "8", "--warmup", "1", "--steps", "1", "--rounds", "2", "--threads", "1"]


def run_bench(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "clipvip", "bench", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_variant(entry, batch=2):
    assert entry["clips_per_s"] > 0 and entry["ms_per_batch"] > 0 and entry["samples"] == 2
    assert entry["clips_per_s"] == pytest.approx(batch / entry["ms_per_batch"] * 1e3, rel=1e-2)
    assert entry["memory"]["method"] in ("rss_hwm_delta", "ru_maxrss_delta", "cuda_max_memory_allocated")
    assert isinstance(entry["memory"]["peak_bytes"], int)
    assert entry["model_tflops_per_s"] >= 0
    # where the host stands: measured on any device; the GPU's busy time only with a GPU clock
    assert 0 < entry["host_cpu_ms"] and 0 < entry["host_ms"] <= entry["ms_per_batch"] * 1.01
    assert entry["gpu_busy_ms"] is None and entry["host_bound_share"] is None


def test_encode_and_train_side_by_side():
    report = run_bench("--mode", "both", *TINY, "--peak-tflops", "1.5")
    assert {"machine", "settings", "model_gflops", "peak_tflops", "results"} <= set(report)
    assert report["machine"]["torch_threads"] == 1 and "load_average_1min" in report["machine"]
    assert report["settings"]["vision"] == {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "patch_size": 32}
    assert report["peak_tflops"] == 1.5 and report["peak_source"] == "--peak-tflops"
    assert set(report["results"]) == {"encode", "train"}
    assert report["settings"]["batch"] == [2] and report["complete"]
    for mode in ("encode", "train"):
        assert set(report["results"][mode]) == {"2"}
        block = report["results"][mode]["2"]
        for attn in ("eager", "sdpa"):
            check_variant(block[attn])
            assert 0 <= block[attn]["mfu"] < 1
            # MFU by hand: the step's model FLOPs over its median time over the peak
            flops = report["model_gflops"]["2"]["train_step" if mode == "train" else "video_forward"] * 1e9
            assert block[attn]["model_gflops"] * 1e9 == pytest.approx(flops, rel=1e-3)
            tflops = flops / (block[attn]["ms_per_batch"] / 1e3) / 1e12
            assert block[attn]["model_tflops_per_s"] == pytest.approx(tflops, rel=2e-2, abs=1e-3)
            assert block[attn]["mfu"] == pytest.approx(tflops / 1.5, rel=2e-2, abs=1e-4)
        assert block["speedup_sdpa_vs_eager_paired"] > 0
        assert block["speedup_sdpa_vs_eager"] == pytest.approx(
            block["eager"]["ms_per_batch"] / block["sdpa"]["ms_per_batch"], rel=1e-2)
    for entry in report["results"]["train"]["2"].values():
        if isinstance(entry, dict):
            assert isinstance(entry["fused_optimizer"], bool)
            assert entry["nonfinite_check"] == "step"  # auto on a CPU
    assert "errors" not in report


def test_one_variant_with_checkpointing_and_bf16():
    report = run_bench("--mode", "train", *TINY, "--attn", "sdpa", "--grad-checkpointing", "--precision", "bf16",
                       "--nonfinite-check", "deferred")
    assert set(report["results"]) == {"train"}
    block = report["results"]["train"]["2"]
    assert block["sdpa"]["nonfinite_check"] == ("deferred" if block["sdpa"]["fused_optimizer"] else "step")
    check_variant(block["sdpa"])
    assert block["sdpa"]["variant"]["grad_checkpointing"] and block["sdpa"]["variant"]["precision"] == "bf16"
    assert "eager" not in block and "speedup_sdpa_vs_eager" not in block
    assert report["settings"]["grad_checkpointing"] and report["settings"]["precision"] == "bf16"
    assert report["peak_tflops"] is None  # CPU: no table entry and no --measure-peak


def test_profile_lists_the_costliest_operators():
    report = run_bench("--mode", "train", *TINY, "--attn", "sdpa", "--profile", "5")
    profile = report["results"]["train"]["2"]["sdpa"]["profile"]
    assert profile["clock"] == "cpu" and len(profile["top"]) == 5 and profile["busy_ms"] is None
    shares = [row["share"] for row in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert all(row["calls"] >= 1 and row["self_ms"] >= 0 for row in profile["top"])


def test_compile_path():
    """The capture-only backend keeps this quick; a compile failure would be reported in "errors"."""
    report = run_bench("--mode", "encode", *TINY, "--attn", "sdpa", "--compile", "--compile-backend", "aot_eager")
    assert report["settings"]["compile"] == "aot_eager"
    assert "errors" not in report, report.get("errors")
    check_variant(report["results"]["encode"]["2"]["sdpa"])
    assert report["results"]["encode"]["2"]["sdpa"]["compiled"]


def test_fp16_on_cpu_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "clipvip", "bench", "--mode", "encode", *TINY, "--precision", "fp16",
                           "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --precision fp16") and not proc.stdout


def test_data_mode():
    report = run_bench("--mode", "data", "--clips", "1", "--clip-frames", "8", "--size", "48x64", "--frames", "4",
                       "--res", "32", "--repeats", "1", "--no-real")
    assert report["per_clip"] == {"sampled_frames": 4, "model_input": [4, 3, 32, 32]}
    assert report["machine"]["torch_threads"] == 1
    results = report["results"]
    backends = [b for b in ("decord", "pyav") if b in results]
    assert backends
    for backend in backends:
        for row in ("decode_sample", "decode_sample_transform"):
            assert results[backend][row]["clips_per_s"] > 0 and results[backend][row]["clips_per_cpu_s"] > 0
    if shutil.which("ffmpeg"):
        ffmpeg = results["ffmpeg_cli"]
        for row in ("decode_all_frames_to_rgb_pipe", "decode_same_frames_to_rgb_pipe",
                    "decode_same_frames_resize_to_rgb_pipe"):
            assert ffmpeg[row]["clips_per_cpu_s"] > 0 and ffmpeg[row]["clips_per_cpu_s_without_start"] > 0
        assert ffmpeg["process_start_cpu_ms"] > 0
        assert set(results["cost_vs_ffmpeg_same_frames"]) == {f"{b}/{r}" for b in backends
                                                               for r in ("decode_sample", "decode_sample_transform")}
    else:
        assert "skipped" in results["ffmpeg_cli"]


@pytest.mark.parametrize("frames", [1, 3])
def test_analytic_flops_match_counted_matmuls(frames):
    """The MFU numerator: the eager model's counted matmul FLOPs (its bmm attention computes exactly
    the proxy-guided pairs; text attention is counted full, as the analytic convention says)."""
    from torch.utils.flop_counter import FlopCounterMode

    args = bench.build_parser().parse_args(TINY[:-2])
    arch = bench.bench_clip_config(args)
    model = bench.build_bench_model(arch).eval()
    model.set_attention("eager")
    video, ids, mask = bench._inputs(arch, 2, frames, 8, torch.device("cpu"))
    expected = bench.model_flops(arch, 2, frames, 8)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.clipmodel.get_video_features(video)
        assert counter.get_total_flops() == expected["video_forward"]
        with FlopCounterMode(display=False) as counter:
            model.clipmodel.get_text_features(ids, mask)
        assert counter.get_total_flops() == expected["text_forward"]


def test_shape_overrides_and_errors():
    args = bench.build_parser().parse_args(["--arch", "b16", "--width", "384", "--heads", "6", "--res", "112"])
    arch = bench.bench_clip_config(args)
    assert arch["vision_config"]["hidden_size"] == 384 and arch["vision_config"]["intermediate_size"] == 1536
    assert arch["vision_config"]["patch_size"] == 16 and arch["vision_config"]["image_size"] == 112
    assert arch["text_config"]["hidden_size"] == 512  # text tower untouched
    for bad, match in ((["--arch", "vit-h"], "unknown --arch"), (["--width", "100", "--heads", "3"], "divisible"),
                       (["--res", "100"], "multiple of the patch")):
        with pytest.raises(bench.ConfigError, match=match):
            bench.bench_clip_config(bench.build_parser().parse_args(bad))


def test_a_compile_failure_is_reported_and_the_run_goes_on():
    report = run_bench("--mode", "encode", *TINY, "--attn", "sdpa", "--compile", "--compile-backend", "no-such-backend")
    assert "no-such-backend" in report["errors"]["compile"]
    check_variant(report["results"]["encode"]["2"]["sdpa"])
    assert report["results"]["encode"]["2"]["sdpa"]["compiled"] is False


def test_training_step_flops_match_counted_matmuls():
    """The MFU numerator of a training step, against torch's count of the eager model's forward,
    loss and backward: equal but for the frames' gradient, which the convention counts
    (3x forward) and autograd never computes (the patch embedding's forward once more)."""
    from torch.utils.flop_counter import FlopCounterMode

    args = bench.build_parser().parse_args(TINY[:-2])
    arch = bench.bench_clip_config(args)
    model = bench.build_bench_model(arch).train()
    model.set_attention("eager")
    video, ids, mask = bench._inputs(arch, 2, 3, 8, torch.device("cpu"))
    loss_fn = bench.build_loss(bench.LossSettings("NCELearnableTempLoss", gather=False))
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(video, ids, mask), model.logit_scale).total.backward()
    v = arch["vision_config"]
    patches = 2 * 3 * (v["image_size"] // v["patch_size"]) ** 2  # clips x frames x patches per frame
    frames_gradient = 2 * patches * 3 * v["patch_size"] ** 2 * v["hidden_size"]
    assert counter.get_total_flops() == bench.model_flops(arch, 2, 3, 8)["train_step"] - frames_gradient


def test_utilisation_and_host_share_arithmetic():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    tflops, mfu = bench.utilisation(10.4e12, 0.080, 989.0)  # issue 23's B/32 step: 10.4 TFLOP in 80 ms
    assert tflops == pytest.approx(130.0) and mfu == pytest.approx(130.0 / 989.0)
    assert bench.utilisation(1e12, 1.0, None) == (1.0, None)
    assert bench.host_bound_share(60.0, 80.0) == 0.25  # the GPU ran 60 ms of an 80 ms step
    assert bench.host_bound_share(90.0, 80.0) == 0.0 and bench.host_bound_share(None, 80.0) is None

    def event(device, us, annotation=False, legacy=False):
        return SimpleNamespace(device_type=device, self_device_time_total=us, is_user_annotation=annotation,
                               is_legacy=legacy)
    events = [event(DeviceType.CPU, 700.0),  # an operator's row: its kernels' time again, not added
              event(DeviceType.CUDA, 500.0), event(DeviceType.CUDA, 200.0),  # the kernels
              event(DeviceType.CUDA, 900.0, annotation=True)]  # a range on the GPU's timeline
    assert bench.device_busy_us(events) == 700.0
    assert bench.device_busy_us([event(DeviceType.CPU, 300.0, legacy=True)]) == 300.0


def test_variants_are_named_by_their_switches():
    def variants(*argv):
        return bench.bench_variants(bench.build_parser().parse_args(["--batch", "32", "64", *argv]))

    default = variants("--precision", "bf16")
    assert [v.name for v in default] == ["eager", "sdpa", "sdpa_plain"]
    assert [(v.attn, v.fast_paths, v.precision) for v in default] == [
        ("eager", "0", "bf16"), ("sdpa", "1", "bf16"), ("sdpa", "0", "bf16")]
    parsed = variants("--precision", "bf16", "--variants", "sdpa", "fp16+eager@32", "sdpa+plain+hostcheck+ckpt@32,64",
                      "sdpa+compile@64")
    assert [v.name for v in parsed] == ["sdpa", "fp16+eager", "sdpa+plain+hostcheck+ckpt", "sdpa+compile"]
    sdpa, eager, plain, compiled = parsed
    assert (sdpa.precision, sdpa.attn, sdpa.fast_paths, sdpa.batches, sdpa.compile) == ("bf16", "sdpa", "1", None, False)
    assert (eager.precision, eager.attn, eager.fast_paths, eager.batches) == ("fp16", "eager", "0", (32,))
    assert (plain.fast_paths, plain.nonfinite_check, plain.grad_checkpointing, plain.batches) == (
        "0", "step", True, (32, 64))
    assert compiled.compile and compiled.batches == (64,)
    for bad, match in ((["sdpa+bf61"], "unknown 'bf61' \\(did you mean 'bf16'\\?\\)"),
                       (["eager+fast"], "'fast' contradicts an earlier token \\(fast_paths\\)"),
                       (["sdpa@128"], "batch 128 is not one of --batch 32 64"),
                       (["sdpa@x"], "batch sizes after '@'"),
                       (["sdpa", "sdpa@32"], "sdpa is given twice at batch 32")):
        with pytest.raises(bench.ConfigError, match=match):
            variants("--variants", *bad)


def test_variants_and_batch_sizes_in_one_process(tmp_path):
    """Several batch sizes and named variants, one process: each runs where asked, its switches
    recorded, the compiled one last; the report is also written to --out and the table to stderr."""
    out, table = tmp_path / "report.json", tmp_path / "table.md"
    at = TINY.index("--batch")
    tiny = TINY[:at] + TINY[at + 2:]
    report = run_bench("--mode", "train", *tiny, "--batch", "2", "3", "--variants", "sdpa", "fp32+eager@2",
                       "bf16+sdpa+hostcheck@3", "sdpa+compile@2", "--compile-backend", "aot_eager",
                       "--out", str(out), "--table", str(table))
    assert json.loads(out.read_text()) == report and report["complete"]
    # Per batch size: the variants' entries, and the speedups and the fastest beside them.
    blocks = report["results"]["train"]
    results = {batch: {n: e for n, e in block.items() if isinstance(e, dict)} for batch, block in blocks.items()}
    assert set(results) == {"2", "3"}
    assert set(results["2"]) == {"sdpa", "fp32+eager", "sdpa+compile"}
    assert set(results["3"]) == {"sdpa", "bf16+sdpa+hostcheck"}
    for batch, block in results.items():
        assert blocks[batch]["fastest"] in block
        for entry in block.values():
            check_variant(entry, batch=int(batch))
    assert results["3"]["bf16+sdpa+hostcheck"]["variant"]["precision"] == "bf16"
    assert results["3"]["bf16+sdpa+hostcheck"]["nonfinite_check"] == "step"
    assert results["2"]["fp32+eager"]["variant"]["attn"] == "eager"
    assert [e["compiled"] for e in results["2"].values()] == [False, False, True]  # compiled last
    assert report["model_gflops"]["3"]["train_step"] > report["model_gflops"]["2"]["train_step"]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| train |")]
    assert len(rows) == 5 and report["table"] == table.read_text()


def test_gpu_check_smoke_runs_every_step(tmp_path):
    """``SMOKE=1 scripts/gpu_check.sh``: every step on tiny shapes, at most 8 files, the targets'
    table at the end (about 60 s of CPU time)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "gpu_check.sh"), str(out)], capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "SMOKE": "1", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) <= 8 and {"summary.md", "summary.json", "log.txt", "b32.json", "b16.json"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    runs = {run["name"]: run for run in summary["runs"]}
    assert runs["test_cuda"]["status"] == "ok" and "1 passed" in runs["test_cuda"]["detail"]
    assert runs["b32"]["status"] == runs["b16"]["status"] == "ok"
    assert runs["e2e"]["status"] in ("ok", "skipped") and runs["torchcodec"]["status"] in ("ok", "skipped")
    targets = [row["target"] for row in summary["targets"]]
    assert len(targets) == 6 and "B/32 training, 3 frames, batch 4, fp32: MFU" in targets
    assert summary["targets"][0]["result"] == "pass"  # the tests; MFU needs a GPU's peak
    b32 = json.loads((out / "b32.json").read_text())
    assert b32["complete"] and not b32.get("errors")
    assert set(b32["results"]["train"]) == {"2", "3", "4"} and set(b32["results"]["encode"]) == {"2", "3", "4"}
    assert set(b32["results"]["train"]["2"]) >= {"sdpa", "sdpa+plain", "sdpa+hostcheck", "bf16+sdpa", "bf16+eager",
                                                 "sdpa+compile"}
    assert b32["results"]["train"]["2"]["sdpa"]["profile"]["top"]
    text = (out / "summary.md").read_text()
    assert "| target | number | needed | result |" in text and text in proc.stdout
