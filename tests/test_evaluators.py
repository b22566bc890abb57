"""Evaluators: scoring on hand-made answers, batched generation and option likelihoods on a tiny
random model, eval outputs written by the training loop, and `lvlm eval` on a trained run."""

import glob
import io
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from xla_env import cpu_env

from lvlm_jax import cli
from lvlm_jax import config as config_lib
from lvlm_jax.evals import evaluators as ev
from lvlm_jax.evals import metrics
from lvlm_jax.evals.model_runner import ModelRunner
from lvlm_jax.evaluate import checkpoint_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments", "demo.py")
# The demo model shrunk to one layer a tower and 32-pixel images (16 image tokens).
SMALL = {
    "model.vision.image_size": "32", "model.vision.width": "64", "model.vision.depth": "1",
    "model.vision.mlp_dim": "128", "model.vision.num_heads": "2",
    "model.language.embed_dim": "64", "model.language.num_layers": "1",
    "model.language.num_heads": "2", "model.language.num_kv_heads": "1",
    "model.language.mlp_dim": "128", "data.image_size": "32", "data.batch_size": "8",
    "train.progress": "false", "evals.batch_size": "4", "evals.max_new_tokens": "4",
}  # fmt: skip


def small_config(**overrides: str):
    merged = {**SMALL, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return config_lib.load(f"{DEMO}:sft", list(merged.items())), merged


class ScriptedRunner:
    """Answers with a fixed list, in order: the evaluator's scoring is what is under test."""

    def __init__(self, answers, logprobs=None):
        self.answers, self.logprobs, self.prompts = list(answers), logprobs, []

    def generate(self, images, prompts, max_new_tokens=16):
        assert len(images) == len(prompts) == len(self.answers)
        self.prompts = list(prompts)
        return list(self.answers)

    def reply_logprobs(self, images, prompts, options):
        return self.logprobs


def _evaluators(**overrides: str) -> list:
    from lvlm_jax.models import build_model
    from lvlm_jax.train.input_pipeline import load_tokenizer, resolve_model_config

    cfg, _ = small_config(**overrides)
    return ev.build_evaluators(cfg, build_model(resolve_model_config(cfg, load_tokenizer(
        cfg.data))))


def _evaluator(task: str, n: int):
    (evaluator,) = _evaluators(evals__tasks=f"('{task}',)", evals__num_examples=str(n))
    return evaluator


# ---------------------------------------------------------------------------------------------
# Scoring on answers we control
# ---------------------------------------------------------------------------------------------


def test_vqa_uses_vqa_accuracy_for_ten_answers_and_exact_match_for_one():
    records = [
        {"id": "a", "question": "q", "answers": ["two"] * 2 + ["three"] * 8, "kind": "count"},
        {"id": "b", "question": "q", "answers": ["2"] * 4 + ["3"] * 6, "kind": "count"},
        {"id": "c", "question": "q", "answer": "Red", "kind": "color"},
        {"id": "d", "question": "q", "answer": "blue", "kind": "color"},
    ]
    summary, examples = ev.score_vqa(records, ["2", "2", "red.", "green"])
    # 2 of 10 annotators said "two" (= "2"): 0.6; 4 of 10: 1.0; exact match after normalisation.
    assert [e["accuracy"] for e in examples] == pytest.approx([0.6, 1.0, 1.0, 0.0])
    assert summary == pytest.approx({"vqa_accuracy": 2.6 / 4, "vqa_accuracy_color": 0.5,
                                     "vqa_accuracy_count": 0.8})


def test_pope_evaluator_gives_known_figures_per_split():
    evaluator = _evaluator("pope", 12)  # 4 probes a split: yes, no, yes, no
    assert [r["split"] for r in evaluator.records] == ["random"] * 4 + ["popular"] * 4 + [
        "adversarial"] * 4
    assert [r["answer"] for r in evaluator.records] == ["yes", "no"] * 6
    answers = (["Yes, there is.", "No, there is not.", "yes", "There is not."]  # all right
               + ["No."] * 4 + ["Yes."] * 4)  # popular: always no; adversarial: always yes
    summary, examples = evaluator.evaluate(ScriptedRunner(answers))
    assert summary["pope_random_accuracy"] == 1.0 and summary["pope_random_f1"] == 1.0
    assert summary["pope_random_yes_ratio"] == 0.5
    assert summary["pope_popular_accuracy"] == 0.5 and summary["pope_popular_f1"] == 0.0
    assert summary["pope_popular_yes_ratio"] == 0.0
    assert summary["pope_adversarial_precision"] == 0.5
    assert summary["pope_adversarial_recall"] == 1.0
    assert summary["pope_adversarial_f1"] == pytest.approx(2 / 3)
    # Overall: tp 4, fp 2, tn 4, fn 2.
    assert summary["pope_accuracy"] == pytest.approx(8 / 12)
    assert summary["pope_precision"] == pytest.approx(4 / 6)
    assert summary["pope_recall"] == pytest.approx(4 / 6)
    assert summary["pope_yes_ratio"] == 0.5
    assert [e["correct"] for e in examples] == [True] * 4 + [False, True] * 2 + [True, False] * 2


def test_chair_evaluator_counts_hallucinated_objects_in_synthetic_descriptions():
    evaluator = _evaluator("chair", 4)
    records = evaluator.records
    absent = next(name for name in ev.records_lib.synthetic_vocabulary()
                  if name not in records[3]["objects"])
    # Three faithful descriptions and one naming an absent object, in the plural.
    answers = [r["caption"] for r in records[:3]]
    answers.append(records[3]["caption"].rstrip(".") + f" and two {absent}s.")
    summary, examples = evaluator.evaluate(ScriptedRunner(answers))
    mentions = sum(len(r["objects"]) for r in records) + 1
    assert summary["chair_mentions"] == mentions
    assert summary["chair_i"] == pytest.approx(1 / mentions)
    assert summary["chair_s"] == 0.25
    assert summary["chair_recall"] == 1.0
    assert examples[3]["hallucinated"] == [absent]
    assert all(e["question"] == "describe the image." for e in examples)


def test_caption_figures_equal_the_metric_functions():
    evaluator = _evaluator("caption", 4)
    refs = [r["caption"] for r in evaluator.records]
    answers = [refs[0], refs[1].replace("at", "on"), "a shape.", ""]
    summary, examples = evaluator.evaluate(ScriptedRunner(answers))
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [a] for i, a in enumerate(answers)}
    assert summary["cider"] == pytest.approx(metrics.cider(gts, res))
    assert summary["rouge_l"] == pytest.approx(metrics.rouge_l(gts, res))
    assert [summary[f"bleu_{k}"] for k in (1, 2, 3, 4)] == pytest.approx(metrics.bleu(gts, res))
    assert examples[0]["rouge_l"] == pytest.approx(1.0)


