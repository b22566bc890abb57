"""Checkpoint tokenizers, built offline: a Vicuna-style SentencePiece model without <image>, and
Llama-3- and Qwen2-style tokenizer.json folders. Our ids equal transformers', a rendered
conversation equals its text tokenized whole, <image>/<video> get HF's ids, a checkpoint's
embedding grows as HF's resize_token_embeddings grows it, and the trainer runs on each."""

import json
import pickle
import random

import numpy as np
import pytest

from data_pipelines.synthetic import SyntheticShapes
from data_pipelines.templates import (
    TEMPLATES,
    VICUNA_SYSTEM,
    end_of_turn_ids,
    get_template,
    render,
    render_text,
)
from data_pipelines.tokenizer import (
    MEDIA_MARKS,
    HFTokenizer,
    SentencePieceTokenizer,
    open_tokenizer,
)

KINDS = ("vicuna", "llama3", "qwen2")
TEMPLATE = {"vicuna": "vicuna_v1", "llama3": "llama3", "qwen2": "chatml"}
# The published pre-tokenizer patterns: Llama-3 groups up to three digits, Qwen2 splits them.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Chat templates in the checkpoints' layouts (Llama-3-Instruct's, Qwen2's chatml).
LLAMA3_CHAT = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
    " + '<|eot_id|>' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n'"
    " -}}{%- endif -%}")
QWEN2_CHAT = (
    "{%- for m in messages -%}{%- if loop.first and m['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
VARIED = [
    "hello world", "Hello World!", " leading space", "  two leading", "trailing space ",
    "a  b   c    d", "tab\tseparated\tvalues", "\tleading tab", "new\nline", "\n\nleading newlines",
    "end newline\n", "mixed \n\t \n spaces", "Café naïve façade résumé", "e\u0301 combining",
    "Ångström", "数据处理和机器学习", "混合 English 和 中文", "emoji 🎉🚀👍🏽 ok",
    "👨\u200d👩\u200d👧 family", "1234567890", "3.14159 and 2.71828", "year 2024, page 12",
    "x=1+2*3", "<s>", "</s>", "text with <s> inside", "a</s>b", "<unk>", "<image>",
    "<image>\nwhat is this?", "two <image><image> marks", "<video> clip", "<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>", "<|begin_of_text|>x", "<|endoftext|>", "  ", " ", "\n",
    "\t", "!!!", "...", "¿Qué tal?", "Привет, мир!", "こんにちは", "한국어 텍스트", "مرحبا",
    "def f(x):\n    return x*2\n", "{'a': [1, 2]}", "https://example.com/path?q=1",
    "user@example.com", "UPPER lower MiXeD", "don't won't it's", "  \n  ", "a\r\nb",
    "\u00a0nbsp", "zero\u200bwidth", "ﬁ ligature", "ＡＢＣ full width", "a red circle at top left.",
]
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nwhat color is the circle?"},
     {"from": "gpt", "value": "red"},
     {"from": "human", "value": "and the square? Answer in 2 words."},
     {"from": "gpt", "value": "A blue one, 100%."}],
    [{"from": "system", "value": "Réponds en français."},
     {"from": "human", "value": "Combien de formes ? 数据"},
     {"from": "gpt", "value": "Deux: un cercle 🎉 et un carré."}],
    [{"from": "human", "value": "describe <image> and <image> briefly"},
     {"from": "gpt", "value": "two shapes\non two lines"}],
]


def varied_strings(n: int = 200) -> list[str]:
    """The listed cases, then random joins of them with spaces, tabs and newlines between."""
    rng = random.Random(0)
    out = list(VARIED)
    while len(out) < n:
        parts = rng.sample(VARIED, rng.randint(2, 4))
        out.append("".join(p + rng.choice(["", " ", "  ", "\n", "\t"]) for p in parts))
    return out


def _corpus() -> list[str]:
    return SyntheticShapes().corpus(200) + VARIED * 2 + [
        VICUNA_SYSTEM, "USER: ASSISTANT: system user assistant You are a helpful assistant."]


def _sentencepiece_dir(path) -> str:
    """A Vicuna/Llama-2-style model (BPE, byte fallback, identity normalization, digits split,
    <unk> <s> </s> at 0-2, no pad, no <image>) with Vicuna's tokenizer_config.json."""
    import sentencepiece as spm

    path.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_prefix=str(path / "tokenizer"), vocab_size=1000,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        pad_id=-1, unk_id=0, bos_id=1, eos_id=2, num_threads=1, shuffle_input_sentence=False,
        hard_vocab_limit=False, minloglevel=2)
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "legacy": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None}))
    return str(path)


