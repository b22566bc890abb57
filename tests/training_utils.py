"""Shared helpers for training tests: a tiny config and random batches in the loader's format."""

from __future__ import annotations

import numpy as np

from lvlm_jax import config as config_lib

IMG = 5


def tiny_config(stage: str = "sft", batch: int = 8, seq: int = 32, steps: int = 5, **kw):
    cfg = config_lib.base_config()
    cfg.stage = stage
    cfg.model.vision = {"preset": "tiny", "image_size": 16, "patch_size": 8, "depth": 2}
    cfg.model.language = {"preset": "tiny", "vocab_size": 128, "num_layers": 2}
    cfg.model.image_token_id = IMG
    cfg.data.batch_size = batch
    cfg.data.seq_len = seq
    cfg.data.image_size = 16
    cfg.train.total_steps = steps
    cfg.train.progress = False
    cfg.train.loss_chunk = 8
    cfg.optimizer.learning_rate = 1e-2
    cfg.optimizer.warmup_steps = 0
    for key, value in kw.items():
        node = cfg
        *head, last = key.split(".")
        for h in head:
            node = node[h]
        node[last] = value
    return cfg


def random_batches(cfg, seed: int = 0, image_tokens: int = 4):
    """An endless iterator of host-local batches: text, one image block, padding."""
    rng = np.random.default_rng(seed)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    size = cfg.data.image_size
    while True:
        ids = rng.integers(8, 128, size=(b, t)).astype(np.int32)
        ids[:, 2:2 + image_tokens] = IMG
        lengths = rng.integers(t // 2, t + 1, size=b)
        seg = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        ids = ids * seg
        targets = np.concatenate([ids[:, 1:], np.zeros((b, 1), np.int32)], axis=1)
        loss_mask = ((np.arange(t)[None] >= 2 + image_tokens) & (targets > 0)
                     & (seg > 0)).astype(np.float32)
        yield {
            "input_ids": ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "segment_ids": seg,
            "positions": (np.arange(t)[None] * seg).astype(np.int32),
            "pixel_values": rng.integers(0, 256, size=(b, 1, size, size, 3), dtype=np.uint8),
        }


def demo_tokenizer_file(directory) -> str:
    """The demo's sentencepiece model, trained into `directory`: its path."""
    from data_pipelines.loader import demo_tokenizer

    demo_tokenizer(directory)
    return str(directory / "demo_tokenizer_v2.model")


def mesh_answers(questions: int = 6) -> list[str]:
    """Greedy answers of the tiny model (at its initialisation, with the demo tokenizer's
    vocabulary) to synthetic VQA questions, each batch sharded over a mesh of all devices."""
    from lvlm_jax import sharding
    from lvlm_jax.evals.model_runner import ModelRunner
    from lvlm_jax.evals.records import synthetic_records
    from lvlm_jax.train import loop
    from lvlm_jax.train.input_pipeline import load_tokenizer

    tokenizer = load_tokenizer(config_lib.base_config().data)  # the demo's, cached
    cfg = tiny_config(**{"model.language.vocab_size": tokenizer.vocab_size,
                         "model.image_token_id": tokenizer.image_id})
    setup = loop.build(cfg)
    records = synthetic_records("vqa", questions, seed=0, image_size=cfg.data.image_size)
    runner = ModelRunner(setup.model, setup.state.params, tokenizer, "vicuna_v1",
                         image_size=cfg.data.image_size, batch_size=4, mesh=setup.mesh)
    with sharding.mesh_context(setup.mesh):
        return runner.generate([r["image"] for r in records], [r["question"] for r in records],
                               max_new_tokens=4)