def test_multiple_choice_scores_the_parsed_letter_and_the_likeliest_option():
    evaluator = _evaluator("multiple_choice", 3)
    records = evaluator.records
    targets = [r["answer"] for r in records]
    letters = ["ABCDE"[targets[0]], f"({'ABCDE'[(targets[1] + 1) % 2]})", "no idea"]
    logprobs = []
    for r, t in zip(records, targets, strict=True):
        scores = [-5.0] * len(r["options"])
        scores[t if r is not records[2] else (t + 1) % len(scores)] = -1.0
        logprobs.append((scores, [1] * len(scores)))
    runner = ScriptedRunner(letters, logprobs)
    summary, examples = evaluator.evaluate(runner)
    assert summary["mc_letter_accuracy"] == pytest.approx(1 / 3)
    assert summary["mc_unparsed"] == pytest.approx(1 / 3)
    assert summary["mc_accuracy"] == pytest.approx(2 / 3)
    assert [e["likelihood_choice"] for e in examples][:2] == targets[:2]
    # The free-answer prompt lists the options by letter.
    assert "A. " + records[0]["options"][0] in runner.prompts[0]


def test_records_come_from_jsonl_and_arrayrecord_paths(tmp_path):
    from data_pipelines.convert import convert
    from data_pipelines.images import to_rgb_uint8

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
    for k, p in enumerate(pictures):
        Image.fromarray(p).save(tmp_path / f"{k}.png")
    with open(tmp_path / "vqa.jsonl", "w") as f:  # image paths relative to the file
        for k in range(3):
            f.write(json.dumps({"id": f"q{k}", "image": f"{k}.png", "question": "how many?",
                                "answers": ["2"] * k + ["3"] * (10 - k)}) + "\n")
    with open(tmp_path / "captions.jsonl", "w") as f:
        for k in range(3):
            f.write(json.dumps({"id": f"c{k}", "image": f"{k}.png",
                                "caption": f"picture number {k}."}) + "\n")
    convert("captions", tmp_path / "captions.jsonl", tmp_path, tmp_path / "shards", workers=1,
            verbose=False)
    vqa, caption = _evaluators(evals__tasks="('vqa', 'caption')", evals__num_examples="2",
                               evals__paths__vqa=str(tmp_path / "vqa.jsonl"),
                               evals__paths__caption=str(tmp_path / "shards"))
    assert [r["id"] for r in vqa.records] == ["q0", "q1"]  # the first num_examples
    assert [r["id"] for r in caption.records] == ["c0", "c1"]
    for k in range(2):
        assert np.array_equal(to_rgb_uint8(vqa.records[k]["image"]), pictures[k])
        assert np.array_equal(to_rgb_uint8(caption.records[k]["image"]), pictures[k])
    # "2" matches 0 and 1 of ten annotators: 0.0 and 0.3.
    assert vqa.evaluate(ScriptedRunner(["2", "2"]))[0]["vqa_accuracy"] == pytest.approx(0.15)
    figures = caption.evaluate(ScriptedRunner(["picture number 0.", "picture number 1."]))[0]
    # Three-word captions have no 4-grams: BLEU-3 is the longest that can be perfect.
    assert figures["bleu_3"] == pytest.approx(1.0) and figures["rouge_l"] == pytest.approx(1.0)


