"""`lvlm demo` end to end at a tiny size: pretrain -> sft -> dpo -> ppo and grpo chain through
init_params, for two seeds; every seed's summary holds every figure the README table reports,
the figures are drawn, the seeds' table aggregates them; bad input fails with one line and
leaves the disk as it was."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from xla_env import cpu_env

from lvlm_jax import cli, demo, demo_report
from lvlm_jax.checkpoints.export import write_model_config
from lvlm_jax.train import input_pipeline

REQUIRED = ("caption_loss", "vqa_accuracy", "pope_accuracy", "pope_f1", "pope_yes_ratio",
            "hallucination_rate_before", "hallucination_rate_after", "wall_seconds")
RL = ("rl_reward_before", "rl_reward_after", "rl_accuracy_before", "rl_accuracy_after",
      "grpo_reward_before", "grpo_reward_after", "grpo_accuracy_before", "grpo_accuracy_after",
      "vqa_accuracy_after_dpo")
TINY = [("train.total_steps", "2"), ("data.batch_size", "8"), ("data.num_examples", "64"),
        ("model.language.num_layers", "1"), ("model.vision.depth", "1"),
        ("train.log_every", "1"), ("train.progress", "false")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_EVALS = {"caption": 16, "vqa": 8, "pope": 6, "chair": 4, "rl": 4}


# The demo's two seeds run as a user runs `lvlm demo`: in a process of its own on one CPU device
# (this suite's processes fake 8, whose collectives only slow a 2-core host), here through
# run_demo_seeds so that the printed lines come back too.
RUN_SEEDS = """
import json, sys
from lvlm_jax import demo
lines = []
result = demo.run_demo_seeds(sys.argv[1], 2, json.loads(sys.argv[2]), log=lines.append,
                             eval_examples=json.loads(sys.argv[3]))
