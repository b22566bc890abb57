"""The same run on any topology: `lvlm train` with the real grain loader on the demo's sft data
(packing on, a mixture of two sources) gives the same losses on 1 process x 8 devices, 2 x 4
and 4 x 2 (gloo collectives on localhost), because every process reads its rows of one global
batch order (data_pipelines/lanes.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
OVERRIDES = [
    f"--config.train.total_steps={STEPS}", "--config.train.log_every=1",
    "--config.train.progress=False", "--config.checkpoint.every_steps=0",
    "--config.evals.every_steps=0", "--config.data.batch_size=8",
    "--config.data.packing=first_fit",
    "--config.data.mixture=(('synthetic:conversation', 1.0), ('synthetic:caption', 1.0))",
]


def _train(workdir: str, processes: int, devices: int) -> dict[int, float]:
    """Step -> loss of one `lvlm train` run on `processes` x `devices` CPU devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, LVLM_CACHE=os.path.join(workdir, "cache"))
    cmd = [sys.executable, "-m", "lvlm_jax", "train",
           f"--config={ROOT}/experiments/demo.py:sft", f"--workdir={workdir}/run", *OVERRIDES]
    if processes > 1:
        port = free_port()
        cmds = [cmd + [f"--coordinator_address=127.0.0.1:{port}",
                       f"--num_processes={processes}", f"--process_id={i}"]
                for i in range(processes)]
    else:
        cmds = [cmd]
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=600)
        finally:
            p.kill()
        assert p.returncode == 0, out[-4000:]
    with open(os.path.join(workdir, "run", "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
    return _train(str(tmp_path_factory.mktemp("1x8")), 1, 8)


@pytest.mark.parametrize("processes, devices", [(2, 4), (4, 2)])
def test_losses_are_the_same_on_every_topology(one_by_eight, tmp_path, processes, devices):
    losses = _train(str(tmp_path), processes, devices)
    assert sorted(losses) == sorted(one_by_eight) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [one_by_eight[s] for s in sorted(one_by_eight)], rtol=1e-5)

