"""Tiny copies of every benchmark in its released layout, bad entries included, for the readers.

`write_benchmark_files(data_dir)` writes `data_dir/<task>/` for each task of
lvlm_jax.evals.benchmarks and returns, per task, `(records, skipped)`: how many records its
reader returns and the skip counts by reason it reports (`Loaded.skipped` as a plain dict).
Images are small solid-colour PNGs or JPEGs of different aspect ratios.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

Expected = tuple[int, dict[str, int]]

MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "image", "source", "l2-category", "split")


def image_bytes(size: tuple[int, int] = (12, 8), color: str = "red", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _image(path: str, size: tuple[int, int] = (12, 8), color: str = "red") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "JPEG" if path.endswith((".jpg", ".jpeg")) else "PNG"
    with open(path, "wb") as f:
        f.write(image_bytes(size, color, fmt))


def _json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _lines(path: str, lines: Sequence[Any]) -> None:
    """JSON lines; a str item is written verbatim (a line that is not JSON)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)


def _qa_release(d: str, annotation: str, header: dict, data: list, images: dict) -> Expected:
    """A {"data": [...]} annotation file (TextVQA, DocVQA, InfographicVQA) and its images; the
    callers' last two entries are one naming a missing image and one malformed."""
    _json(f"{d}/{annotation}", {**header, "data": data})
    for path, (size, color) in images.items():
        _image(f"{d}/{path}", size, color)
    return len(data) - 2, {"missing image": 1, "malformed entry": 1}


def vqav2(d: str) -> Expected:
    ten = lambda *pairs: [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                          for i, a in enumerate(a for a, n in pairs for _ in range(n))]
    questions = [
        {"image_id": 42, "question": "Is it red?", "question_id": 42000},
        {"image_id": 73, "question": "How many?", "question_id": 73000},
        {"image_id": 73, "question": "What colour?", "question_id": 73001},
        {"image_id": 99, "question": "Missing image?", "question_id": 99000},
        {"image_id": 42, "question_id": 42001},  # no question: malformed
    ]
    annotations = [
        {"question_id": 42000, "image_id": 42, "answer_type": "yes/no", "question_type": "is it",
         "multiple_choice_answer": "yes", "answers": ten(("yes", 10))},
        {"question_id": 73000, "image_id": 73, "answer_type": "number",
         "question_type": "how many", "multiple_choice_answer": "3",
         "answers": ten(("2", 3), ("3", 7))},
        {"question_id": 73001, "image_id": 73, "answer_type": "other", "question_type": "what",
         "multiple_choice_answer": "red", "answers": ten(("red", 10))},
        {"question_id": 99000, "image_id": 99, "answer_type": "other", "question_type": "what",
         "multiple_choice_answer": "x", "answers": ten(("x", 10))},
        {"question_id": 42001, "image_id": 42, "answer_type": "other", "question_type": "what",
         "multiple_choice_answer": "x", "answers": ten(("x", 10))},
    ]
    _json(f"{d}/v2_OpenEnded_mscoco_val2014_questions.json",
          {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
           "data_subtype": "val2014", "questions": questions, "license": {}})
    _json(f"{d}/v2_mscoco_val2014_annotations.json", {"info": {}, "annotations": annotations})
    _image(f"{d}/val2014/COCO_val2014_000000000042.jpg", (12, 8), "red")
    _image(f"{d}/val2014/COCO_val2014_000000000073.jpg", (8, 12), "blue")
    return 3, {"missing image": 1, "malformed entry": 1}


def textvqa(d: str) -> Expected:
    entry = lambda qid, img, q, answers: {
        "question": q, "image_id": img, "image_classes": ["Sign"], "image_width": 12,
        "image_height": 8, "answers": answers, "question_tokens": q.split(), "question_id": qid,
        "set_name": "val"}
    data = [entry(34602, "003a8ae2ef43b901", "what is the brand?", ["nokia"] * 10),
            entry(34603, "00685bc495504d61", "what does it say?", ["stop"] * 9 + ["halt"]),
            entry(34604, "ffffffffffffffff", "no such image?", ["x"] * 10),
            entry(34605, "003a8ae2ef43b901", "answers not a list", 5)]  # malformed
    return _qa_release(d, "TextVQA_0.5.1_val.json", {"dataset_type": "val", "dataset_name":
                                                     "textvqa", "dataset_version": "0.5.1"},
                       data, {"train_images/003a8ae2ef43b901.jpg": ((16, 8), "green"),
                              "train_images/00685bc495504d61.jpg": ((8, 8), "yellow")})


