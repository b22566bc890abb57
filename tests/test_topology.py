"""The same run on any topology: `lvlm train` with the real grain loader on the demo's sft data
(packing on, a mixture of two sources) gives the same losses on 1 process x 8 devices, 2 x 4
and 4 x 2 (gloo collectives on localhost), because every process reads its rows of one global
batch order (data_pipelines/lanes.py); and a 2-process run killed with SIGKILL mid-run resumes
on 1 or 4 processes to the uninterrupted run's final params (bitwise on 4 processes, whose
reductions run in the same order).

`LVLM_TOPOLOGY_STEPS=20 LVLM_TOPOLOGY_KILL_AT=10 python -m pytest -s tests/test_topology.py`
runs 20 steps, kills at step 10, and prints the losses of every topology side by side."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_multiprocess import free_port
from xla_env import cpu_env

from lvlm_jax.checkpoints.manager import restore_params
from lvlm_jax.param_paths import flat_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = int(os.environ.get("LVLM_TOPOLOGY_STEPS", "8"))
KILL_AT = int(os.environ.get("LVLM_TOPOLOGY_KILL_AT", "4"))  # the killed run's last checkpoint
EVERY = KILL_AT  # checkpoint every EVERY steps: at the kill and at the end, no more
# The vision tower frozen (the demo's sft trains it): these runs test the loop, not the tower,
# and its backward only adds compile time to every process.
OVERRIDES = [
    "--config.optimizer.freeze=['vision/.*']",
    f"--config.train.total_steps={STEPS}", "--config.train.log_every=1",
    "--config.train.progress=False", f"--config.checkpoint.every_steps={EVERY}",
    "--config.checkpoint.keep=100", "--config.evals.every_steps=0",
    "--config.data.batch_size=8", "--config.data.packing=first_fit",
    "--config.data.mixture=(('synthetic:conversation', 1.0), ('synthetic:caption', 1.0))",
]


def _launch(workdir: str, processes: int, devices: int) -> list[subprocess.Popen]:
    """The processes of one `lvlm train` run on `processes` x `devices` CPU devices."""
    env = cpu_env(devices, PYTHONPATH=ROOT,
                  LVLM_CACHE=os.path.join(os.path.dirname(workdir), "cache"))
    cmd = [sys.executable, "-m", "lvlm_jax", "train",
           f"--config={ROOT}/experiments/demo.py:sft", f"--workdir={workdir}", *OVERRIDES]
    if processes > 1:
        port = free_port()
        cmds = [cmd + [f"--coordinator_address=127.0.0.1:{port}",
                       f"--num_processes={processes}", f"--process_id={i}"]
                for i in range(processes)]
    else:
        cmds = [cmd]
    return [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for c in cmds]


def _train(workdir: str, processes: int, devices: int) -> dict[int, float]:
    """Step -> loss of one whole run (the last value logged for a step, so a resumed run's)."""
    procs = _launch(workdir, processes, devices)
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        finally:
            p.kill()
        assert p.returncode == 0, out[-4000:]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _train_until_killed(workdir: str, processes: int, devices: int, at_step: int) -> None:
    """SIGKILL every process of a run as soon as its checkpoint of `at_step` is complete
    (orbax renames a step's directory into place when all processes have written it)."""
    procs = _launch(workdir, processes, devices)
    done = os.path.join(workdir, "checkpoints", str(at_step))
    try:
        while not os.path.isdir(done):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-4000:]
            time.sleep(0.01)
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.communicate()
    assert all(p.returncode == -signal.SIGKILL for p in procs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Step -> loss of the whole run on each topology, and its workdir."""
    out = {}
    for processes, devices in [(1, 8), (2, 4), (4, 2)]:
        workdir = str(tmp_path_factory.mktemp(f"{processes}x{devices}") / "run")
        out[processes, devices] = _train(workdir, processes, devices), workdir
    return out


def test_losses_are_the_same_on_every_topology(runs):
    (one, _), others = runs[1, 8], {k: v[0] for k, v in runs.items() if k != (1, 8)}
    print("\nstep " + " ".join(f"{p}x{d}".rjust(10) for p, d in runs))
    for step in sorted(one):
        print(f"{step:4d} " + " ".join(f"{losses[step]:10.6f}"
                                        for losses, _ in runs.values()))
    for losses in others.values():
        assert sorted(losses) == sorted(one) == list(range(1, STEPS + 1))
        np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                                   [one[s] for s in sorted(one)], rtol=1e-5)


def _final_params(workdir: str):
    params, step = restore_params(workdir)
    assert step == STEPS
    return flat_paths(params)


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The workdir of the 2 x 4 run, SIGKILLed after its checkpoint of step KILL_AT."""
    workdir = str(tmp_path_factory.mktemp("killed") / "run")
    _train_until_killed(workdir, 2, 4, at_step=KILL_AT)
    return workdir


@pytest.mark.parametrize("processes, devices", [(1, 8), (4, 2)])
def test_a_killed_two_process_run_resumes_on_another_number_of_processes(
        runs, killed, tmp_path_factory, processes, devices):
    resumed = str(tmp_path_factory.mktemp(f"resumed_{processes}x{devices}") / "run")
    shutil.copytree(killed, resumed)
    last = max(int(s) for s in os.listdir(os.path.join(resumed, "checkpoints")) if s.isdigit())
    assert KILL_AT <= last < STEPS  # the kill came mid-run, after a checkpoint
    losses = _train(resumed, processes, devices)
    whole_losses, whole = runs[2, 4]
    np.testing.assert_allclose([losses[s] for s in range(last + 1, STEPS + 1)],
                               [whole_losses[s] for s in range(last + 1, STEPS + 1)],
                               rtol=1e-5)
    got, want = _final_params(resumed), _final_params(whole)
    assert got.keys() == want.keys()
    if processes > 1:
        # Every collective crosses processes (gloo), in the same order on 2 x 4 and 4 x 2.
        for path, w in want.items():
            np.testing.assert_array_equal(got[path], w, err_msg=path)
    else:
        # One process reduces in-process, in another order: each tensor within 1e-6 of its
        # norm. Not attention's key biases: softmax ignores q . b_k (the same for every key), so
        # their gradient is 0 but for rounding, Adam scales that noise by 1 / eps, and their
        # values are the reduction order's noise: both runs' only checked to be noise-sized
        # (1% of what STEPS full Adam steps would move them).
        lr = json.loads(open(os.path.join(whole, "config.json")).read())["optimizer"][
            "learning_rate"]
        for path, w in want.items():
            if path.endswith("k_proj/bias"):
                assert max(np.abs(w).max(), np.abs(got[path]).max()) < 0.01 * lr * STEPS, path
            else:
                diff = np.linalg.norm(got[path] - w)
                assert diff <= 1e-6 * np.linalg.norm(w) + 1e-12, path
