"""`lvlm demo` end to end at a tiny size: pretrain -> sft -> dpo -> ppo chain through
init_params, and the summary holds every figure the README table reports."""

import json
import math

from lvlm_jax import demo

REQUIRED = ("caption_loss", "vqa_accuracy", "pope_accuracy", "pope_f1", "pope_yes_ratio",
            "hallucination_rate_before", "hallucination_rate_after", "wall_seconds")
TINY = [("train.total_steps", "2"), ("data.batch_size", "8"), ("data.num_examples", "64"),
        ("model.language.num_layers", "1"), ("model.vision.depth", "1"),
        ("train.log_every", "1"), ("train.progress", "false")]


def test_demo_runs_every_stage_and_writes_the_summary_table(tmp_path):
    lines = []
    summary = demo.run_demo(str(tmp_path), TINY, log=lines.append,
                            eval_examples={"caption": 16, "vqa": 8, "pope": 6, "chair": 4})
    assert [line for line in lines if line.startswith("== stage")] == [
        f"== stage {i + 1}/4: {name} ({title})" for i, (name, title) in enumerate([
            ("pretrain", "image-text alignment on captions"),
            ("sft", "visual instruction tuning"),
            ("dpo", "preference tuning on descriptions"),
            ("ppo", "RL with an exact-match reward")])]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in REQUIRED:
        assert math.isfinite(on_disk[key]), key
    for key in REQUIRED[1:-1]:
        assert 0.0 <= on_disk[key] <= 1.0, key
    assert on_disk["wall_seconds"] >= sum(on_disk["stage_seconds"].values())
    for stage in demo.STAGES:
        metrics = [json.loads(x) for x in (tmp_path / stage / "metrics.jsonl").open()]
        assert max(m["step"] for m in metrics) == 2, stage
    table = lines[-1]
    assert f"{on_disk['caption_loss']:.3f}" in table
    assert f"{100 * on_disk['vqa_accuracy']:.1f}%" in table
    assert f"{100 * on_disk['hallucination_rate_after']:.1f}%" in table
    assert len((tmp_path / "vqa_results.jsonl").read_text().splitlines()) == 8
