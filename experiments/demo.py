"""The tiny LVLM of `lvlm demo`, trained on the built-in synthetic shapes set on CPU.

    lvlm train --config=experiments/demo.py:pretrain --workdir=/tmp/demo/pretrain
    lvlm train --config=experiments/demo.py:sft --workdir=/tmp/demo/sft

`lvlm demo --workdir=DIR` runs the stages in order and prints the results table. Each stage runs
in about a minute on 2 CPU cores; see README.md for the numbers.
"""

from lvlm_jax.config import base_config

STAGES = ("pretrain", "sft")


def get_config(arg: str | None = None):
    stage = arg or "sft"
    if stage not in STAGES:
        raise ValueError(f"experiments/demo.py takes one of {STAGES}, got {stage!r}")
    c = base_config()
    c.stage = stage
    c.model.vision = {"preset": "tiny", "image_size": 64, "patch_size": 8, "width": 128,
                      "depth": 2, "mlp_dim": 256, "num_heads": 4}
    c.model.language = {"preset": "tiny", "vocab_size": 384, "embed_dim": 192,
                        "num_layers": 3, "num_heads": 6, "num_kv_heads": 2, "mlp_dim": 512,
                        "max_length": 256}
    c.model.connector = {"kind": "projector", "projector": "mlp2x_gelu"}
    c.data.image_size = 64
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.train.log_every = 20
    if stage == "pretrain":
        c.data.kind = "caption"
        c.data.template = "plain"
        c.data.num_examples = 4000
        c.optimizer.learning_rate = 2e-3
        c.train.total_steps = 150
        # LLaVA's stage 1 trains only the connector of pretrained towers; the demo's towers
        # start from random weights, so here everything trains.
        c.optimizer.freeze = []
    else:
        c.data.kind = "conversation"
        c.data.template = "vicuna_v1"
        c.data.num_examples = 20000
        c.optimizer.learning_rate = 1e-3
        c.train.total_steps = 400
        # The demo's LM starts from random weights, so SFT trains it with the connector;
        # the vision tower stays as pretraining left it (LLaVA's stage 2).
        c.optimizer.freeze = [r"vision/.*"]
    return c
