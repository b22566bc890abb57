"""The tiny LVLM of `lvlm demo`, trained on the built-in synthetic shapes set on CPU.

    lvlm train --config=experiments/demo.py:pretrain --workdir=/tmp/demo/pretrain
    lvlm train --config=experiments/demo.py:sft --workdir=/tmp/demo/sft
    lvlm train --config=experiments/demo.py:dpo --workdir=/tmp/demo/dpo \
        --config.checkpoint.init_from=/tmp/demo/sft
    lvlm train --config=experiments/demo.py:reward --workdir=/tmp/demo/reward \
        --config.checkpoint.init_from=/tmp/demo/sft
    lvlm train --config=experiments/demo.py:ppo --workdir=/tmp/demo/ppo \
        --config.checkpoint.init_from=/tmp/demo/sft
    lvlm train --config=experiments/demo.py:grpo --workdir=/tmp/demo/grpo \
        --config.checkpoint.init_from=/tmp/demo/sft

`lvlm demo --workdir=DIR` runs the stages in order and prints the results table. Each stage runs
in about a minute on 2 CPU cores; see README.md for the numbers.
"""

from lvlm_jax.config import base_config

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")


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
    elif stage in ("reward", "dpo"):
        # Preference pairs of the synthetic set: the faithful description vs one naming an
        # absent object. The caller sets checkpoint.init_from (the sft run); the vision tower
        # stays frozen. 144 tokens hold the longest pair (131 with vicuna_v1).
        c.data.kind = "preference"
        c.data.template = "vicuna_v1"
        c.data.seq_len = 144
        c.data.num_examples = 4000
        c.optimizer.learning_rate = 1e-4
        c.optimizer.freeze = [r"vision/.*"]
        c.train.total_steps = 100
        c.dpo.beta = 0.1
    elif stage in ("ppo", "grpo"):
        # RL on the synthetic VQA questions: sampled answers score 1 when they match the
        # reference after normalisation (the rule reward), with a KL penalty to the sft policy
        # the caller names in checkpoint.init_from. Prompts are left-padded to seq_len.
        c.data.kind = "prompt"
        c.data.template = "vicuna_v1"
        c.data.seq_len = 112
        c.data.num_examples = 4000
        c.optimizer.learning_rate = 2e-5
        c.optimizer.warmup_steps = 0
        c.optimizer.freeze = [r"vision/.*"]
        c.train.total_steps = 30
        c.train.log_every = 5
        section = c.ppo if stage == "ppo" else c.grpo
        section.max_new_tokens = 8
        section.temperature = 1.0
        section.reward = "rule"
        section.epochs = 2
        if stage == "grpo":
            c.data.batch_size = 16  # prompts; x group_size 4 = 64 sampled answers a step
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
