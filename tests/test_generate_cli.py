"""`lvlm generate` on a freshly trained run: answers, chats, and refuses bad input in one line."""

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from xla_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A two-step model mostly says EOS when greedy; sampling (seeded) makes it print text.
SAMPLING = dict(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=0)
FLAGS = [f"--{k}={v}" for k, v in SAMPLING.items()]


def _env() -> dict[str, str]:
    return cpu_env()


def lvlm(*args: str, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "lvlm_jax", *args], cwd=ROOT, env=_env(),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-step SFT run of the demo model and a non-square PNG."""
    base = tmp_path_factory.mktemp("generate_cli")
    workdir = str(base / "run")
    out = lvlm("train", "--config=experiments/demo.py:sft", f"--workdir={workdir}",
               "--config.train.total_steps=2", "--config.data.batch_size=4",
               "--config.train.progress=false")
    assert out.returncode == 0, out.stderr[-3000:]
    image = str(base / "shape.png")
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    return {"workdir": workdir, "image": image, "base": base}


def test_generate_prints_the_answer_the_python_api_gives(run):
    from lvlm_jax import chat

    prompt = "What shape is in the picture?"
    out = lvlm("generate", f"--checkpoint={run['workdir']}", f"--image={run['image']}",
               f"--prompt={prompt}", *FLAGS)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.strip()
    assert printed
    assert printed == chat.answer(run["workdir"], [run["image"]], prompt, **SAMPLING)


def test_chat_keeps_history_over_two_turns_on_stdin(run):
    from lvlm_jax import chat

    turns = "What shape is it?\nAnd what colour?\n"
    out = lvlm("generate", f"--checkpoint={run['workdir']}", f"--image={run['image']}",
               "--chat", *FLAGS, stdin=turns)
    assert out.returncode == 0, out.stderr[-3000:]
    replies = out.stdout.splitlines()
    # One line per turn; a sampled reply of the 2-step model may be empty (an end-of-turn first).
    assert len(replies) == 2 and any(r.strip() for r in replies), out.stdout
    # The Python session on the same turns gives the same replies, the second one conditioned
    # on the first exchange (the image marks go with the first turn only).
    stdout = io.StringIO()
    conversation = chat.chat(chat.load(run["workdir"]), [run["image"]],
                             io.StringIO(turns + "/quit\nnever read\n"), stdout, io.StringIO(),
                             **SAMPLING)
    assert stdout.getvalue().splitlines() == replies
    assert [t["from"] for t in conversation] == ["human", "gpt", "human", "gpt"]
    assert conversation[0]["value"].startswith("<image>")
    assert "<image>" not in conversation[2]["value"]


@pytest.mark.parametrize("case", ["missing_image", "folder_image", "not_an_image",
                                  "empty_prompt", "no_prompt", "too_long_prompt"])
def test_bad_input_fails_with_one_line_and_exit_2(run, case):
    image, message = run["image"], None
    prompt = "What shape is it?"
    if case == "missing_image":
        image, message = str(run["base"] / "nope.png"), "does not exist"
    elif case == "folder_image":
        image, message = str(run["base"]), "is a folder, not an image file"
    elif case == "not_an_image":
        image = str(run["base"] / "notes.png")
        with open(image, "w") as f:
            f.write("not a png")
        message = "is not a readable image"
    elif case == "empty_prompt":
        prompt, message = "   ", "the prompt is empty"
    elif case == "no_prompt":
        prompt, message = None, "the prompt is empty; give --prompt=TEXT"
    else:  # the demo model's context is 256 tokens
        prompt, message = "square circle " * 200, "the prompt is too long"
    flags = [] if prompt is None else [f"--prompt={prompt}"]
    out = lvlm("generate", f"--checkpoint={run['workdir']}", f"--image={image}", *flags)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lvlm generate: ") and message in last, last
    if case in ("missing_image", "folder_image", "not_an_image"):
        assert os.path.basename(image) in last
    if case == "too_long_prompt":
        assert re.search(r"\d+ tokens .* context \(language.max_length\) is 256", last), last


def test_generate_bench_runs_quick():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    # One real CPU device with the suite's fast-compile flags: the test checks that the script
    # runs and prints its lines (and the greedy check), not its figures.
    env = cpu_env(1)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "generate.py"), "--quick",
                           "--no_unscanned"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "greedy check, lvlm_jax vs HF" in proc.stdout and "DIFFER" not in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("generate: batch")]
    floors = [line for line in lines if "floor" in line]
    lines = [line for line in lines if "floor" not in line]
    assert len(floors) == 2, proc.stdout
    for line, batch in zip(floors, (1, 16), strict=True):
        m = re.fullmatch(rf"generate: batch {batch}, floor \(fp32 matmuls of a step alone\) "
                         r"(\d+\.\d) tok/s = (\d+\.\d\d)x HF's decode; ours reach (\d+)% "
                         r"\(lvlm_jax\) of it", line)
        assert m, line
        assert float(m.group(1)) > 0 and int(m.group(3)) > 0
    kinds = [(b, kind) for b in (1, 16) for kind in ("decode only", "prefill+decode")]
    assert len(lines) == len(kinds), proc.stdout
    for line, (batch, kind) in zip(lines, kinds, strict=True):
        m = re.fullmatch(rf"generate: batch {batch}, {re.escape(kind)}: lvlm_jax (\d+\.\d) "
                         r"tok/s, HF (\d+\.\d) tok/s, ratio (\d+\.\d\d)x", line)
        assert m, line
        ours, hf, ratio = map(float, m.groups())
        assert ours > 0 and hf > 0
        assert ratio == pytest.approx(ours / hf, rel=0.02, abs=0.01)