def _byte_level_dir(path, split: str, specials: list[str], nfc: bool, config: dict,
                    chat_file: str | None = None) -> str:
    """A byte-level BPE trained on the corpus, its special tokens appended after the merges (as
    the checkpoints have them), saved with tokenizer_config.json."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    path.mkdir()
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.normalizer = normalizers.NFC() if nfc else None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_special_tokens(specials)
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos = config.get("bos_token")
    tok.post_processor = byte_level if bos is None else processors.Sequence([
        byte_level, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(path / "tokenizer.json"))
    config["added_tokens_decoder"] = {  # as the checkpoints list them
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in tok.get_added_tokens_decoder().items()}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_file is not None:
        (path / "chat_template.jinja").write_text(chat_file)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("checkpoint_tokenizers")
    return {
        "vicuna": _sentencepiece_dir(root / "vicuna"),
        "llama3": _byte_level_dir(
            root / "llama3", LLAMA3_SPLIT, LLAMA3_SPECIALS, nfc=False, config={
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>", "chat_template": LLAMA3_CHAT,
                "clean_up_tokenization_spaces": True}),
        "qwen2": _byte_level_dir(
            root / "qwen2", QWEN2_SPLIT, QWEN2_SPECIALS, nfc=True, config={
                "tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
                "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                "add_prefix_space": False, "errors": "replace"}, chat_file=QWEN2_CHAT),
    }


@pytest.fixture(scope="session")
def ours(tokenizer_dirs):
    return {kind: open_tokenizer(path) for kind, path in tokenizer_dirs.items()}


def _transformers(path, how: str = "special_tokens"):
    """transformers' tokenizer of the folder, with <image> and <video> added one of two ways."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if how == "special_tokens":
        tok.add_special_tokens({"additional_special_tokens": list(MEDIA_MARKS)})
    elif how == "add_tokens":
        tok.add_tokens(list(MEDIA_MARKS), special_tokens=True)
    return tok


@pytest.fixture(scope="session")
def theirs(tokenizer_dirs):
    return {kind: _transformers(path) for kind, path in tokenizer_dirs.items()}


def test_the_loader_picks_the_backend_from_the_path(tokenizer_dirs, tmp_path):
    import shutil

    sp, llama3 = tokenizer_dirs["vicuna"], tokenizer_dirs["llama3"]
    assert isinstance(open_tokenizer(sp), SentencePieceTokenizer)
    assert isinstance(open_tokenizer(f"{sp}/tokenizer.model"), SentencePieceTokenizer)
    assert isinstance(open_tokenizer(llama3), HFTokenizer)
    assert isinstance(open_tokenizer(f"{llama3}/tokenizer.json"), HFTokenizer)
    both = tmp_path / "both"  # as Llama-2 and Mistral ship: transformers reads tokenizer.json
    shutil.copytree(llama3, both)
    shutil.copyfile(f"{sp}/tokenizer.model", both / "tokenizer.model")
    assert isinstance(open_tokenizer(both), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="nope"):
        open_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("a\n")
    for bad in (tmp_path / "vocab.txt", tmp_path):
        with pytest.raises(ValueError, match="tokenizer.json"):
            open_tokenizer(bad)


def test_special_ids_and_chat_template_come_from_the_checkpoint(ours):
    sp, llama3, qwen2 = ours["vicuna"], ours["llama3"], ours["qwen2"]
    # Vicuna has no pad: unk pads it (LLaVA's choice); Llama-3 has no unk: eos pads it.
    assert (sp.bos_id, sp.eos_id, sp.unk_id, sp.pad_id, sp.add_bos) == (1, 2, 0, 0, True)
    assert sp.chat_template is None
    ids = {t: llama3.piece_to_id(t) for t in LLAMA3_SPECIALS}
    assert (llama3.bos_id, llama3.eos_id, llama3.unk_id, llama3.pad_id, llama3.add_bos) == (
        ids["<|begin_of_text|>"], ids["<|eot_id|>"], None, ids["<|eot_id|>"], True)
    assert llama3.chat_template == LLAMA3_CHAT
    assert (qwen2.bos_id, qwen2.eos_id, qwen2.unk_id, qwen2.pad_id, qwen2.add_bos) == (
        None, qwen2.piece_to_id("<|im_end|>"), None, qwen2.piece_to_id("<|endoftext|>"), False)
    assert qwen2.chat_template == QWEN2_CHAT
    assert sp.piece_to_id("<nope>") is None and llama3.piece_to_id("<nope>") is None


