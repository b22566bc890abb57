"""The demo figures: loss curves per stage and an example grid, written as real PNGs."""

import json

import numpy as np
from PIL import Image

from lvlm_jax import demo_plots


def _assert_png(path, min_width: int, min_height: int) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_width and im.height >= min_height, im.size
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2  # something was drawn
    return pixels


def _write_metrics(path, records):
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')


def test_loss_curves_draw_every_stage_and_a_missing_stage_does_not_raise(tmp_path):
    _write_metrics(tmp_path / "pretrain" / "metrics.jsonl",
                   [{"step": 0, "compile_seconds": 1.5}]
                   + [{"step": s, "loss": 3.0 / s} for s in range(1, 11)])
    _write_metrics(tmp_path / "sft" / "metrics.jsonl",
                   [{"step": s, "loss": 2.0 - 0.1 * s, "grad_norm": 1.0} for s in range(1, 6)]
                   + [{"step": 5, "eval_loss": 1.7}])
    _write_metrics(tmp_path / "dpo" / "metrics.jsonl", [{"step": 0, "compile_seconds": 1.0}])
    out = tmp_path / "figures" / "loss_curves.png"
    got = demo_plots.plot_loss_curves(str(tmp_path), ["pretrain", "sft", "dpo", "ppo"], str(out))
    assert got == str(out)
    _assert_png(out, 800, 250)


def test_loss_curves_of_a_workdir_with_no_stage_files_still_write_a_png(tmp_path):
    out = tmp_path / "loss.png"
    demo_plots.plot_loss_curves(str(tmp_path), ["ppo"], str(out))
    _assert_png(out, 200, 200)


def test_examples_grid_shows_upscaled_images_and_colours_answers_by_match(tmp_path):
    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
                 "question": f"What colour is shape {i}? Answer with one word.",
                 "answer": answer, "reference": "Red"}
                for i, answer in enumerate([" red ", "blue", "RED", "a long answer " * 10, ""])]
    # A one-pixel checkerboard: drawn with nearest, its pixels become blocks of pure magenta.
    checker = (np.indices((64, 64)).sum(0) % 2).astype(bool)
    examples[0]["image"] = np.where(checker[..., None], [255, 0, 255], [0, 255, 0]).astype(np.uint8)
    out = tmp_path / "examples.png"
    assert demo_plots.plot_examples(examples, str(out), columns=4) == str(out)
    pixels = _assert_png(out, 4 * 150, 2 * 150)
    magenta = (pixels == [255, 0, 255]).all(-1)
    runs = magenta[:, 2:] & magenta[:, 1:-1] & magenta[:, :-2]
    assert runs.sum() > 64 * 32, "the 64x64 image is not upscaled pixel for pixel"
    # Both colours are used: two answers match the reference, three do not.
    for hex_colour in (demo_plots.MATCH_COLOR, demo_plots.MISMATCH_COLOR):
        rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).sum(-1) < 30).any(), hex_colour


def test_answers_match_ignores_case_and_surrounding_space():
    assert demo_plots.answers_match(" Red\n", "red")
    assert not demo_plots.answers_match("red circle", "red")
