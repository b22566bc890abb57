"""The benchmark readers on tiny copies of each release, and their scorers on scripted replies."""

import io
import os

import pytest
from benchmark_files import mmbench_without_copies, write_benchmark_files
from PIL import Image

from lvlm_jax.evals.benchmarks import BENCHMARKS, MissingFiles, get
from lvlm_jax.evals.benchmarks.base import slug

NAMES = list(BENCHMARKS)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("benchmarks"))
    return data_dir, write_benchmark_files(data_dir)


def read(data, name, limit=0):
    data_dir, _ = data
    return get(name).read(os.path.join(data_dir, name), limit)


def records(data, name, limit=0):
    return read(data, name, limit).records


def scored(data, name, predictions):
    recs = records(data, name)
    return get(name).score(recs, predictions)


def open_image(image):
    if isinstance(image, bytes):
        image = io.BytesIO(image)
    with Image.open(image) as im:
        im.load()
        return im.size


def test_registry():
    assert NAMES == ["vqav2", "textvqa", "docvqa", "infovqa", "chartqa", "scienceqa", "mmbench",
                     "mmmu", "pope", "coco_captions"]
    assert all(b.name == n and b.description for n, b in BENCHMARKS.items())
    with pytest.raises(ValueError, match="unknown benchmark 'gqa'.*vqav2.*coco_captions"):
        get("gqa")


@pytest.mark.parametrize("name", NAMES)
def test_reader_counts_records_and_skips(data, name):
    _, expected = data
    loaded = read(data, name)
    assert (len(loaded.records), dict(loaded.skipped)) == expected[name]
    ids = [r["id"] for r in loaded.records]
    assert len(set(ids)) == len(ids) and all(isinstance(i, str) for i in ids)
    for rec in loaded.records:
        assert isinstance(rec["question"], str) and rec["question"]
        assert min(open_image(rec["image"])) >= 4
        prompt = get(name).render_prompt(rec)
        assert isinstance(prompt, str) and prompt
        if name != "coco_captions":
            assert rec["question"] in prompt


@pytest.mark.parametrize("name", NAMES)
def test_missing_files_are_named(tmp_path, name):
    with pytest.raises(MissingFiles, match=name) as err:
        get(name).read(str(tmp_path), 0)
    first = {"vqav2": "v2_OpenEnded_mscoco_val2014_questions.json",
             "textvqa": "TextVQA_0.5.1_val.json", "docvqa": "val_v1.0_withQT.json",
             "infovqa": "infographicsVQA_val_v1.0_withQT.json",
             "chartqa": "test/test_human.json", "scienceqa": "problems.json",
             "mmbench": "MMBench_DEV_EN.tsv", "mmmu": "validation-00000-of-00001.parquet",
             "pope": "coco_pope_random.json", "coco_captions": "dataset_coco.json"}[name]
    assert first in str(err.value)


def test_vqav2_and_textvqa_fields(data):
    vqa = records(data, "vqav2")
    assert [r["kind"] for r in vqa] == ["yes/no", "number", "other"]
    assert vqa[1]["answers"] == ["2"] * 3 + ["3"] * 7
    assert vqa[0]["image"].endswith(os.path.join("val2014", "COCO_val2014_000000000042.jpg"))
    assert open_image(vqa[1]["image"]) == (8, 12)
    text = records(data, "textvqa")
    assert text[0]["image"].endswith(os.path.join("train_images", "003a8ae2ef43b901.jpg"))
    assert len(text[1]["answers"]) == 10


def test_vqa_scores(data):
    summary, examples = scored(data, "vqav2", ["Yes", "two", "blue"])
    assert summary == pytest.approx({"vqav2_accuracy": (1 + 0.9 + 0) / 3,
                                     "vqav2_accuracy_yes_no": 1.0, "vqav2_accuracy_number": 0.9,
                                     "vqav2_accuracy_other": 0.0})
    assert [e["accuracy"] for e in examples] == pytest.approx([1.0, 0.9, 0.0])
    assert {"index", "id", "question", "prediction", "reference"} <= set(examples[0])
    summary, _ = scored(data, "textvqa", ["Nokia", "halt"])
    assert summary == pytest.approx({"textvqa_accuracy": (1.0 + 0.3) / 2})