def test_a_non_synthetic_source_needs_eval_paths():
    with pytest.raises(ValueError, match=r"eval task 'pope' needs evals.paths.pope=FILE"):
        _evaluators(evals__tasks="('pope',)", data__source="arrayrecord")


def test_unknown_task_name_fails_naming_it_and_the_valid_ones():
    cfg, _ = small_config(evals__tasks="('vqa', 'bogus')")
    with pytest.raises(ValueError, match=r"unknown eval task 'bogus'.*vqa, caption, pope"):
        ev.task_names(cfg)


# ---------------------------------------------------------------------------------------------
# The model runner on a tiny random model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_runner():
    from lvlm_jax.models import build_model, dummy_inputs
    from lvlm_jax.train.input_pipeline import load_tokenizer, resolve_model_config

    cfg, _ = small_config()
    tokenizer = load_tokenizer(cfg.data)
    model = build_model(resolve_model_config(cfg, tokenizer))
    init = jax.jit(lambda rng: model.init(rng, **dummy_inputs(model.cfg, batch=1))["params"])
    params = init(jax.random.PRNGKey(1))
    records = ev.records_lib.synthetic_records("vqa", 5, seed=0, image_size=32)
    return ModelRunner(model, params, tokenizer, "vicuna_v1", image_size=32, batch_size=4), records


def test_batched_generation_equals_one_prompt_at_a_time(random_runner):
    runner, records = random_runner
    images = [r["image"] for r in records]
    # Prompts of different lengths share a left-padded batch; the last batch is padded out.
    prompts = [r["question"] + " please" * i for i, r in enumerate(records)]
    batched = runner.generate(images, prompts, max_new_tokens=4)
    single = ModelRunner(**{**runner.__dict__, "batch_size": 1})
    assert batched == [single.generate([im], [p], 4)[0] for im, p in zip(images, prompts,
                                                                         strict=True)]
    assert any(batched)  # random weights still say something


