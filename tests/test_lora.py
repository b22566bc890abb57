"""LoRA: only adapters train on a frozen base, B=0 leaves the model exact, merging equals running
base + adapters, and export / from_pretrained hand on the merged model without "lora" keys."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from training_utils import random_batches, tiny_config

from lvlm_jax.checkpoints.export import export_checkpoint, load_params_only
from lvlm_jax.checkpoints.manager import restore_params
from lvlm_jax.param_paths import flat_paths
from lvlm_jax.train import loop, lora
from lvlm_jax.train.optimizer import trainable_mask
from lvlm_jax.train.stages import LossContext, get_stage
from lvlm_jax.train.stages.base import PAIR_TEXT_FIELDS, SIDES, normalize_pixels, with_reference

RANK, ALPHA, STEPS = 4, 8.0, 3
TARGETS = 7  # q, k, v, o, gate, up, down in each decoder layer


def lora_config(rank: int = RANK, **kw):
    # Unscanned layers: the activation-side reference below adapts one layer's kernel at a time.
    cfg = tiny_config(steps=STEPS, **{"lora.rank": rank, "lora.alpha": ALPHA,
                                      "optimizer.weight_decay": 0.1, **kw})
    cfg.model.language = dict(cfg.model.language.to_dict(), scan_layers=False)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short LoRA run in a workdir: its config, initial and trained state."""
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    cfg = lora_config()
    initial = jax.device_get(loop.plan(cfg).init_state(int(cfg.seed)).params)
    setup, _ = loop.train(cfg, workdir, batches=random_batches(cfg), log=lambda *_: None)
    return {"cfg": cfg, "workdir": workdir, "setup": setup, "initial": initial,
            "trained": jax.device_get(setup.state.params)}


def logits(model, params, batch):
    """The model's logits; a LoRA tree's adapters run unmerged, in the dense layers."""
    pixels = normalize_pixels(jnp.asarray(batch["pixel_values"]), (0.5,) * 3, (0.5,) * 3)
    out, _ = jax.jit(lambda p: model.apply(
        lora.model_variables(p), batch["input_ids"], pixels, segment_ids=batch["segment_ids"],
        positions=batch["positions"]))(params)
    return np.asarray(out)


def test_only_adapters_change_and_only_they_hold_optimizer_state(run):
    before, after = flat_paths(run["initial"]), flat_paths(run["trained"])
    base = [p for p in before if not p.startswith("lora/")]
    adapters = [p for p in before if p.startswith("lora/") and p != "lora/alpha"]
    assert len(adapters) == 2 * TARGETS * 2  # (A, B) x 7 kernels x 2 layers
    for p in base + ["lora/alpha"]:
        assert before[p].tobytes() == after[p].tobytes(), p
    for p in adapters:
        assert not np.array_equal(before[p], after[p]), p
    adapter_shapes = sorted(before[p].shape for p in adapters)
    opt = flat_paths(jax.device_get(run["setup"].state.opt_state))
    moments = {name: sorted(v.shape for p, v in opt.items() if f"/{name}/" in p)
               for name in ("mu", "nu")}
    assert moments == {"mu": adapter_shapes, "nu": adapter_shapes}
    assert all("/lora/" in p for p, v in opt.items() if np.ndim(v) > 0)


def test_zero_b_at_init_gives_exactly_the_base_models_logits(run):
    cfg = run["cfg"]
    plain = lora_config(rank=0)
    base_params = jax.device_get(loop.plan(plain).init_state(int(plain.seed)).params)
    initial = run["initial"]
    # The adapters draw from their own stream: the base weights are those of a plain run.
    assert jax.tree.all(jax.tree.map(np.array_equal, base_params,
                                     {k: v for k, v in initial.items() if k != "lora"}))
    model = run["setup"].model
    batch = next(random_batches(cfg, seed=3))
    np.testing.assert_array_equal(logits(model, lora.merge(initial), batch),
                                  logits(model, base_params, batch))