json.dump({"lines": lines, "result": result}, open(sys.argv[4], "w"))
"""


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    out = workdir.parent / f"{workdir.name}.json"
    proc = subprocess.run([sys.executable, "-c", RUN_SEEDS, str(workdir), json.dumps(TINY),
                           json.dumps(SMALL_EVALS), str(out)], env=cpu_env(1), cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = json.loads(out.read_text())
    return workdir, ran["lines"], ran["result"]


def test_demo_runs_every_stage_and_writes_the_summary_and_figures(two_seeds):
    workdir, lines, _ = two_seeds
    titles = [(s, demo.TITLES[s]) for s in demo.STAGES]
    assert [line for line in lines if line.startswith("== stage")] == 2 * [
        f"== stage {i + 1}/5: {name} ({title})" for i, (name, title) in enumerate(titles)]
    for seed in (0, 1):
        run = workdir / f"seed_{seed}"
        on_disk = json.loads((run / "summary.json").read_text())
        for key in REQUIRED + RL:
            assert math.isfinite(on_disk[key]), key
        for key in REQUIRED[1:-1] + RL:
            assert 0.0 <= on_disk[key] <= 1.0, key
        assert on_disk["wall_seconds"] >= sum(on_disk["stage_seconds"].values())
        # ppo and grpo sample alike here: one measurement of the dpo params serves both
        assert on_disk["grpo_reward_before"] == on_disk["rl_reward_before"]
        for stage in demo.STAGES:
            metrics = [json.loads(x) for x in (run / stage / "metrics.jsonl").open()]
            assert max(m["step"] for m in metrics) == 2, stage
            assert json.loads((run / stage / "config.json").read_text())["seed"] == seed
        assert len((run / "vqa_results.jsonl").read_text().splitlines()) == 8
        for png in ("loss_curves.png", "examples.png"):
            with Image.open(run / png) as im:
                assert im.format == "PNG" and min(im.size) > 200, png
        table = [t for t in lines if t.startswith("\nlvlm demo results\n")][seed].splitlines()
        row = lambda label: next(t for t in table if t.startswith(label)).split()  # noqa: E731
        vqa = f"{100 * on_disk['vqa_accuracy']:.1f}%"
        assert row("held-out VQA accuracy (after sft)")[-1] == vqa
        assert row("held-out caption loss")[-1] == f"{on_disk['caption_loss']:.3f}"
        assert row("ppo: held-out reward")[-3:] == [
            f"{100 * on_disk[k]:.1f}%" if k else "->" for k in
            ("rl_reward_before", None, "rl_reward_after")]


def test_demo_seeds_table_has_every_seed_and_the_median_and_range(two_seeds):
    workdir, lines, result = two_seeds
    per_seed = [json.loads((workdir / f"seed_{k}" / "summary.json").read_text()) for k in (0, 1)]
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["seeds"] == [0, 1]
    for key in REQUIRED + RL:
        values = [s[key] for s in per_seed]
        assert on_disk["figures"][key] == {"median": float(np.median(values)),
                                           "min": min(values), "max": max(values)}, key
    table = lines[-1].splitlines()
    assert table[1].startswith("lvlm demo results, 2 seeds")
    assert demo_report.cpu_model() in table[2] and "jax " in table[2]
    row = next(t for t in table if t.startswith("held-out VQA accuracy (after sft)"))
    pct = [f"{100 * s['vqa_accuracy']:.1f}%" for s in per_seed]
    median = f"{100 * on_disk['figures']['vqa_accuracy']['median']:.1f}%"
    low, high = sorted(pct, key=lambda p: float(p[:-1]))
    assert row.split()[-6:] == [*pct, median, low, "-", high]


def _demo_cli(capsys, *args):
    code = cli.main(["demo", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_demo_refuses_bad_seeds_and_a_file_as_workdir_with_one_line(tmp_path, capsys):
    code, err = _demo_cli(capsys, "--seeds=0", f"--workdir={tmp_path / 'new'}")
    assert code == 2 and err == ["lvlm demo: --seeds must be at least 1, got 0"]
    assert not (tmp_path / "new").exists()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for seeds in ("1", "3"):
        code, err = _demo_cli(capsys, f"--seeds={seeds}", f"--workdir={a_file}")
        assert code == 2 and err == [f"lvlm demo: --workdir={a_file} is a file, not a directory"]
    assert a_file.read_text() == "keep me"


def test_demo_refuses_a_workdir_holding_another_models_run(tmp_path, capsys):
    cfg = demo._config("sft", [("model.language.embed_dim", "64")])
    other = input_pipeline.resolve_model_config(cfg, input_pipeline.load_tokenizer(cfg.data))
    sft = tmp_path / "seed_1" / "sft"
    (sft / "checkpoints" / "800").mkdir(parents=True)
    write_model_config(other, str(sft))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, err = _demo_cli(capsys, "--seeds=2", f"--workdir={tmp_path}")
    assert code == 2 and len(err) == 1
    assert "holds checkpoints of a different model" in err[0] and "embed_dim" in err[0]
    assert str(sft) in err[0]
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # seed 0 never started
    train_run = tmp_path / "train_run"
    (train_run / "checkpoints").mkdir(parents=True)
    write_model_config(other, str(train_run))
    code, err = _demo_cli(capsys, f"--workdir={train_run}")
    assert code == 2 and err == [f"lvlm demo: --workdir={train_run} holds an `lvlm train` run; "
                                 "the demo writes one folder per stage: use a new or empty "
                                 "workdir"]
    assert sorted(os.listdir(train_run)) == ["checkpoints", "model_config.json"]  # as it was


def test_readme_table_is_pasted_verbatim_from_a_runs_output(two_seeds, tmp_path):
    workdir, lines, _ = two_seeds
    log = tmp_path / "demo.log"
    log.write_text("\n".join(lines) + "\n")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- demo table: start -->\nold\n<!-- demo table: end -->"
                      "\nafter\n")
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench",
                          "update_demo_table.py")
    proc = subprocess.run([sys.executable, script, f"--log={log}", f"--readme={readme}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = lines[-1].strip("\n")
    assert readme.read_text() == (
        "# x\n\nbefore\n<!-- demo table: start -->\n`lvlm demo --seeds=2 --workdir=DIR` "
        f"printed:\n\n```\n{table}\n```\n<!-- demo table: end -->\nafter\n")
    log.write_text("\n".join(lines[:-1]))  # cut before the seeds table
    proc = subprocess.run([sys.executable, script, f"--log={log}", f"--readme={readme}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("update_demo_table: no 'lvlm demo results, N seeds' table")


def test_demo_sft_checkpoint_exports_to_transformers_with_equal_logits(two_seeds, tmp_path):
    """The demo's model (SigLIP's post-normed output through an MLP) is DeepSeek-VL's layout:
    `lvlm export --format=hf` writes that class, and transformers gives our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import lvlm_jax
    from data_pipelines.loader import demo_tokenizer
    from data_pipelines.templates import render
    from lvlm_jax.evals.records import synthetic_records

    workdir, _, _ = two_seeds
    sft, out = workdir / "seed_0" / "sft", tmp_path / "hf"
    assert cli.main(["export", f"--checkpoint={sft}", "--format=hf", f"--out={out}"]) == 0
    model = transformers.AutoModelForImageTextToText.from_pretrained(str(out)).eval()
    assert type(model).__name__ == "DeepseekVLForConditionalGeneration"
    assert (out / "tokenizer.model").is_file()  # the run's tokenizer goes with the weights
    ours = lvlm_jax.from_pretrained(str(sft))
    records = synthetic_records("vqa", 2, seed=3, image_size=64)
    tokenizer = demo_tokenizer(input_pipeline.cache_dir())
    rows = [render("gemma", [{"from": "human", "value": "<image>\n" + r["question"]},
                             {"from": "gpt", "value": r["answer"]}], tokenizer, 16)[0]
            for r in records]
    width = max(map(len, rows))
    ids = np.stack([np.pad(r, (width - len(r), 0)) for r in rows]).astype(np.int64)  # left pad
    mask = (np.arange(width)[None] >= width - np.array([len(r) for r in rows])[:, None])
    pixels = np.stack([(np.asarray(r["image"], np.float32) / 255 - 0.5) / 0.5
                       for r in records]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                       attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.numpy()
    got = ours.logits(ids, pixels, attention_mask=mask.astype(np.int64))
    real = mask.astype(bool)  # padded positions' logits are meaningless on both sides
    np.testing.assert_allclose(got[real], theirs[real], atol=1e-4, rtol=0)
