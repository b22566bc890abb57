"""Random search over the demo SFT's learning rate, warm-up and schedule (seeded: the same
points every time), plus two hand-picked (learning rate, batch size) pairs.

    lvlm sweep --config=experiments/demo.py:sft --sweep=experiments/sweeps/demo_random.py:8 \
        --workdir=/tmp/sweeps/demo_random --config.train.total_steps=100

`:N` draws N points (default 6); the two pairs are added to them.
"""

from lvlm_jax.sweep_helpers import choice, loguniform, zip


def get_sweep(arg: str | None = None) -> list[dict]:
    n = int(arg) if arg else 6
    drawn = choice(n, seed=0, **{"optimizer.learning_rate": loguniform(1e-4, 1e-2),
                                 "optimizer.warmup_steps": [0.0, 0.03, 0.1],
                                 "optimizer.schedule": ["cosine", "linear"]})
    # The learning rate grows with the square root of the batch size.
    pairs = zip(**{"optimizer.learning_rate": [1e-3, 2e-3], "data.batch_size": [16, 64]})
    return drawn + pairs
