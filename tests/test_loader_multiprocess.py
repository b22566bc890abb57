"""Two real processes (jax.distributed on localhost, gloo) building the training input as
`lvlm train` does read disjoint shares of the records that together are the whole epoch."""

import json
import os
import socket
import subprocess
import sys

from record_shards import numbered_captions, write_shards

from data_pipelines.loader import demo_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_shares_that_cover_the_epoch(tmp_path):
    n = 21  # odd: the shares differ in size (11 and 10)
    data = write_shards(tmp_path / "data", numbered_captions(n), "caption", num_shards=3)
    demo_tokenizer(tmp_path / "cache")  # trained once here, not by both processes
    env = dict(os.environ, LVLM_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(
        [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "loader_multiprocess_worker.py"), str(port), "2",
         str(i), str(data), str(share)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for i, share in enumerate((11, 10))]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    first, second = (o["seen"] for o in outs)
    assert outs[0]["size"] == outs[1]["size"] == n
    assert len(set(first)) == 11 and len(set(second)) == 10  # one epoch: no record twice
    assert set(first).isdisjoint(second)
    assert sorted(first + second) == list(range(n))
