"""SentencePiece tokenizers: training one on text lines, and a wrapper with the ids models need."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

IMAGE_MARK = "<image>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train_tokenizer(
    lines: Iterable[str],
    out_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    user_defined_symbols: Sequence[str] = (IMAGE_MARK,),
) -> str:
    """Trains a SentencePiece model on `lines`; returns the path of `{out_prefix}.model`.

    `vocab_size` is an upper bound (a tiny corpus yields fewer pieces). User-defined symbols such
    as `<image>` always encode to one token. The default normalization folds whitespace, newlines
    included, into single spaces; pass "\\n" among `user_defined_symbols` to keep newlines.
    """
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=list(user_defined_symbols),
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        byte_fallback=False,
        character_coverage=1.0,
        hard_vocab_limit=False,
        # One thread and no sampling of the input keep the model a pure function of the lines.
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return f"{out_prefix}.model"


def train_chat_tokenizer(
    lines: Iterable[str], out_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> str:
    """`train_tokenizer` for our chat templates: `<image>` and every template marker are single
    pieces, and the templates' fixed texts join the corpus. The demo tokenizer is made this way."""
    from data_pipelines.templates import SPECIAL_MARKERS, template_texts

    corpus = itertools.chain(lines, template_texts())
    return train_tokenizer(corpus, out_prefix, vocab_size, model_type,
                           user_defined_symbols=(IMAGE_MARK, *SPECIAL_MARKERS))


def read_corpus(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """The non-empty lines of UTF-8 text files, streamed; missing files raise before any is read."""
    if not paths:
        raise ValueError("no corpus files given")
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"corpus file(s) not found: {', '.join(missing)}")

    def lines() -> Iterator[str]:
        for path in paths:
            with open(path, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())

    return lines()


def train_corpus_files(paths: Sequence[str | os.PathLike], out_prefix: str, vocab_size: int,
                       model_type: str = "bpe") -> str:
    """`train_chat_tokenizer` on the lines of text files (`lvlm data train-tokenizer`); returns
    the path of the `.model`."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    lines = read_corpus(paths)
    first = next(lines, None)
    if first is None:
        raise ValueError(f"the corpus {', '.join(map(str, paths))} holds no text")
    try:
        return train_chat_tokenizer(itertools.chain([first], lines), out_prefix, vocab_size,
                                    model_type)
    except RuntimeError as e:  # sentencepiece's own words, e.g. a vocab_size below the needed
        raise ValueError(f"sentencepiece: {str(e).strip().splitlines()[-1]}") from e


class Tokenizer:
    """A trained SentencePiece model with the special ids (pad 0, unk 1, bos 2, eos 3)."""

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(
                f"tokenizer model not found: {self.model_path} "
                "(train one with data_pipelines.tokenizer.train_tokenizer)"
            )
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)

    # Pickled by path, so grain worker processes load their own copy of the model.
    def __getstate__(self) -> dict[str, str]:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def image_id(self) -> int:
        """The id of `<image>`; a model trained without that symbol has none and raises."""
        piece_id = self._sp.piece_to_id(IMAGE_MARK)
        if piece_id == self._sp.unk_id():
            raise ValueError(f"{self.model_path} has no {IMAGE_MARK} token")
        return piece_id

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes all of `ids` (no stopping at eos); pad, bos and eos decode to nothing."""
        return self._sp.decode([int(i) for i in ids if int(i) != self.pad_id])

    def id_to_piece(self, piece_id: int) -> str:
        return self._sp.id_to_piece(int(piece_id))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)
