"""The docs stay true: the worked examples of docs/ run (from the files the pages quote), the
pages quote them verbatim, every module, function and file a page names exists, every config key
is documented, and docs/cli.md matches the parser."""

import glob
import importlib
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "*.md")))


def example(name: str):
    """docs/examples/NAME.py as a module: the code the page shows is the code under test."""
    path = os.path.join(DOCS, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"docs_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# The pages agree with the code
# ---------------------------------------------------------------------------------------------


def test_cli_reference_matches_the_parser():
    out = subprocess.run([sys.executable, os.path.join(DOCS, "gen_cli.py"), "--check"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_every_worked_example_is_quoted_verbatim_by_a_page():
    sys.path.insert(0, DOCS)
    try:
        import sync_examples
    finally:
        sys.path.remove(DOCS)
    quotes = {}
    for p in PAGES:
        for path, code in sync_examples.quoted(page(os.path.basename(p))):
            quotes[path] = code
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert code == f.read(), f"{os.path.basename(p)} quotes a stale {path}"
    examples = {os.path.relpath(p, ROOT)
                for p in glob.glob(os.path.join(DOCS, "examples", "*.py"))}
    assert examples == set(quotes)


_DOTTED = re.compile(r"`((?:lvlm_jax|data_pipelines)(?:\.\w+)+)`")
_PATH = re.compile(r"`((?:lvlm_jax|data_pipelines|experiments|tests|bench|docs)/[a-z0-9_/.]*)`")
_LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")


def _resolve(dotted: str):
    """The object a dotted name names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attr in parts[k:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_every_module_function_and_file_a_page_names_exists():
    missing = []
    for p in PAGES:
        text = page(os.path.basename(p))
        for dotted in sorted(set(_DOTTED.findall(text))):
            try:
                _resolve(dotted)
            except (ImportError, AttributeError):
                missing.append(f"{os.path.basename(p)}: {dotted}")
        paths = set(_PATH.findall(text)) | {os.path.normpath(os.path.join("docs", link))
                                            for link in _LINK.findall(text)}
        for path in sorted(paths):
            if not os.path.exists(os.path.join(ROOT, path.rstrip("/"))):
                missing.append(f"{os.path.basename(p)}: {path}")
    assert not missing, missing


def test_the_index_links_every_page():
    index = page("README.md")
    linked = set(_LINK.findall(index))
    assert {os.path.basename(p) for p in PAGES} - {"README.md"} <= linked


def test_configs_page_documents_every_key_of_the_base_config():
    from lvlm_jax import config as config_lib

    text = page("configs.md")
    keys = config_lib.valid_keys(config_lib.base_config())
    assert len(keys) > 100
    undocumented = [k for k in keys if f"`{k}`" not in text]
    assert not undocumented, undocumented


def test_configs_page_names_every_experiment_and_sweep_file():
    text = page("configs.md")
    files = glob.glob(os.path.join(ROOT, "experiments", "*.py")) + glob.glob(
        os.path.join(ROOT, "experiments", "sweeps", "*.py"))
    unnamed = [os.path.relpath(f, ROOT) for f in files if os.path.relpath(f, ROOT) not in text]
    assert not unnamed, unnamed


# ---------------------------------------------------------------------------------------------
# docs/add_model_family.md
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family():
    return example("add_model_family")


def test_registered_preset_builds_a_vlm_with_the_presets_decoder(family):
    model, params, logits = family.build()
    p = family.language.PRESETS["toy_qwen2"]
    assert logits.shape == (2, 24, p["vocab_size"])
    assert bool(jnp.all(jnp.isfinite(logits)))
    d, h, k, f, n = (p[x] for x in ("embed_dim", "num_heads", "num_kv_heads", "mlp_dim",
                                    "num_layers"))
    x = d // h
    per_layer = 2 * d + d * h * x + h * x + 2 * (d * k * x + k * x) + h * x * d + 3 * d * f
    expected = p["vocab_size"] * d + n * per_layer + d  # tied: no LM head
    assert sum(a.size for a in jax.tree.leaves(params["decoder"])) == expected
    assert model.cfg.language.qkv_bias and model.cfg.language.rope_theta == 1e6


def test_registered_preset_maps_one_to_one_onto_hf_tensor_names(family):
    _, params, _ = family.build(scan_layers=False)
    key_map = family.hf_key_map()
    assert set(family.decoder_paths(params)) == set(key_map)
    assert key_map["decoder/stack/layers_1/self_attn/q_proj/bias"] == \
        "text.layers.1.self_attn.q_proj.bias"
    assert "lm_head.weight" not in key_map.values()


def test_registered_preset_exports_to_hf_and_imports_back_to_the_same_logits(family, tmp_path):
    before, after = family.hf_round_trip(str(tmp_path / "hf"))
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["text_config"]["model_type"] == "qwen2"
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# docs/add_dataset.md
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset():
    return example("add_dataset")


def test_custom_source_gives_loader_batches_that_supervise_the_answer(dataset, tmp_path):
    from data_pipelines.loader import example_spec
    from data_pipelines.synthetic import COLOR_RGB
    from lvlm_jax.train.input_pipeline import load_tokenizer

    cfg = dataset.config(str(tmp_path))
    source = dataset.ColorSquares(8)
    batch = next(iter(dataset.batches(source, cfg)))
    spec = example_spec(96, 32)
    assert sorted(batch) == sorted(spec)
    for name, (shape, dtype) in spec.items():
        assert batch[name].shape == (4, *shape) and batch[name].dtype == dtype
    tokenizer = load_tokenizer(cfg.data)
    for row in range(4):
        color = source[row]["conversations"][1]["value"]
        # A square image pads to itself and resizes to a solid square of its colour.
        assert (batch["pixel_values"][row, 0] == np.array(COLOR_RGB[color], np.uint8)).all()
        supervised = batch["targets"][row][batch["loss_mask"][row] > 0]
        assert tokenizer.decode(supervised.tolist()).strip().startswith(color)
        image_tokens = (batch["input_ids"][row] == tokenizer.image_id).sum()
        assert image_tokens == 16


def test_shards_written_from_the_source_train_through_the_config_with_the_same_batches(
        dataset, tmp_path):
    from data_pipelines.arrayrecord_source import ArrayRecordSource
    from lvlm_jax.train.input_pipeline import make_input

    source = dataset.ColorSquares(8)
    out = str(tmp_path / "squares")
    dataset.write_shards(source, out, num_shards=2)
    assert len(ArrayRecordSource(out).files) == 2 and len(ArrayRecordSource(out)) == 8
    cfg = dataset.config(out)
    expected = list(dataset.batches(source, cfg))
    batches, model_cfg, size = make_input(cfg)
    assert size == 8 and model_cfg.image_tokens == 16
    for want in expected:  # two batches of 4
        got = next(batches)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# docs/add_stage.md
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_example():
    return example("add_stage")


@pytest.fixture(scope="module")
def stage_run(stage_example):
    """One step of the example stage through loop.build + loop.run_steps, with the first
    batch and the starting params kept aside."""
    from lvlm_jax.train import loop
    from lvlm_jax.train.input_pipeline import make_input

    cfg = stage_example.get_config()
    batches, model_cfg, size = make_input(cfg)
    first = next(batches)
    setup = loop.build(cfg, model_cfg, dataset_size=size)
    before = jax.device_get(setup.state.params)
    _, history = loop.run_steps(setup, itertools.chain([first], batches), 1)
    return cfg, setup, first, before, history


def _loss(stage, cfg, model, params, batch):
    """(loss, metrics) of `stage` on one host batch, divided as the train step divides them."""
    from lvlm_jax.train.stages import LossContext

    ctx = LossContext(model, tuple(cfg.data.image_mean), tuple(cfg.data.image_std),
                      cfg.train.loss_chunk, config=cfg)
    batch = {f: jnp.asarray(batch[f]) for f in stage.fields}
    total, weight, metrics = jax.jit(lambda p, b: stage.loss(ctx, p, b, None))(params, batch)
    return float(total / weight), {k: float(v / weight) for k, v in metrics.items()}


def test_custom_stage_without_smoothing_equals_sft(stage_example, stage_run):
    from lvlm_jax.train.stages import get_stage

    _, setup, batch, params, _ = stage_run
    cfg = stage_example.get_config("0")
    assert cfg.sft_smooth.label_smoothing == 0.0
    smooth, metrics = _loss(get_stage("sft_smooth"), cfg, setup.model, params, batch)
    sft, _ = _loss(get_stage("sft"), cfg, setup.model, params, batch)
    assert smooth == pytest.approx(sft, rel=1e-5)
    assert metrics["nll"] == pytest.approx(sft, rel=1e-5)


def test_custom_stage_trains_a_step_through_the_loop_on_the_smoothed_loss(stage_run):
    from lvlm_jax.param_paths import flat_paths
    from lvlm_jax.train.stages.base import LossContext, model_inputs

    cfg, setup, batch, before, history = stage_run
    eps = cfg.sft_smooth.label_smoothing
    assert eps == 0.1
    # The expected loss, from the logits of the starting params, in float64 numpy.
    ctx = LossContext(setup.model, tuple(cfg.data.image_mean), tuple(cfg.data.image_std))
    logits, _ = setup.model.apply({"params": before}, **model_inputs(
        ctx, {k: jnp.asarray(v) for k, v in batch.items()}))
    logits = np.asarray(logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
        -1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["loss_mask"]
    expected = ((1 - eps) * nll - eps * logp.mean(-1)) * w
    assert history[0]["loss"] == pytest.approx(expected.sum() / w.sum(), rel=1e-4)
    assert history[0]["nll"] == pytest.approx((nll * w).sum() / w.sum(), rel=1e-4)
    after = flat_paths(jax.device_get(setup.state.params))
    before = flat_paths(before)
    vision = [p for p in before if p.startswith("vision/")]
    assert vision and all(np.array_equal(before[p], after[p]) for p in vision)
    assert not np.array_equal(before["connector/linear_1/kernel"],
                              after["connector/linear_1/kernel"])


def test_loading_the_stage_example_as_a_config_file_registers_the_stage(stage_example):
    from lvlm_jax import config as config_lib
    from lvlm_jax.train.stages import STAGES, get_stage

    STAGES.pop("sft_smooth")
    cfg = config_lib.load(os.path.join(DOCS, "examples", "add_stage.py") + ":0.3",
                          [("train.total_steps", "7")])
    assert cfg.stage == "sft_smooth" and cfg.sft_smooth.label_smoothing == 0.3
    assert get_stage("sft_smooth").fields == get_stage("sft").fields


# ---------------------------------------------------------------------------------------------
# docs/add_evaluator.md
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluator():
    return example("add_evaluator")


def test_custom_evaluator_scores_answers_it_is_given(evaluator):
    records = [{"id": str(i), "question": "what color is the circle?", "answer": a}
               for i, a in enumerate(("red", "green", "yellow"))]
    summary, examples = evaluator.score_color_named(
        records, ["Red.", "a blue circle", "nothing"])
    assert summary == {"color_named": pytest.approx(2 / 3), "color_correct": pytest.approx(1 / 3)}
    assert [e["named"] for e in examples] == [["red"], ["blue"], []]


def test_custom_evaluator_runs_beside_the_configured_tasks_on_a_tiny_model(evaluator,
                                                                          tmp_path):
    from lvlm_jax.evals.evaluators import runner_settings
    from lvlm_jax.evals.model_runner import ModelRunner
    from lvlm_jax.train.input_pipeline import load_tokenizer

    cfg = evaluator.tiny_config()
    figures, params = evaluator.evaluate(cfg, str(tmp_path))
    out = tmp_path / "eval" / "step_0"
    rows = [json.loads(line) for line in (out / "color_named.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.evals.num_examples and (out / "vqa.jsonl").exists()
    assert figures["color_named"] == pytest.approx(np.mean([bool(r["named"]) for r in rows]))
    assert figures["color_correct"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert "vqa_accuracy" in figures
    assert json.loads((out / "summary.json").read_text())["color_named"] == \
        figures["color_named"]
    # The answers scored are the model's greedy answers to exactly these questions.
    from lvlm_jax.models import build_model
    from lvlm_jax.train.input_pipeline import resolve_model_config

    tokenizer = load_tokenizer(cfg.data)
    model = build_model(resolve_model_config(cfg, tokenizer))
    records = evaluator.color_records(4, model.cfg.vision.image_size)
    runner = ModelRunner(model, params, tokenizer, **runner_settings(cfg, model.cfg))
    answers = runner.generate([r["image"] for r in records], [r["question"] for r in records],
                              cfg.evals.max_new_tokens)
    assert [r["prediction"] for r in rows] == answers
    assert all(r["question"].startswith("what color") for r in rows)