def docvqa(d: str) -> Expected:
    entry = lambda qid, q, image, answers: {
        "questionId": qid, "question": q, "question_types": ["form"], "image": image,
        "docId": 14465, "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81",
        "answers": answers, "data_split": "val"}
    data = [entry(49153, "What is the title?", "documents/pybv0228_81.png", ["hello world"]),
            entry(24580, "What kind of form?", "documents/nkbl0226_1.png", ["invoice", "bill"]),
            entry(57349, "Missing page?", "documents/none_1.png", ["x"]),
            entry(57350, "Answers not a list", "documents/pybv0228_81.png", "x")]  # malformed
    return _qa_release(d, "val_v1.0_withQT.json", {"dataset_name": "docvqa",
                                                   "dataset_split": "val"},
                       data, {"documents/pybv0228_81.png": ((8, 12), "white"),
                              "documents/nkbl0226_1.png": ((10, 14), "gray")})


def infovqa(d: str) -> Expected:
    entry = lambda qid, q, image, answers: {
        "questionId": qid, "question": q, "image_local_name": image, "image_url": "",
        "ocr_output_file": image.replace(".jpeg", ".json"), "answers": answers,
        "data_split": "val", "answer_type": ["single span"], "evidence": ["text"],
        "operation/reasoning": []}
    data = [entry(65718, "Which year?", "20471.jpeg", ["2016"]),
            entry(65719, "How many people?", "37313.jpeg", ["5", "five"]),
            entry(65720, "Missing image?", "99999.jpeg", ["x"])]
    data.append({k: v for k, v in entry(65721, "No id", "20471.jpeg", ["x"]).items()
                 if k != "questionId"})  # malformed
    return _qa_release(d, "infographicsVQA_val_v1.0_withQT.json",
                       {"dataset_name": "infographicVQA", "dataset_split": "val"},
                       data, {"infographicsvqa_images/20471.jpeg": ((6, 18), "purple"),
                              "infographicsvqa_images/37313.jpeg": ((12, 12), "orange")})


def chartqa(d: str) -> Expected:
    _json(f"{d}/test/test_human.json",
          [{"imgname": "41699051005347.png", "query": "How many food items?", "label": "14"},
           {"imgname": "8127.png", "query": "Is it higher?", "label": "Yes"},
           {"imgname": "0000.png", "query": "Missing chart?", "label": "1"}])
    _json(f"{d}/test/test_augmented.json",
          [{"imgname": "41699051005347.png", "query": "Difference?", "label": "0.57"},
           {"imgname": "8127.png", "query": "Which food?", "label": "Lamb"},
           "not an entry"])  # malformed
    _image(f"{d}/test/png/41699051005347.png", (20, 10), "navy")
    _image(f"{d}/test/png/8127.png", (10, 20), "teal")
    return 4, {"missing image": 1, "malformed entry": 1}


def scienceqa(d: str) -> Expected:
    problem = lambda q, choices, answer, image, subject, split, hint="": {
        "question": q, "choices": choices, "answer": answer, "hint": hint, "image": image,
        "task": "closed choice", "grade": "grade4", "subject": subject, "topic": "t",
        "category": "c", "skill": "s", "lecture": "", "solution": "", "split": split}
    problems = {
        "4": problem("Which animal is shown?", ["cat", "dog", "fish"], 1, "image.png",
                     "natural science", "test", hint="The animal barks."),
        "5": problem("Which state is highlighted?", ["Ohio", "Texas"], 0, "image.png",
                     "social science", "test"),
        "11": problem("No image here?", ["yes", "no"], 0, None, "language science", "test"),
        "12": problem("Image file missing?", ["yes", "no"], 0, "image.png", "natural science",
                      "test"),
        "13": problem("Answer out of range?", ["yes", "no"], 5, "image.png", "natural science",
                      "test"),  # malformed
        "1": problem("A train problem", ["a", "b"], 0, "image.png", "natural science", "train"),
    }
    _json(f"{d}/problems.json", problems)
    _json(f"{d}/pid_splits.json", {"train": ["1"], "val": [], "test": ["4", "5", "11", "12",
                                                                       "13"]})
    for pid, size in (("4", (12, 8)), ("5", (8, 14)), ("13", (8, 8)), ("1", (8, 8))):
        _image(f"{d}/images/{'train' if pid == '1' else 'test'}/{pid}/image.png", size, "pink")
    return 2, {"missing image": 1, "malformed entry": 1}


