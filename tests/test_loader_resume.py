"""Resuming the input: an iterator restored from a checkpoint (the Checkpointer's own save of the
grain state) yields exactly the batches the uninterrupted one does, in-process and with grain
worker processes, packed or not; and a training run preempted at step 2 and resumed consumes the
batches of the uninterrupted input."""

import itertools
import json
import os
import signal

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from training_utils import tiny_config

from data_pipelines.loader import SyntheticSource, demo_tokenizer, make_dataset
from lvlm_jax.checkpoints.manager import Checkpointer
from lvlm_jax.train import input_pipeline, loop


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("workers,packing", [(0, "none"), (0, "first_fit"), (2, "first_fit")])
def test_restored_iterator_continues_with_the_uninterrupted_batches(tok, tmp_path, workers,
                                                                    packing):
    def dataset():
        # 40 records, 3 rows a batch: the 8 batches read cross an epoch boundary.
        return make_dataset(
            SyntheticSource("caption", 40, image_size=16), kind="caption", tokenizer=tok,
            template="plain", seq_len=48, image_size=16, image_tokens=4, max_images=2,
            batch_size=3, seed=1, packing=packing, worker_count=workers,
            read_options=grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))

    uninterrupted = iter(dataset())
    expected = list(itertools.islice(uninterrupted, 8))
    if packing == "first_fit":
        assert expected[0]["segment_ids"].max() >= 2  # rows really hold several samples
    interrupted = iter(dataset())
    _assert_batches_equal(list(itertools.islice(interrupted, 5)), expected[:5])
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(5, {"x": jnp.zeros(())}, interrupted)
    ckpt.wait()
    resumed = iter(dataset())  # a new process rebuilds the pipeline, then restores its state
    _, step = ckpt.restore({"x": jnp.zeros(())}, resumed)
    ckpt.close()
    assert step == 5
    _assert_batches_equal(list(itertools.islice(resumed, 3)), expected[5:])
    for it in (uninterrupted, interrupted, resumed):
        if hasattr(it, "close"):
            it.close()  # stops worker processes now rather than at garbage collection


def test_one_worker_yields_the_in_process_batches(tok):
    # One worker stacks its batches straight into shared memory (loader.with_workers).
    def batches(workers):
        it = iter(make_dataset(
            SyntheticSource("conversation", 20, image_size=16), kind="conversation",
            tokenizer=tok, template="vicuna_v1", seq_len=64, image_size=16, image_tokens=4,
            batch_size=3, seed=2, worker_count=workers))
        out = [{k: np.array(v) for k, v in b.items()} for b in itertools.islice(it, 8)]
        if hasattr(it, "close"):
            it.close()
        return out

    in_process, one_worker = batches(0), batches(1)
    assert in_process[0]["pixel_values"].any() and in_process[0]["loss_mask"].any()
    _assert_batches_equal(one_worker, in_process)


class _Record(grain.transforms.Map):
    """Keeps every batch the loop takes; sends this process SIGTERM (preemption) at batch
    `preempt_at`, so the loop saves a checkpoint after that step and stops."""

    def __init__(self, seen: list, preempt_at: int | None):
        self.seen, self.preempt_at = seen, preempt_at

    def map(self, batch):
        self.seen.append({k: np.array(v) for k, v in batch.items()})
        if len(self.seen) == self.preempt_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch


def test_preempted_run_resumes_with_the_uninterrupted_batches(tmp_path, monkeypatch):
    cfg = tiny_config(steps=4, batch=8, **{
        "model.language.vocab_size": 384, "model.image_token_id": -1, "data.kind": "caption",
        "data.num_examples": 24, "data.worker_count": 2, "data.packing": "first_fit",
        "data.seq_len": 48, "data.max_images": 2, "train.log_every": 1})
    _check_preempted_run_resumes(cfg, tmp_path, monkeypatch)


def _check_preempted_run_resumes(cfg, tmp_path, monkeypatch):
    make = input_pipeline.make_dataset
    uninterrupted, _, _ = input_pipeline.make_input(cfg)
    expected = list(itertools.islice(uninterrupted, 4))
    uninterrupted.close()

    def run(seen, preempt_at=None):
        monkeypatch.setattr(input_pipeline, "make_dataset",
                            lambda *a, **k: make(*a, **k).map(_Record(seen, preempt_at)))
        loop.train(cfg, str(tmp_path / "run"), log=lambda msg: None)

    first, second = [], []
    run(first, preempt_at=2)
    assert len(first) == 2  # preempted: stopped after step 2, with a checkpoint
    run(second)
    assert len(second) == 2  # resumed at step 3
    _assert_batches_equal(first + second, expected)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]
    assert all(r["data/skipped"] == 0 for r in logged if "loss" in r)
