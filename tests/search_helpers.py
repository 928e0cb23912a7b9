"""Shared set-up of the search tests: synthetic clips, a tiny CLIP with the real vocabulary, configs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tiny_models import write_hf_clip

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "CLIPVIP_LOG_LEVEL": "WARNING"}


def make_bench(root, n_train: int = 2, n_test: int = 6, seed: int = 0, size: int = 64, **config) -> dict:
    """Synthetic clips of ``size`` px (the test clips copied alone into ``root/videos``), a tiny CLIP
    (input 32 px), a config file."""
    from clipvip.apps import synthetic

    root = str(root)
    data = os.path.join(root, "data")
    synthetic.generate(data, n_train=n_train, n_test=n_test, seed=seed, size=size, frames=8,
                       n_pretrain_videos=1, clips_per_video=1, frame_folders=False, workers=1)
    with open(os.path.join(data, "test.jsonl")) as f:
        test = [json.loads(line) for line in f if line.strip()]
    videos = os.path.join(root, "videos")
    os.makedirs(videos, exist_ok=True)
    for record in test:
        shutil.copy(os.path.join(data, "videos", record["clip_id"] + ".mp4"), videos)
    clip = os.path.join(root, "clip")
    write_hf_clip(clip, vocab_size=49408, max_positions=32)
    cfg = {
        "clip_config": clip, "clip_weights": clip, "train_num_frms": 4, "test_num_frms": 4, "input_res": [32, 32],
        "max_txt_len": 24, "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3},
        "test_batch_size": 4, "n_workers": 0, "pin_mem": 0, "seed": 0,
    }
    cfg.update(config)
    path = os.path.join(root, "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return {"root": root, "data": data, "videos": videos, "config": path, "clip": clip, "test": test}


def clipvip(*args, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m clipvip ARGS`` in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "clipvip", *map(str, args)], capture_output=True, text=True,
                            env=ENV, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"clipvip {' '.join(map(str, args))}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def json_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a failed command (no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]
