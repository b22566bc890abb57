"""The HF `tokenizers` backend: a checkpoint's tokenizer.json (Llama-3, Qwen2, Mistral, ...) with
the special tokens of its tokenizer_config.json and the chat template it ships.

Ids are transformers' (`AutoTokenizer.from_pretrained(dir)`, `add_special_tokens=False`): the
same tokenizer.json runs in the same library, special-token strings in a text are their ids, and
tokens the config names but the vocabulary lacks, then `<image>` and `<video>`, are appended as
special tokens in the order transformers appends them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from data_pipelines.tokenizer_base import (
    CHAT_TEMPLATE_FILE,
    IMAGE_MARK,
    MEDIA_MARKS,
    VIDEO_MARK,
    added_token_entry,
    extra_specials,
    named_specials,
    read_chat_template,
    token_text,
    write_config,
)

TOKENIZER_FILE = "tokenizer.json"


class HFTokenizer:
    """tokenizer.json + tokenizer_config.json. Special ids are the config's bos/eos/unk/pad
    tokens (None where it names none); pad falls back to unk, then eos. Pickled by path: grain
    worker processes reload the files."""

    special_tokens_in_text = True

    def __init__(self, tokenizer_file: str, config: Mapping[str, Any] | None = None,
                 path: str | None = None):
        self.path = str(path or tokenizer_file)
        self.tokenizer_file = str(tokenizer_file)
        self._config = dict(config or {})
        self._tok = Tokenizer.from_file(self.tokenizer_file)
        self._tok.no_padding()
        self._tok.no_truncation()
        before = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        decoder = self._config.get("added_tokens_decoder") or {}
        listed = [token_text(t) for _, t in sorted((int(i), t) for i, t in decoder.items())]
        self._named = named_specials(self._config)
        for token in [*listed, *self._named.values(), *extra_specials(self._config),
                      *MEDIA_MARKS]:
            # As transformers adds them: special, matched on the raw text, never stripped.
            if token and self._tok.token_to_id(token) is None:
                self._tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._added = {t: i for t, i in sorted(vocab.items(), key=lambda x: x[1]) if i >= before}
        self.vocab_size = max(vocab.values()) + 1  # ids may skip some; the embedding covers all
        self.chat_template = read_chat_template(Path(self.tokenizer_file).parent, self._config)
        ids = {key: self._tok.token_to_id(token) for key, token in self._named.items()}
        if ids.get("eos_token") is None:
            raise ValueError(f"{self.path}: tokenizer_config.json names no eos_token that the "
                             "vocabulary has")
        self.bos_id: int | None = ids.get("bos_token")
        self.eos_id: int = ids["eos_token"]
        self.unk_id: int | None = ids.get("unk_token")
        pad = ids.get("pad_token")
        self.pad_id: int = pad if pad is not None else (
            self.unk_id if self.unk_id is not None else self.eos_id)

    def __reduce__(self):
        # By path: a grain worker process reloads the files.
        return HFTokenizer, (self.tokenizer_file, self._config, self.path)

    @property
    def add_bos(self) -> bool:
        """Whether the checkpoint's tokenizer puts bos before a text: the config's
        add_bos_token, else what tokenizer.json's post-processor does."""
        if "add_bos_token" in self._config:
            return bool(self._config["add_bos_token"]) and self.bos_id is not None
        return self.bos_id is not None and self._tok.encode("x").ids[:1] == [self.bos_id]

    @property
    def image_id(self) -> int:
        return self._tok.token_to_id(IMAGE_MARK)

    @property
    def video_id(self) -> int:
        return self._tok.token_to_id(VIDEO_MARK)

    def piece_to_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def id_to_piece(self, piece_id: int) -> str:
        piece = self._tok.id_to_token(int(piece_id))
        if piece is None:
            raise IndexError(f"id {piece_id} is outside the vocabulary of {self.path}")
        return piece

    def added_tokens(self) -> dict[str, int]:
        """The tokens appended to the checkpoint's tokenizer here, with their ids."""
        return dict(self._added)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if add_eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text`."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (no stopping at eos); special tokens and pad decode to nothing."""
        return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id],
                                skip_special_tokens=True)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes tokenizer.json (with the added tokens), tokenizer_config.json and the chat
        template file, if any, to `directory`; loading it gives the same ids, here and in
        transformers."""
        os.makedirs(directory, exist_ok=True)
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))
        write_config(directory, self._config, {
            i: added_token_entry(t.content, t.special, t.normalized, t.lstrip, t.rstrip,
                                 t.single_word)
            for i, t in self._tok.get_added_tokens_decoder().items()})
        template = Path(self.tokenizer_file).parent / CHAT_TEMPLATE_FILE
        if template.is_file():
            shutil.copyfile(template, Path(directory) / CHAT_TEMPLATE_FILE)
        return str(directory)