def _tsv(path: str, rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(MMBENCH_COLUMNS) + "\n")
        for row in rows:
            f.write("\t".join(str(row.get(c, "")) for c in MMBENCH_COLUMNS) + "\n")


def _mmbench_row(index: int, options: Sequence[str], answer: int, image: str, **kw: Any) -> dict:
    row = {"index": index, "question": kw.get("question", f"Question {index % 1_000_000}?"),
           "hint": kw.get("hint", ""), "answer": "ABCD"[answer], "image": image,
           "category": kw.get("category", "ocr"), "source": "tiny",
           "l2-category": "perception", "split": "dev"}
    row.update(dict(zip("ABCD", options, strict=False)))
    return row


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def mmbench(d: str) -> Expected:
    """VLMEvalKit's layout: originals (index < 1e6) first, then the circular copies (index +
    k * 1e6, options rotated) whose image field is the original's index."""
    from lvlm_jax.evals.metrics_choice import circular_rotations

    zero, one = ["left", "right", "top", "bottom"], ["yes", "no"]
    rows = [_mmbench_row(0, zero, 1, _b64(image_bytes((12, 8), "red")), hint="Look closely.",
                         category="object_localization"),
            _mmbench_row(1, one, 0, _b64(image_bytes((8, 16), "blue", "JPEG"))),
            _mmbench_row(2, one, 0, "!!" * 40),  # not base64
            _mmbench_row(3, one, 0, _b64(image_bytes()))]
    rows[3]["answer"] = "Z"  # malformed: no such option
    for original, options, answer in ((0, zero, 1), (1, one, 0)):
        for k, (rotated, new_answer) in enumerate(circular_rotations(options, answer)[1:], 1):
            rows.append(_mmbench_row(original + k * 1_000_000, rotated, new_answer,
                                     str(original), hint=rows[original]["hint"],
                                     category=rows[original]["category"]))
    rows.append(_mmbench_row(1_000_004, one, 0, "4"))  # refers to a row that is not there
    _tsv(f"{d}/MMBench_DEV_EN.tsv", rows)
    return 6, {"undecodable image": 1, "malformed entry": 1, "missing image": 1}


def mmbench_without_copies(d: str) -> Expected:
    """A TSV of originals only (as the V1.1 file or an older release): the reader rotates."""
    rows = [_mmbench_row(0, ["cat", "dog", "cow"], 2, _b64(image_bytes((9, 9), "black"))),
            _mmbench_row(1, ["up", "down"], 1, _b64(image_bytes((16, 4), "white")))]
    _tsv(f"{d}/MMBench_DEV_EN_V11.tsv", rows)
    return 5, {}


