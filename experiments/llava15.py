"""LLaVA-1.5 (Liu et al., "Improved Baselines with Visual Instruction Tuning", 2023): the recipe.

`:SIZE` is stage 2 (visual instruction tuning); `:SIZE_pretrain` is stage 1 (feature alignment);
`:SIZE_lora` is stage 2 with LoRA adapters on the frozen LM (the paper's LoRA recipe). SIZE is
`7b`, `13b` or `tiny` (the same structure at toy sizes, for a CPU):

    lvlm train --config=experiments/llava15.py:7b_pretrain --workdir=DIR/stage1 \
        --config.data.path=LCS558K_SHARDS --config.data.tokenizer=vicuna-7b-v1.5/tokenizer.model
    lvlm train --config=experiments/llava15.py:7b --workdir=DIR/stage2 \
        --config.data.path=MIX665K_SHARDS --config.data.tokenizer=vicuna-7b-v1.5/tokenizer.model \
        --config.checkpoint.init_from=DIR/stage1
    lvlm train --config=experiments/llava15.py:7b_lora --workdir=DIR/stage2_lora \
        --config.data.path=MIX665K_SHARDS --config.data.tokenizer=vicuna-7b-v1.5/tokenizer.model \
        --config.checkpoint.init_from=DIR/stage1
    lvlm export --checkpoint=DIR/stage2_lora --format=hf --out=DIR/llava15_7b_lora_merged
    lvlm compile --config=experiments/llava15.py:7b --topology=v5p-64
    lvlm compile --config=experiments/llava15.py:7b --topology=v5e-256 --config.mesh.ici.tensor=2
    lvlm train --config=experiments/llava15.py:tiny --workdir=/tmp/llava15_tiny

`:tiny` takes ~25 s on 2 CPU cores (50 steps on synthetic data): loss 6.2 -> ~1.4 for `:tiny`,
6.6 -> ~5.4 for `:tiny_pretrain`, where only the projector trains.

Per-chip memory of the 7B step (bench/results/tpu_aot_report.txt, as configured: FSDP, full
remat, bf16 compute): v5p-64 at batch 256, 16.9 of 95 GiB, predicted 2.3 s a step (67% MFU);
v5e-256 at batch 128 with fsdp=128 x tensor=2 (128 rows cannot split over 256 chips of pure
FSDP), 1.6 of 16 GiB, 0.50 s (45% MFU). Collectives and the sharding audit:
bench/results/sharding_audit.md.

Shards come from `lvlm data convert --format=captions` (stage 1, LAION/CC/SBU 558K BLIP
captions) and `--format=llava` (stage 2, llava_v1_5_mix665k.json). Both towers start from
pretrained weights (`lvlm import` of CLIP ViT-L/14-336 and Vicuna-v1.5); the paper's stage 1
takes ~5.5 h and stage 2 ~20 h for 13B on 8x A100-80GB (about half that for 7B).

The tokenizer is the one Vicuna-v1.5 ships: its SentencePiece tokenizer.model (the
tokenizer_config.json beside it gives bos/eos/unk; the ids are transformers'). It has no
`<image>`: `<image>` and `<video>` are appended as ids 32000 and 32001, the 32000-token
vocabulary of the config grows to 32002, and the imported embedding and LM head gain two rows
started as transformers' resize_token_embeddings starts them (the run's vocab.json records it;
its tokenizer/ folder is what stage 2, eval and generate read). Padding uses <unk>, as LLaVA's.

The paper's numbers (Table 4 / Appendix):
    stage 1: 558K image-caption pairs, 1 epoch, batch 256, LR 1e-3, projector only
    stage 2: 665K instruction mix, 1 epoch, batch 128, LR 2e-5, projector + LM (vision frozen)
    both:    AdamW, no weight decay, cosine schedule, warmup ratio 0.03, 2048 tokens, 336 px
             images padded to square; CLIP features from the penultimate layer, CLS dropped;
             a 2-layer MLP (GELU) projector.
    results: 7B  VQAv2 78.5, GQA 62.0, VizWiz 50.0, SciQA-IMG 66.8, TextVQA 58.2, POPE 85.9,
             MME 1510.7, MMBench 64.3, SEED 58.6, MM-Vet 31.1
             13B VQAv2 80.0, GQA 63.3, VizWiz 53.6, SciQA-IMG 71.6, TextVQA 61.3, POPE 85.9,
             MME 1531.3, MMBench 67.7, SEED 61.6, MM-Vet 36.1
    LoRA:    stage 2 with rank 128, alpha 256 adapters on every linear layer of the LM, LR 2e-4
             (the projector trains in full at 2e-5), batch 128, 1 epoch; about the full
             fine-tune's results (7B-LoRA: VQAv2 ~79.1, GQA ~63.0, TextVQA ~58.2, POPE ~86.4,
             MME ~1476.9, MMBench ~66.1). The paper's lora_dropout of 0.05 has no counterpart
             here (lora.dropout is not implemented). The adapters run unmerged in the train
             step; `lvlm export` writes the merged weights.
"""

