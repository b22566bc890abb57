"""Flat media through the grain loader and the trainer (data.media="flat"): rows of 0..N images,
any-res tiles and packing in one crop budget per batch shard, bad media skipped and counted."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipelines.loader import SkipStats, demo_tokenizer, make_dataset
from data_pipelines.media import OVER_BUDGET
from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.templates import SPECIAL_MARKERS, template_texts
from data_pipelines.tokenizer import IMAGE_MARK, VIDEO_MARK, open_tokenizer, train_tokenizer
from lvlm_jax import cli
from lvlm_jax import config as config_lib
from lvlm_jax.models.vision import VisionEncoder
from lvlm_jax.models.vlm import VLM, vlm_config
from lvlm_jax.train import input_pipeline
from lvlm_jax.train.media_batch import MediaBatch, media_options
from lvlm_jax.train.stages.base import FLAT_MEDIA_FIELDS, LM_FIELDS, LossContext, model_inputs

SIZE = 32  # crops of 32 px, 8 px patches: 16 tokens a crop
PINPOINTS = ((32, 64), (64, 32), (64, 64))


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer(input_pipeline.cache_dir())  # trained once, as `lvlm train` uses it


def _model_cfg(tok, **kw):
    return vlm_config({
        "vision": {"image_size": SIZE, "patch_size": 8, "width": 16, "depth": 1, "mlp_dim": 32,
                   "num_heads": 2},
        "language": {"vocab_size": tok.vocab_size, "embed_dim": 32, "num_layers": 1,
                     "num_heads": 2, "num_kv_heads": 2, "mlp_dim": 64, "head_dim": 16},
        "image_token_id": tok.image_id, **kw})


def _record(i, images, text="What is here?", reply="A red circle and a blue square."):
    marks = "".join("<image>\n" for _ in images)
    return {"id": f"r{i}", "images": list(images),
            "conversations": [{"from": "human", "value": f"{marks}{text}"},
                              {"from": "gpt", "value": reply}]}


def _image(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _batches(tok, cfg, records, *, batch_size, groups, crops, seq_len=96, packing="none",
             stats=None):
    stats = stats if stats is not None else SkipStats()
    ds = make_dataset(
        records, kind="conversation", tokenizer=tok, template="vicuna_v1", seq_len=seq_len,
        image_size=SIZE, image_tokens=cfg.vision.num_tokens, batch_size=batch_size, seed=0,
        shuffle=False, num_epochs=1, packing=packing, stats=stats,
        media=media_options(cfg, crops // groups, num_frames=2),
        batch_map=MediaBatch(cfg, rows_per_group=batch_size // groups,
                             crops_per_group=crops // groups, media_ids=(tok.image_id,),
                             stats=stats))
    return list(ds)


def _init(model, seed):
    inputs = (jnp.zeros((1, 24), jnp.int32), jnp.zeros((1, 1, SIZE, SIZE, 3), jnp.float32))
    return jax.jit(lambda rng: model.init(rng, *inputs)["params"])(jax.random.PRNGKey(seed))


def _token_losses(model, params, batch):
    """Per-token cross-entropy [b, t] times the loss mask, as the sft loss sums it."""
    ctx = LossContext(model=model)
    fields = {k: jnp.asarray(v) for k, v in batch.items() if k in (*LM_FIELDS,
                                                                     *FLAT_MEDIA_FIELDS)}
    logits, _ = model.apply({"params": params}, **model_inputs(ctx, fields))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, fields["targets"][..., None], axis=-1)[..., 0]
    return nll * fields["loss_mask"]


@pytest.fixture(scope="module")
def plain(tok):
    cfg = _model_cfg(tok)
    model = VLM(cfg)
    params = _init(model, 0)
    return cfg, model, params


def test_rows_of_0_1_3_images_run_the_tower_on_4_crops_and_equal_rows_alone(tok, plain):
    cfg, model, params = plain
    rng = np.random.default_rng(0)
    records = [_record(i, [_image(rng, 40, 48) for _ in range(n)])
               for i, n in enumerate((0, 1, 3))]
    (batch,) = _batches(tok, cfg, records, batch_size=3, groups=1, crops=4)
    assert batch["pixel_values"].shape == (1, 4, SIZE, SIZE, 3)
    assert batch["pixel_values"].dtype == np.uint8 and batch["crop_valid"].all()
    assert batch["image_slots"].shape == (3, 96, 1)
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, VisionEncoder) and context.method_name == "__call__":
            seen.append(args[0].shape)
        return next_fun(*args, **kwargs)

    losses = jax.jit(lambda p, b: _token_losses(model, p, b))
    with nn.intercept_methods(spy):
        together = np.asarray(losses(params, batch)).sum(axis=1)
    assert seen == [(4, SIZE, SIZE, 3)]  # 4 crops, not 3 rows x 3 images
    alone = [float(np.asarray(losses(params, _batches(
        tok, cfg, [r], batch_size=1, groups=1, crops=4)[0])).sum()) for r in records]
    assert all(x > 0 for x in alone)
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def anyres(tok):
    cfg = _model_cfg(tok, image_newline=True, image_grid_pinpoints=PINPOINTS)
    model = VLM(cfg)
    params = _init(model, 1)
    return cfg, model, params


def _segment_losses(losses, batch):
    """Loss sums of every sample (row, segment) of a batch, sorted."""
    seg = np.asarray(batch["segment_ids"])
    return sorted(float(losses[r][seg[r] == s].sum()) for r in range(len(seg))
                  for s in range(1, int(seg[r].max()) + 1))


def test_anyres_rows_packed_with_text_only_equal_each_sample_alone(tok, anyres):
    cfg, model, params = anyres
    rng = np.random.default_rng(1)
    # wide (1x2 tiles), tall (2x1), square (2x2) and a text-only sample; packed 2 a row into
    # 2 rows of 2 groups of 8 crops: row 0 = wide + square (3 + 5), row 1 = tall + text (3)
    records = [_record(0, [_image(rng, 20, 60)]), _record(1, [_image(rng, 60, 20)]),
               _record(2, [_image(rng, 40, 40)]), _record(3, [], reply="Nothing at all.")]
    (batch,) = _batches(tok, cfg, records, batch_size=2, groups=2, crops=16, seq_len=256,
                        packing="first_fit")
    assert batch["segment_ids"].max(axis=1).tolist() == [2, 2]
    assert batch["pixel_values"].shape == (2, 8, SIZE, SIZE, 3)
    assert batch["crop_valid"].sum(axis=1).tolist() == [8, 3]
    losses = jax.jit(lambda p, b: _token_losses(model, p, b))
    packed = _segment_losses(np.asarray(losses(params, batch)), batch)
    alone = []
    for r in records:
        (one,) = _batches(tok, cfg, [r], batch_size=1, groups=1, crops=8, seq_len=256)
        alone += _segment_losses(np.asarray(losses(params, one)), one)
    # 16 global-view tokens + the un-padded tile map with one newline a row
    square = int(np.sum(np.asarray(batch["image_slots"])[0, :, 0] >= 0))
    assert square == (16 + 2 * 8 + 2) + (16 + 8 * 8 + 8)
    np.testing.assert_allclose(packed, sorted(alone), rtol=1e-5)


def test_bad_media_are_skipped_and_counted_with_their_reasons(tok, anyres):
    cfg, model, params = anyres
    rng = np.random.default_rng(2)
    square = lambda i: _record(i, [_image(rng, 40, 40)])  # noqa: E731 (5 crops)
    records = [_record(0, [_image(rng, 20, 60)]),  # 3 crops
               _record(1, [_image(rng, 2, 200)]),  # no tile row survives un-padding
               _record(2, [b"not an image"]),
               square(3), square(4),
               _record(5, [_image(rng, 40, 40)] * 2),  # 10 crops: over any group's 8
               square(6), square(7)]
    stats = SkipStats()
    batches = _batches(tok, cfg, records, batch_size=2, groups=1, crops=8, seq_len=256,
                       stats=stats)
    # lanes: row 0 reads records 0, 2, 4, 6 and row 1 records 1, 3, 5, 7
    assert len(batches) == 2
    assert batches[0]["crop_valid"].sum() == 8  # records 0 and 3
    second = batches[1]  # records 4 and 7: 5 + 5 crops; row 1 is emptied, not the run
    assert second["crop_valid"].sum() == 5
    assert not second["segment_ids"][1].any() and not second["loss_mask"][1].any()
    assert (second["image_slots"][1] == -1).all()
    assert dict(stats.skipped) == {"image beyond the any-res grids": 1,
                                   "unreadable image": 1, OVER_BUDGET: 2}
    losses = jax.jit(lambda p, b: _token_losses(model, p, b))
    assert np.isfinite(np.asarray(losses(params, second))).all()


def _frames(folder, n, rng):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(_image(rng, 24, 40)).save(folder / f"frame_{i}.png")
    return str(folder)


def test_video_rows_pool_their_frames_and_bad_clips_are_skipped(tmp_path):
    lines = [*SyntheticShapes(seed=0).corpus(100), *template_texts()]
    tok = open_tokenizer(train_tokenizer(lines, str(tmp_path / "tok"), 384, user_defined_symbols=(
        IMAGE_MARK, VIDEO_MARK, *SPECIAL_MARKERS)))
    # LLaVA-NeXT-Video: each frame's 4x4 map mean-pooled 2x2 before the projector
    cfg = _model_cfg(tok, video_token_id=tok.video_id, video_pool="average")
    model, rng = VLM(cfg), np.random.default_rng(3)
    params = _init(model, 2)
    clip = lambda i, video, marks="<video>\n": {  # noqa: E731
        "id": f"v{i}", "video": video, "images": [_image(rng, 30, 30)] * marks.count("<image>"),
        "conversations": [{"from": "human", "value": f"{marks}What happens?"},
                          {"from": "gpt", "value": "A red circle moves."}]}
    good = [clip(0, _frames(tmp_path / "a", 3, rng)),
            clip(1, _frames(tmp_path / "b", 4, rng), "<image>\n<video>\n")]
    bad = [clip(2, _frames(tmp_path / "c", 1, rng)),  # 1 frame, 2 asked
           clip(3, b"not a video")]
    records = [*good, *bad, *good]  # rows read good[0], bad[0], good[0] and good[1], ...
    stats = SkipStats()
    ds = make_dataset(
        records, kind="conversation", tokenizer=tok, template="vicuna_v1", seq_len=128,
        image_size=SIZE, image_tokens=16, batch_size=2, seed=0, shuffle=False, num_epochs=1,
        stats=stats, media=media_options(cfg, 5, num_frames=2),
        batch_map=MediaBatch(cfg, rows_per_group=2, crops_per_group=5,
                             media_ids=(tok.image_id, tok.video_id), stats=stats))
    batch = list(ds)[0]
    assert dict(stats.skipped) == {"video too short": 1, "unreadable video": 1}
    # row 0: 2 frames x 4 pooled tokens; row 1: a 16-token image, then its clip's 8
    assert (batch["image_slots"][..., 0] >= 0).sum(axis=1).tolist() == [8, 24]
    assert batch["crop_valid"].sum() == 5 and batch["pixel_values"].shape[:2] == (1, 5)
    losses = jax.jit(lambda p, b: _token_losses(model, p, b))
    together = np.asarray(losses(params, batch)).sum(axis=1)
    alone = []
    for r in good:
        (one,) = list(make_dataset(
            [r], kind="conversation", tokenizer=tok, template="vicuna_v1", seq_len=128,
            image_size=SIZE, image_tokens=16, batch_size=1, seed=0, shuffle=False,
            num_epochs=1, media=media_options(cfg, 5, num_frames=2),
            batch_map=MediaBatch(cfg, rows_per_group=1, crops_per_group=5,
                                 media_ids=(tok.image_id, tok.video_id))))
        alone.append(float(np.asarray(losses(params, one)).sum()))
    np.testing.assert_allclose(together, alone, rtol=1e-5)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny any-res recipe at one layer a tower: 8 rows on 8 fake devices, so 8 crop groups
# of 3 crops (one 32 px synthetic image on a 1x2 grid a row).
TINY = [f"--config={ROOT}/experiments/llava_next.py:tiny", "--config.data.batch_size=8",
        "--config.data.max_crops=24", "--config.model.vision.depth=1",
        "--config.model.language.num_layers=1", "--config.train.log_every=1",
        "--config.train.progress=false", "--config.checkpoint.every_steps=2"]


def _losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_lvlm_train_runs_the_tiny_anyres_recipe_over_8_groups_and_resumes(tmp_path, capsys):
    cfg = config_lib.load(TINY[0].removeprefix("--config="))
    assert input_pipeline.media_groups(cfg) == 8  # fsdp over the 8 devices: 8 crop groups
    workdir = tmp_path / "run"
    assert cli.main(["train", f"--workdir={workdir}", "--config.train.total_steps=3",
                     *TINY]) == 0
    first = _losses(workdir)
    assert sorted(first) == [1, 2, 3] and all(np.isfinite(list(first.values())))
    assert first[3] < first[1]
    assert cli.main(["train", f"--workdir={workdir}", "--config.train.total_steps=4",
                     *TINY]) == 0
    assert "resumed from" in capsys.readouterr().out
    again = _losses(workdir)
    assert sorted(again) == [1, 2, 3, 4] and np.isfinite(again[4])