def mmmu(d: str) -> Expected:
    """Two subjects' validation parquet files as the Hugging Face release has them; a dev file
    beside is not read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("id", pa.string()), ("question", pa.string()), ("options", pa.string()),
              ("explanation", pa.string()),
              *((f"image_{k}", image) for k in range(1, 8)),
              ("img_type", pa.string()), ("answer", pa.string()),
              ("topic_difficulty", pa.string()), ("question_type", pa.string()),
              ("subfield", pa.string())]
    schema = pa.schema(fields)

    def row(id_: str, question: str, options: str, answer: str, kind: str, images: int) -> dict:
        r = {"id": id_, "question": question, "options": options, "explanation": "",
             "img_type": "['Paintings']", "answer": answer, "topic_difficulty": "Easy",
             "question_type": kind, "subfield": "Art History"}
        for k in range(1, 8):
            r[f"image_{k}"] = ({"bytes": image_bytes((10 + k, 8), "olive"), "path": f"{k}.png"}
                               if k <= images else None)
        return r

    def write(path: str, rows: list[dict]) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)

    write(f"{d}/Art/validation-00000-of-00001.parquet", [
        row("validation_Art_1", "Which painting is older, <image 1> or <image 2>?",
            "['<image 1>', '<image 2>', 'Neither']", "B", "multiple-choice", 2),
        row("validation_Art_2", "No image at all?", "['a', 'b']", "A", "multiple-choice", 0)])
    write(f"{d}/Art/dev-00000-of-00001.parquet",
          [row("dev_Art_1", "Dev question <image 1>", "['a', 'b']", "A", "multiple-choice", 1)])
    write(f"{d}/Math/validation-00000-of-00001.parquet", [
        row("validation_Math_15", "<image 1> What is the ratio?", "[]", "['24/7', '3.429']",
            "open", 1),
        row("validation_Math_16", "Options broken <image 1>", "['a', 'b'", "A",
            "multiple-choice", 1)])  # malformed options literal
    return 2, {"missing image": 1, "malformed entry": 1}


def pope(d: str) -> Expected:
    """Each split numbers its questions from 1, as the release does."""
    q = lambda qid, image, obj, label: {"question_id": qid, "image": image,
                                        "text": f"Is there a {obj} in the image?", "label": label}
    a, b = "COCO_val2014_000000310196.jpg", "COCO_val2014_000000210789.jpg"
    _lines(f"{d}/coco_pope_random.json", [q(1, a, "snowboard", "yes"), q(2, a, "car", "no")])
    _lines(f"{d}/coco_pope_popular.json",
           [q(1, b, "person", "yes"), '{"question_id": 2, "image": ', q(3, b, "chair", "no")])
    _lines(f"{d}/coco_pope_adversarial.json",
           [q(1, a, "skis", "yes"), q(2, a, "boat", "no"),
            q(3, "COCO_val2014_000000000001.jpg", "dog", "no")])
    _image(f"{d}/val2014/{a}", (12, 8), "silver")
    _image(f"{d}/val2014/{b}", (8, 12), "maroon")
    return 6, {"malformed entry": 1, "missing image": 1}


def coco_captions(d: str) -> Expected:
    sentences = lambda *raws: [{"tokens": r.lower().split(), "raw": r, "imgid": 0, "sentid": i}
                               for i, r in enumerate(raws)]
    image = lambda cocoid, filename, split, sents: {
        "filepath": "val2014", "sentids": [], "filename": filename, "imgid": cocoid,
        "split": split, "sentences": sents, "cocoid": cocoid}
    images = [
        image(391895, "COCO_val2014_000000391895.jpg", "test",
              sentences("A man riding a bike down a road.", "A person on a bicycle.",
                        "A cyclist rides along a dirt path.")),
        image(522418, "COCO_val2014_000000522418.jpg", "test",
              sentences("A woman cutting a cake.", "A lady slices a large cake.")),
        image(184613, "COCO_val2014_000000184613.jpg", "train", sentences("Not test.")),
        image(318219, "COCO_val2014_000000318219.jpg", "test", sentences("No image file.")),
        {k: v for k, v in image(391895, "COCO_val2014_000000391895.jpg", "test", []).items()
         if k != "sentences"},  # malformed
    ]
    _json(f"{d}/dataset_coco.json", {"images": images, "dataset": "coco"})
    _image(f"{d}/val2014/COCO_val2014_000000391895.jpg", (16, 12), "brown")
    _image(f"{d}/val2014/COCO_val2014_000000522418.jpg", (12, 16), "cyan")
    return 2, {"missing image": 1, "malformed entry": 1}


WRITERS = {"vqav2": vqav2, "textvqa": textvqa, "docvqa": docvqa, "infovqa": infovqa,
           "chartqa": chartqa, "scienceqa": scienceqa, "mmbench": mmbench, "mmmu": mmmu,
           "pope": pope, "coco_captions": coco_captions}


def write_benchmark_files(data_dir: str) -> dict[str, Expected]:
    """Every task's tiny release under `data_dir/<task>/`; per task (records, skipped)."""
    return {name: write(os.path.join(data_dir, name)) for name, write in WRITERS.items()}
