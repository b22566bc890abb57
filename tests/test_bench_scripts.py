"""The benchmark scripts run end to end at their --quick size and print their summary line."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env() -> dict[str, str]:
    """The environment without conftest's fake devices: a benchmark sees the real CPU."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_train_step_cpu_bench_runs_quick():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "train_step_cpu.py"), "--quick"],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"train_step_cpu: lvlm_jax (\d+\.\d+) ex/s, HF (\d+\.\d+) ex/s, "
                     r"ratio (\d+\.\d+)x", last)
    assert m, last
    ours, hf, ratio = map(float, m.groups())
    assert ours > 0 and hf > 0
    assert ratio == pytest.approx(ours / hf, rel=0.02, abs=0.01)


def test_data_loader_bench_runs_quick():
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "data_loader.py"), "--quick"],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert "max |diff| = 0" in proc.stdout  # ours and torch make the same uint8 pixels
    m = re.fullmatch(r"data_loader: ours (\d+\.\d+) img/s, torch (\d+\.\d+) img/s, "
                     r"ceiling (\d+\.\d+) img/s per worker, 1 workers, ratio (\d+\.\d+)x, "
                     r"(\d+)% of the ceiling", lines[-1])
    assert m, lines[-1]
    ours, torch, ceiling, ratio, share = map(float, m.groups())
    assert ours > 0 and torch > 0 and ceiling > 0
    assert ratio == pytest.approx(ours / torch, rel=0.02, abs=0.01)
    assert share == pytest.approx(100 * ours / ceiling, abs=1)