def test_document_anls(data):
    recs = records(data, "docvqa")
    assert recs[0]["image"].endswith(os.path.join("documents", "pybv0228_81.png"))
    summary, examples = scored(data, "docvqa", ["Hello World", "invoce"])
    assert examples[1]["anls"] == pytest.approx(1 - 1 / 7)  # one edit in "invoice"
    assert summary == pytest.approx({"docvqa_anls": (1 + 1 - 1 / 7) / 2})
    summary, _ = scored(data, "infovqa", ["2016", "nothing like it"])
    assert summary == pytest.approx({"infovqa_anls": 0.5})
    assert open_image(records(data, "infovqa")[0]["image"]) == (6, 18)


def test_chartqa_splits_and_relaxed_accuracy(data):
    recs = records(data, "chartqa")
    assert [r["split"] for r in recs] == ["human", "human", "augmented", "augmented"]
    assert recs[0]["answer"] == "14" and recs[0]["question"] == "How many food items?"
    summary, examples = scored(data, "chartqa", ["14.5", "yes", "0.6", "Corn"])
    assert summary == {"chartqa_relaxed_accuracy": 0.5, "chartqa_human_relaxed_accuracy": 1.0,
                       "chartqa_augmented_relaxed_accuracy": 0.0}
    assert [e["relaxed_accuracy"] for e in examples] == [1.0, 1.0, 0.0, 0.0]
    # A limit is shared between the splits.
    assert [r["id"] for r in records(data, "chartqa", 2)] == ["human-0", "augmented-0"]


def test_scienceqa_image_subset(data):
    recs = records(data, "scienceqa")
    assert recs[0]["options"] == ["cat", "dog", "fish"] and recs[0]["answer"] == 1
    assert recs[0]["image"].endswith(os.path.join("images", "test", "4", "image.png"))
    assert get("scienceqa").render_prompt(recs[1]) == (
        "Which state is highlighted?\nA. Ohio\nB. Texas\n"
        "Answer with the option's letter from the given choices directly.")
    summary, examples = scored(data, "scienceqa", ["B", "The answer is B."])
    assert summary == {"scienceqa_accuracy": 0.5, "scienceqa_accuracy_natural_science": 1.0,
                       "scienceqa_accuracy_social_science": 0.0}
    assert [e["choice"] for e in examples] == [1, 1]
    assert examples[0]["reference"] == "B. dog"


def test_mmbench_circular_copies(data):
    recs = records(data, "mmbench")
    by_id = {r["id"]: r for r in recs}
    assert by_id["2000000"]["image"] == by_id["0"]["image"]  # resolved by index
    assert (by_id["2000000"]["group"], by_id["2000000"]["rotation"]) == (0, 2)
    assert by_id["1000000"]["options"] == ["right", "top", "bottom", "left"]
    assert by_id["1000000"]["answer"] == 0
    assert by_id["0"]["hint"] == "Look closely." and by_id["1"]["hint"] == ""
    assert by_id["1"]["options"] == ["yes", "no"]  # empty C and D columns are no options
    assert get("mmbench").render_prompt(by_id["1"]) == (
        "Question 1?\nA. yes\nB. no\n"
        "Answer with the option's letter from the given choices directly.")
    # Right everywhere but one rotation of group 0.
    replies = {"0": "B", "1000000": "A", "2000000": "A", "3000000": "C", "1": "A",
               "1000001": "(B) yes"}
    summary, examples = get("mmbench").score(recs, [replies[r["id"]] for r in recs])
    assert summary == {"mmbench_circular_accuracy": 0.5, "mmbench_accuracy": 1.0,
                       "mmbench_circular_accuracy_object_localization": 0.0,
                       "mmbench_circular_accuracy_ocr": 1.0}
    assert [e["correct"] for e in examples] == [True, True, True, False, True, True]


def test_mmbench_limit_counts_whole_groups(data):
    assert sorted(r["id"] for r in records(data, "mmbench", 1)) == [
        "0", "1000000", "2000000", "3000000"]
    assert len(records(data, "mmbench", 2)) == 6


