"""Flamingo (Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning", 2022).

`:9b` is Flamingo-9B-shaped: a frozen vision tower, a perceiver resampler (64 latents, 6 layers)
turning each image into 64 media tokens, and a frozen 7B decoder with a gated cross-attention
block (tanh gates at 0, so training starts from the LM exactly) before every 4th layer. Only the
resampler and the cross-attention blocks train. SigLIP So400m (0.4B) stands in for the paper's
NFNet-F6 (435M) and Mistral-7B's shapes (7.24B) for its 7.1B Chinchilla-style LM, so the total
is within ~1% of Flamingo-9B's. `:tiny` is the same structure at toy sizes for a CPU:

    lvlm train --config=experiments/flamingo.py:9b --workdir=DIR \
        --config.data.path=INTERLEAVED_SHARDS --config.data.tokenizer=Mistral-7B-v0.1 \
        --config.checkpoint.init_from=IMPORTED_TOWERS_DIR
    lvlm train --config=experiments/flamingo.py:tiny --workdir=/tmp/flamingo_tiny

The tokenizer is the Mistral-7B checkpoint folder's: its tokenizer.json (HF `tokenizers`, as
transformers reads it), with `<image>` and `<video>` appended as 32000 and 32001 (the LM's
vocabulary grows to 32002). Each image is marked in the text by one `<image>` token
(`model.image_token_id`); a text token
attends to the media of the most recent marker before it (the paper's masking scheme). The
one-step CPU check is tests/test_experiment_configs.py.

The paper's numbers:
    model:    Flamingo-9B = frozen NFNet-F6 (435M) + perceiver resampler (194M) + frozen 7.1B LM
              + gated cross-attention dense blocks every 4th layer (1.6B): 9.3B in all
              (Flamingo-3B: 1.4B LM, every layer; Flamingo-80B: 70B LM, every 7th layer)
    training: M3W (interleaved web pages) + ALIGN + LTIP + VTP, AdamW with gradient clipping at
              1, LR 1e-4 after a 5,000-step linear warmup then constant, weight decay 0.1
              except on the resampler
    results:  Flamingo-9B zero-shot VQAv2 ~51.8, OKVQA ~44.7, COCO CIDEr ~79.4;
              4-shot VQAv2 ~56.3, COCO ~93.1
Batch size and length below are ours.
"""

from lvlm_jax.config import ConfigDict, base_config
from lvlm_jax.train.optimizer import DEFAULT_WD_EXCLUDE

ARGS = ("9b", "tiny")
PUBLISHED_PARAMS = {"9b": 9.3e9}
# Frozen: the vision tower and every LM weight; the cross-attention blocks live inside the
# decoder's scanned groups (decoder/stack/groups/cross_attn/...) and train.
FREEZE = [r"vision/.*", r"decoder/(?!stack/groups/cross_attn/).*"]


def get_config(arg: str | None = None) -> ConfigDict:
    size = arg or "9b"
    if size not in ARGS:
        raise ValueError(f"experiments/flamingo.py takes one of: {', '.join(ARGS)}; got {arg!r}")
    c = base_config()
    c.stage = "pretrain"  # next-token loss on the text
    execution = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True,
                 "remat_policy": "full", "attention": "xla"}
    if size == "tiny":
        execution = dict(execution, dtype="float32", remat_policy="none")
        vision = {"preset": "siglip_so400m14_224", "image_size": 28, "patch_size": 14,
                  "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4}
        language = {"preset": "mistral_7b", "vocab_size": 512, "embed_dim": 64,
                    "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 128,
                    "max_length": 256}
        connector = {"num_queries": 8, "width": 64, "depth": 1, "num_heads": 4,
                     "mlp_dim": 128, "cross_attention_every": 2}
    else:
        vision = {"preset": "siglip_so400m14_224"}
        language = {"preset": "mistral_7b"}
        connector = {"num_queries": 64, "width": 1152, "depth": 6, "num_heads": 16,
                     "mlp_dim": 4608, "cross_attention_every": 4}
    c.model.vision = dict(vision, **execution)
    c.model.language = dict(language, **execution)
    c.model.connector = dict(connector, kind="cross_attention")
    c.data.kind = "caption"
    c.data.template = "plain"
    c.data.image_size = 0
    c.optimizer.update(name="adamw", learning_rate=1e-4, schedule="constant",
                       warmup_steps=5000, weight_decay=0.1, grad_clip_norm=1.0)
    c.optimizer.freeze = list(FREEZE)
    c.optimizer.wd_exclude = (*DEFAULT_WD_EXCLUDE, r"connector/.*")  # no decay on the resampler
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    if size == "tiny":
        c.data.source = "synthetic"
        c.data.seq_len = 32
        c.data.batch_size = 16
        c.data.num_examples = 1024
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 3
        c.train.total_steps = 30
    else:
        c.data.source = "arrayrecord"
        c.data.seq_len = 512
        c.data.batch_size = 256
        c.data.worker_count = 16
        c.train.total_steps = 500_000
    return c
