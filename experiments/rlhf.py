"""LLaVA-RLHF (Sun et al., "Aligning Large Multimodal Models with Factually Augmented RLHF", 2023):
a reward model and PPO on top of a LLaVA SFT model, plus DPO and GRPO as alternatives.

`:SIZE_STAGE` with SIZE `7b` (CLIP ViT-L/14 at 224 px + Vicuna-7B, as LLaVA-RLHF-7B),
`13b` (336 px + Vicuna-13B, as LLaVA-RLHF-13B) or `tiny` (toy sizes for a CPU), and STAGE
`reward`, `ppo`, `dpo` or `grpo`. Every stage starts from an SFT run (`experiments/llava15.py`)
and, as in the paper, trains LoRA adapters (`lora.*`) on the frozen SFT weights; the reward and
value heads train in full:

    lvlm train --config=experiments/rlhf.py:13b_reward --workdir=DIR/rm \
        --config.data.path=PREFERENCE_SHARDS --config.checkpoint.init_from=SFT13B_DIR \
        --config.data.tokenizer=SFT13B_DIR/tokenizer
    lvlm train --config=experiments/rlhf.py:7b_ppo --workdir=DIR/ppo \
        --config.data.path=PROMPT_SHARDS --config.checkpoint.init_from=SFT7B_DIR \
        --config.data.tokenizer=SFT7B_DIR/tokenizer --config.ppo.reward_model=DIR/rm
    lvlm train --config=experiments/rlhf.py:7b_dpo --workdir=DIR/dpo \
        --config.data.path=PREFERENCE_SHARDS --config.checkpoint.init_from=SFT7B_DIR \
        --config.data.tokenizer=SFT7B_DIR/tokenizer
    lvlm train --config=experiments/rlhf.py:tiny_dpo --workdir=/tmp/rlhf_tiny_dpo

The tokenizer is the SFT run's own (SFT_DIR/tokenizer: Vicuna's with `<image>` and `<video>`
appended), so the ids and the 32002-row vocabulary are the SFT model's. Preference shards come
from `lvlm data convert --format=preferences` (records {id, images,
prompt, chosen, rejected}); PPO/GRPO prompts are records {id, images, prompt, reference}. The
`tiny_*` configs run on the built-in synthetic set on a CPU (20 steps; tiny_ppo scores by
the rule, as no reward-model run is given).

The paper's numbers:
    models:   LLaVA-SFT+ 7B (224 px) and 13B (336 px) policies; a 13B reward model initialised
              from LLaVA-SFT+-13B, trained on 10K human preferences (LLaVA-Human-Preference-10K)
              and, for Fact-RLHF, given the image captions / reference answers as extra context;
              PPO with the reward model, a KL penalty to the SFT policy, LoRA adapters throughout
    results:  LLaVA-RLHF-13B LLaVA-Bench ~95.6 (relative score), MMHal-Bench ~2.53;
              LLaVA-RLHF-7B MMHal-Bench ~2.05
The learning rates, LoRA rank, batch sizes and PPO/GRPO/DPO coefficients below are ours.
"""

from lvlm_jax.config import ConfigDict, base_config

SIZES = ("7b", "13b", "tiny")
STAGES = ("reward", "ppo", "dpo", "grpo")
ARGS = tuple(f"{size}_{stage}" for size in SIZES for stage in STAGES)
PUBLISHED_PARAMS = {f"{size}_{stage}": n for size, n in (("7b", 7.06e9), ("13b", 13.35e9))
                    for stage in STAGES}  # the LLaVA model; heads and adapters come on top
LANGUAGE = {"7b": "llama2_7b", "13b": "llama2_13b"}
VISION = {"7b": "clip_l14_224", "13b": "clip_l14_336"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# stage -> (data kind, learning rate, batch size) at full size.
RECIPE = {"reward": ("preference", 2e-5, 64), "dpo": ("preference", 5e-6, 64),
          "ppo": ("prompt", 3e-5, 64), "grpo": ("prompt", 3e-5, 64)}
# Stage options, written into the stage's config section (created if base_config has none yet).
OPTIONS = {
    "dpo": {"beta": 0.1},
    "ppo": {"max_new_tokens": 128, "temperature": 1.0, "kl_coef": 0.1, "clip_eps": 0.2,
            "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95, "reward": "model"},
    "grpo": {"max_new_tokens": 128, "temperature": 1.0, "kl_coef": 0.04, "clip_eps": 0.2,
             "group_size": 8, "reward": "rule"},
}


def get_config(arg: str | None = None) -> ConfigDict:
    arg = arg or "7b_ppo"
    size, _, stage = arg.partition("_")
    if size not in SIZES or stage not in STAGES:
        raise ValueError(f"experiments/rlhf.py takes SIZE_STAGE with SIZE in {SIZES} and STAGE "
                         f"in {STAGES} (e.g. 7b_ppo, tiny_dpo); got {arg!r}")
    c = base_config()
    c.stage = stage
    tiny = size == "tiny"
    execution = ({"dtype": "float32", "param_dtype": "float32", "scan_layers": True}
                 if tiny else {"dtype": "bfloat16", "param_dtype": "float32",
                               "scan_layers": True, "remat_policy": "full"})
    if tiny:
        vision = {"preset": "clip_l14_224", "image_size": 28, "width": 64, "depth": 3,
                  "mlp_dim": 128, "num_heads": 4}
        # The demo tokenizer's 384 pieces: sampled ids (PPO/GRPO) must all decode.
        language = {"preset": "llama2_7b", "vocab_size": 384, "embed_dim": 64,
                    "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 128,
                    "max_length": 512}
    else:
        vision = {"preset": VISION[size]}
        language = {"preset": LANGUAGE[size]}
    c.model.vision = dict(vision, feature_layer=-2, drop_cls=True, **execution)
    c.model.language = dict(language, **execution)
    c.model.connector = {"kind": "projector", "projector": "mlp2x_gelu"}
    kind, lr, batch = RECIPE[stage]
    c.data.kind = kind
    c.data.template = "vicuna_v1"
    c.data.image_size = 0
    c.data.image_mean = CLIP_MEAN
    c.data.image_std = CLIP_STD
    c.optimizer.update(name="adamw", learning_rate=lr, schedule="cosine", warmup_steps=0.03,
                       weight_decay=0.0, grad_clip_norm=1.0)
    c.lora.update(rank=8 if tiny else 64, alpha=16.0 if tiny else 128.0)
    options = dict(OPTIONS.get(stage, {}))
    if tiny:
        # No reward-model run to point at: the tiny PPO scores answers by the rule (exact
        # match with the synthetic set's reference answers).
        options.update({k: v for k, v in (("max_new_tokens", 8), ("group_size", 2),
                                          ("reward", "rule")) if k in options})
    if options:
        if stage not in c:
            c[stage] = ConfigDict()
        c[stage].update(options)
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    if tiny:
        c.data.source = "synthetic"
        c.data.seq_len = 144  # the longest synthetic preference pair (131 tokens) fits
        c.data.batch_size = 8
        c.data.num_examples = 512
        c.optimizer.learning_rate = 1e-3
        c.train.total_steps = 20
    else:
        c.data.source = "arrayrecord"
        c.data.seq_len = 2048 if kind == "preference" else 1024
        c.data.batch_size = batch
        c.data.worker_count = 16
        c.train.epochs = 1.0
    return c