from lvlm_jax.config import ConfigDict, base_config

LANGUAGE = {"7b": "llama2_7b", "13b": "llama2_13b"}  # Vicuna-v1.5 has Llama-2's shapes
SIZES = (*LANGUAGE, "tiny")
ARGS = tuple(f"{s}{v}" for s in SIZES for v in ("", "_pretrain", "_lora"))
PUBLISHED_PARAMS = {f"{s}{v}": n for s, n in (("7b", 7.06e9), ("13b", 13.35e9))
                    for v in ("", "_pretrain", "_lora")}  # LoRA adapters come on top
# OpenAI CLIP's normalisation (what LLaVA's image processor applies).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Full remat keeps only each layer's input between forward and backward; at 2048 tokens the
# saved per-layer activations of a 7B model would otherwise dominate per-chip memory.
REMAT = "full"


def get_config(arg: str | None = None) -> ConfigDict:
    arg = arg or "7b"
    size, _, stage = arg.partition("_")
    if size not in SIZES or stage not in ("", "pretrain", "lora"):
        forms = ", ".join(f"{s}, {s}_pretrain, {s}_lora" for s in SIZES)
        raise ValueError(f"experiments/llava15.py takes one of: {forms}; got {arg!r}")
    c = base_config()
    execution = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": True,
                 "remat_policy": REMAT, "attention": "xla"}
    if size == "tiny":
        # A CLIP-style tower (CLS token, pre-norm, quick GELU) small enough for a CPU step.
        vision = {"preset": "clip_l14_336", "image_size": 56, "width": 64, "depth": 3,
                  "mlp_dim": 128, "num_heads": 4}
        language = {"preset": "llama2_7b", "vocab_size": 512, "embed_dim": 64,
                    "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "mlp_dim": 128,
                    "max_length": 512}
    else:
        vision = {"preset": "clip_l14_336"}
        language = {"preset": LANGUAGE[size]}
    # LLaVA's mm_vision_select_layer=-2 with the "patch" strategy: penultimate layer, no CLS.
    c.model.vision = dict(vision, feature_layer=-2, drop_cls=True, **execution)
    c.model.language = dict(language, **execution)
    c.model.connector = {"kind": "projector", "projector": "mlp2x_gelu"}
    c.data.image_mean = CLIP_MEAN
    c.data.image_std = CLIP_STD
    c.data.image_size = 0  # the tower's: 336 (56 for tiny)
    c.data.max_images = 1
    c.optimizer.update(name="adamw", schedule="cosine", warmup_steps=0.03, weight_decay=0.0,
                       grad_clip_norm=1.0)
    c.train.epochs = 1.0
    # FSDP over every chip: the paper's ZeRO-3 (DeepSpeed) setting.
    c.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1, "sequence": 1}
    if stage == "pretrain":
        c.stage = "pretrain"  # freezes vision/ and decoder/: only the projector trains
        c.data.kind = "caption"
        c.data.template = "plain"
        c.data.batch_size = 256
        c.optimizer.learning_rate = 1e-3
    else:
        c.stage = "sft"  # freezes vision/: the projector and the whole LM train
        c.data.kind = "conversation"
        c.data.template = "vicuna_v1"
        c.data.batch_size = 128
        c.optimizer.learning_rate = 2e-5
    if stage == "lora":
        # Adapters on q/k/v/o/gate/up/down of every LM layer (lora.targets' default); the
        # projector trains in full at a tenth of the adapters' LR (2e-5), the LM stays frozen.
        c.lora.update(rank=128, alpha=256.0, trainable=(r"connector/.*",))
        c.optimizer.learning_rate = 2e-4
        c.optimizer.lr_multipliers = ((r"connector/.*", 0.1),)
    if size == "tiny":
        c.data.source = "synthetic"
        c.data.seq_len = 128
        c.data.batch_size = 16
        c.data.num_examples = 2048
        c.train.epochs = 0.0
        c.train.total_steps = 50
        c.optimizer.learning_rate = 1e-3
        if stage == "lora":
            c.lora.update(rank=8, alpha=16.0)
    else:
        c.data.source = "arrayrecord"  # with --config.data.path=DIR and the Vicuna tokenizer
        c.data.seq_len = 2048
        c.data.worker_count = 16
        c.train.log_every = 10
    return c