def test_generation_sharded_over_the_mesh_batch_axes_gives_the_same_answers(random_runner):
    from jax.sharding import NamedSharding, PartitionSpec

    from lvlm_jax import sharding

    runner, records = random_runner
    mesh = sharding.make_mesh({"ici": {"data": 2, "fsdp": 4}})
    params = jax.device_put(runner.params, NamedSharding(mesh, PartitionSpec()))
    sharded = ModelRunner(**{**runner.__dict__, "params": params, "mesh": mesh, "batch_size": 6})
    images, prompts = [r["image"] for r in records], [r["question"] for r in records]
    # 5 prompts at batch_size 6 on 8 batch shards: one batch of 8 rows, one row per device.
    assert sharded._batch_size(len(prompts)) == 8
    ids = sharded._put(np.zeros((8, 16), np.int32))
    assert ids.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert len({s.device for s in ids.addressable_shards}) == 8
    with sharding.mesh_context(mesh):
        answers = sharded.generate(images, prompts, max_new_tokens=4)
    assert answers == runner.generate(images, prompts, max_new_tokens=4)


def test_sampled_generation_repeats_with_its_seed_and_differs_from_greedy(random_runner):
    # The demo's sampled CHAIR compares two params on the same random numbers: same seed, same
    # answers; another seed (or greedy) gives others.
    runner, records = random_runner
    images, prompts = [r["image"] for r in records], [r["question"] for r in records]
    sampled = lambda seed: ModelRunner(**{**runner.__dict__, "temperature": 1.0,  # noqa: E731
                                          "sample_seed": seed}).generate(images, prompts, 6)
    first = sampled(0)
    assert sampled(0) == first
    assert sampled(1) != first
    assert runner.generate(images, prompts, 6) != first


def test_demo_pope_and_chair_functions_match_the_configured_evaluators(random_runner):
    runner, _ = random_runner
    args = (runner.model, runner.params, runner.tokenizer)
    figures = {}
    for task, fn in (("pope", ev.pope_eval), ("chair", ev.chair_eval)):
        cfg, _ = small_config(evals__tasks=f"('{task}',)", evals__num_examples="4")
        (evaluator,) = ev.build_evaluators(cfg, runner.model)
        summary, examples = evaluator(*args)
        assert len(examples) == (6 if task == "pope" else 4)  # POPE: 2 probes a split
        # The same template as the evaluator (the config's): with random weights a different
        # prompt changes the replies, so the figures would agree only by chance.
        figures[task] = fn(*args, cfg.data.template, num_examples=4, max_new_tokens=4,
                           batch_size=4)
        assert figures[task] == summary
    assert {"pope_accuracy", "pope_f1", "pope_yes_ratio", "pope_adversarial_f1"} <= set(
        figures["pope"])
    assert {"chair_i", "chair_s"} <= set(figures["chair"])


