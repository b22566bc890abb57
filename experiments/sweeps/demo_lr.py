"""A 2x2 grid over the learning rate and weight decay of the demo's SFT stage.

    lvlm sweep --config=experiments/demo.py:sft --sweep=experiments/sweeps/demo_lr.py \
        --workdir=/tmp/sweeps/demo_lr --config.train.total_steps=100 --parallel=2

Four runs, each in /tmp/sweeps/demo_lr/<learning_rate=...,weight_decay=...>/; about a minute
each for 100 steps on 2 CPU cores. Ends with summary.csv and curves.png in the workdir.
`:fine` gives a 3x3 grid instead.
"""

from lvlm_jax.sweep_helpers import product


def get_sweep(arg: str | None = None) -> list[dict]:
    if arg == "fine":
        return product(**{"optimizer.learning_rate": [3e-4, 1e-3, 3e-3],
                          "optimizer.weight_decay": [0.0, 0.01, 0.1]})
    if arg is not None:
        raise ValueError(f"experiments/sweeps/demo_lr.py takes nothing or 'fine', got {arg!r}")
    return product(**{"optimizer.learning_rate": [1e-3, 3e-3],
                      "optimizer.weight_decay": [0.0, 0.1]})
