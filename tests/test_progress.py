"""Training progress: tqdm on a terminal, one plain line per tenth of the steps in a log."""

import io
import itertools

import jax
from tqdm import tqdm
from training_utils import random_batches, tiny_config

from lvlm_jax import progress as progress_lib
from lvlm_jax.train import loop


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(bar, steps: int) -> None:
    for i in range(steps):
        bar.set_postfix(loss=f"{1.0 / (i + 1):.4f}")
        bar.update(1)
    bar.close()


def test_progress_prints_one_line_every_tenth_of_the_steps_when_not_a_tty():
    out = io.StringIO()
    bar = progress_lib.progress(800, desc="sft", file=out)
    assert isinstance(bar, progress_lib.PlainProgress)
    _run(bar, 800)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and text.endswith("\n")
    assert [line.split(" steps")[0] for line in lines] == [f"sft: {80 * k}/800"
                                                           for k in range(1, 11)]
    assert lines[1].startswith("sft: 160/800 steps (20%), ")
    assert "loss 0.0063" in lines[1] and "eta " in lines[1] and "it/s" in lines[1]
    assert lines[-1].startswith("sft: 800/800 steps (100%), ") and "took " in lines[-1]


def test_progress_line_shows_the_rate_from_the_first_step_and_the_eta():
    out = io.StringIO()
    # The first tick is construction and compiling (10 s); each step then takes 0.25 s.
    clock = itertools.chain([0.0, 10.0], itertools.count(10.25, 0.25)).__next__
    bar = progress_lib.PlainProgress(800, desc="sft", file=out, clock=clock)
    for _ in range(160):
        bar.set_postfix(loss="0.3412")
        bar.update(1)
    assert out.getvalue().splitlines()[-1] == (
        "sft: 160/800 steps (20%), 4 it/s, loss 0.3412, eta 2m40s")


def test_progress_on_resume_counts_from_the_initial_step_and_close_reports_an_early_stop():
    out = io.StringIO()
    bar = progress_lib.progress(100, initial=50, desc="dpo", file=out)
    for _ in range(25):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(" steps")[0] for line in lines] == ["dpo: 60/100", "dpo: 70/100",
                                                           "dpo: 75/100"]


def test_progress_with_fewer_steps_than_lines_prints_each_milestone_once_and_the_end():
    out = io.StringIO()
    _run(progress_lib.progress(3, desc="ppo", file=out), 3)
    assert [line.split(" steps")[0] for line in out.getvalue().splitlines()] == [
        "ppo: 1/3", "ppo: 2/3", "ppo: 3/3"]


def test_progress_uses_tqdm_on_a_terminal():
    out = _Terminal()
    bar = progress_lib.progress(10, initial=2, desc="sft", file=out)
    assert isinstance(bar, tqdm)
    assert bar.n == 2
    _run(bar, 8)
    assert "\r" in out.getvalue() and "loss=" in out.getvalue()


def test_training_loop_writes_plain_progress_lines_with_the_loss_to_a_log(capsys):
    cfg = tiny_config(steps=4, batch=4, seq=16)
    setup = loop.build(cfg, devices=jax.devices()[:1])
    _, history = loop.run_steps(setup, random_batches(cfg), 4, progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal, as in a log file
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" steps")[0] for line in lines] == [f"sft: {k}/4" for k in range(1, 5)]
    assert f"loss {history[-1]['loss']:.4f}" in lines[-1]
