"""Weighted mixtures: examples come in proportion to the weights, weight 0 never reads its source,
each source keeps its own record kind, bad records are skipped and counted as from one source,
and the pipeline is deterministic and resumes exactly."""

import itertools

import grain
import numpy as np
import pytest

from data_pipelines.loader import SyntheticSource, demo_tokenizer, make_dataset
from data_pipelines.mixture import (
    make_mixture_dataset,
    mix,
    open_mixture,
    parse_mixture,
)
from data_pipelines.skips import skip_counts

BATCH, SEQ, SIZE, TOKENS = 8, 64, 16, 4


class Untouchable:
    """A source that fails the test if anything reads it."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        raise AssertionError("a weight-0 source was read")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _pipeline(tokenizer, weights=(0.75, 0.25, 0.0), seed=0):
    parts = [(SyntheticSource("caption", 40, image_size=SIZE), "caption", weights[0]),
             (SyntheticSource("conversation", 40, image_size=SIZE), "conversation", weights[1]),
             (Untouchable(), "conversation", weights[2])]
    return make_mixture_dataset(
        parts, tokenizer=tokenizer, template="vicuna_v1", seq_len=SEQ, image_size=SIZE,
        image_tokens=TOKENS, batch_size=BATCH, seed=seed,
        read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def test_mix_counts_match_the_weights_exactly_and_weight_zero_never_appears():
    a = grain.MapDataset.range(10).map(lambda i: ("a", i)).repeat(None)
    b = grain.MapDataset.range(7).map(lambda i: ("b", i)).repeat(None)
    c = grain.MapDataset.range(5).map(lambda i: ("c", i)).repeat(None)
    for weights in [(0.7, 0.3, 0.0), (1.0, 2.0, 1.0), (0.0, 5.0, 0.0)]:
        mixed = mix([a, b, c], weights)
        n = 1200
        names = [mixed[i][0] for i in range(n)]
        total = sum(weights)
        for name, w in zip("abc", weights, strict=True):
            assert abs(names.count(name) - n * w / total) <= 1, (weights, name)
    # Within a source, records keep their order (here the source's repeat).
    mixed = mix([a, b], (0.5, 0.5))
    from_b = [mixed[i][1] for i in range(40) if mixed[i][0] == "b"]
    assert len(from_b) == 20 and from_b == [i % 7 for i in range(20)]


def test_pipeline_draws_each_kind_in_proportion_with_its_own_template(tokenizer):
    batches = list(itertools.islice(iter(_pipeline(tokenizer)), 25))
    ids = np.concatenate([b["input_ids"] for b in batches])
    # Caption records use the plain template (the image block right after BOS), conversations
    # the Vicuna system prompt.
    is_caption = ids[:, 1] == tokenizer.image_id
    assert len(ids) == 200
    assert int(is_caption.sum()) == 150
    system = ids[~is_caption]
    assert np.all(system[:, 1] == system[0, 1]) and system[0, 1] != tokenizer.image_id


def test_pipeline_is_deterministic_and_resumes_from_its_state(tokenizer):
    first = list(itertools.islice(iter(_pipeline(tokenizer)), 4))
    it = iter(_pipeline(tokenizer))
    for _ in range(2):
        next(it)
    state = it.get_state()
    resumed = iter(_pipeline(tokenizer))
    resumed.set_state(state)
    for want in first[2:]:
        got = next(resumed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    other = next(iter(_pipeline(tokenizer, seed=1)))
    assert not np.array_equal(other["input_ids"], first[0]["input_ids"])


def test_bad_mixtures_fail_naming_the_entry(tmp_path):
    for mixture, message in [
        ((("synthetic", 1.0), ("nowhere:x", 1.0)), "'nowhere:x' names no source"),
        ((("synthetic:pictures", 1.0),), "unknown kind 'pictures'"),
        ((("synthetic", -0.5),), "must be a finite number >= 0"),
        ((("synthetic", 0.0),), "needs an entry of weight > 0"),
        ((("arrayrecord", 1.0),), "needs a DIR"),
        (("synthetic",), r"\(SPEC, WEIGHT\) pairs"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_mixture(mixture)
    entries = parse_mixture([("synthetic:caption", 1), ("path:/no/such/dir", 0.0)])
    assert [(e.source, e.arg, e.weight) for e in entries] == [
        ("synthetic", "caption", 1.0), ("arrayrecord", "/no/such/dir", 0.0)]
    opened = open_mixture(entries, split="train", default_kind="conversation", num_examples=8,
                          seed=0, image_size=SIZE)  # the weight-0 directory is never opened
    assert [(kind, w) for _, kind, w in opened] == [("caption", 1.0)]
    with pytest.raises(FileNotFoundError, match="entry 'arrayrecord:/no/such/dir'"):
        open_mixture(parse_mixture([("path:/no/such/dir", 1.0)]), split="train",
                     default_kind="conversation", num_examples=8, seed=0, image_size=SIZE)


def test_training_input_reads_the_configured_mixture(tmp_path, monkeypatch):
    from training_utils import tiny_config

    from lvlm_jax.train import input_pipeline

    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    cfg = tiny_config(batch=BATCH, seq=SEQ)
    cfg.model.language.vocab_size = 512
    cfg.model.image_token_id = -1
    cfg.data.num_examples = 24
    cfg.data.mixture = (("synthetic:caption", 1.0), ("synthetic:conversation", 3.0),
                        ("arrayrecord:/no/such/dir", 0.0))
    batches, model_cfg, size = input_pipeline.make_input(cfg)
    assert size == 48
    ids = np.concatenate([next(batches)["input_ids"] for _ in range(4)])
    assert int((ids[:, 1] == model_cfg.image_token_id).sum()) == 8  # a quarter are captions


def test_a_bad_record_in_a_mixture_is_skipped_and_counted_as_in_a_single_source(tokenizer):
    records = [SyntheticSource("conversation", 12, image_size=SIZE)[i] for i in range(12)]
    records[5] = dict(records[5], id="broken", images=[b"not an image"])
    kwargs = dict(tokenizer=tokenizer, template="vicuna_v1", seq_len=SEQ, image_size=SIZE,
                  image_tokens=TOKENS, batch_size=2, seed=0, shuffle=False, num_epochs=1,
                  read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    single = iter(make_dataset(records, kind="conversation", **kwargs))
    single_batches = list(single)
    mixed = iter(make_mixture_dataset([(records, "conversation", 1.0)], **kwargs))
    mixed_batches = list(mixed)
    assert skip_counts(single.get_state()) == skip_counts(mixed.get_state()) == (12, 1)
    assert len(single_batches) == len(mixed_batches) == 5  # the 11 good records, in pairs
    for want, got in zip(single_batches, mixed_batches, strict=True):
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # Beside a clean source, the bad record is still the one skip among all records read.
    captions = SyntheticSource("caption", 12, image_size=SIZE)
    both = iter(make_mixture_dataset(
        [(records, "conversation", 1.0), (captions, "caption", 1.0)], **kwargs))
    assert sum(len(b["input_ids"]) for b in both) == 22  # 24 read, one skipped, 23 -> 11 pairs
    # Iteration ends when a row's lane runs out: the lane with the bad record does, after its
    # 12 positions, before the other lane's last record is read.
    assert skip_counts(both.get_state()) == (23, 1)
