"""Chat templates: a LLaVA-format conversation -> token ids and a loss mask on the replies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

IMAGE_MARK = "<image>"
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


class TextTokenizer(Protocol):
    """What a template needs of a tokenizer (data_pipelines.tokenizer.Tokenizer has it)."""

    bos_id: int
    eos_id: int
    image_id: int

    def encode(self, text: str) -> list[int]: ...
    def piece_to_id(self, piece: str) -> int: ...
    def id_to_piece(self, piece_id: int) -> str: ...


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
        if tokenizer.id_to_piece(piece_id) == part:
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


def render(
    template: str,
    conversations: Sequence[dict[str, Any]],
    tokenizer: TextTokenizer,
    image_tokens: int,
    add_generation_prompt: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and a loss mask (bool): True exactly on reply and end-of-turn tokens.

    Each part is tokenized on its own, so the mask boundary never falls inside a token. Each
    `<image>` in a user turn becomes `image_tokens` copies of the tokenizer's image id.
    `add_generation_prompt` appends the assistant prefix, for prompting a model to reply.
    """
    spec = get_template(template)
    if image_tokens < 1:
        raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
    ids: list[int] = [tokenizer.bos_id] if spec.bos else []
    mask: list[bool] = [False] * len(ids)

    def emit(
        parts: Sequence[str], content: str = "", supervised: bool = False, keep_text: bool = True
    ) -> None:
        for part in parts:
            if part == CONTENT:
                new = _encode_content(content, tokenizer, image_tokens, keep_text)
            else:
                new = encode_part(part, tokenizer)
            ids.extend(new)
            mask.extend([supervised] * len(new))

    turns = [(_role(t), str(t["value"])) for t in conversations]
    system = next((v for r, v in turns if r == "system"), spec.system)
    turns = [(r, v) for r, v in turns if r != "system"]
    if system is not None and spec.user_text:
        if spec.system_in_first_user and turns and turns[0][0] == "user":
            turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
        elif not spec.system_in_first_user:
            emit(spec.system_turn, system)
    for role, value in turns:
        if role == "user":
            emit(spec.user_turn, value, keep_text=spec.user_text)
            continue
        if IMAGE_MARK in value:
            raise ValueError(f"{IMAGE_MARK} in an assistant reply: {value!r}")
        emit(spec.assistant_prefix)
        emit([CONTENT], value, supervised=True)
        emit(spec.assistant_end, supervised=True)
        emit(spec.assistant_after)
    if add_generation_prompt:
        emit(spec.assistant_prefix)
    return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)


def _role(turn: dict[str, Any]) -> str:
    speaker = turn.get("from", turn.get("role"))
    if speaker not in _ROLES:
        raise ValueError(f"unknown speaker {speaker!r}; expected one of {sorted(_ROLES)}")
    return _ROLES[speaker]
