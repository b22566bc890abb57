"""`lvlm sweep` and `lvlm summarize`: every point runs in its own workdir, finished points are
skipped, interrupted ones resume, --print_only commands run as printed, bad keys fail first;
plus the sweep helpers, the profiler window and the compile time of the train step."""

import csv
import glob
import json
import os
import stat
import subprocess
import sys

import pytest
from xla_env import cpu_env

from lvlm_jax import summarize, sweep, sweep_helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = "--sweep=experiments/sweeps/demo_lr.py"
# A one-layer demo model, 4 steps, checkpoints at 2 and 4, one eval at the end, a trace of
# steps 3-4: the common overrides reach every point.
# The vision tower frozen (the demo's sft trains it): these runs test the loop, not the tower,
# and its backward only adds compile time to every process.
COMMON = ["--config=experiments/demo.py:sft", "--config.optimizer.freeze=['vision/.*']",
          "--config.train.total_steps=4",
          "--config.data.batch_size=8", "--config.data.num_examples=64",
          "--config.model.language.num_layers=1", "--config.model.vision.depth=1",
          "--config.checkpoint.every_steps=2", "--config.train.progress=false",
          "--config.train.log_every=1", "--config.evals.every_steps=4",
          "--config.evals.num_examples=8", "--config.train.profile_steps=[3,4]"]
POINTS = [(0.001, 0.0), (0.001, 0.1), (0.003, 0.0), (0.003, 0.1)]
NAMES = [f"learning_rate={lr},weight_decay={wd}" for lr, wd in POINTS]


def _env(**extra):
    return cpu_env(**extra)


