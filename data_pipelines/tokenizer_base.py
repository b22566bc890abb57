"""What every tokenizer backend offers, the media marks added to tokenizers that lack them, and
the checkpoint files (tokenizer_config.json, chat template) both backends read."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

IMAGE_MARK = "<image>"
VIDEO_MARK = "<video>"
# Appended, in this order, to a checkpoint's tokenizer that lacks them, as transformers'
# `add_special_tokens({"additional_special_tokens": [...]})` does: existing ids never move.
MEDIA_MARKS = (IMAGE_MARK, VIDEO_MARK)
# transformers' SPECIAL_TOKENS_ATTRIBUTES order: a named token missing from the vocabulary is
# appended in this order before any extra special token.
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@runtime_checkable
class TextTokenizer(Protocol):
    """A tokenizer as the pipeline, the templates and generation use it.

    Ids of absent specials are None (a Qwen2 tokenizer has no bos, a Llama-3 one no unk);
    `pad_id` always has a value (see each backend for its fallback). `special_tokens_in_text`
    says whether special-token strings in a text encode to their ids, as transformers does; then
    a rendered conversation is tokenized as one string (templates.render).
    """

    path: str
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    unk_id: int | None
    image_id: int
    video_id: int
    add_bos: bool  # whether the checkpoint's tokenizer starts a text with bos
    chat_template: str | None
    special_tokens_in_text: bool

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...
    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def id_to_piece(self, piece_id: int) -> str: ...
    def added_tokens(self) -> dict[str, int]: ...
    def save(self, directory: str | os.PathLike) -> str: ...


def token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} or null."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json (older checkpoints name their special
    tokens only there); {} when the folder has neither."""
    config: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_MAP_FILE, CONFIG_FILE):
        path = Path(directory) / name
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                config.update(json.load(f))
    return config


def read_chat_template(directory: str | os.PathLike, config: Mapping[str, Any]) -> str | None:
    """The chat template a checkpoint ships: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the "default" one)."""
    path = Path(directory) / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def extra_specials(config: Mapping[str, Any]) -> list[str]:
    """The config's extra special tokens (`extra_special_tokens` in transformers 5,
    `additional_special_tokens` before)."""
    values = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(values, Mapping):  # transformers 5 may name them: {"image_token": "<image>"}
        values = list(values.values())
    return [t for t in (token_text(v) for v in values) if t]


def named_specials(config: Mapping[str, Any]) -> dict[str, str]:
    """{"bos_token": "<s>", ...}: the special tokens the config names."""
    named = {key: token_text(config.get(key)) for key in NAMED_SPECIALS}
    return {key: value for key, value in named.items() if value}


def added_token_entry(content: str, special: bool = True, normalized: bool = False,
                      lstrip: bool = False, rstrip: bool = False, single_word: bool = False
                      ) -> dict[str, Any]:
    """One added token as tokenizer_config.json's added_tokens_decoder lists it."""
    return {"content": content, "lstrip": lstrip, "normalized": normalized, "rstrip": rstrip,
            "single_word": single_word, "special": special}


def write_config(directory: str | os.PathLike, config: Mapping[str, Any],
                 added: Mapping[int, Mapping[str, Any]]) -> None:
    """tokenizer_config.json of a saved tokenizer: the checkpoint's, its added_tokens_decoder
    listing every added token at its id (transformers' classes that rebuild the tokenizer from
    the vocabulary, as Qwen2Tokenizer does, take the added tokens' ids from there)."""
    config = dict(config)
    decoder = dict(config.get("added_tokens_decoder") or {})
    decoder.update({str(token_id): dict(entry) for token_id, entry in added.items()})
    if decoder:
        config["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda x: int(x[0])))
    with open(Path(directory) / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
