"""Tokenizers: `open_tokenizer` picks the backend a path holds (SentencePiece or HF
`tokenizers`), and SentencePiece training for `lvlm data train-tokenizer` and the demo."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from data_pipelines.tokenizer_base import (
    IMAGE_MARK,
    MEDIA_MARKS,
    VIDEO_MARK,
    TextTokenizer,
    read_config,
)
from data_pipelines.tokenizer_hf import TOKENIZER_FILE, HFTokenizer
from data_pipelines.tokenizer_sp import MODEL_FILE, SentencePieceTokenizer

__all__ = ["IMAGE_MARK", "MEDIA_MARKS", "VIDEO_MARK", "HFTokenizer", "SentencePieceTokenizer",
           "TextTokenizer", "Tokenizer", "open_tokenizer", "read_corpus", "train_chat_tokenizer",
           "train_corpus_files", "train_tokenizer"]

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


def open_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer at `path`: a `.model` file, or a folder holding only tokenizer.model ->
    SentencePiece; a tokenizer.json file, or a folder holding one -> HF `tokenizers` (a folder
    with both is read as transformers reads it: tokenizer.json). tokenizer_config.json beside
    either gives the special tokens and the chat template."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path} (give a SentencePiece .model, a "
                                "tokenizer.json or a checkpoint folder holding one)")
    folder = path if path.is_dir() else path.parent
    if path.is_dir() and (path / TOKENIZER_FILE).is_file():
        path = path / TOKENIZER_FILE
    elif path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(str(path), read_config(folder), path=str(path))
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer(str(path), read_config(folder), path=str(path))
    raise ValueError(
        f"{path} is not a tokenizer this framework reads: give a SentencePiece .model, a "
        f"tokenizer.json, or a folder holding {MODEL_FILE} or {TOKENIZER_FILE} (for another "
        "format, `AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)` in transformers "
        f"writes {TOKENIZER_FILE})")


Tokenizer = open_tokenizer  # the name from when SentencePiece was the only backend
