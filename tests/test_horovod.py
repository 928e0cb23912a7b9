"""The horovod backend under a real ``horovodrun`` (2 processes, Gloo, CPU).

Skipped unless horovod with PyTorch support is installed (scripts/install_horovod.sh; it is not a
dependency and CI does not have it). The checks themselves are in tests/horovod_worker.py.
"""
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("horovod.torch")

HERE = os.path.dirname(os.path.abspath(__file__))


def _horovodrun() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    found = beside if os.path.exists(beside) else shutil.which("horovodrun")
    if not found:
        pytest.skip("horovod is importable but horovodrun is not on PATH")
    return found


def test_two_horovod_processes():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")])))
    cmd = [_horovodrun(), "-np", "2", "-H", "localhost:2", "--gloo",
           sys.executable, os.path.join(HERE, "horovod_worker.py")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "rank 0: horovod checks passed" in out and "rank 1: horovod checks passed" in out, out[-4000:]
