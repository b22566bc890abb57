"""The training core: sharded steps equal single-device steps, freezing, gradient accumulation,
non-finite guards, and one-line errors for bad meshes, batches and config keys."""

import itertools

import jax
import numpy as np
import pytest
from training_utils import random_batches, tiny_config

from lvlm_jax import config as config_lib
from lvlm_jax.param_paths import flat_paths
from lvlm_jax.train import loop

MESHES = {
    "data=8": {"data": 8},
    "fsdp=8": {"fsdp": 8},
    "fsdp=4,tensor=2": {"fsdp": 4, "tensor": 2},
    "data=2,fsdp=2,tensor=2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def with_mesh(cfg, ici):
    cfg.mesh.ici = {a: ici.get(a, 1) for a in ("data", "fsdp", "tensor", "sequence")}
    return cfg


def losses_of(cfg, devices=None, steps=5, seed=0):
    setup = loop.build(cfg, devices=devices)
    _, history = loop.run_steps(setup, random_batches(cfg, seed), steps)
    return np.array([h["loss"] for h in history]), setup


@pytest.fixture(scope="module")
def single_device_losses():
    cfg = with_mesh(tiny_config(**{"optimizer.learning_rate": 1e-3}), {"fsdp": 1})
    losses, _ = losses_of(cfg, devices=jax.devices()[:1])
    return losses


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_losses_equal_single_device_losses(name, single_device_losses):
    cfg = with_mesh(tiny_config(**{"optimizer.learning_rate": 1e-3}), MESHES[name])
    losses, setup = losses_of(cfg)
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
    assert len(set(losses.round(6))) > 1  # the model is actually training
    # The state really is distributed: some parameter is split across devices.
    if name != "data=8":
        specs = [s.spec for s in jax.tree.leaves(setup.state_shardings.params)]
        assert any(any(a is not None for a in spec) for spec in specs)
        emb = setup.state.params["decoder"]["embed_tokens"]["embedding"]
        assert len({str(s.index) for s in emb.addressable_shards}) > 1


def test_frozen_params_are_bitwise_unchanged_and_hold_no_optimizer_state():
    cfg = tiny_config(stage="sft", **{"optimizer.weight_decay": 0.1})
    setup = loop.build(cfg)
    before = jax.device_get(setup.state.params)
    state, _ = loop.run_steps(setup, random_batches(cfg), 3)
    after = jax.device_get(state.params)
    flat_before, flat_after = flat_paths(before), flat_paths(after)
    vision = [p for p in flat_before if p.startswith("vision/")]
    assert vision
    for p in vision:
        assert np.array_equal(flat_before[p], flat_after[p]), p
        assert flat_before[p].tobytes() == flat_after[p].tobytes(), p
    assert not np.array_equal(flat_before["connector/linear_1/kernel"],
                              flat_after["connector/linear_1/kernel"])
    # No optimizer state anywhere carries a vision path.
    opt_paths = flat_paths(jax.device_get(state.opt_state))
    assert not [p for p in opt_paths if "vision/" in p]
    assert [p for p in opt_paths if "connector/" in p]


def test_pretrain_trains_only_the_connector_by_default():
    cfg = tiny_config(stage="pretrain")
    setup = loop.build(cfg)
    before = flat_paths(jax.device_get(setup.state.params))
    state, _ = loop.run_steps(setup, random_batches(cfg), 2)
    after = flat_paths(jax.device_get(state.params))
    changed = {p.split("/")[0] for p in before if not np.array_equal(before[p], after[p])}
    assert changed == {"connector"}


def test_gradient_accumulation_4x2_equals_batch_8():
    # Two data shards, so each of the 4 micro-batches of 2 rows keeps one row per device.
    two = jax.devices()[:2]
    plain, _ = losses_of(tiny_config(batch=8, **{"optimizer.learning_rate": 1e-3}), two, 3)
    accum, _ = losses_of(tiny_config(batch=8, **{"optimizer.learning_rate": 1e-3,
                                                 "train.grad_accum": 4}), two, 3)
    np.testing.assert_allclose(accum, plain, rtol=1e-5)
    assert len(set(plain.round(6))) > 1


@pytest.mark.parametrize("log_every", [1, 10])
def test_nonfinite_steps_are_skipped_then_the_run_stops_naming_the_step(log_every):
    # Metrics are read every log_every steps: with 1 the run stops at the step that reached the
    # limit; with 10 it notices at the next read (step 10), naming the same step, and the steps
    # in between were skipped too (no parameter moved).
    cfg = tiny_config(**{"train.max_nonfinite_steps": 3})
    setup = loop.build(cfg)

    def poisoned():
        for i, b in enumerate(random_batches(cfg)):
            if i >= 2:
                b = dict(b, loss_mask=b["loss_mask"] * np.float32("nan"))
            yield b

    it = poisoned()
    state, _ = loop.run_steps(setup, itertools.islice(it, 2), 2)
    good = flat_paths(jax.device_get(state.params))
    with pytest.raises(loop.NonFiniteError, match=r"step 5: 3 steps in a row"):
        loop.run_steps(setup, it, 10, max_nonfinite=3, log_every=log_every)
    # The skipped steps did not touch the parameters, and they were counted.
    after = flat_paths(jax.device_get(setup.state.params))
    assert all(np.array_equal(good[p], after[p]) for p in good)
    assert int(setup.state.nonfinite) == (3 if log_every == 1 else 8)


def test_metrics_are_read_every_log_every_steps_in_one_transfer(monkeypatch):
    cfg = tiny_config()
    setup = loop.build(cfg)
    reads = []
    device_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: reads.append(len(x)) or device_get(x))
    _, history = loop.run_steps(setup, random_batches(cfg), 7, log_every=3)
    monkeypatch.undo()
    # The first step, then steps 2-3, 4-6 and 7: four reads for seven steps, every step logged.
    assert reads == [1, 2, 3, 1]
    assert len(history) == 7 and all(np.isfinite(h["loss"]) for h in history)
    reference = loop.build(cfg)
    _, every_step = loop.run_steps(reference, random_batches(cfg), 7, log_every=1)
    assert [h["loss"] for h in history] == [h["loss"] for h in every_step]


