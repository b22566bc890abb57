"""`lvlm train` on 2 processes x 4 devices (gloo on localhost, the real loader), started from
another run's checkpoint: SIGTERM to one process makes both save the same step and exit 0, and
the resumed run ends equal to an uninterrupted one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from xla_env import cpu_env

from lvlm_jax import cli
from lvlm_jax.checkpoints.manager import restore_params
from lvlm_jax.param_paths import flat_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# The demo's model at one layer per tower: a step of 8 rows over 2 processes' gloo collectives
# takes ~1 s with three layers.
# The vision tower frozen (the demo's sft trains it): these runs test the loop, not the tower,
# and its backward only adds compile time to every process.
COMMON = ["--config=experiments/demo.py:sft", "--config.optimizer.freeze=['vision/.*']",
          "--config.data.batch_size=8",
          "--config.model.language.num_layers=1", "--config.model.vision.depth=1",
          "--config.train.log_every=1", "--config.train.progress=false",
          "--config.checkpoint.every_steps=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, source) -> list[subprocess.Popen]:
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "lvlm_jax", "train", *COMMON,
         f"--config.train.total_steps={STEPS}", f"--config.checkpoint.init_from={source}",
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=cpu_env(devices=4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]


def finish(procs) -> list[str]:
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def logged_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def wait_for_logged_step(procs, workdir, step, timeout=300) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and max(logged_losses(workdir), default=0) >= step:
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(p.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError(f"step {step} was never logged")


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes_exactly(tmp_path):
    source = str(tmp_path / "source")  # another run's checkpoint, the start of both runs
    assert cli.main(["train", *COMMON, "--config.train.total_steps=2",
                     f"--workdir={source}"]) == 0
    straight = str(tmp_path / "straight")
    finish(launch(straight, source))

    interrupted = str(tmp_path / "interrupted")
    procs = launch(interrupted, source)
    wait_for_logged_step(procs, interrupted, 1)
    procs[1].send_signal(signal.SIGTERM)  # not the coordinator: the others must learn of it
    finish(procs)
    (saved,) = checkpoint_steps(interrupted)  # only the preemption save (every_steps=0)
    assert 1 <= saved < STEPS
    data = os.listdir(os.path.join(interrupted, "checkpoints", str(saved), "data"))
    assert sorted(n for n in data if n.startswith("process_")) == [  # both saved this step
        "process_0-of-2.json", "process_1-of-2.json"]
    assert max(logged_losses(interrupted)) == saved

    outs = finish(launch(interrupted, source))
    assert all(f"resumed from {interrupted}/checkpoints/{saved}" in out for out in outs)
    # The same batches after the restart (the loaders' states were saved) and the same steps.
    expected, got = logged_losses(straight), logged_losses(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    np.testing.assert_array_equal([got[s] for s in sorted(got)],
                                  [expected[s] for s in sorted(expected)])
    want = flat_paths(restore_params(straight)[0])
    have = flat_paths(restore_params(interrupted)[0])
    assert want.keys() == have.keys()
    for path, value in want.items():
        assert have[path].tobytes() == value.tobytes(), path
