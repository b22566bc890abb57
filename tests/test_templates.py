"""Tests of the chat templates: token-exact loss masks, image blocks, layouts, demo tokenizer."""

import os

import numpy as np
import pytest

from data_pipelines.loader import demo_tokenizer
from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.templates import (
    SPECIAL_MARKERS,
    TEMPLATES,
    VICUNA_SYSTEM,
    encode_part,
    end_of_turn_ids,
    get_template,
    render,
)

IMAGE_TOKENS = 5

CONVERSATIONS = {
    "0_images": [
        {"from": "human", "value": "how many shapes are there?"},
        {"from": "gpt", "value": "2"},
        {"from": "human", "value": "is there a red circle?"},
        {"from": "gpt", "value": "yes"},
    ],
    "1_image": [
        {"from": "human", "value": "<image>\nwhat shape is at top right?"},
        {"from": "gpt", "value": "a blue square at top left."},
        {"from": "human", "value": "where is the red circle?"},
        {"from": "gpt", "value": "bottom left"},
        {"from": "human", "value": "what color is the triangle?"},
        {"from": "gpt", "value": "green"},
    ],
    "2_images": [
        {"from": "human", "value": "<image>\nwhat color is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nhow many squares are there?"},
        {"from": "gpt", "value": "a red circle at top left and a green square at bottom right."},
    ],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _replies(conversation):
    return [t["value"] for t in conversation if t["from"] == "gpt"]


def _check_mask_is_exactly_the_replies(template, conversation, tok):
    ids, mask = render(template, conversation, tok, IMAGE_TOKENS)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    eot = end_of_turn_ids(template, tok)
    prefix = [i for p in get_template(template).assistant_prefix for i in encode_part(p, tok)]
    expected = [tok.encode(r) + eot for r in _replies(conversation)]
    # The masked tokens, in order, are the replies each followed by its end-of-turn token(s).
    assert ids[mask].tolist() == [i for turn in expected for i in turn]
    # Token by token: each reply is one contiguous masked span right after the assistant prefix.
    positions = np.flatnonzero(mask)
    offset = 0
    for reply, turn in zip(_replies(conversation), expected, strict=True):
        span = positions[offset : offset + len(turn)]
        offset += len(turn)
        start, stop = int(span[0]), int(span[-1]) + 1
        assert span.tolist() == list(range(start, stop)), "a reply's mask has a hole"
        assert not mask[start - 1] or ids[start - 1] in eot, "the mask starts before the reply"
        assert ids[start - len(prefix) : start].tolist() == prefix
        assert stop == len(ids) or not mask[stop] or ids[stop - 1] in eot
        assert tok.decode(ids[start : stop - len(eot)]) == reply
        assert ids[stop - len(eot) : stop].tolist() == eot


@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=list(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_mask_covers_exactly_the_assistant_replies(template, conversation, tok):
    _check_mask_is_exactly_the_replies(template, CONVERSATIONS[conversation], tok)


def test_vicuna_mask_covers_exactly_the_assistant_replies(tok):
    conversation = CONVERSATIONS["1_image"]
    ids, mask = render("vicuna_v1", conversation, tok, IMAGE_TOKENS)
    # </s> decodes to nothing, so the masked tokens read as the replies, space-joined.
    assert tok.decode(ids[mask]) == " ".join(_replies(conversation))
    assert ids[mask].tolist().count(tok.eos_id) == 3


@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=list(CONVERSATIONS))
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_each_image_mark_becomes_one_block_of_image_tokens(template, conversation, tok):
    turns = CONVERSATIONS[conversation]
    n_images = sum(t["value"].count("<image>") for t in turns)
    ids, mask = render(template, turns, tok, IMAGE_TOKENS)
    where = np.flatnonzero(ids == tok.image_id)
    assert len(where) == n_images * IMAGE_TOKENS
    for block in where.reshape(n_images, IMAGE_TOKENS):
        assert block.tolist() == list(range(block[0], block[0] + IMAGE_TOKENS))
    assert not mask[where].any()


def test_vicuna_renders_the_llava15_prompt(tok):
    ids, _ = render("vicuna_v1", CONVERSATIONS["0_images"], tok, IMAGE_TOKENS)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == (
        f"{VICUNA_SYSTEM} USER: how many shapes are there? ASSISTANT: 2"
        " USER: is there a red circle? ASSISTANT: yes"
    )


@pytest.mark.parametrize(
    "template, layout",
    [
        (
            "chatml",
            "<|im_start|> system You are a helpful assistant.<|im_end|><|im_start|> user "
            "is there a red circle?<|im_end|><|im_start|> assistant yes<|im_end|>",
        ),
        (
            "llama3",
            "<|start_header_id|> user<|end_header_id|> is there a red circle?<|eot_id|>"
            "<|start_header_id|> assistant<|end_header_id|> yes<|eot_id|>",
        ),
        (
            "gemma",
            "<start_of_turn> user is there a red circle?<end_of_turn>"
            "<start_of_turn> model yes<end_of_turn>",
        ),
        ("plain", "yes"),
    ],
)
def test_template_layout(template, layout, tok):
    turns = CONVERSATIONS["0_images"][2:]
    ids, _ = render(template, turns, tok, IMAGE_TOKENS)
    assert tok.decode(ids) == layout
    assert (ids[0] == tok.bos_id) == get_template(template).bos


def test_special_markers_are_single_tokens_of_the_demo_tokenizer(tok):
    for marker in SPECIAL_MARKERS:
        assert tok.id_to_piece(tok.piece_to_id(marker)) == marker
    ids, _ = render("chatml", CONVERSATIONS["0_images"], tok, IMAGE_TOKENS)
    assert ids.tolist().count(tok.piece_to_id("<|im_end|>")) == 5  # system, 2 user, 2 assistant


def test_plain_keeps_only_the_images_of_the_user_turns(tok):
    turns = [
        {"from": "human", "value": "describe the image.\n<image>"},
        {"from": "gpt", "value": "a red circle at top left."},
    ]
    ids, mask = render("plain", turns, tok, IMAGE_TOKENS)
    caption = tok.encode("a red circle at top left.")
    assert ids.tolist() == [tok.bos_id] + [tok.image_id] * IMAGE_TOKENS + caption + [tok.eos_id]
    assert mask.tolist() == [False] * (1 + IMAGE_TOKENS) + [True] * (len(caption) + 1)


def test_system_turn_replaces_the_default_system_prompt(tok):
    turns = [{"from": "system", "value": "answer in one word."}, *CONVERSATIONS["0_images"]]
    for template in ("vicuna_v1", "chatml", "llama3", "gemma"):
        text = tok.decode(render(template, turns, tok, IMAGE_TOKENS)[0])
        assert "answer in one word." in text and "helpful" not in text, template
        _check_mask_is_exactly_the_replies(template, turns, tok)


def test_generation_prompt_ends_with_the_assistant_prefix(tok):
    turns = CONVERSATIONS["1_image"][:1]
    ids, mask = render("vicuna_v1", turns, tok, IMAGE_TOKENS, add_generation_prompt=True)
    assert tok.decode(ids).endswith("what shape is at top right? ASSISTANT:")
    assert not mask.any()
    assert end_of_turn_ids("vicuna_v1", tok) == [tok.eos_id]
    assert end_of_turn_ids("gemma", tok) == [tok.piece_to_id("<end_of_turn>")]


def test_unknown_template_names_itself_and_the_valid_ones(tok):
    with pytest.raises(ValueError, match=r"'vicuna_v2'.*chatml.*gemma.*llama3.*plain.*vicuna_v1"):
        render("vicuna_v2", CONVERSATIONS["0_images"], tok, IMAGE_TOKENS)


def test_image_mark_in_a_reply_is_rejected(tok):
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}]
    with pytest.raises(ValueError, match="assistant reply"):
        render("chatml", turns, tok, IMAGE_TOKENS)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_synthetic_conversations_render_without_unk(template, tok):
    shapes = SyntheticShapes(split="eval")
    for i in range(30):
        turns = shapes.conversation(i)["conversations"]
        ids, _ = render(template, turns, tok, IMAGE_TOKENS)
        assert 1 not in ids.tolist()  # <unk>
        _check_mask_is_exactly_the_replies(template, turns, tok)


def test_demo_tokenizer_is_cached_and_deterministic(tok, tmp_path):
    again = demo_tokenizer(tmp_path)
    pieces = [again.id_to_piece(i) for i in range(again.vocab_size)]
    assert pieces == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert 256 <= again.vocab_size <= 512
    mtime = os.path.getmtime(again.model_path)
    assert demo_tokenizer(tmp_path).model_path == again.model_path
    assert os.path.getmtime(again.model_path) == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_tokenizer_v2.model"]
