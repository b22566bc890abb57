"""Tests of the built-in synthetic shapes set: determinism, split hygiene, and answers vs pixels."""

import re

import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines.synthetic import (
    CELLS,
    COLOR_RGB,
    COLORS,
    DESCRIBE_PROMPT,
    POPE_SPLITS,
    QUESTION_KINDS,
    SHAPES,
    SyntheticShapes,
    mentioned_objects,
    object_frequencies,
    object_names,
)

N = 120


def read_cells(image: np.ndarray, grid: int = 2) -> dict[str, tuple[str, str]]:
    """Recovers {cell: (color, shape)} from pixels alone, independently of the generator's code."""
    size = image.shape[0]
    found = {}
    for k, cell in enumerate(synthetic.cell_names(grid)):
        row, col = divmod(k, grid)
        y0, y1 = row * size // grid, (row + 1) * size // grid
        x0, x1 = col * size // grid, (col + 1) * size // grid
        patch = image[y0:y1, x0:x1]
        for color, rgb in COLOR_RGB.items():
            mask = np.all(patch == rgb, axis=-1)
            if mask.any():
                ys, xs = np.nonzero(mask)
                fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
                # Share of the bounding box covered: square ~1, circle ~pi/4, triangle ~1/2.
                shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
                found[cell] = (color, shape)
    return found


def answer_from_pixels(question: str, image: np.ndarray) -> str:
    cells = read_cells(image)
    objects = set(cells.values())
    if m := re.fullmatch(r"what color is the shape at (.+)\?", question):
        return cells[m[1]][0]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (color,) = [c for c, s in objects if s == m[1]]
        return color
    if m := re.fullmatch(r"what shape is at (.+)\?", question):
        return cells[m[1]][1] if m[1] in cells else "nothing"
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(c == m[1] for c, _ in objects))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(s == m[1] for _, s in objects))
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        (cell,) = [k for k, v in cells.items() if v == (m[1], m[2])]
        return cell
    if m := re.fullmatch(r"is there a (\w+) (\w+)(?: in the image)?\?", question):
        return "yes" if (m[1], m[2]) in objects else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_constants_describe_a_small_closed_vocabulary():
    assert synthetic.cell_names(2) == CELLS
    assert len(object_names()) == len(COLORS) * len(SHAPES) == 12
    assert "red circle" in object_names()
    assert abs(sum(object_frequencies().values()) - 1) < 1e-9


def test_images_are_uint8_rgb_of_the_requested_size():
    for size, grid in [(64, 2), (48, 3)]:
        ds = SyntheticShapes(image_size=size, grid=grid, max_objects=4)
        image = ds.caption(0)["image"]
        assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_records_are_deterministic_per_index():
    fresh = SyntheticShapes(seed=3)
    used = SyntheticShapes(seed=3)
    for i in range(7):  # generating other records first must not shift record 7
        used.conversation(i), used.vqa(i), used.pope(i, "random")
    for method in ("caption", "conversation", "vqa", "preference", "pope"):
        a, b = getattr(fresh, method)(7), getattr(used, method)(7)
        images_a = a.pop("images", None) or [a.pop("image")]
        images_b = b.pop("images", None) or [b.pop("image")]
        assert a == b
        assert all(np.array_equal(x, y) for x, y in zip(images_a, images_b, strict=True))


def test_different_seeds_give_different_data():
    a = [SyntheticShapes(seed=0).caption(i)["caption"] for i in range(20)]
    b = [SyntheticShapes(seed=1).caption(i)["caption"] for i in range(20)]
    assert a != b


def test_train_and_eval_splits_do_not_overlap():
    train = SyntheticShapes(split="train")
    held_out = SyntheticShapes(split="eval")
    train_captions = {train.caption(i)["caption"] for i in range(600)}
    eval_captions = {held_out.caption(i)["caption"] for i in range(200)}
    assert len(eval_captions) > 100  # eval is varied, not a handful of repeated scenes
    assert not train_captions & eval_captions
    assert train.caption(0)["id"] != held_out.caption(0)["id"]


