"""The tiny LVLM of `lvlm demo`, trained on the built-in synthetic shapes set on CPU.

`lvlm demo --workdir=DIR` runs pretrain -> sft -> dpo -> ppo, and grpo from the dpo params, in
one process (each stage starts from the previous one's params) with held-out evaluations between
them, and prints the results table (see README.md for the numbers over 3 seeds). The same chain,
one stage at a time:

    lvlm train --config=experiments/demo.py:pretrain --workdir=/tmp/demo/pretrain
    lvlm train --config=experiments/demo.py:sft --workdir=/tmp/demo/sft \
        --config.checkpoint.init_from=/tmp/demo/pretrain
    lvlm train --config=experiments/demo.py:dpo --workdir=/tmp/demo/dpo \
        --config.checkpoint.init_from=/tmp/demo/sft
    lvlm train --config=experiments/demo.py:ppo --workdir=/tmp/demo/ppo \
        --config.checkpoint.init_from=/tmp/demo/dpo
    lvlm train --config=experiments/demo.py:grpo --workdir=/tmp/demo/grpo \
        --config.checkpoint.init_from=/tmp/demo/dpo

and the reward model on the same data:

    lvlm train --config=experiments/demo.py:reward --workdir=/tmp/demo/reward \
        --config.checkpoint.init_from=/tmp/demo/sft
"""

from lvlm_jax.config import base_config

STAGES = ("pretrain", "sft", "reward", "dpo", "ppo", "grpo")


def get_config(arg: str | None = None):
    stage = arg or "sft"
    if stage not in STAGES:
        raise ValueError(f"experiments/demo.py takes one of {STAGES}, got {stage!r}")
    c = base_config()
    c.stage = stage
    c.model.vision = {"preset": "tiny", "image_size": 64, "patch_size": 16, "width": 128,
                      "depth": 2, "mlp_dim": 256, "num_heads": 4}
    c.model.language = {"preset": "tiny", "vocab_size": 384, "embed_dim": 192,
                        "num_layers": 3, "num_heads": 6, "num_kv_heads": 2, "mlp_dim": 512,
                        "max_length": 256}
    c.model.connector = {"kind": "projector", "projector": "mlp2x_gelu"}
    c.data.image_size = 64
    # 16x16 patches: 16 image tokens, each a quarter of one grid cell, which keeps sequences
    # short enough for 2 CPU cores.
    c.data.seq_len = 48  # 16 image tokens + the longest caption (39 tokens, plain template)
    c.data.batch_size = 32
    # The chat stages use gemma's turn markers: no system prompt, so sequences are ~25 tokens
    # shorter than with vicuna_v1, which matters on 2 CPU cores.
    c.data.template = "gemma"
    c.train.log_every = 20
    if stage == "pretrain":
        c.data.kind = "caption"
        c.data.template = "plain"
        c.data.num_examples = 4000
        c.optimizer.learning_rate = 2e-3
        # The caption loss drops from ~0.5 to ~0.1 somewhere in steps 60-120, the step moving
        # with the seed (and with a CPU's rounding); 250 steps leave every seed time to settle
        # (held-out caption loss ~0.01). At 150 a late seed ended at 0.13, and its sft fell
        # short (POPE yes-ratio 66%).
        c.train.total_steps = 250
        # LLaVA's stage 1 trains only the connector of pretrained towers; the demo's towers
        # start from random weights, so here everything trains.
        c.optimizer.freeze = []
    elif stage in ("reward", "dpo"):
        # Preference pairs of the synthetic set: the faithful description vs one naming an
        # absent object. The caller sets checkpoint.init_from (the sft run); the vision tower
        # stays frozen. A pair is two sequences (and DPO adds the reference's forward), so the
        # batch is smaller.
        c.data.kind = "preference"
        c.data.seq_len = 56  # the longest pair (gemma template) is 55 tokens
        c.data.batch_size = 16
        c.data.num_examples = 4000
        c.optimizer.learning_rate = 5e-5
        c.optimizer.freeze = [r"vision/.*"]
        c.train.total_steps = 40
        c.train.log_every = 5
        c.dpo.beta = 0.1
        # RPO's chosen NLL keeps the faithful descriptions' likelihood (and so their recall).
        c.dpo.sft_weight = 1.0
    elif stage in ("ppo", "grpo"):
        # RL on the synthetic VQA questions: sampled answers score 1 when they match the
        # reference after normalisation (the rule reward), with a KL penalty to the sft policy
        # the caller names in checkpoint.init_from. Prompts are left-padded to seq_len.
        c.data.kind = "prompt"
        c.data.seq_len = 32  # the longest prompt (gemma template) is 31 tokens
        c.data.batch_size = 32
        c.data.num_examples = 4000
        c.optimizer.learning_rate = 1e-4
        c.optimizer.warmup_steps = 0
        c.optimizer.freeze = [r"vision/.*"]
        # 40 rollouts of 32 answers, each trained on twice (the second pass off-policy, where
        # PPO's clip acts). More passes on one rollout (epochs 4) overfit its 32 answers and
        # lowered the held-out reward; more rollouts are what raise it (10 steps at lr 2e-5
        # left it where it was).
        c.train.total_steps = 80
        c.train.log_every = 5
        section = c.ppo if stage == "ppo" else c.grpo
        section.max_new_tokens = 8
        # Sampled at 1.5 and scored at 1.5 (the policy PPO and GRPO optimise is
        # softmax(logits / 1.5)). At 1.0 the sft model is already sharp (sampled reward ~= greedy
        # accuracy): most groups' answers all score alike, advantages are ~0, and the held-out
        # reward moved +0.4 to +1.5 points, within its noise; at 1.5, seed 0's ppo moved it
        # 64.5% -> 76.2% and its greedy exact match 82.0% -> 85.9%.
        section.temperature = 1.5
        section.reward = "rule"
        section.epochs = 2
        if stage == "grpo":
            # 16 prompts x group_size 4 = 64 sampled answers a step: a group whose 4 answers
            # all score alike adds nothing, and at ~75% accuracy many do; with 8 prompts the
            # held-out reward of seed 0 rose 1.4 points, with 16 3.5.
            c.data.batch_size = 16
    else:
        c.data.kind = "conversation"
        c.data.seq_len = 68  # the longest conversation (gemma template) is 65 tokens
        # 32 conversations a step: at 16 the held-out VQA accuracy of one seed ranged 52-68%
        # with the learning rate (the gradient noise of a tiny batch); at 32, 76-83%.
        c.data.batch_size = 32
        c.data.num_examples = 30000
        # A description is ~25 supervised tokens, an answer 1-2: at the set's default 20% of
        # descriptions they took about two thirds of the (token-mean) loss, and the position
        # and shape questions, the last to be learned, lagged (seed 0: 59% and 62%). At 10%,
        # 70% and 81%; with 900 steps instead of 700 the rest of the margin.
        c.data.describe_share = 0.1
        # Half the free descriptions name one absent object too (noisy instruction data):
        # the hallucinations the dpo stage then removes.
        c.data.description_noise = 0.5
        c.optimizer.learning_rate = 1e-3
        c.train.total_steps = 900
        # Everything trains, the vision tower too (as LLaVA-NeXT and Qwen-VL's instruction
        # tuning do). With the tower frozen as captioning left it, presence questions ("is
        # there a red circle?", a colour bound to a shape) plateaued for seed 2 at ~85% from
        # step 450 on, with a yes-bias (POPE F1 83.7%, yes-ratio 64.7%); trained, the same seed
        # reached 92.2% F1 at a 56.3% yes-ratio (steps ~20% slower).
        c.optimizer.freeze = []
    return c