def test_mmbench_without_copies_rotates(tmp_path):
    expected = mmbench_without_copies(str(tmp_path))
    loaded = get("mmbench").read(str(tmp_path), 0)
    assert (len(loaded.records), dict(loaded.skipped)) == expected
    recs = loaded.records
    assert [r["id"] for r in recs] == ["0", "1000000", "2000000", "1", "1000001"]
    assert [(r["options"], r["answer"]) for r in recs[:3]] == [
        (["cat", "dog", "cow"], 2), (["dog", "cow", "cat"], 1), (["cow", "cat", "dog"], 0)]
    assert len({r["image"] for r in recs[:3]}) == 1
    assert [r["id"] for r in get("mmbench").read(str(tmp_path), 1).records] == [
        "0", "1000000", "2000000"]
    summary, _ = get("mmbench").score(recs, ["C", "B", "A", "B", "B"])
    assert summary["mmbench_circular_accuracy"] == 0.5
    assert summary["mmbench_accuracy"] == 1.0


def test_mmmu_parquet(data):
    mc, open_ = records(data, "mmmu")
    assert mc["num_images"] == 2 and open_["num_images"] == 1
    assert mc["options"] == ["<image 1>", "<image 2>", "Neither"] and mc["answer"] == 1
    assert mc["subject"] == "Art" and open_["answers"] == ["24/7", "3.429"]
    assert open_image(mc["image"]) == (11, 8)  # image_1
    assert get("mmmu").render_prompt(mc) == (
        "Which painting is older, <image 1> or <image 2>?\n(A) <image 1>\n(B) <image 2>\n"
        "(C) Neither\n\nAnswer with the option's letter from the given choices directly.")
    assert get("mmmu").render_prompt(open_) == (
        "<image 1> What is the ratio?\nAnswer the question using a single word or phrase.")
    summary, examples = get("mmmu").score([mc, open_], ["(B)", "The ratio is 3.43."])
    assert summary == {"mmmu_accuracy": 1.0, "mmmu_multiple_choice_accuracy": 1.0,
                       "mmmu_open_accuracy": 1.0}
    summary, _ = get("mmmu").score([mc, open_], ["(C)", "about 5"])
    assert summary == {"mmmu_accuracy": 0.0, "mmmu_multiple_choice_accuracy": 0.0,
                       "mmmu_open_accuracy": 0.0}


def test_pope_splits_and_scores(data):
    recs = records(data, "pope")
    assert [r["split"] for r in recs] == ["random"] * 2 + ["popular"] * 2 + ["adversarial"] * 2
    assert [r["split"] for r in records(data, "pope", 4)] == [
        "random", "random", "popular", "adversarial"]
    summary, examples = scored(data, "pope", ["Yes"] * 6)
    assert summary["pope_accuracy"] == 0.5 and summary["pope_yes_ratio"] == 1.0
    assert summary["pope_adversarial_recall"] == 1.0 and "pope_popular_f1" in summary
    assert examples[1]["reference"] == "no" and not examples[1]["correct"]


def test_coco_captions_karpathy_test(data):
    recs = records(data, "coco_captions")
    assert len(recs[0]["captions"]) == 3 and recs[0]["image"].endswith(
        os.path.join("val2014", "COCO_val2014_000000391895.jpg"))
    summary, examples = scored(data, "coco_captions", [r["captions"][0] for r in recs])
    assert set(summary) == {"coco_captions_cider", "coco_captions_rouge_l",
                            *(f"coco_captions_bleu_{k}" for k in range(1, 5))}
    assert summary["coco_captions_bleu_1"] == pytest.approx(1.0)
    assert examples[0]["cider"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_scorers_report_per_example_results(data, name):
    recs = records(data, name)
    summary, examples = get(name).score(recs, ["no"] * len(recs))
    assert summary and all(k.startswith(name + "_") and k == slug(k) for k in summary)
    assert len(examples) == len(recs)
    for i, e in enumerate(examples):
        assert {"index", "id", "question", "prediction", "reference"} <= set(e)
        assert e["index"] == i and e["id"] == recs[i]["id"] and len(e) > 5


def test_malformed_annotation_file_is_counted(tmp_path, data):
    data_dir, _ = data
    for name in ("vqav2", "docvqa"):
        task_dir = tmp_path / name
        task_dir.mkdir()
        for f in os.listdir(os.path.join(data_dir, name)):
            if f.endswith(".json"):
                (task_dir / f).write_text("{not json")
            else:
                os.symlink(os.path.join(data_dir, name, f), task_dir / f)
        loaded = get(name).read(str(task_dir), 0)
        assert (loaded.records, dict(loaded.skipped)) == ([], {"malformed file": 1})
