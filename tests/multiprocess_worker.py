"""One process of the multi-process test: 4 CPU devices, gloo collectives, its half of every
global batch. Prints, as JSON on the last line, the losses of 5 steps, the greedy answers of an
eval whose batches are sharded over both processes' devices and the number of images this
process decoded (argv: port, processes, process id). tests/test_preemption_multiprocess.py runs
`lvlm train` itself on 2 processes."""

import json
import os
import sys

from xla_env import xla_flags

os.environ["XLA_FLAGS"] = xla_flags(devices=4)
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    port, n, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n, process_id=pid)
    sys.path.insert(0, os.path.dirname(__file__))
    from training_utils import mesh_answers, random_batches, tiny_config

    from lvlm_jax.train import loop

    cfg = tiny_config(**{"optimizer.learning_rate": 1e-3})
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    rows = cfg.data.batch_size // n

    def mine_of(cfg, seed=0):
        for batch in random_batches(cfg, seed):
            yield {k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}

    mine = lambda: mine_of(cfg)  # noqa: E731

    setup = loop.build(cfg)
    _, history = loop.run_steps(setup, mine(), 5)
    # Each process decodes only the images of the rows its devices hold.
    from lvlm_jax.evals import model_runner

    decoded = []
    prepare = model_runner.prepare_image
    model_runner.prepare_image = lambda *a, **k: decoded.append(1) or prepare(*a, **k)
    answers = mesh_answers()
    print(json.dumps({"losses": [h["loss"] for h in history], "answers": answers,
                      "decoded": len(decoded)}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
