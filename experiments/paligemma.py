"""PaliGemma (Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024): stage 1.

`:3b` is the PaliGemma-3B shape (SigLIP So400m/14 at 224 px + Gemma-2B with PaliGemma's
257,152-token vocabulary, joined by one linear layer), trained as the paper's Stage 1: every
parameter trains (no frozen tower), images are plainly resized to a square (no padding), and
image + prompt form a bidirectional prefix (prefix-LM) before the causal suffix that carries the
loss. `:tiny` is the same structure at toy sizes for a CPU:

    lvlm train --config=experiments/paligemma.py:3b --workdir=DIR \
        --config.data.path=CAPTION_SHARDS --config.data.tokenizer=paligemma-3b-pt-224
    lvlm compile --config=experiments/paligemma.py:3b --topology=v5e-256
    lvlm train --config=experiments/paligemma.py:tiny --workdir=/tmp/paligemma_tiny

Start both towers from pretrained weights with `lvlm import` of an HF PaliGemma (or SigLIP and
Gemma) folder and `--config.checkpoint.init_from`. The tokenizer is that folder's tokenizer.json
(Gemma's 256,000 tokens + 1,024 <loc> + 128 <seg> = 257,152, then `<image>` at 257152;
`<video>` is appended at 257153); the vocabulary is HF's 257,216 rows (padded to a multiple of
64), so the imported embedding loads as it is. `:tiny` runs 30 steps on the synthetic
captions on a CPU (its one-step check is tests/test_experiment_configs.py).

The paper's numbers:
    model:   2.92B parameters (SigLIP-So400m 0.4B + Gemma-2B 2.5B + a zero-initialised linear
             projection); 224 px -> 256 image tokens; BOS + prefix + "\\n" attend
             bidirectionally with the image, the suffix is causal
    stage 1: 1B examples of the multimodal pretraining mixture at 224 px, 128 text tokens,
             nothing frozen (the image encoder's learning rate warms up slowly); then stage 2
             at 448 px (50M examples) and 896 px (10M examples) with 512 text tokens
    results: (224 px checkpoint, fine-tuned per task) COCO captions CIDEr ~141.9, VQAv2 ~83.2,
             TextVQA ~55.5, GQA ~65.6
Optimizer settings below are ours (AdamW, cosine, 3% warmup); the paper's slow warmup of the
image encoder is approximated with a 0.1x learning-rate multiplier on `vision/`.
"""

from lvlm_jax.config import ConfigDict, base_config

ARGS = ("3b", "tiny")
PUBLISHED_PARAMS = {"3b": 2.92e9}
IMAGE_TOKENS = 256  # (224 / 14) ** 2
TEXT_TOKENS = 128


def get_config(arg: str | None = None) -> ConfigDict:
    size = arg or "3b"
    if size not in ARGS:
        raise ValueError(f"experiments/paligemma.py takes one of: {', '.join(ARGS)}; got {arg!r}")
    c = base_config()
    c.stage = "pretrain"  # next-token loss on the suffix (the caption)
    execution = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True,
                 "remat_policy": "full", "attention": "xla"}
    if size == "tiny":
        vision = {"preset": "siglip_so400m14_224", "image_size": 28, "patch_size": 14,
                  "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 4}
        language = {"preset": "gemma_2b", "vocab_size": 512, "embed_dim": 64, "num_layers": 2,
                    "num_heads": 4, "num_kv_heads": 1, "head_dim": 16, "mlp_dim": 128,
                    "max_length": 256}
        execution = {"dtype": "float32", "param_dtype": "float32", "scan_layers": True,
                     "remat_policy": "none"}
    else:
        vision = {"preset": "siglip_so400m14_224"}
        language = {"preset": "gemma_2b", "vocab_size": 257216}  # HF's, padded
    c.model.vision = dict(vision, **execution)  # the final, post-normed sequence; no pooling
    c.model.language = dict(language, **execution)
    c.model.connector = {"kind": "projector", "projector": "linear",
                         "scale_by_inverse_sqrt_embed": True}
    c.model.prefix_lm = True
    c.data.kind = "caption"
    c.data.template = "plain"
    c.data.image_size = 0  # the tower's
    c.data.image_mean = (0.5, 0.5, 0.5)  # SigLIP maps pixels to [-1, 1]
    c.data.image_std = (0.5, 0.5, 0.5)
    c.data.image_mode = "resize"  # a plain resize to the square, no padding
    c.optimizer.update(name="adamw", learning_rate=1e-4, schedule="cosine", warmup_steps=0.03,
                       weight_decay=0.0, grad_clip_norm=1.0)
    c.optimizer.freeze = []  # Stage 1 trains everything
    c.optimizer.lr_multipliers = ((r"vision/.*", 0.1),)
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    if size == "tiny":
        c.data.source = "synthetic"
        c.data.seq_len = 64
        c.data.batch_size = 16
        c.data.num_examples = 1024
        c.optimizer.learning_rate = 1e-3
        c.train.total_steps = 30
    else:
        c.data.source = "arrayrecord"
        c.data.seq_len = IMAGE_TOKENS + TEXT_TOKENS
        c.data.batch_size = 256
        c.data.worker_count = 16
        # 1B examples at batch 256: 3.9M steps.
        c.train.examples = 1_000_000_000
    return c