def _activation_side_reference(trained):
    """Intercepts every adapted dense layer of the plain model: y = x W + alpha/r * (x A) B,
    written out here independently of the model's own adapter code."""
    pairs = lora._adapter_pairs({k: v for k, v in trained["lora"].items() if k != "alpha"})
    scale = ALPHA / RANK
    running = set()  # layers.Dense.__call__ calls DenseGeneral's, and both are intercepted

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        key = "/".join(module.path) + "/kernel"
        if context.method_name != "__call__" or key not in pairs or key in running:
            return next_fun(*args, **kwargs)
        running.add(key)
        try:
            y = next_fun(*args, **kwargs)
        finally:
            running.discard(key)
        a, b = pairs[key]
        x = args[0]
        n_in = len(module.axis) if isinstance(module.axis, tuple) else 1
        x2 = x.reshape(*x.shape[:x.ndim - n_in], a.shape[0])
        return y + (scale * (x2 @ a) @ b).reshape(y.shape).astype(y.dtype)

    return interceptor, len(pairs)


def test_merged_and_unmerged_models_equal_base_plus_adapters_after_training(run):
    model, trained = run["setup"].model, run["trained"]
    batch = next(random_batches(run["cfg"], seed=4))
    merged = logits(model, lora.merge(trained), batch)
    unmerged = logits(model, trained, batch)
    interceptor, n = _activation_side_reference(trained)
    assert n == TARGETS * 2
    base = {k: v for k, v in trained.items() if k != "lora"}
    with nn.intercept_methods(interceptor):
        reference = logits(model, base, batch)
    np.testing.assert_allclose(merged, reference, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(unmerged, reference, atol=1e-5, rtol=1e-5)
    # Training moved the adapted model away from the base: the comparison is not vacuous.
    assert np.max(np.abs(merged - logits(model, base, batch))) > 1e-3


def preference_batch(cfg, seed):
    """Chosen and rejected sides from two random LM batches, sharing the first one's images."""
    chosen, rejected = next(random_batches(cfg, seed)), next(random_batches(cfg, seed + 1))
    batch = {f"{side}_{f}": rows[f] for side, rows in zip(SIDES, (chosen, rejected), strict=True)
             for f in PAIR_TEXT_FIELDS}
    return {**batch, "pixel_values": chosen["pixel_values"]}


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("stage_name", ["sft", "dpo"])
def test_unmerged_adapters_give_the_merged_loss_and_adapter_gradients(stage_name, scan):
    """The step as LoRA runs it (adapters in the dense layers; DPO's reference the base without
    adapters) against the merged step it replaced (W + alpha/r * A @ B in every kernel; the
    reference a separate frozen copy of the base)."""
    cfg = lora_config(stage=stage_name, batch=4, seq=16)
    cfg.model.language = dict(cfg.model.language.to_dict(), scan_layers=scan)
    setup = loop.plan(cfg, devices=jax.devices()[:1])
    # Random values everywhere, B included (a fresh B is zero and gives A no gradient).
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype),
                          setup.abstract_state.params)
    base = {k: v for k, v in params.items() if k != "lora"}
    adapters = {k: v for k, v in params["lora"].items() if k != "alpha"}
    stage = get_stage(stage_name)
    batch = preference_batch(cfg, 1) if stage_name == "dpo" else next(random_batches(cfg, 1))
    batch = {f: batch[f] for f in stage.fields}
    ctx = LossContext(setup.model, loss_chunk=8, config=cfg)
    unmerged = lora.adapted_stage(stage, cfg.lora).loss
    merged = lambda c, p, b, r: stage.loss(with_reference(c, base), lora.merge(p), b, r)  # noqa: E731

    def loss_and_grads(adapters):
        def mean_loss(adapters, loss):
            p = {**base, "lora": {**adapters, "alpha": jnp.float32(ALPHA)}}
            total, weight, _ = loss(ctx, p, batch, jax.random.PRNGKey(0))
            return total / weight
        return [jax.value_and_grad(mean_loss)(adapters, f) for f in (unmerged, merged)]

    (loss, grads), (expected_loss, expected_grads) = jax.device_get(
        jax.jit(loss_and_grads)(adapters))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-5)
    got, expected = flat_paths(grads), flat_paths(expected_grads)
    # (A, B) of 7 kernels, stacked over the 2 layers or one pair per layer
    assert sorted(got) == sorted(expected) and len(got) == 2 * TARGETS * (1 if scan else 2)
    for path, g in expected.items():
        np.testing.assert_allclose(got[path], g, rtol=1e-5, atol=1e-5, err_msg=path)
        assert np.abs(g).max() > 1e-6, path  # every adapter gets a gradient
    if stage_name == "dpo":  # the policy differs from the reference: not DPO's log 2
        assert abs(loss - np.log(2)) > 1e-3


