"""The `lvlm` command: train writes the workdir contract; bad input fails with one clear line."""

import json
import os
import subprocess
import sys

from xla_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lvlm(*args, timeout=600):
    env = cpu_env()
    return subprocess.run([sys.executable, "-m", "lvlm_jax", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_train_writes_config_metrics_and_tensorboard(tmp_path):
    workdir = tmp_path / "run"
    out = lvlm("train", "--config=experiments/demo.py:sft", f"--workdir={workdir}",
               "--config.train.total_steps=3", "--config.data.batch_size=4",
               "--config.train.log_every=1", "--config.train.progress=false",
               "--config.evals.every_steps=3", "--config.evals.num_examples=8")
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["train"]["total_steps"] == 3 and cfg["data"]["batch_size"] == 4
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("loss", "grad_norm", "learning_rate", "step_time", "examples_per_s",
                "tokens_per_s"):
        assert all(key in r for r in steps), key
    assert any(name.startswith("events") for name in os.listdir(workdir / "tb"))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3] and evals[0]["eval_loss"] > 0


def test_mistyped_config_key_fails_naming_it(tmp_path):
    out = lvlm("train", "--config=experiments/demo.py:sft", f"--workdir={tmp_path}",
               "--config.optimizer.learnig_rate=0.1")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "unknown config key 'optimizer.learnig_rate'" in last
    assert "Traceback" not in out.stderr
    assert not os.listdir(tmp_path)  # nothing written before the config is valid


def test_missing_config_file_and_bad_stage_arg_fail_cleanly(tmp_path):
    out = lvlm("train", "--config=experiments/nope.py", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = lvlm("train", "--config=experiments/demo.py:dpo_typo", f"--workdir={tmp_path}")
    assert out.returncode == 2 and "takes one of" in out.stderr