def test_a_host_array_reaching_the_step_fails_loudly(monkeypatch):
    # The step runs under jax.transfer_guard("disallow"): a batch that was not put on the mesh
    # (an implicit host-to-device copy every step) raises instead of silently costing time.
    from lvlm_jax import sharding

    cfg = tiny_config()
    setup = loop.build(cfg)
    loop.run_steps(setup, random_batches(cfg), 1)  # compiled with device batches
    monkeypatch.setattr(sharding, "to_global", lambda batch, mesh: dict(batch))
    with pytest.raises(Exception, match=r"[Dd]isallowed host-to-device transfer"):
        loop.run_steps(setup, random_batches(cfg), 2)


def test_bad_mesh_batch_and_keys_fail_with_one_clear_line():
    cfg = with_mesh(tiny_config(), {"data": 3, "fsdp": 1})
    with pytest.raises(ValueError, match=r"mesh.ici degrees .* make 3 devices, but there are 8"):
        loop.build(cfg)
    cfg = with_mesh(tiny_config(batch=6), {"fsdp": 8})
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the data axes"):
        loop.build(cfg)
    cfg = tiny_config()
    cfg.lock()
    with pytest.raises(KeyError, match=r"unknown config key 'optimizer.learnig_rate'"):
        config_lib.apply_override(cfg, "optimizer.learnig_rate", "0.1")
    cfg = tiny_config(**{"optimizer.freeze": "visoin/.*"})
    with pytest.raises(ValueError, match=r"optimizer.freeze pattern 'visoin/.\*' matches no"):
        loop.build(cfg)


def test_lr_multipliers_scale_the_update_of_their_group():
    # SGD without momentum: an update is exactly -lr x gradient, so a 0.0 multiplier on the
    # projector's first layer must leave it unchanged while the rest moves.
    cfg = tiny_config(**{"optimizer.name": "sgd", "optimizer.freeze": [],
                         "optimizer.grad_clip_norm": 0.0, "optimizer.schedule": "constant",
                         "optimizer.lr_multipliers": ((r"connector/linear_1/.*", 0.0),)})
    setup = loop.build(cfg)
    before = flat_paths(jax.device_get(setup.state.params))
    state, _ = loop.run_steps(setup, random_batches(cfg), 1)
    after = flat_paths(jax.device_get(state.params))
    assert np.array_equal(before["connector/linear_1/kernel"], after["connector/linear_1/kernel"])
    assert not np.array_equal(before["connector/linear_2/kernel"],
                              after["connector/linear_2/kernel"])


def test_durations_in_steps_epochs_or_examples():
    cfg = tiny_config(batch=8, steps=0)
    cfg.train.epochs = 2.0
    assert config_lib.total_steps(cfg, dataset_size=100) == 25
    cfg.train.epochs, cfg.train.examples = 0.0, 80
    assert config_lib.total_steps(cfg) == 10
    cfg.train.total_steps = 7
    with pytest.raises(ValueError, match="set exactly one of"):
        config_lib.total_steps(cfg)