def test_reply_logprobs_equal_a_full_forward_pass(random_runner):
    from data_pipelines.templates import render

    runner, records = random_runner
    forward = jax.jit(lambda p, ids, px: runner.model.apply({"params": p}, ids, px)[0])
    options = [["red", "green", "blue"], ["yes", "no"]]
    scores = runner.reply_logprobs([records[0]["image"], records[1]["image"]],
                                   [records[0]["question"], records[1]["question"]], options)
    for k, (sums, counts) in enumerate(scores):
        for opt, got, count in zip(options[k], sums, counts, strict=True):
            conv = [{"from": "human", "value": "<image>\n" + records[k]["question"]},
                    {"from": "gpt", "value": opt}]
            ids, mask = render("vicuna_v1", conv, runner.tokenizer, runner.model.cfg.image_tokens)
            pixels, _ = runner._pixels([records[k]["image"]])
            logits = forward(runner.params, jnp.asarray(ids)[None], pixels)[0]
            logp = jax.nn.log_softmax(logits[:-1].astype(jnp.float32), axis=-1)
            want = float(jnp.sum(logp[jnp.arange(len(ids) - 1), ids[1:]] * mask[1:]))
            assert count == int(mask[1:].sum()) and got == pytest.approx(want, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# During training, and `lvlm eval` afterwards
# ---------------------------------------------------------------------------------------------


def _tb_images(workdir: str) -> dict[tuple[str, int], bytes]:
    """(tag, step) -> PNG bytes of the image summaries in the run's TensorBoard events."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in glob.glob(os.path.join(workdir, "tb", "events.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):  # TFRecord: length, its CRC, the event, the event's CRC
            (n,) = struct.unpack_from("<Q", data, i)
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                if v.HasField("image"):
                    found[(v.tag, event.step)] = v.image.encoded_image_string
    return found


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lvlm_jax.train import loop

    workdir = str(tmp_path_factory.mktemp("evals") / "run")
    cfg, overrides = small_config(train__total_steps="3", evals__every_steps="2",
                                  evals__num_examples="6", evals__num_rendered="2",
                                  evals__tasks="('eval_loss', 'vqa', 'pope')")
    loop.train(cfg, workdir, log=lambda *_: None)
    return workdir, overrides


def test_training_writes_eval_results_at_the_configured_steps(trained):
    from lvlm_jax.train.metrics_writer import read_metrics

    workdir, _ = trained
    assert sorted(os.listdir(os.path.join(workdir, "eval"))) == ["step_2", "step_3"]  # + the end
    for step in (2, 3):
        out = os.path.join(workdir, "eval", f"step_{step}")
        vqa, pope = _jsonl(f"{out}/vqa.jsonl"), _jsonl(f"{out}/pope.jsonl")
        assert len(vqa) == 6 and len(pope) == 6  # POPE: 2 probes in each of 3 splits
        with open(f"{out}/summary.json") as f:
            summary = json.load(f)
        assert summary["step"] == step
        rows = summary.pop("tasks")  # one row a task: what was scored, skipped, how long
        assert [(r["task"], r["examples"], r["skipped"]) for r in rows] == [
            ("eval_loss", 0, {}), ("vqa", 6, {}), ("pope", 6, {})]
        assert rows[1]["vqa_accuracy"] == summary["vqa_accuracy"] and rows[2]["seconds"] > 0
        assert summary["vqa_accuracy"] == pytest.approx(np.mean([e["accuracy"] for e in vqa]))
        assert summary["pope_accuracy"] == pytest.approx(np.mean([e["correct"] for e in pope]))
        logged = [m for m in read_metrics(workdir) if m["step"] == step and "vqa_accuracy" in m]
        assert len(logged) == 1
        assert {k: logged[0][k] for k in summary if k != "step"} == pytest.approx(
            {k: v for k, v in summary.items() if k != "step"})
        assert np.isfinite(summary["eval_loss"])
    images = _tb_images(workdir)
    assert sorted(tag for tag, step in images if step == 2) == [
        "eval/pope/0", "eval/pope/1", "eval/vqa/0", "eval/vqa/1"]
    picture = Image.open(io.BytesIO(images[("eval/vqa/0", 2)]))
    assert picture.width == 256 and picture.height > 256  # the image, then the text below it


def test_lvlm_eval_reproduces_the_training_time_results_and_prints_them(trained):
    workdir, overrides = trained
    assert checkpoint_steps(workdir) == [3]
    before = _jsonl(os.path.join(workdir, "eval", "step_3", "vqa.jsonl"))
    with open(os.path.join(workdir, "eval", "step_3", "summary.json")) as f:
        trained_summary = json.load(f)
    os.remove(os.path.join(workdir, "eval", "step_3", "summary.json"))
    # A fresh process on one device: the checkpoint was saved from a mesh of 8.
    env = cpu_env()
    out = subprocess.run([sys.executable, "-m", "lvlm_jax", "eval", f"--config={DEMO}:sft",
                          f"--workdir={workdir}",
                          *[f"--config.{k}={v}" for k, v in overrides.items()]],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout
    with open(os.path.join(workdir, "eval", "step_3", "summary.json")) as f:
        summary = json.load(f)
    # The same params, records and greedy decoding: the same answers and figures.
    assert [e["prediction"] for e in _jsonl(os.path.join(workdir, "eval", "step_3",
                                                         "vqa.jsonl"))] == [
        e["prediction"] for e in before]
    assert summary.pop("tasks")[1]["examples"] == trained_summary.pop("tasks")[1]["examples"]
    assert summary == pytest.approx(trained_summary, rel=1e-4)
    assert "eval at step 3" in printed
    for key in ("eval_loss", "vqa_accuracy", "pope_f1"):
        assert f"{key} " in printed and f"{summary[key]:.4f}" in printed


@pytest.mark.parametrize("case", ["unknown_task", "missing_workdir", "no_checkpoint",
                                  "missing_step", "missing_benchmark_files",
                                  "benchmark_without_data_dir"])
def test_lvlm_eval_bad_input_fails_with_one_line_and_exit_2(trained, tmp_path, capsys, case):
    workdir, overrides = trained
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    if case == "unknown_task":
        flags.append("--config.evals.tasks=('vqa', 'bogus')")
        message = "unknown eval task 'bogus'"
    elif case == "missing_workdir":
        workdir, message = str(tmp_path / "nope"), "does not exist"
    elif case == "no_checkpoint":
        workdir, message = str(tmp_path), "holds no checkpoint"
    elif case == "missing_benchmark_files":
        os.makedirs(tmp_path / "docvqa")
        flags += ["--tasks=vqa,docvqa", f"--data_dir={tmp_path}"]
        message = "docvqa: " + repr(str(tmp_path / "docvqa")) + " has none of val_v1.0_withQT.json"
    elif case == "benchmark_without_data_dir":
        flags.append("--tasks=chartqa")
        message = "eval task 'chartqa' reads the benchmark's released files: set evals.data_dir"
    else:
        flags.append("--step=2")
        message = "has no checkpoint of step 2; it has steps 3"
    code = cli.main(["eval", f"--config={DEMO}:sft", f"--workdir={workdir}", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("lvlm eval: ") and message in err[0], err


# ---------------------------------------------------------------------------------------------
# The released benchmarks through `lvlm eval`
# ---------------------------------------------------------------------------------------------


def test_lvlm_eval_reads_every_released_benchmark_and_writes_one_row_each(trained, tmp_path,
                                                                         capsys):
    import shutil

    from benchmark_files import write_benchmark_files

    from lvlm_jax.evals.benchmarks import BENCHMARKS

    source, overrides = trained
    workdir = str(tmp_path / "run")  # a copy: the tests above read the run's own results
    shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("eval", "tb"))
    data_dir = str(tmp_path / "benchmarks")
    expected = write_benchmark_files(data_dir)
    # A file the annotation names that is not an image: its question is left out and counted.
    broken = BENCHMARKS["docvqa"].read(os.path.join(data_dir, "docvqa"), 0).records[0]["image"]
    with open(broken, "wb") as f:
        f.write(b"not an image")
    n, skipped = expected["docvqa"]
    expected["docvqa"] = (n - 1, {**skipped, "unreadable image": 1})
    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    code = cli.main(["eval", f"--config={DEMO}:sft", f"--workdir={workdir}",
                     f"--tasks={','.join(BENCHMARKS)}", f"--data_dir={data_dir}", "--limit=0",
                     "--config.evals.benchmark_max_new_tokens=3", *flags])
    printed = capsys.readouterr().out
    assert code == 0
    out = os.path.join(workdir, "eval", "step_3")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    rows = {r["task"]: r for r in summary["tasks"]}
    assert list(rows) == list(BENCHMARKS)
    for name, (count, reasons) in expected.items():
        if name not in rows:
            continue  # a variant of a task's layout (the readers' own tests read it)
        assert (rows[name]["examples"], rows[name]["skipped"]) == (count, reasons), name
        examples = _jsonl(os.path.join(out, f"{name}.jsonl"))
        assert len(examples) == count and all("prediction" in e for e in examples)
        figures = {k: v for k, v in rows[name].items() if k.startswith(f"{name}_")}
        assert figures and all(summary[k] == v and 0.0 <= v <= 1.0 or "cider" in k
                               for k, v in figures.items()), (name, figures)
        assert f"{name}: {count} examples" in printed
    # The prompt each task asked is its benchmark's template applied to the record.
    docvqa = _jsonl(os.path.join(out, "docvqa.jsonl"))
    assert docvqa[0]["question"] and "prediction" in docvqa[0]


def test_a_benchmark_runs_every_n_steps_in_training_like_in_lvlm_eval(random_runner, tmp_path):
    # The loop's periodic evaluator is the same EvalSuite: a benchmark named in evals.tasks with
    # evals.data_dir is read once, then scored on the live params at each eval step.
    import types

    from benchmark_files import write_benchmark_files

    from lvlm_jax.train.metrics_writer import MetricsWriter
    from lvlm_jax.train.periodic_evals import make_evaluator

    runner, _ = random_runner
    data_dir = str(tmp_path / "benchmarks")
    count, skipped = write_benchmark_files(data_dir)["chartqa"]
    cfg, _ = small_config(evals__tasks="('chartqa',)", evals__data_dir=data_dir,
                          evals__num_examples="0", evals__benchmark_max_new_tokens="3")
    writer = MetricsWriter(str(tmp_path / "run"))
    try:
        evaluate = make_evaluator(cfg, runner.model, str(tmp_path / "run"), writer)
        figures = evaluate(types.SimpleNamespace(params=runner.params), 7)
    finally:
        writer.close()
    with open(tmp_path / "run" / "eval" / "step_7" / "summary.json") as f:
        (row,) = json.load(f)["tasks"]
    assert (row["task"], row["examples"], row["skipped"]) == ("chartqa", count, skipped)
    assert set(figures) == {"chartqa_relaxed_accuracy", "chartqa_human_relaxed_accuracy",
                            "chartqa_augmented_relaxed_accuracy"}


def test_the_config_has_a_prompt_slot_for_every_benchmark():
    from lvlm_jax.evals.benchmarks import BENCHMARKS

    cfg, _ = small_config()
    assert sorted(cfg.evals.prompts) == sorted(BENCHMARKS)
    assert set(ev.all_tasks()) == set(ev.TASKS) | set(BENCHMARKS)


def test_a_configured_prompt_template_replaces_the_benchmarks_own(tmp_path):
    from benchmark_files import write_benchmark_files

    from lvlm_jax.evals.benchmarks import BENCHMARKS

    data_dir = str(tmp_path)
    count, _ = write_benchmark_files(data_dir)["docvqa"]
    asked = {}
    for template in ("", "Q: {question} A:"):
        (evaluator,) = _evaluators(evals__tasks="('docvqa',)", evals__data_dir=data_dir,
                                   evals__prompts__docvqa=template, evals__num_examples="0")
        runner = ScriptedRunner([evaluator.records[0]["answers"][0]] + ["?"] * (count - 1))
        summary, _ = evaluator.evaluate(runner)
        assert summary["docvqa_anls"] == pytest.approx(1 / count)  # one exact answer of count
        asked[template] = runner.prompts
    records = evaluator.records
    assert asked[""] == [BENCHMARKS["docvqa"].render_prompt(r) for r in records]
    assert asked["Q: {question} A:"] == [f"Q: {r['question']} A:" for r in records]
    assert asked[""] != asked["Q: {question} A:"]