def test_rendered_pixels_match_the_scene():
    ds = SyntheticShapes()
    for i in range(N):
        scene, image = ds.scene(i), ds.image(i)
        assert read_cells(image) == {o.cell: (o.color, o.shape) for o in scene.objects}
        for k, cell in enumerate(CELLS):
            row, col = divmod(k, 2)
            centre = tuple(image[row * 32 + 16, col * 32 + 16])
            objects = [o for o in scene.objects if o.cell == cell]
            expected = COLOR_RGB[objects[0].color] if objects else scene.background
            assert centre == tuple(expected)
        assert tuple(image[0, 0]) == scene.background


def test_answers_match_the_rendered_scene():
    ds = SyntheticShapes()
    for i in range(N):
        record = ds.vqa(i)
        assert record["kind"] in QUESTION_KINDS
        assert answer_from_pixels(record["question"], record["image"]) == record["answer"]
        conversation = ds.conversation(i)
        turns = conversation["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            question = human["value"].removeprefix("<image>\n")
            if question == DESCRIBE_PROMPT:
                cells = read_cells(conversation["images"][0])
                assert mentioned_objects(gpt["value"]) == set(cells.values())
            else:
                assert answer_from_pixels(question, conversation["images"][0]) == gpt["value"]
        caption = ds.caption(i)
        assert mentioned_objects(caption["caption"]) == set(read_cells(caption["image"]).values())
        assert ds.objects(i) == set(read_cells(caption["image"]).values())


def test_every_question_kind_can_be_asked_and_is_answer_balanced():
    ds = SyntheticShapes()
    for kind in QUESTION_KINDS:
        records = [ds.vqa(i, kind=kind) for i in range(40)]
        assert {r["kind"] for r in records} == {kind}
        for r in records:
            assert answer_from_pixels(r["question"], r["image"]) == r["answer"]
    presence = [ds.vqa(i, kind="presence")["answer"] for i in range(400)]
    assert 0.4 < presence.count("yes") / len(presence) < 0.6
    kinds = {ds.vqa(i)["kind"] for i in range(100)}
    assert kinds == set(QUESTION_KINDS)


def test_conversations_follow_the_llava_format():
    ds = SyntheticShapes()
    lengths, describes = set(), 0
    for i in range(200):
        record = ds.conversation(i)
        turns = record["conversations"]
        if turns[0]["value"] == f"<image>\n{DESCRIBE_PROMPT}":
            describes += 1
            assert len(turns) == 2 and mentioned_objects(turns[1]["value"]) == ds.objects(i)
            continue
        lengths.add(len(turns) // 2)
        assert len(record["images"]) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        questions = [t["value"] for t in turns[::2]]
        assert len(set(questions)) == len(questions)  # no question repeated within a dialogue
        assert all(len(t["value"].split()) <= 2 for t in turns[1::2])
    assert lengths == {1, 2, 3}
    assert 0.1 < describes / 200 < 0.3  # DESCRIBE_SHARE of 0.2


def test_pope_splits_are_balanced_and_negatives_are_absent():
    ds = SyntheticShapes()
    prior = object_frequencies()
    for split in POPE_SPLITS:
        records = [ds.pope(i, split) for i in range(200)]
        assert sum(r["answer"] == "yes" for r in records) == 100
        for i, r in enumerate(records):
            assert r["split"] == split
            (asked,) = mentioned_objects(r["question"])
            present = ds.objects(i)
            assert (asked in present) == (r["answer"] == "yes")
            assert answer_from_pixels(r["question"], r["image"]) == r["answer"]
            if r["answer"] == "no" and split == "popular":
                absent = sorted((o for o in prior if o not in present), key=lambda o: -prior[o])
                assert asked in absent[:3]
            if r["answer"] == "no" and split == "adversarial":
                assert any(asked[0] == c or asked[1] == s for c, s in present)
    # Negatives really differ between splits; positives are shared.
    negatives = {s: [ds.pope(i, s)["question"] for i in range(1, 200, 2)] for s in POPE_SPLITS}
    assert negatives["random"] != negatives["popular"] != negatives["adversarial"]
    assert ds.pope(0, "random")["question"] == ds.pope(0, "adversarial")["question"]


def test_rejected_description_mentions_an_absent_object():
    ds = SyntheticShapes()
    for i in range(N):
        record = ds.preference(i)
        present = ds.objects(i)
        assert record["prompt"] == "<image>\ndescribe the image."
        assert len(record["images"]) == 1
        assert mentioned_objects(record["chosen"]) == present
        extra = mentioned_objects(record["rejected"]) - present
        assert len(extra) == 1
        assert mentioned_objects(record["rejected"]) >= present


def test_mentioned_objects_parses_free_text():
    text = "I see two Red circles, a blue  square and a purple triangle; no green."
    assert mentioned_objects(text) == {("red", "circle"), ("blue", "square")}
    assert mentioned_objects("") == set()


def test_corpus_covers_every_word_of_the_records():
    ds = SyntheticShapes()
    words = set(re.findall(r"[a-z0-9]+", " ".join(ds.corpus(30))))
    for i in range(100, 130):
        texts = [ds.caption(i)["caption"], ds.preference(i)["rejected"], ds.vqa(i)["question"]]
        texts += [t["value"] for t in ds.conversation(i)["conversations"]]
        for text in texts:
            assert set(re.findall(r"[a-z0-9]+", text.replace("<image>", ""))) <= words


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(split="test")
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticShapes(max_objects=5)
    with pytest.raises(ValueError, match="grid"):
        SyntheticShapes(grid=5)
    with pytest.raises(ValueError, match="POPE split"):
        SyntheticShapes().pope(0, "hard")
    with pytest.raises(IndexError):
        SyntheticShapes().caption(-1)


def test_description_noise_adds_exactly_one_absent_object_to_that_share_of_descriptions():
    clean, noisy = SyntheticShapes(), SyntheticShapes(description_noise=0.5)
    described = noised = 0
    for i in range(300):
        a, b = clean.conversation(i)["conversations"], noisy.conversation(i)["conversations"]
        if a[0]["value"] != f"<image>\n{DESCRIBE_PROMPT}":
            assert a == b  # questions are never touched
            continue
        described += 1
        present, told = clean.objects(i), mentioned_objects(b[1]["value"])
        assert mentioned_objects(a[1]["value"]) == present
        if told != present:
            noised += 1
            assert present < told and len(told - present) == 1
    assert described > 40 and 0.35 < noised / described < 0.65
    with pytest.raises(ValueError, match="description_noise"):
        SyntheticShapes(description_noise=1.5)


def test_highres_task_is_deterministic_balanced_and_unresolvable_in_one_small_view():
    from data_pipelines.anyres import tile_image
    from data_pipelines.synthetic_highres import SIZES, HighResShapes

    train, again, held = (HighResShapes(seed=3), HighResShapes(seed=3),
                          HighResShapes(seed=3, split="eval"))
    a, b = train.conversation(7), again.conversation(7)
    assert np.array_equal(a["image"], b["image"]) and a["conversations"] == b["conversations"]
    assert not np.array_equal(train.sample(7)[0], held.sample(7)[0])
    answers = [train.sample(i)[1] for i in range(300)]
    assert {s: answers.count(s) for s in SHAPES} == pytest.approx(
        {s: 100 for s in SHAPES}, abs=25)
    assert {train.sample(i)[0].shape[:2] for i in range(300)} == set(SIZES)
    # The object is 16 px in a canvas of 96-192 px: one 32-px view of the whole image leaves a
    # blob of at most ~5x5 pixels, the any-res tiles (up to 128 px here) 60 pixels or more.
    pins = [[32, 64], [64, 32], [64, 64], [64, 128], [128, 64], [96, 96]]

    def ink(x):  # pixels off the background, the tiles' black padding aside
        return int(((np.abs(x.astype(int) - 240).sum(-1) > 60) & (x.sum(-1) > 0)).sum())

    for i in range(20):
        image, _, _ = train.sample(i)
        crops = tile_image(image, pins, 32).crops  # the global view (whole image) first
        assert ink(crops[0]) <= 30 and ink(crops[1:]) >= 60, (i, ink(crops[0]), ink(crops[1:]))
