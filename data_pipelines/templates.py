"""Chat templates: a LLaVA-format conversation -> token ids and a loss mask on the replies."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipelines.tokenizer_base import IMAGE_MARK, TextTokenizer

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CHATML_SYSTEM = "You are a helpful assistant."

# Parts of a template: literal text, a special marker (one token where the tokenizer has it, its
# text pieces otherwise), the tokenizer's eos, or the place a turn's content goes.
EOS = "<eos>"
CONTENT = "<content>"
SPECIAL_MARKERS = (
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|im_start|>",
    "<|im_end|>",
)
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class ChatTemplate:
    """How turns are laid out; only the assistant reply and `assistant_end` are supervised."""

    name: str
    bos: bool
    system: str | None  # the default system prompt; a {"from": "system"} turn replaces it
    system_turn: tuple[str, ...]
    user_turn: tuple[str, ...]
    assistant_prefix: tuple[str, ...]
    assistant_end: tuple[str, ...]  # closes a reply; supervised, and the generation stop
    assistant_after: tuple[str, ...] = ()  # after the end-of-turn; not supervised
    user_text: bool = True  # plain (LLaVA pretraining) keeps only the images of a user turn
    system_in_first_user: bool = False  # gemma has no system role: it prefixes the first user turn
    # Joins two adjacent text parts in the conversation's text (render_text). Vicuna's spaces:
    # a sentencepiece model that never reads special tokens in text (ours) adds each one itself,
    # as its "▁" before every part it encodes.
    sep: str = ""


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        # LLaVA pretraining: <s><image tokens> caption</s>.
        ChatTemplate(
            "plain",
            bos=True,
            system=None,
            system_turn=(),
            user_turn=(CONTENT,),
            assistant_prefix=(),
            assistant_end=(EOS,),
            user_text=False,
        ),
        # LLaVA-1.5: "{system} USER: {q} ASSISTANT: {a}</s>USER: ...".
        ChatTemplate(
            "vicuna_v1",
            bos=True,
            system=VICUNA_SYSTEM,
            system_turn=(CONTENT,),
            user_turn=("USER:", CONTENT),
            assistant_prefix=("ASSISTANT:",),
            assistant_end=(EOS,),
            sep=" ",
        ),
        ChatTemplate(
            "llama3",
            bos=True,
            system=None,
            system_turn=(
                "<|start_header_id|>",
                "system",
                "<|end_header_id|>",
                "\n\n",
                CONTENT,
                "<|eot_id|>",
            ),
            user_turn=(
                "<|start_header_id|>",
                "user",
                "<|end_header_id|>",
                "\n\n",
                CONTENT,
                "<|eot_id|>",
            ),
            assistant_prefix=("<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"),
            assistant_end=("<|eot_id|>",),
        ),
        ChatTemplate(
            "gemma",
            bos=True,
            system=None,
            system_turn=(),
            user_turn=("<start_of_turn>", "user\n", CONTENT, "<end_of_turn>", "\n"),
            assistant_prefix=("<start_of_turn>", "model\n"),
            assistant_end=("<end_of_turn>",),
            assistant_after=("\n",),
            system_in_first_user=True,
        ),
        ChatTemplate(
            "chatml",
            bos=False,
            system=CHATML_SYSTEM,
            system_turn=("<|im_start|>", "system\n", CONTENT, "<|im_end|>", "\n"),
            user_turn=("<|im_start|>", "user\n", CONTENT, "<|im_end|>", "\n"),
            assistant_prefix=("<|im_start|>", "assistant\n"),
            assistant_end=("<|im_end|>",),
            assistant_after=("\n",),
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; valid templates: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def template_texts() -> list[str]:
    """Every fixed text the templates emit (role words, system prompts, markers): tokenizer food."""
    lines = [VICUNA_SYSTEM, CHATML_SYSTEM, "USER: ASSISTANT:", "system user assistant model"]
    return lines + list(SPECIAL_MARKERS)


def encode_part(part: str, tokenizer: TextTokenizer) -> list[int]:
    """The ids of one template part (text, special marker or EOS; not CONTENT)."""
    if part == EOS:
        return [tokenizer.eos_id]
    if part in SPECIAL_MARKERS:
        # Looked up, not encoded: encoding adds a dummy-prefix piece before a symbol at the start.
        piece_id = tokenizer.piece_to_id(part)
        if piece_id is not None and tokenizer.id_to_piece(piece_id) == part:
            return [piece_id]
    return list(tokenizer.encode(part))


def _encode_content(text: str, tokenizer: TextTokenizer, image_tokens: int, keep_text: bool):
    chunks = text.split(IMAGE_MARK)
    ids: list[int] = []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids += [tokenizer.image_id] * image_tokens
        if keep_text:
            ids += tokenizer.encode(chunk)
    return ids


def end_of_turn_ids(template: str, tokenizer: TextTokenizer) -> list[int]:
    """The ids that close an assistant reply (the stop sequence for generation)."""
    parts = get_template(template).assistant_end
    return [i for part in parts for i in encode_part(part, tokenizer)]


Block = tuple[Sequence[str], str, bool, bool]  # (parts, content, supervised, keep_text)


def _layout(spec: ChatTemplate, conversations: Sequence[dict[str, Any]],
            add_generation_prompt: bool) -> Iterator[Block]:
    """The template's parts for each turn, in order, with what fills CONTENT."""
    turns = [(_role(t), str(t["value"])) for t in conversations]
    system = next((v for r, v in turns if r == "system"), spec.system)
    turns = [(r, v) for r, v in turns if r != "system"]
    if system is not None and spec.user_text:
        if spec.system_in_first_user and turns and turns[0][0] == "user":
            turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
        elif not spec.system_in_first_user:
            yield spec.system_turn, system, False, True
    for role, value in turns:
        if role == "user":
            yield spec.user_turn, value, False, spec.user_text
            continue
        if IMAGE_MARK in value:
            raise ValueError(f"{IMAGE_MARK} in an assistant reply: {value!r}")
        yield spec.assistant_prefix, "", False, True
        yield (CONTENT,), value, True, True
        yield spec.assistant_end, "", True, True
        yield spec.assistant_after, "", False, True
    if add_generation_prompt:
        yield spec.assistant_prefix, "", False, True


