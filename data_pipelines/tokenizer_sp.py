"""The SentencePiece backend: a `.model` read with sentencepiece, with the special ids the model
(or the tokenizer_config.json beside it) names.

Two kinds of model come here. One trained for lvlm_jax (`lvlm data train-tokenizer`, the demo's)
has `<image>` as a piece; it is used exactly as sentencepiece encodes it. A checkpoint's model
(Vicuna's, Llama-2's) has no `<image>`: it is encoded as transformers' LlamaTokenizer encodes it,
so ids match HF's: special-token strings in the text are their ids, `<image>` and `<video>` are
appended as special tokens, and only the text at the start gets the "▁" prefix (every segment
after a special token too where the config says `"legacy": true`). That matches models with
identity normalization, as Llama-family ones are.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2, sentencepiece_pb2

from data_pipelines.tokenizer_base import (
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

MODEL_FILE = "tokenizer.model"


class SentencePieceTokenizer:
    """A `.model` file with its special ids; see the module docstring for the two encodings.

    Special ids come from the model, overridden by tokenizer_config.json's bos/eos/unk/pad
    tokens. pad: the model's pad piece, else the config's pad_token, else unk (what LLaVA pads
    Vicuna with), else eos. Pickled by path: grain worker processes reload the files.
    """

    def __init__(self, model_path: str, config: Mapping[str, Any] | None = None,
                 path: str | None = None):
        self.path = str(path or model_path)
        self.model_path = str(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        self.size = self._sp.get_piece_size()
        # Trained for lvlm_jax: sentencepiece's own encoding, bit for bit as the demo needs.
        self.native = self._piece(IMAGE_MARK) is not None
        self.special_tokens_in_text = not self.native
        self._config = {} if self.native else dict(config or {})
        # The model's control pieces are its special tokens unless the config names others.
        self._named = {key: self._sp.id_to_piece(i) for key, i in (
            ("bos_token", self._sp.bos_id()), ("eos_token", self._sp.eos_id()),
            ("unk_token", self._sp.unk_id()), ("pad_token", self._sp.pad_id())) if i >= 0}
        self._named.update(named_specials(self._config))
        self._added: dict[str, int] = {}
        if not self.native:
            self._add_checkpoint_tokens()
            self._add([*self._named.values(), *extra_specials(self._config), *MEDIA_MARKS])
        self._by_id = {i: t for t, i in self._added.items()}
        self.chat_template = (None if self.native else
                              read_chat_template(Path(self.model_path).parent, self._config))
        self._ids = self._special_ids()
        proto = _model_proto(self._sp)
        if self.native:
            self._raw, self._prepend, self._split = self._sp, "never", None
            return
        self._raw = _without_dummy_prefix(proto) or self._sp
        if not proto.normalizer_spec.add_dummy_prefix or (
                self._config.get("add_prefix_space") is False):
            self._prepend = "never"
        else:  # transformers' LlamaTokenizer: legacy=False (its default) prefixes the start only
            self._prepend = "always" if self._config.get("legacy") is True else "first"
        specials = sorted({*self._added, *self._named.values(), *extra_specials(self._config)},
                          key=len, reverse=True)  # the longest match wins, as in transformers
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def __reduce__(self):
        # By path: a grain worker process reloads the model file.
        return SentencePieceTokenizer, (self.model_path, self._config, self.path)

    # ---- ids ---------------------------------------------------------------------------
    def _piece(self, piece: str) -> int | None:
        piece_id = self._sp.piece_to_id(piece)
        return piece_id if self._sp.id_to_piece(piece_id) == piece else None

    def _add_checkpoint_tokens(self) -> None:
        """Tokens a checkpoint added past the model's pieces (tokenizer_config.json's
        added_tokens_decoder, as llava-hf lists <image>): at their ids, which must follow on."""
        decoder = self._config.get("added_tokens_decoder") or {}
        for token_id, token in sorted((int(i), token_text(t)) for i, t in decoder.items()):
            if token_id < self.size or token is None:
                continue
            if token_id != self.size + len(self._added):
                raise ValueError(
                    f"{self.path}: added token {token!r} has id {token_id} but the next free id is "
                    f"{self.size + len(self._added)}; gaps in added_tokens_decoder are not "
                    "supported")
            self._added[token] = token_id

    def _add(self, tokens: Iterable[str]) -> None:
        for token in tokens:
            if self._piece(token) is None and token not in self._added:
                self._added[token] = self.size + len(self._added)

    def _special_ids(self) -> dict[str, int | None]:
        ids = {key: self.piece_to_id(self._named[key]) if key in self._named else None
               for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if ids["pad_token"] is None:
            ids["pad_token"] = ids["eos_token"] if ids["unk_token"] is None else ids["unk_token"]
        if ids["eos_token"] is None:
            raise ValueError(f"{self.path}: the tokenizer has no eos token")
        return ids

    @property
    def vocab_size(self) -> int:
        return self.size + len(self._added)

    @property
    def pad_id(self) -> int:
        return self._ids["pad_token"]

    @property
    def bos_id(self) -> int | None:
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def unk_id(self) -> int | None:
        return self._ids["unk_token"]

    @property
    def add_bos(self) -> bool:
        """Whether the checkpoint's tokenizer puts bos before a text (transformers' default for
        a LlamaTokenizer: yes)."""
        return bool(self._config.get("add_bos_token", True)) and self.bos_id is not None

    @property
    def image_id(self) -> int:
        """The id of `<image>`; a model trained without that symbol has none and raises."""
        return self._mark(IMAGE_MARK)

    @property
    def video_id(self) -> int:
        return self._mark(VIDEO_MARK)

    def _mark(self, mark: str) -> int:
        piece_id = self.piece_to_id(mark)
        if piece_id is None:
            raise ValueError(f"{self.path} has no {mark} token (a model trained by `lvlm data "
                             "train-tokenizer` has only the marks it was trained with)")
        return piece_id

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece or added token; None when the vocabulary lacks it."""
        return self._added[piece] if piece in self._added else self._piece(piece)

    def id_to_piece(self, piece_id: int) -> str:
        piece_id = int(piece_id)
        if 0 <= piece_id < self.size:
            return self._sp.id_to_piece(piece_id)
        if piece_id in self._by_id:
            return self._by_id[piece_id]
        raise IndexError(f"id {piece_id} is outside the vocabulary of {self.path} "
                         f"({self.vocab_size} ids)")

    def added_tokens(self) -> dict[str, int]:
        """The tokens past the model's own pieces, with their ids."""
        return dict(self._added)

    # ---- text --------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if self.native:
            return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)
        ids = self.encode_with_offsets(text)[0]
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if add_eos else [])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text`."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        start = 0
        for i, segment in enumerate(self._split.split(text) if self._split else [text]):
            if segment and i % 2:  # the capture group: a special token
                ids.append(self.piece_to_id(segment))
                spans.append((start, start + len(segment)))
            elif segment:
                self._encode_segment(segment, start, ids, spans)
            start += len(segment)
        return ids, spans

    def _encode_segment(self, segment: str, start: int, ids: list[int],
                        spans: list[tuple[int, int]]) -> None:
        # Metaspace's rule: "▁" goes before a segment that does not start with a space, at the
        # start of the text only ("first") or after every special token too ("always").
        prefix = not self.native and not segment.startswith((" ", "\u2581")) and (
            self._prepend == "always" or (self._prepend == "first" and start == 0))
        proto = sentencepiece_pb2.SentencePieceText()
        proto.ParseFromString(self._raw.encode((" " if prefix else "") + segment,
                                               out_type="serialized_proto"))
        # Surfaces are the characters each piece covers (a byte-fallback character's go to its
        # last byte): their running length is the offset. The added space belongs to no text.
        at = start - (1 if prefix else 0)
        for piece in proto.pieces:
            end = at + len(piece.surface)
            ids.append(piece.id)
            spans.append((max(at, start), max(end, start)))
            at = end

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` (no stopping at eos); pad, bos, eos and added tokens decode to
        nothing."""
        drop = {self.pad_id, self.bos_id, self.eos_id, *self._by_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in drop])

    def save(self, directory: str | os.PathLike) -> str:
        """Writes tokenizer.model and tokenizer_config.json (the checkpoint's, listing the added
        tokens) to `directory`; loading it gives the same ids, here and in transformers."""
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(self.model_path, Path(directory) / MODEL_FILE)
        if not self.native:
            config = dict(self._config)
            if self.chat_template is not None:
                config["chat_template"] = self.chat_template
            config.setdefault("tokenizer_class", "LlamaTokenizer")
            write_config(directory, config, {i: added_token_entry(t)
                                             for t, i in self._added.items()})
        return str(directory)


def _model_proto(sp: spm.SentencePieceProcessor) -> sentencepiece_model_pb2.ModelProto:
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return proto


def _without_dummy_prefix(proto: sentencepiece_model_pb2.ModelProto
                          ) -> spm.SentencePieceProcessor | None:
    """The same model, never adding its "▁" itself (the encoder decides where one goes); None
    when it never does."""
    if not proto.normalizer_spec.add_dummy_prefix:
        return None
    proto = sentencepiece_model_pb2.ModelProto.FromString(proto.SerializeToString())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
