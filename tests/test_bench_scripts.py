"""The benchmark scripts run end to end at their --quick size and print their summary line."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from xla_env import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env() -> dict[str, str]:
    """The environment without conftest's fake devices and test compile flags: a benchmark
    sees the real CPU and compiles as a user's run does."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if f not in FAST_COMPILE
             and not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _quick_env() -> dict[str, str]:
    """`_clean_env` (the real CPU, one device) compiling with the suite's fast flags: for tests
    that check a script runs and prints its lines, not the figures (compiling is most of their
    time, ~40% less with the flags)."""
    from xla_env import cpu_env

    return cpu_env(1)


def test_train_step_cpu_bench_runs_quick():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "train_step_cpu.py"), "--quick"],
        cwd=ROOT, env=_quick_env(), capture_output=True, text=True, timeout=300)
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
        [sys.executable, os.path.join(ROOT, "bench", "data_loader.py"), "--quick",
         "--repeats", "2"],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert "max |diff| = 0" in proc.stdout  # ours and torch make the same uint8 pixels
    # Each round's rates at 1 worker; the summary's ratios are their medians.
    rounds = [tuple(map(float, m.groups())) for m in (
        re.search(r"1: ours (\d+\.\d+) torch (\d+\.\d+) ceiling (\d+\.\d+)", line)
        for line in lines if line.lstrip().startswith("round ")) if m]
    assert len(rounds) == 2, proc.stdout
    m = re.fullmatch(r"data_loader: 1 workers, ours/torch (\d+\.\d+)x, (\d+)% of the ceiling "
                     r"per worker \(medians of 2 rounds\)", lines[-1])
    assert m, lines[-1]
    ratio, share = map(float, m.groups())
    assert all(rate > 0 for row in rounds for rate in row)
    assert ratio == pytest.approx(np.median([o / t for o, t, _ in rounds]), rel=0.02, abs=0.01)
    assert share == pytest.approx(100 * np.median([o / c for o, _, c in rounds]), abs=1)


def test_demo_divergence_bench_runs_quick():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "demo_divergence.py"), "--quick",
         "--steps=3"], cwd=ROOT, env=_quick_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"demo_divergence: pretrain, 3 steps; final loss of the default run "
                        r"\d+\.\d{5}", lines[0]), lines[0]
    names = [re.match(r"  (.+?)\s+first differs: ", line).group(1) for line in lines[1:]]
    assert names == ["another seed (1)"]
    # another seed starts from other weights and data: its losses differ from step 1
    assert "first differs: step 1 " in lines[1]


@pytest.mark.parametrize("script", ["gpu_train.py", "gpu_rollout.py"])
def test_gpu_bench_scripts_run_tiny_on_cpu(script):
    """The prepared GPU scripts (bench/gpu_check.sh runs both on a lent GPU) run end to end at a
    CPU size, so a GPU's few minutes are not spent on a broken script."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", script), "--tiny", "--steps", "1",
         "--warmup", "0"] if script == "gpu_train.py" else
        [sys.executable, os.path.join(ROOT, "bench", script), "--tiny"],
        cwd=ROOT, env=_quick_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    if script == "gpu_train.py":
        m = re.search(r"gpu_train\[xla\]: \d+\.\d+B params, step (\d+\.\d+) ms", out)
        assert m and float(m.group(1)) > 0, out
    else:
        assert re.search(r"gpu_rollout\[scanned decoder\]: generate \d+ ms \((\d+) tokens/s\)",
                         out), out
        assert out.strip().endswith("same tokens: True"), out


def test_eval_throughput_bench_runs_quick():
    from xla_env import cpu_env

    # Compiled with the suite's fast flags: what is checked is that the script runs `lvlm eval`
    # at both batch sizes and prints its figures, not the figures themselves.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "eval_throughput.py"), "--quick",
         "--examples=8", "--batch=4", "--new_tokens=4", "--no_breakdown"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    for batch, line in zip((1, 4), lines[-3:-1], strict=True):
        m = re.match(rf"eval_throughput: batch {batch}: (\d+\.\d) examples/s end to end "
                     r"\((\d+\.\d) s for 8, compiling \d+ programs", line)
        assert m and float(m.group(1)) == pytest.approx(8 / float(m.group(2)), rel=0.1), line
    assert re.match(r"eval_throughput: batch 4 / batch 1 = \d+\.\dx examples/s end to end, "
                    r"\d+\.\dx generating and scoring .*same answers: True", lines[-1]), lines[-1]