def render(
    template: str,
    conversations: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer,
    image_tokens: int,
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and a loss mask (bool): True exactly on reply and end-of-turn tokens.

    Each `<image>` in a user turn becomes `image_tokens` copies of the tokenizer's image id.
    `add_generation_prompt` appends the assistant prefix, for prompting a model to reply.

    A tokenizer that reads special tokens in text (a checkpoint's, as transformers does) gets the
    conversation's text (`render_text`) in one piece, so the ids are exactly HF's for that text
    (after bos); a token that straddles the start of a reply is supervised. Our own
    sentencepiece models get each part on its own, so the mask boundary never falls inside a
    token.
    """
    spec = get_template(template)
    if image_tokens < 1:
        raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
    if getattr(tokenizer, "special_tokens_in_text", False):
        return _render_whole(spec, conversations, tokenizer, image_tokens, add_generation_prompt)
    ids: list[int] = [tokenizer.bos_id] if spec.bos else []
    mask: list[bool] = [False] * len(ids)
    for parts, content, supervised, keep_text in _layout(spec, conversations,
                                                         add_generation_prompt):
        for part in parts:
            if part == CONTENT:
                new = _encode_content(content, tokenizer, image_tokens, keep_text)
            else:
                new = encode_part(part, tokenizer)
            ids.extend(new)
            mask.extend([supervised] * len(new))
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def _text_spans(spec: ChatTemplate, conversations: Sequence[dict[str, Any]],
                tokenizer: TextTokenizer, image_tokens: int, add_generation_prompt: bool
                ) -> list[tuple[str, bool]]:
    """The conversation's text as (text, supervised) spans, joined by nothing."""
    spans: list[tuple[str, bool]] = []
    after_text = False
    for parts, content, supervised, keep_text in _layout(spec, conversations,
                                                         add_generation_prompt):
        for part in parts:
            if part == CONTENT:
                chunks = content.split(IMAGE_MARK)
                block = IMAGE_MARK * image_tokens
                text = block.join(chunks) if keep_text else block * (len(chunks) - 1)
            else:
                text = tokenizer.id_to_piece(tokenizer.eos_id) if part == EOS else part
            is_text = part not in (EOS, *SPECIAL_MARKERS)
            if spec.sep and is_text and after_text:
                spans.append((spec.sep, supervised))  # a reply's leading space is the reply's
            spans.append((text, supervised))
            after_text = is_text
    return spans


def render_text(
    template: str,
    conversations: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer,
    image_tokens: int = 1,
    add_generation_prompt: bool = False,
) -> str:
    """The text `render` tokenizes for a tokenizer that reads special tokens in text, without
    the template's bos: each `<image>` repeated `image_tokens` times (as HF processors expand
    it), the eos as its token's text. An HF chat template of the same layout renders
    bos + this (llama3) or this (chatml)."""
    spec = get_template(template)
    spans = _text_spans(spec, conversations, tokenizer, image_tokens, add_generation_prompt)
    return "".join(text for text, _ in spans)


def _render_whole(spec: ChatTemplate, conversations: Sequence[dict[str, Any]],
                  tokenizer: TextTokenizer, image_tokens: int, add_generation_prompt: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    spans = _text_spans(spec, conversations, tokenizer, image_tokens, add_generation_prompt)
    text = "".join(t for t, _ in spans)
    # Supervised characters, summed: a token is supervised when its span holds one of them.
    supervised = np.concatenate([[0], np.cumsum(np.concatenate(
        [np.full(len(t), s, dtype=np.int64) for t, s in spans] or [np.zeros(0, np.int64)]))])
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.asarray([a for a, _ in offsets], np.int64).reshape(-1)
    ends = np.maximum(np.asarray([b for _, b in offsets], np.int64).reshape(-1),
                      np.minimum(starts + 1, len(text)))  # an empty span reads its next char
    mask = supervised[ends] > supervised[starts]
    images = sum(t.count(IMAGE_MARK) for t, _ in spans)
    if ids.count(tokenizer.image_id) != images:
        raise ValueError(f"{tokenizer.path} does not encode {IMAGE_MARK} as one token")
    bos = [tokenizer.bos_id] if spec.bos and tokenizer.bos_id is not None else []
    return (np.asarray(bos + list(ids), dtype=np.int32),
            np.concatenate([np.zeros(len(bos), bool), mask]).astype(bool))


def _role(turn: dict[str, Any]) -> str:
    speaker = turn.get("from", turn.get("role"))
    if speaker not in _ROLES:
        raise ValueError(f"unknown speaker {speaker!r}; expected one of {sorted(_ROLES)}")
    return _ROLES[speaker]
