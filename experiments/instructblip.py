"""InstructBLIP (Dai et al., "InstructBLIP: Towards General-purpose Vision-Language Models with
Instruction Tuning", 2023): instruction tuning of an instruction-aware Q-Former only.

`:7b` is InstructBLIP (Vicuna-7B)-shaped: an EVA-CLIP ViT-g/14-shaped tower (224 px, 1408 wide,
39 layers: BLIP-2 drops the 40th; all 257 tokens incl. CLS feed the Q-Former), a Q-Former-shaped
resampler with 32 learned queries that also attend to the instruction tokens, and Vicuna-7B (Llama
shapes). The vision tower and the LLM are frozen: only the resampler (and its projection into the
LM) trains. `:tiny` is the same structure at toy sizes for a CPU:

    lvlm train --config=experiments/instructblip.py:7b --workdir=DIR \
        --config.data.path=INSTRUCTION_SHARDS \
        --config.data.tokenizer=vicuna-7b-v1.1/tokenizer.model \
        --config.checkpoint.init_from=BLIP2_IMPORTED_DIR
    lvlm train --config=experiments/instructblip.py:tiny --workdir=/tmp/instructblip_tiny

The tokenizer is Vicuna's SentencePiece tokenizer.model: `<image>` and `<video>` are appended
(32000, 32001) and the LM's vocabulary grows to 32002 (lvlm_jax/train/input_pipeline.py).
The instruction the queries read is the prompt of each example (its unsupervised text tokens
before the first answer token, up to 128), taken from the batch by the loss
(`stages/base.py:prompt_inputs`) in the LM's vocabulary. `:tiny` runs 30 steps on a CPU (its
one-step check is tests/test_experiment_configs.py).

The paper's numbers:
    model:    ViT-g/14 (frozen, ~1B) + Q-Former (188M trainable, 32 queries of width 768, BERT-base
              initialised, instruction-aware) + Vicuna-7B (frozen); 7.9B parameters in all
    training: 13 held-in datasets, at most 60K iterations, batch 64 for Vicuna models (192 and
              128 for FlanT5-XL/XXL), AdamW (b1 0.9, b2 0.999, weight decay 0.05), LR warmed up
              linearly over 1,000 steps to 1e-5, then cosine decay to 0
    results:  zero-shot, held-out (Vicuna-7B): GQA ~49.2, TextVQA ~50.1, VizWiz ~34.5,
              ScienceQA-IMG ~60.5, NoCaps ~123.1
Our resampler puts cross-attention in every layer and shares one FFN between queries and
instruction, so it has ~153M parameters where the Q-Former has 188M; the model's total is within
1% of the published checkpoint's.
"""

from lvlm_jax.config import ConfigDict, base_config

ARGS = ("7b", "tiny")
PUBLISHED_PARAMS = {"7b": 7.91e9}  # Salesforce/instructblip-vicuna-7b
# BLIP-2's image processor uses OpenAI CLIP's normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EVA-CLIP ViT-g/14 as BLIP-2 runs it: CLS kept, no pre-norm, exact GELU, a final LayerNorm.
EVA_VIT_G = {"preset": "clip_l14_224", "width": 1408, "depth": 39, "mlp_dim": 6144,
             "num_heads": 16, "pre_norm": False, "post_norm": True, "activation": "gelu",
             "drop_cls": False, "norm_eps": 1e-6}


def get_config(arg: str | None = None) -> ConfigDict:
    size = arg or "7b"
    if size not in ARGS:
        raise ValueError(f"experiments/instructblip.py takes one of: {', '.join(ARGS)}; "
                         f"got {arg!r}")
    c = base_config()
    c.stage = "sft"  # the loss on the answers
    execution = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True,
                 "remat_policy": "full", "attention": "xla"}
    connector = {"kind": "resampler", "num_queries": 32, "instruction_aware": True,
                 "instruction_vocab": 0, "max_instruction_len": 128}
    if size == "tiny":
        execution = dict(execution, dtype="float32", remat_policy="none")
        vision = dict(EVA_VIT_G, image_size=28, width=64, depth=2, mlp_dim=128, num_heads=4)
        language = {"preset": "llama2_7b", "vocab_size": 512, "embed_dim": 64,
                    "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 128,
                    "max_length": 256}
        connector.update(num_queries=8, width=64, depth=2, num_heads=4, mlp_dim=128,
                         max_instruction_len=64)
    else:
        vision = dict(EVA_VIT_G)
        language = {"preset": "llama2_7b"}
        connector.update(width=768, depth=12, num_heads=12, mlp_dim=3072)
    c.model.vision = dict(vision, **execution)
    c.model.language = dict(language, **execution)
    c.model.connector = connector
    c.data.kind = "conversation"
    c.data.template = "vicuna_v1"
    c.data.image_size = 0
    c.data.image_mean = CLIP_MEAN
    c.data.image_std = CLIP_STD
    c.optimizer.update(name="adamw", learning_rate=1e-5, schedule="cosine", warmup_steps=1000,
                       b1=0.9, b2=0.999, weight_decay=0.05, grad_clip_norm=1.0)
    # Frozen ViT and frozen LLM: the resampler is all that trains.
    c.optimizer.freeze = [r"vision/.*", r"decoder/.*"]
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    if size == "tiny":
        c.data.source = "synthetic"
        c.data.seq_len = 96
        c.data.batch_size = 16
        c.data.num_examples = 1024
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 0.1
        c.train.total_steps = 30
    else:
        c.data.source = "arrayrecord"
        c.data.seq_len = 512
        c.data.batch_size = 64
        c.data.worker_count = 16
        c.train.total_steps = 60_000
    return c
