"""Tests of the SentencePiece tokenizer: training on the synthetic corpus, ids, round trips."""

import numpy as np
import pytest

from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return SyntheticShapes().corpus(200)


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory) -> Tokenizer:
    prefix = tmp_path_factory.mktemp("spm") / "shapes"
    return Tokenizer(train_tokenizer(corpus, str(prefix), vocab_size=256))


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert tokenizer.id_to_piece(1) == "<unk>"
    ids = tokenizer.encode("red", add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.encode("red") == ids[1:-1]


def test_image_mark_is_one_token(tokenizer):
    ids = tokenizer.encode("<image>\nwhat color is the circle?")
    assert ids.count(tokenizer.image_id) == 1
    assert tokenizer.id_to_piece(tokenizer.image_id) == "<image>"
    assert tokenizer.encode("<image><image>").count(tokenizer.image_id) == 2


def test_encode_decode_roundtrip(tokenizer):
    ds = SyntheticShapes(split="eval")  # texts the tokenizer was not trained on
    texts = [ds.caption(i)["caption"] for i in range(20)]
    texts += [ds.vqa(i)["question"] for i in range(20)] + [ds.preference(0)["rejected"]]
    for text in texts:
        ids = tokenizer.encode(text)
        assert 1 not in ids  # the closed vocabulary never needs <unk>
        assert tokenizer.decode(ids) == text
    # Newlines fold into spaces under the default normalization.
    assert tokenizer.decode(tokenizer.encode("<image>\nis there a red circle?")) == (
        "<image> is there a red circle?"
    )


def test_decode_skips_pad_and_special_tokens(tokenizer):
    ids = tokenizer.encode("a blue square at top left.", add_bos=True, add_eos=True)
    padded = np.array(ids + [tokenizer.pad_id] * 5, dtype=np.int32)
    assert tokenizer.decode(padded) == "a blue square at top left."


def test_common_words_are_single_tokens(tokenizer):
    # A tiny model learns faster when each answer word is one token.
    for word in ["red", "circle", "yes", "no", "2"]:
        assert len(tokenizer.encode(word)) == 1, word


def test_training_is_deterministic(corpus, tmp_path):
    a = Tokenizer(train_tokenizer(corpus, str(tmp_path / "a"), vocab_size=128))
    b = Tokenizer(train_tokenizer(corpus, str(tmp_path / "b"), vocab_size=128))
    # Compare vocabularies, not files: the file also records its own output path.
    assert a.vocab_size == b.vocab_size
    assert [a.id_to_piece(i) for i in range(a.vocab_size)] == [
        b.id_to_piece(i) for i in range(b.vocab_size)
    ]


def test_tiny_corpus_yields_a_smaller_vocab(tmp_path):
    lines = ["a red circle.", "a blue square.", "yes", "no"]
    tokenizer = Tokenizer(train_tokenizer(lines, str(tmp_path / "sub" / "tiny"), vocab_size=1000))
    assert tokenizer.vocab_size < 1000
    assert tokenizer.decode(tokenizer.encode("a red square.")) == "a red square."


def test_newlines_can_be_kept_as_a_token(corpus, tmp_path):
    symbols = ("<image>", "\n")
    tokenizer = Tokenizer(train_tokenizer(corpus, str(tmp_path / "nl"), 256, "bpe", symbols))
    text = "<image>\nhow many shapes are there?"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_missing_model_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(str(missing))


def test_train_tokenizer_command_makes_template_markers_single_pieces(corpus, tmp_path, capsys):
    from data_pipelines.templates import SPECIAL_MARKERS, render
    from lvlm_jax import cli

    (tmp_path / "a.txt").write_text("\n".join(corpus[:100]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(corpus[100:]) + "\n\nthe quick brown fox.\n")
    prefix = tmp_path / "out" / "chat"
    rc = cli.main(["data", "train-tokenizer", f"--input={tmp_path / 'a.txt'},{tmp_path / 'b.txt'}",
                   "--vocab_size=300", f"--out={prefix}"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == f"{prefix}.model"
    tokenizer = Tokenizer(f"{prefix}.model")
    assert tokenizer.vocab_size <= 300
    assert tokenizer.id_to_piece(tokenizer.image_id) == "<image>"
    for marker in SPECIAL_MARKERS:
        assert tokenizer.id_to_piece(tokenizer.piece_to_id(marker)) == marker
    for text in ["the quick brown fox.", corpus[150], "a red circle and a blue square."]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    turns = [{"from": "human", "value": "<image>\nwhat color is the circle?"},
             {"from": "gpt", "value": "red."}]
    for template in ["vicuna_v1", "llama3", "gemma", "chatml"]:
        ids, _ = render(template, turns, tokenizer, image_tokens=3)
        assert 1 not in ids.tolist(), template  # no <unk>: template words were in the corpus


def test_demo_tokenizer_is_the_train_tokenizer_recipe_on_the_synthetic_corpus(tmp_path):
    from data_pipelines.loader import DEMO_VOCAB_SIZE, demo_tokenizer
    from data_pipelines.templates import SPECIAL_MARKERS, template_texts

    demo = demo_tokenizer(tmp_path)
    # The recipe spelled out: the cached demo_tokenizer_v2 models must stay valid.
    lines = SyntheticShapes(seed=0).corpus(500) + template_texts()
    spelled = Tokenizer(train_tokenizer(lines, str(tmp_path / "spelled"), DEMO_VOCAB_SIZE,
                                        user_defined_symbols=("<image>", *SPECIAL_MARKERS)))
    assert [demo.id_to_piece(i) for i in range(demo.vocab_size)] == [
        spelled.id_to_piece(i) for i in range(spelled.vocab_size)]


def test_train_tokenizer_command_bad_input_fails_with_one_line(tmp_path, capsys):
    from lvlm_jax import cli

    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "small.txt").write_text("a red circle.\nthe quick brown fox.\n")
    for args, message in [
        ([f"--input={tmp_path / 'nope.txt'}", "--vocab_size=100"], "not found: "),
        ([f"--input={tmp_path / 'blank.txt'}", "--vocab_size=100"], "holds no text"),
        ([f"--input={tmp_path / 'small.txt'}", "--vocab_size=5"], "Vocabulary size is smaller"),
        ([f"--input={tmp_path / 'small.txt'}", "--vocab_size=0"], "vocab_size must be >= 1"),
    ]:
        rc = cli.main(["data", "train-tokenizer", *args, f"--out={tmp_path / 'o'}"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and message in lines[0], lines
