"""LLaVA-NeXT (LLaVA-1.6; Liu et al., "LLaVA-NeXT: Improved reasoning, OCR, and world
knowledge", 2024): any-res visual instruction tuning. `:7b` is the Vicuna-7B recipe, `:tiny`
the same structure at toy sizes for a CPU:

    lvlm train --config=experiments/llava_next.py:7b --workdir=DIR/next \
        --config.data.path=NEXT779K_SHARDS --config.data.tokenizer=vicuna-7b-v1.5/tokenizer.model \
        --config.checkpoint.init_from=DIR/stage1
    lvlm train --config=experiments/llava_next.py:tiny --workdir=/tmp/llava_next_tiny

Each image is tiled any-res (data_pipelines/anyres.py): a global view plus the tiles of the
best grid of `model.image_grid_pinpoints`, its tile features un-padded with a learned
image_newline after every row, so one image takes up to 5 crops and 2,928 tokens at 336 px.
Batches carry their crops flat (data.media="flat", models/media_layout.py): the vision tower
runs on data.max_crops crops a step, split evenly over the batch shards, whatever the number
of images in a row (text-only rows cost nothing). A row whose crops its shard cannot fit is
emptied and counted ("over crop budget"), so size max_crops to the data's images a batch.

`:tiny` (32 px crops; the synthetic set's 32x32 images take the 1x2 grid: 3 crops and 36 tokens
an image) takes ~35 s on 2 CPU cores for 50 steps (12 s of it compiling): loss 6.5 -> ~1.3.

The paper's stage 2 (the 779K mix of LLaVA-1.5's 665K and new high-resolution data): 1 epoch,
batch 128, LR 2e-5 for the projector and the LM and 2e-6 for the vision tower (which trains,
unlike LLaVA-1.5's), AdamW, cosine, warmup 0.03, 4096 tokens; grids up to 672x672 (2x2),
1008x336 (1x3) and 336x1008 (3x1). Stage 1 is LLaVA-1.5's (experiments/llava15.py:7b_pretrain).
"""

from lvlm_jax.config import ConfigDict, base_config

ARGS = ("7b", "tiny")
PUBLISHED_PARAMS = {"7b": 7.06e9}  # plus the 4,096 of image_newline
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PINPOINTS_336 = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def get_config(arg: str | None = None) -> ConfigDict:
    arg = arg or "7b"
    if arg not in ARGS:
        raise ValueError(f"experiments/llava_next.py takes one of: {', '.join(ARGS)}; "
                         f"got {arg!r}")
    c = base_config()
    execution = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True,
                 "remat_policy": "full", "attention": "xla"}
    if arg == "tiny":
        vision = {"preset": "clip_l14_336", "image_size": 32, "patch_size": 8, "width": 64,
                  "depth": 2, "mlp_dim": 128, "num_heads": 4}
        language = {"preset": "llama2_7b", "vocab_size": 512, "embed_dim": 64,
                    "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 128,
                    "max_length": 512}
        pinpoints = ((32, 64), (64, 32), (64, 64))
    else:
        vision, language, pinpoints = {"preset": "clip_l14_336"}, {"preset": "llama2_7b"}, \
            PINPOINTS_336
    c.model.vision = dict(vision, feature_layer=-2, drop_cls=True, **execution)
    c.model.language = dict(language, **execution)
    c.model.connector = {"kind": "projector", "projector": "mlp2x_gelu"}
    c.model.image_newline = True
    c.model.image_grid_pinpoints = pinpoints
    c.data.image_mean, c.data.image_std = CLIP_MEAN, CLIP_STD
    c.data.media = "flat"
    c.data.kind, c.data.template = "conversation", "vicuna_v1"
    c.stage = "sft"
    c.optimizer.update(name="adamw", schedule="cosine", warmup_steps=0.03, weight_decay=0.0,
                       grad_clip_norm=1.0, learning_rate=2e-5, freeze=[],
                       lr_multipliers=((r"vision/.*", 0.1),))
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    if arg == "tiny":
        c.data.source = "synthetic"
        c.data.seq_len = 192
        c.data.batch_size = 16
        c.data.max_crops = 48  # one 3-crop image a row
        c.data.num_examples = 2048
        c.train.total_steps = 50
        c.optimizer.learning_rate = 1e-3
    else:
        c.data.source = "arrayrecord"  # with --config.data.path=DIR and the Vicuna tokenizer
        c.data.seq_len = 4096
        c.data.batch_size = 128
        c.data.max_crops = 4 * 128  # 4 crops a row on average
        c.data.worker_count = 16
        c.train.epochs = 1.0
    return c
