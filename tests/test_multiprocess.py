"""Two processes x 4 CPU devices (gloo collectives on localhost) train exactly like one process
with 8 devices: each process feeds its half of every global batch. An eval's batches, sharded
over all 8 devices, give both processes every answer, the same as one process's, while each
process decodes only the images of its own rows."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from training_utils import mesh_answers, random_batches, tiny_config

from lvlm_jax.train import loop

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_eight_devices_in_training_and_eval(tmp_path):
    cfg = tiny_config(**{"optimizer.learning_rate": 1e-3})
    setup = loop.build(cfg)
    _, history = loop.run_steps(setup, random_batches(cfg), 5)
    reference = np.array([h["loss"] for h in history])
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
                               str(port), "2", str(i)],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for out in outs:
        np.testing.assert_allclose(out["losses"], reference, rtol=1e-5)
    # The same initial params, programs and shards: the same greedy answers, bit for bit.
    answers = mesh_answers()
    assert outs[0]["answers"] == outs[1]["answers"] == answers and any(answers)
    # One batch of 8 rows (6 questions, padded to the 8 devices): each process decoded its 4.
    assert [out["decoded"] for out in outs] == [4, 4]