def lvlm(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "lvlm_jax", *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def records(run_dir):
    return summarize.read_records(str(run_dir))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Print the sweep's commands; run the first two as printed, the second cut short at step 2
    (an interrupted point); then the sweep (finishing that one and starting the last two), then
    the same sweep again."""
    tmp = tmp_path_factory.mktemp("sweep")
    workdir = tmp / "sweep"
    printed = lvlm("sweep", *COMMON, SWEEP, f"--workdir={workdir}", "--print_only")
    assert printed.returncode == 0, printed.stderr[-3000:]
    created_by_print = workdir.exists()
    commands = printed.stdout.strip().splitlines()
    # The printed commands call the `lvlm` console script: a stand-in on PATH runs this checkout.
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "lvlm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lvlm_jax "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    pre = [subprocess.Popen(cmd, shell=True, executable="/bin/bash", cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for cmd in (commands[0], commands[1] + " --config.train.total_steps=2")]
    pre_out = [p.communicate(timeout=900)[0] for p in pre]
    assert [p.returncode for p in pre] == [0, 0], pre_out
    finished_by_print = [sweep.checkpoint_step(str(workdir / n)) for n in NAMES]
    first = lvlm("sweep", *COMMON, SWEEP, f"--workdir={workdir}", "--parallel=3")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    watched = [workdir / n / f for n in NAMES for f in ("metrics.jsonl", "checkpoints/4")]
    mtimes = {str(p): p.stat().st_mtime_ns for p in watched}
    second = lvlm("sweep", *COMMON, SWEEP, f"--workdir={workdir}", "--parallel=3")
    return dict(workdir=workdir, commands=commands, created_by_print=created_by_print,
                printed_runs=pre_out, finished_by_print=finished_by_print, first=first,
                second=second, mtimes=mtimes, watched=watched)


def test_print_only_prints_one_runnable_train_command_per_point(swept):
    commands, workdir = swept["commands"], swept["workdir"]
    assert not swept["created_by_print"]  # nothing was run or written
    assert len(commands) == 4
    for cmd, name, (lr, wd) in zip(commands, NAMES, POINTS, strict=True):
        assert cmd.startswith("lvlm train --config=experiments/demo.py:sft ")
        assert f"--workdir={workdir}/{name} " in cmd
        assert cmd.endswith(f"--config.optimizer.learning_rate={lr} "
                            f"--config.optimizer.weight_decay={wd}")
        assert "'--config.train.profile_steps=[3,4]'" in cmd  # quoted for the shell
    # The first two commands ran as printed (the second cut short), and the sweep then found
    # the first finished.
    assert swept["finished_by_print"] == [4, 2, None, None]
    assert f"[1/4] {NAMES[0]}: finished already, skipped" in swept["first"].stdout


def test_sweep_runs_every_point_and_writes_the_summary(swept):
    workdir, out = swept["workdir"], swept["first"].stdout
    assert f"[3/4] {NAMES[2]}: starting" in out and f"[4/4] {NAMES[3]}: starting" in out
    rows = read_csv(workdir / "summary.csv")
    assert len(rows) == 4
    assert {(float(r["optimizer.learning_rate"]), float(r["optimizer.weight_decay"]))
            for r in rows} == set(POINTS)
    for r in rows:
        lr, wd = float(r["optimizer.learning_rate"]), float(r["optimizer.weight_decay"])
        assert r["run"] == f"learning_rate={lr},weight_decay={wd}"
        run = records(workdir / r["run"])
        cfg = json.loads((workdir / r["run"] / "config.json").read_text())
        assert (cfg["optimizer"]["learning_rate"], cfg["optimizer"]["weight_decay"]) == (lr, wd)
        assert (r["status"], r["steps"]) == ("done", "4")
        assert float(r["loss"]) == [x["loss"] for x in run if "loss" in x][-1]
        assert float(r["eval_loss"]) == [x["eval_loss"] for x in run if "eval_loss" in x][-1]
    evals = [float(r["eval_loss"]) for r in rows]
    assert evals == sorted(evals)  # sorted by eval_loss by default
    assert "sorted by eval_loss" in out
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_point_resumes_from_its_checkpoint(swept):
    run_dir = swept["workdir"] / NAMES[1]
    assert f"[2/4] {NAMES[1]}: resuming from step 2" in swept["first"].stdout
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir}/checkpoints/2" in log
    assert sweep.checkpoint_step(str(run_dir)) == 4
    run = records(run_dir)
    # Two invocations: compiled fresh at step 0, then again on resuming at step 2.
    assert [r["step"] for r in run if "compile_seconds" in r] == [0, 2]
    assert sorted({r["step"] for r in run if "loss" in r}) == [1, 2, 3, 4]


def test_rerun_skips_every_finished_point(swept):
    second = swept["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("finished already, skipped") == 4
    assert "starting" not in second.stdout and "resuming" not in second.stdout
    assert {str(p): p.stat().st_mtime_ns for p in swept["watched"]} == swept["mtimes"]
    assert len(read_csv(swept["workdir"] / "summary.csv")) == 4


def test_profile_steps_write_a_trace_and_compile_time_is_logged_apart(swept):
    for name in NAMES:
        run_dir = swept["workdir"] / name
        assert glob.glob(str(run_dir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    logs = [swept["printed_runs"][0], (swept["workdir"] / NAMES[3] / "train.log").read_text()]
    for name, log in zip((NAMES[0], NAMES[3]), logs, strict=True):
        run = records(swept["workdir"] / name)  # fresh runs: as printed, and by the sweep
        compile_s = [r["compile_seconds"] for r in run if "compile_seconds" in r]
        first_step = [r["first_step_seconds"] for r in run if "first_step_seconds" in r]
        assert len(compile_s) == 1 and len(first_step) == 1
        # Compiling happened before step 1 and is not part of its time.
        assert first_step[0] < 0.5 * compile_s[0]
        assert f"compiled the train step in {compile_s[0]:.1f}s" in log


def test_summarize_infers_overrides_by_diffing_configs(swept, tmp_path):
    out = lvlm("summarize", str(swept["workdir"]), f"--out={tmp_path}", "--sort_by=-loss",
               timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_csv(tmp_path / "summary.csv")
    header = list(rows[0])
    assert header[:header.index("status")] == ["run", "optimizer.learning_rate",
                                               "optimizer.weight_decay"]
    by_run = {r["run"]: r for r in read_csv(swept["workdir"] / "summary.csv")}
    assert sorted(r["run"] for r in rows) == sorted(NAMES)
    for r in rows:
        assert r["loss"] == by_run[r["run"]]["loss"]
        assert float(r["optimizer.learning_rate"]) == float(
            by_run[r["run"]]["optimizer.learning_rate"])
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    assert (tmp_path / "curves.png").exists()


def test_sweep_key_not_in_config_fails_before_any_run(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_sweep(arg=None):\n"
                   "    return [{'optimizer.learning_rate': 0.1},\n"
                   "            {'optimizer.learnig_rate': 0.2}]\n")
    workdir = tmp_path / "sweep"
    out = lvlm("sweep", "--config=experiments/demo.py:sft", f"--sweep={bad}",
               f"--workdir={workdir}", timeout=120)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lvlm sweep: ")
    assert "unknown config key 'optimizer.learnig_rate'" in last
    assert "Traceback" not in out.stderr
    assert not workdir.exists()


def test_grid_zip_and_seeded_random_search():
    grid = sweep_helpers.product(**{"a.x": [1, 2], "b": ["p", "q", "r"]})
    assert grid == [{"a.x": 1, "b": "p"}, {"a.x": 1, "b": "q"}, {"a.x": 1, "b": "r"},
                    {"a.x": 2, "b": "p"}, {"a.x": 2, "b": "q"}, {"a.x": 2, "b": "r"}]
    assert sweep_helpers.zip(**{"a.x": [1, 2], "b": [3, 4]}) == [{"a.x": 1, "b": 3},
                                                                {"a.x": 2, "b": 4}]
    with pytest.raises(ValueError, match="different lengths"):
        sweep_helpers.zip(a=[1, 2], b=[3])
    axes = {"lr": sweep_helpers.loguniform(1e-4, 1e-2), "wd": [0.0, 0.1, 0.2]}
    drawn = sweep_helpers.choice(20, seed=3, **axes)
    assert drawn == sweep_helpers.choice(20, seed=3, **axes)
    assert drawn != sweep_helpers.choice(20, seed=4, **axes)
    assert all(1e-4 <= p["lr"] <= 1e-2 and p["wd"] in (0.0, 0.1, 0.2) for p in drawn)
    assert sweep_helpers.cross([{"a": 1}, {"a": 2}], [{"b": 3}]) == [{"a": 1, "b": 3},
                                                                    {"a": 2, "b": 3}]


def test_point_names_are_stable_filesystem_safe_and_distinct():
    points = [{"optimizer.freeze": "vision/.*", "data.path": "/x y"},
              {"data.path": "/x y", "optimizer.freeze": "vision_.*"},
              {"optimizer.learning_rate": 1e-05}]
    names = sweep.point_names(points)
    assert names == sweep.point_names(points)
    assert len(set(names)) == 3
    assert all("/" not in n and " " not in n for n in names)
    assert names[2] == "learning_rate=1e-05"
    # Two values that read alike once made safe are told apart by a hash of the point.
    assert names[0].startswith("path=_x_y,freeze=vision_._-") and names[0] != names[1]
    with pytest.raises(ValueError, match="points 0 and 1 are the same"):
        sweep.point_names([{"a": 1}, {"a": 1}])


def test_resumed_run_counts_each_step_once_and_missing_values_sort_last():
    run = [{"step": 0, "compile_seconds": 9.0}, {"step": 1, "loss": 4.0},
           {"step": 2, "loss": 3.0}, {"step": 3, "loss": 2.5},  # cut off after step 3
           {"step": 2, "compile_seconds": 8.0}, {"step": 3, "loss": 2.0},
           {"step": 4, "loss": 1.0}, {"step": 4, "eval_loss": 1.5},
           {"step": 4, "train_seconds": 5.0, "total_steps": 4}]
    assert summarize.curve(run, "loss") == ([1, 2, 3, 4], [4.0, 3.0, 2.0, 1.0])
    row = summarize.metrics_row(run)
    assert row == {"status": "done", "steps": 4, "loss": 1.0, "eval_loss": 1.5,
                   "best_eval_loss": 1.5, "compile_seconds": 8.0, "train_seconds": 5.0}
    rows = [{"run": "a", "loss": 2.0}, {"run": "b", "loss": None}, {"run": "c", "loss": 1.0}]
    assert [r["run"] for r in summarize.sort_rows(rows, None)[0]] == ["c", "a", "b"]
    assert [r["run"] for r in summarize.sort_rows(rows, "-loss")[0]] == ["a", "c", "b"]
    with pytest.raises(ValueError, match="cannot sort by 'acc'"):
        summarize.sort_rows(rows, "acc")


def test_profile_steps_must_be_a_window_of_steps():
    from lvlm_jax.train.loop import check_profile_steps

    assert check_profile_steps(()) is None
    assert check_profile_steps((3, 5)) == (3, 5)
    for bad in ((5, 3), (0, 2), (4,), (1.5, 2)):
        with pytest.raises(ValueError, match="train.profile_steps must be"):
            check_profile_steps(bad)