@pytest.mark.parametrize("kind", KINDS)
def test_ids_equal_transformers_on_200_varied_strings(kind, ours, theirs):
    tok, hf = ours[kind], theirs[kind]
    strings = varied_strings()
    assert len(set(strings)) == 200
    for text in strings:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
    # bos only where asked, as `add_special_tokens=True` puts it for a checkpoint with one.
    assert tok.encode("hi", add_bos=True) == hf.encode("hi", add_special_tokens=True)


@pytest.mark.parametrize("kind", KINDS)
def test_media_marks_are_appended_with_transformers_ids(kind, ours, theirs, tokenizer_dirs):
    tok, hf = ours[kind], theirs[kind]
    other = _transformers(tokenizer_dirs[kind], "add_tokens")
    before = len(_transformers(tokenizer_dirs[kind], "none"))
    assert (tok.image_id, tok.video_id) == (before, before + 1)  # after the last id
    for t in (hf, other):
        assert [tok.image_id, tok.video_id] == t.convert_tokens_to_ids(list(MEDIA_MARKS))
        assert tok.vocab_size == len(t)
    assert tok.added_tokens() == {"<image>": before, "<video>": before + 1}
    assert tok.encode("<image>" * 3)[1:] == [tok.image_id] * 2
    assert tok.decode([*tok.encode("a red circle"), tok.image_id]) == "a red circle"


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_conversations_are_the_whole_text_tokenized(kind, ours, theirs):
    tok, hf = ours[kind], theirs[kind]
    for template in sorted(TEMPLATES):
        for turns in CONVERSATIONS:
            for prompt in (False, True):
                ids, mask = render(template, turns, tok, 3, add_generation_prompt=prompt)
                text = render_text(template, turns, tok, 3, add_generation_prompt=prompt)
                bos = [tok.bos_id] if get_template(template).bos and tok.bos_id is not None else []
                assert ids.tolist() == bos + hf.encode(text, add_special_tokens=False), (
                    template, text)
                assert ids.tolist().count(tok.image_id) == text.count("<image>")


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])
def test_render_equals_the_chat_template_the_checkpoint_ships(kind, ours, theirs):
    tok, hf = ours[kind], theirs[kind]
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for turns in CONVERSATIONS:
        messages = [{"role": roles[t["from"]], "content": t["value"]} for t in turns]
        for prompt in (False, True):
            shipped = hf.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=prompt)
            ours_text = render_text(TEMPLATE[kind], turns, tok, 1, add_generation_prompt=prompt)
            bos = hf.bos_token if get_template(TEMPLATE[kind]).bos else ""
            assert shipped == bos + ours_text
            ids, _ = render(TEMPLATE[kind], turns, tok, 1, add_generation_prompt=prompt)
            assert ids.tolist() == hf(shipped, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_loss_mask_is_each_reply_and_its_end_of_turn(kind, ours):
    tok, template = ours[kind], TEMPLATE[kind]
    sep = get_template(template).sep
    eot = end_of_turn_ids(template, tok)
    for turns in CONVERSATIONS:
        ids, mask = render(template, turns, tok, 3)
        replies = [t["value"] for t in turns if t["from"] == "gpt"]
        assert ids[mask].tolist() == [i for r in replies for i in tok.encode(sep + r) + eot]
        assert not mask[ids == tok.image_id].any()


@pytest.mark.parametrize("kind", KINDS)
def test_pickled_and_saved_tokenizers_keep_their_ids(kind, ours, tmp_path):
    from transformers import AutoTokenizer

    tok = ours[kind]
    texts = varied_strings(40)
    again = pickle.loads(pickle.dumps(tok))
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    saved = open_tokenizer(tok.save(tmp_path / "tokenizer"))
    assert type(saved) is type(tok)
    assert (saved.image_id, saved.video_id, saved.vocab_size, saved.pad_id, saved.eos_id,
            saved.chat_template) == (tok.image_id, tok.video_id, tok.vocab_size, tok.pad_id,
                                     tok.eos_id, tok.chat_template)
    assert [saved.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    hf = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")  # nothing left to add
    assert len(hf) == tok.vocab_size
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == [
        tok.encode(t) for t in texts]


def _tiny_hf_llama(vocab_size: int):
    """A random HF Llama with the LM shapes of experiments/llava15.py:tiny."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512))


def test_a_checkpoints_embedding_grows_as_transformers_resize_token_embeddings(ours):
    from lvlm_jax.checkpoints.partial import merge_params

    tok = ours["vicuna"]
    rows, vocab = tok.size, tok.vocab_size  # the .model's pieces; with <image>, <video>
    hf = _tiny_hf_llama(rows)
    embedding = hf.get_input_embeddings().weight.detach().numpy().copy()
    head = hf.get_output_embeddings().weight.detach().numpy().copy()  # [vocab, embed]
    loaded = {"decoder": {"embed_tokens": {"embedding": embedding}, "lm_head": {"kernel": head.T}}}
    own = {"decoder": {"embed_tokens": {"embedding": np.zeros((vocab, 64), np.float32)},
                       "lm_head": {"kernel": np.zeros((64, vocab), np.float32)}}}
    merged, report = merge_params(own, loaded)
    assert (f"grew to the model's vocabulary: decoder/embed_tokens/embedding ({rows}, 64) -> "
            f"({vocab}, 64), decoder/lm_head/kernel (64, {rows}) -> (64, {vocab})") in report
    hf.resize_token_embeddings(vocab)  # transformers' default: mean_resizing=True
    grown_embedding = np.asarray(merged["decoder"]["embed_tokens"]["embedding"])
    grown_head = np.asarray(merged["decoder"]["lm_head"]["kernel"]).T
    for grown, old, resized in (
            (grown_embedding, embedding, hf.get_input_embeddings().weight),
            (grown_head, head, hf.get_output_embeddings().weight)):
        resized = resized.detach().numpy()
        np.testing.assert_array_equal(grown[:rows], old)  # existing ids never move
        # New rows: the old rows' mean, perturbed by ~3e-5 of their spread (1e-9 covariance).
        np.testing.assert_allclose(grown[rows:], resized[rows:], atol=1e-5)
        np.testing.assert_allclose(grown[rows:], np.broadcast_to(old.mean(0), (2, 64)),
                                   atol=1e-5)
        assert np.abs(old.mean(0)).max() < 0.01 < np.abs(old).max()  # not the old rows' scale
    with pytest.raises(ValueError, match="set model.language.vocab_size to at least"):
        merge_params({"decoder": {"embed_tokens": {"embedding": np.zeros((rows - 1, 64))}}},
                     loaded)


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory, ours) -> str:
    """`lvlm import` of an HF Llama with a row per piece of the SentencePiece model (as Vicuna's
    32000 are its tokenizer.model's): a checkpoint for init_from whose embedding must grow."""
    from lvlm_jax import cli

    root = tmp_path_factory.mktemp("hf_llama")
    _tiny_hf_llama(ours["vicuna"].size).save_pretrained(root / "hf")
    assert cli.main(["import", f"--hf={root / 'hf'}", f"--out={root / 'imported'}"]) == 0
    return str(root / "imported")


@pytest.mark.parametrize("kind", KINDS)
def test_the_trainer_runs_on_each_checkpoint_tokenizer(kind, tokenizer_dirs, ours, tmp_path,
                                                       capsys, request):
    from lvlm_jax import cli

    workdir = tmp_path / "run"
    args = ["train", "--config=experiments/llava15.py:tiny", f"--workdir={workdir}",
            f"--config.data.tokenizer={tokenizer_dirs[kind]}",
            f"--config.data.template={TEMPLATE[kind]}", "--config.train.total_steps=3",
            "--config.train.log_every=1", "--config.train.progress=false",
            "--config.data.batch_size=8", "--config.data.num_examples=64"]
    tok = ours[kind]
    if kind == "vicuna":  # as llava15:7b: the config's and the checkpoint's vocab, the .model's
        args += [f"--config.checkpoint.init_from={request.getfixturevalue('imported_llama')}",
                 f"--config.model.language.vocab_size={tok.size}"]
    assert cli.main(args) == 0
    log = capsys.readouterr().out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] or losses[-1] < np.log(tok.vocab_size) + 1, losses
    vocab = json.loads((workdir / "vocab.json").read_text())
    assert vocab["added_tokens"] == {"<image>": tok.image_id, "<video>": tok.video_id}
    assert vocab["model_vocab_size"] == max(tok.vocab_size, vocab["config_vocab_size"])
    saved = open_tokenizer(workdir / "tokenizer")  # what generate and eval read
    assert saved.image_id == tok.image_id and saved.encode(VARIED[12]) == tok.encode(VARIED[12])
    if kind == "vicuna":
        assert vocab["init_from"]["new_rows"] == [tok.size, tok.size + 2]
        assert (f"decoder/embed_tokens/embedding ({tok.size}, 64) -> ({tok.size + 2}, 64)"
                in log)