def test_merge_of_scanned_kernels_adapts_each_layer_on_its_own():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 6, 2, 4)).astype(np.float32)  # [layers, embed, heads, head_dim]
    o = rng.normal(size=(3, 2, 4, 6)).astype(np.float32)  # [layers, heads, head_dim, embed]
    adapters = {k: {"a": rng.normal(size=(3, d_in, 2)).astype(np.float32),
                    "b": rng.normal(size=(3, 2, d_out)).astype(np.float32)}
                for k, d_in, d_out in (("q", 6, 8), ("o", 8, 6))}
    params = {"q": {"kernel": q}, "o": {"kernel": o},
              "lora": {"q": {"kernel": adapters["q"]}, "o": {"kernel": adapters["o"]},
                       "alpha": np.float32(3.0)}}
    merged = jax.device_get(lora.merge(params))
    assert set(merged) == {"q", "o"}
    for name, w in (("q", q), ("o", o)):
        a, b = adapters[name]["a"], adapters[name]["b"]
        for layer in range(3):
            expect = w[layer] + 1.5 * (a[layer] @ b[layer]).reshape(w.shape[1:])
            np.testing.assert_allclose(merged[name]["kernel"][layer], expect, rtol=1e-6,
                                       atol=1e-6)


def test_export_and_from_pretrained_give_the_merged_model_without_lora_keys(run, tmp_path):
    import lvlm_jax

    out = str(tmp_path / "exported")
    export_checkpoint(run["workdir"], "params", out)
    _, exported = load_params_only(out)
    assert "lora" not in exported
    assert not [p for p in flat_paths(exported) if "lora" in p]
    saved, _ = restore_params(run["workdir"])
    expected = flat_paths(jax.device_get(lora.merge(saved)))
    got, initial = flat_paths(exported), flat_paths(run["initial"])
    assert sorted(got) == sorted(expected)
    changed = sorted(p for p in got if not np.array_equal(got[p], initial[p]))
    assert len(changed) == TARGETS * 2 and all(p.endswith("/kernel") for p in changed)
    for p in got:
        np.testing.assert_array_equal(got[p], expected[p])
    handle = lvlm_jax.from_pretrained(run["workdir"])
    assert "lora" not in handle.params
    for p, x in flat_paths(jax.device_get(handle.params)).items():
        np.testing.assert_array_equal(x, expected[p])
    assert os.path.exists(os.path.join(out, "model_config.json"))


@pytest.mark.parametrize("override, message", [
    ({"lora.targets": (r"decoder/.*/no_such_proj/kernel",)}, "matches no parameter"),
    ({"lora.targets": (r"decoder/final_norm/scale",)}, "not a kernel"),
    ({"lora.targets": (r"decoder/embed_tokens/embedding",)}, "not a dense layer's kernel"),
    ({"lora.dropout": 0.05}, "lora.dropout"),
    ({"lora.trainable": (r"connector/no_such/.*",)}, "lora.trainable pattern"),
])
def test_bad_lora_settings_fail_naming_the_setting(override, message):
    with pytest.raises(ValueError, match=message):
        loop.plan(lora_config(**override))


def test_lora_trainable_base_params_train_beside_the_adapters():
    cfg = lora_config(**{"lora.trainable": (r"connector/.*",)})
    setup = loop.plan(cfg)
    mask = flat_paths(trainable_mask(nn.meta.unbox(setup.abstract_state.params),
                                     loop.optimizer_config(cfg)))
    trained = sorted(p for p, on in mask.items() if on)
    assert trained == sorted(p for p in mask if p.startswith("connector/")
                             or (p.startswith("lora/") and p != "lora/alpha"))
    assert len(trained) == 4 + 2 * TARGETS * 2  # the projector's 2 kernels + 2 biases
