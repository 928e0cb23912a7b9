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


def test_encode_and_train_side_by_side():
    report = run_bench("--mode", "both", *TINY, "--peak-tflops", "1.5")
    assert {"machine", "settings", "model_gflops", "peak_tflops", "results"} <= set(report)
    assert report["machine"]["torch_threads"] == 1 and "load_average_1min" in report["machine"]
    assert report["settings"]["vision"] == {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                            "patch_size": 32}
    assert report["peak_tflops"] == 1.5 and report["peak_source"] == "--peak-tflops"
    assert set(report["results"]) == {"encode", "train"}
    for mode in ("encode", "train"):
        block = report["results"][mode]
        for attn in ("eager", "sdpa"):
            check_variant(block[attn])
            assert 0 <= block[attn]["mfu"] < 1
        assert block["speedup_sdpa_vs_eager_paired"] > 0
        assert block["speedup_sdpa_vs_eager"] == pytest.approx(
            block["eager"]["ms_per_batch"] / block["sdpa"]["ms_per_batch"], rel=1e-2)
    assert isinstance(report["results"]["train"]["fused_optimizer"], bool)
    assert report["results"]["train"]["nonfinite_check"] == "step"  # auto on a CPU
    assert "errors" not in report


def test_one_variant_with_checkpointing_and_bf16():
    report = run_bench("--mode", "train", *TINY, "--attn", "sdpa", "--grad-checkpointing", "--precision", "bf16",
                       "--nonfinite-check", "deferred")
    assert set(report["results"]) == {"train"}
    block = report["results"]["train"]
    assert block["nonfinite_check"] == ("deferred" if block["fused_optimizer"] else "step")
    check_variant(block["sdpa"])
    assert "eager" not in block and "speedup_sdpa_vs_eager" not in block
    assert report["settings"]["grad_checkpointing"] and report["settings"]["precision"] == "bf16"
    assert report["peak_tflops"] is None  # CPU: no table entry and no --measure-peak


def test_profile_lists_the_costliest_operators():
    report = run_bench("--mode", "train", *TINY, "--attn", "sdpa", "--profile", "5")
    profile = report["results"]["train"]["sdpa"]["profile"]
    assert profile["clock"] == "cpu" and len(profile["top"]) == 5
    shares = [row["share"] for row in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert all(row["calls"] >= 1 and row["self_ms"] >= 0 for row in profile["top"])


def test_compile_path():
    """The capture-only backend keeps this quick; a compile failure would be reported in "errors"."""
    report = run_bench("--mode", "encode", *TINY, "--attn", "sdpa", "--compile", "--compile-backend", "aot_eager")
    assert report["settings"]["compile"] == "aot_eager"
    assert "errors" not in report, report.get("errors")
    check_variant(report["results"]["encode"]["sdpa"])


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
    check_variant(report["results"]["encode"]["sdpa"])
