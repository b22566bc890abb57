"""The one training loop. Every stage runs through it; a stage supplies only its loss.

Reads top to bottom: config -> mesh -> input -> model (sharded init) -> optimizer -> update
step -> loop (log, guard, checkpoint) -> summary.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lvlm_jax import config as config_lib
from lvlm_jax import progress as progress_lib
from lvlm_jax import sharding
from lvlm_jax.models import VLM, build_model, dummy_inputs, vlm_config
from lvlm_jax.models.media_layout import media_taps
from lvlm_jax.sharding import mesh_context
from lvlm_jax.train import flops as flops_lib
from lvlm_jax.train import lora as lora_lib
from lvlm_jax.train.media_batch import flat_crops
from lvlm_jax.train.metrics_writer import MetricsWriter
from lvlm_jax.train.optimizer import make_optimizer, trainable_mask
from lvlm_jax.train.periodic_evals import make_evaluator
from lvlm_jax.train.preemption import StopFlag
from lvlm_jax.train.profiling import Profiler, check_profile_steps
from lvlm_jax.train.stages import LossContext, get_stage
from lvlm_jax.train.stages.base import (
    batch_fields,
    extra_param_keys,
    plain_causal_rows,
    with_extra_params,
)
from lvlm_jax.train.step import TrainState, make_train_step


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


@dataclasses.dataclass
class Setup:
    """Everything the loop builds, for callers that step it themselves (tests, bench, compile).

    `state` is None until `materialize`; `abstract_state` has shapes, dtypes and shardings only.
    """

    cfg: Any
    mesh: Any
    rules: dict
    model: VLM
    abstract_state: TrainState
    state_shardings: Any
    batch_shardings: dict
    init_state: Any
    step_fn: Any
    schedule: Any
    total_steps: int
    flops_per_step: float
    state: TrainState | None = None
    # The model config as given; `model.cfg` has its "auto" kernels resolved for the mesh.
    model_cfg: Any = None

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shape-only global batch (for ahead-of-time compilation)."""
        d = self.cfg.data
        v = self.model.cfg.vision
        size = d.image_size or v.image_size
        shapes = {"pixel_values": ((d.batch_size, d.max_images, size, size, 3), jnp.uint8),
                  "loss_mask": ((d.batch_size, d.seq_len), jnp.float32)}
        if "image_slots" in self.batch_shardings:  # flat media: [groups, crops] of crops
            groups = sharding.batch_axis_size(self.mesh)
            crops = flat_crops(self.cfg) // groups
            taps = (d.batch_size, d.seq_len, media_taps(self.model.cfg))
            shapes.update(pixel_values=((groups, crops, size, size, 3), jnp.uint8),
                          image_slots=(taps, jnp.int32), image_weights=(taps, jnp.float32),
                          crop_valid=((groups, crops), jnp.bool_))
        # Preference pairs name their fields chosen_loss_mask, rejected_input_ids, ...
        base = lambda f: f.removeprefix("chosen_").removeprefix("rejected_")  # noqa: E731
        return {f: jax.ShapeDtypeStruct(
                    *shapes.get(base(f), ((d.batch_size, d.seq_len), jnp.int32)),
                    sharding=self.batch_shardings[f])
                for f in self.batch_shardings}


# Batch arrays are sharded on their leading axis (rows, or a flat batch's crop groups).
FIELD_NDIM = {"pixel_values": 5, "image_slots": 3, "image_weights": 3}


def optimizer_config(cfg) -> dict:
    stage = get_stage(cfg.stage)
    opt = cfg.optimizer.to_dict()
    if opt.get("freeze") is None:
        opt["freeze"] = list(stage.default_freeze)
    if lora_lib.enabled(cfg):
        opt["freeze"] = lora_lib.optimizer_freeze(opt["freeze"], cfg.lora)  # base frozen
    return opt


def plan(cfg, model_cfg=None, dataset_size: int | None = None, devices=None) -> Setup:
    """Mesh, abstract sharded state and the jitted step for `cfg`; allocates nothing."""
    stage = get_stage(cfg.stage)
    # ---- mesh --------------------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), devices)
    rules = sharding.rules_from_config(cfg.mesh.get("rules"))
    sharding.check_batch(cfg.data.batch_size, mesh)
    if cfg.data.batch_size % (cfg.train.grad_accum * sharding.batch_axis_size(mesh)):
        raise ValueError(f"batch size {cfg.data.batch_size} does not split into "
                         f"{cfg.train.grad_accum} micro-batches over "
                         f"{sharding.batch_axis_size(mesh)} data shards")
    # ---- model -------------------------------------------------------------------------
    model_cfg = model_cfg or vlm_config(cfg.model.to_dict())
    # Kernels for the mesh's devices (an AOT target's included), not for this host.
    model = build_model(model_cfg, platform=sharding.mesh_platform(mesh))
    steps = config_lib.total_steps(cfg, dataset_size)
    init_inputs = dummy_inputs(model_cfg, batch=1)
    # Parameter paths start below the "params" collection: "vision/...", "decoder/...".
    init_fn = lambda rng: model.init(rng, **init_inputs)["params"]  # noqa: E731
    init_fn = with_extra_params(init_fn, stage, model_cfg)  # a stage's head, if it has one
    if lora_lib.enabled(cfg):
        # Adapters join the params under "lora"; the model's dense layers apply them.
        init_fn = lora_lib.init_with_adapters(init_fn, cfg.lora)
        stage = lora_lib.adapted_stage(stage, cfg.lora)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    param_shardings = sharding.logical_shardings(abstract, mesh, rules)
    abstract_params = nn.meta.unbox(abstract)
    # ---- optimizer ---------------------------------------------------------------------
    opt_cfg = optimizer_config(cfg)
    tx, schedule = make_optimizer(opt_cfg, abstract_params, steps)
    trainable = trainable_mask(abstract_params, opt_cfg)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = sharding.shardings_following_params(abstract_opt, abstract_params,
                                                        param_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def reference_of(tree):
        """What TrainState.reference keeps of the params (or their shardings): all of them, or
        under LoRA only the base weights that train (the rest is the policy's frozen base)."""
        if not stage.uses_reference:
            return None
        return lora_lib.saved_reference(tree, trainable) if lora_lib.enabled(cfg) else tree

    # The reference (stages/base.py) is sharded exactly like the policy it is a copy of.
    state_shardings = TrainState(step=replicated, params=param_shardings,
                                 opt_state=opt_shardings, rng=replicated, nonfinite=replicated,
                                 reference=reference_of(param_shardings))

    def init_state(seed):
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
        params = nn.meta.unbox(init_fn(init_rng))
        # Two outputs of one jit are two buffers, as donation of the state needs.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params), rng=train_rng,
                          nonfinite=jnp.zeros((), jnp.int32), reference=reference_of(params))

    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_state, 0), state_shardings)
    # ---- update step -------------------------------------------------------------------
    ctx = LossContext(model=model, image_mean=tuple(cfg.data.image_mean),
                      image_std=tuple(cfg.data.image_std), loss_chunk=cfg.train.loss_chunk,
                      config=cfg, plain_causal=plain_causal_rows(cfg))
    step = make_train_step(ctx, stage, tx, trainable, schedule, cfg.train.grad_accum)
    fields = batch_fields(stage, cfg)
    if "image_slots" in fields and cfg.train.grad_accum > 1:
        raise ValueError("data.media='flat' does not split into micro-batches (a group's "
                         "crops serve its rows together): set train.grad_accum=1")
    if "image_slots" in fields and flat_crops(cfg) % sharding.batch_axis_size(mesh):
        raise ValueError(f"data.max_crops={flat_crops(cfg)} does not split evenly over the "
                         f"{sharding.batch_axis_size(mesh)} batch shards (data x fsdp)")
    batch_shardings = {f: sharding.batch_sharding(mesh, FIELD_NDIM.get(f, 2)) for f in fields}
    step_fn = jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    trains_vision = any(jax.tree.leaves(trainable.get("vision", {})))
    trains_lm = any(jax.tree.leaves(trainable.get("decoder", {})))
    # A flat batch's vision tower runs on its crop budget, whatever the rows hold.
    images = (flat_crops(cfg) / cfg.data.batch_size if "image_slots" in fields
              else cfg.data.max_images)
    flops = cfg.data.batch_size * flops_lib.train_flops_per_example(
        model_cfg, abstract_params, cfg.data.seq_len, images, trains_vision, trains_lm)
    jit_init = jax.jit(init_state, static_argnums=0, out_shardings=state_shardings)
    return Setup(cfg, mesh, rules, model, abstract_state, state_shardings, batch_shardings,
                 jit_init, step_fn, schedule, steps, flops, model_cfg=model_cfg)


def _start_from(setup: Setup, params: Any) -> None:
    """`params` become the policy and, for a stage with a reference, its frozen copy (the part
    the state keeps, see `plan`): always fresh buffers (never aliases of the caller's or of each
    other), since steps donate the state."""
    put = lambda tree, shardings: jax.device_put(tree, shardings, may_alias=False)  # noqa: E731
    ref = setup.state.reference
    setup.state = setup.state.replace(
        params=put(params, setup.state_shardings.params),
        reference=None if ref is None else put(lora_lib.select_like(ref, params),
                                               setup.state_shardings.reference))


def materialize(setup: Setup, init_params: Any = None) -> Setup:
    """Initialises the state directly in its shards: never whole on one device or the host.

    `init_params` (a params tree of the same model, e.g. the previous stage's) replaces the
    random initialisation; the optimizer state starts fresh. The stage's extra parameters (a
    head) that `init_params` lacks keep their fresh values. For a stage with a reference, the
    reference is a copy of the starting params.
    """
    # Shardings come from out_shardings; flax's own init-time constraints stay out of the way.
    setup.state = setup.init_state(int(setup.cfg.seed))
    if init_params is not None:
        init_params = lora_lib.carry_over(init_params, setup.state.params)
        heads = extra_param_keys(get_stage(setup.cfg.stage), setup.model.cfg) - set(init_params)
        init_params = {**init_params, **{k: setup.state.params[k] for k in heads}}
        expected = jax.tree.map(lambda s: (s.shape, s.dtype), setup.abstract_state.params)
        given = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), init_params)
        if jax.tree.structure(expected) != jax.tree.structure(given) or expected != given:
            raise ValueError("init_params do not match the model of this config")
        _start_from(setup, init_params)
    return setup


def build(cfg, model_cfg=None, dataset_size: int | None = None, devices=None,
          init_params: Any = None) -> Setup:
    """plan + materialize: a ready-to-step Setup."""
    return materialize(plan(cfg, model_cfg, dataset_size, devices), init_params)


def run_steps(setup: Setup, batches: Iterator[Mapping[str, np.ndarray]], num_steps: int,
              writer: MetricsWriter | None = None, progress: bool = False,
              log_every: int = 10, max_nonfinite: int = 5,
              after_step: Any = None, log: Any = None, profile_steps: tuple[int, ...] = (),
              profile_dir: str | None = None) -> tuple[TrainState, list[dict]]:
    """Steps the state until step `num_steps` on host-local numpy batches; returns per-step
    metrics. `after_step(step, state)` runs after every step; returning True stops the loop.
    The step is compiled before the first one runs, timed apart (`compile_seconds`); steps
    `profile_steps` = (first, last) are traced into `profile_dir`.

    The host does not wait for each step: metrics stay on the devices and are read every
    `log_every` steps (and at the first and last), in one transfer; while a step runs, the next
    batch is read and sent to the devices (one step in flight, the next batch ready behind
    it). So `step_time` is the mean over the steps read together, the progress bar shows the
    loss last read, and a run of `max_nonfinite` skipped steps is noticed when they are read
    (the error names the step it reached the limit at; skipped steps change no parameter).
    The step runs under `jax.transfer_guard("disallow")`: a host array that reaches it (an
    implicit transfer) fails loudly instead of costing a silent copy each step.
    """
    stage = get_stage(setup.cfg.stage)
    mesh, state = setup.mesh, setup.state
    # PPO/GRPO: a rollout turns each prompt batch into the step's batch (train/rollout.py).
    make_rollout = getattr(stage, "make_rollout", None)
    rollout = make_rollout(setup) if make_rollout is not None else None
    history: list[dict] = []
    peak = flops_lib.device_peak()
    first = int(state.step) + 1  # the one read of the step counter; the host counts after it
    bar = None
    if progress and jax.process_index() == 0:
        bar = progress_lib.progress(num_steps, initial=first - 1, desc=setup.cfg.stage)
    bad_in_a_row = 0
    compiled = False
    t_last = time.perf_counter()
    unread: list[tuple[int, Any, Any]] = []  # (step, metrics, rollout metrics) on the devices

    def read() -> None:
        """Fetches the unread steps' metrics in one transfer and logs them."""
        nonlocal bad_in_a_row, t_last
        if not unread:
            return
        fetched = jax.device_get([(m, r) for _, m, r in unread])
        now = time.perf_counter()
        dt, t_last = (now - t_last) / len(unread), now
        for (step, _, _), (metrics, rollout_metrics) in zip(unread, fetched, strict=True):
            record = {k: float(v) for k, v in metrics.items() if k != "finite"}
            record.update({k: float(v) for k, v in rollout_metrics.items()})
            record.update(step_time=dt, examples_per_s=setup.cfg.data.batch_size / dt,
                          tokens_per_s=float(metrics["tokens"]) / dt)
            m = flops_lib.mfu(setup.flops_per_step, dt, jax.device_count(), peak)
            if m is not None:
                record["mfu"] = m
            history.append(record)
            if not bool(metrics["finite"]):
                bad_in_a_row += 1
                record["skipped_nonfinite"] = True
                if bad_in_a_row >= max_nonfinite:
                    unread.clear()
                    raise NonFiniteError(
                        f"step {step}: {bad_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient (loss={record['loss']}, grad_norm={record['grad_norm']}); "
                        "stopping. Resume from the last good checkpoint with a lower learning "
                        "rate or check the data.")
            else:
                bad_in_a_row = 0
            if writer is not None and (step % log_every == 0 or step == num_steps or step == 1):
                from lvlm_jax.train.input_pipeline import data_metrics

                record.update(data_metrics(batches))  # skipped bad records, from the loader
                writer.write(step, record)
        if bar is not None:  # the loss last read; the count moves every step
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        unread.clear()

    with (mesh_context(mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)),
          Profiler(profile_steps, profile_dir) as profiler):
        for step in range(first, num_steps + 1):
            local = next(batches)
            if rollout is None:
                batch, rollout_metrics = sharding.to_global(
                    {f: local[f] for f in setup.batch_shardings}, mesh), {}
            else:
                batch, rollout_metrics = rollout(state, local)
            if not compiled:
                # jit reuses this executable on the first call, so step_time excludes compiling.
                t = time.perf_counter()
                setup.step_fn.lower(state, batch).compile()
                compiled, seconds = True, time.perf_counter() - t
                if writer is not None:
                    writer.write(step - 1, {"compile_seconds": seconds})
                if log is not None:
                    log(f"compiled the train step in {seconds:.1f}s")
                t_last = time.perf_counter()
            profiler.before(step)
            if unread:
                # Double buffering: the previous step finishes before this one is queued, so one
                # step runs while the host reads and sends the next batch, and no more pile up.
                jax.block_until_ready(unread[-1][1]["loss"])
            with jax.transfer_guard("disallow"):
                state, metrics = setup.step_fn(state, batch)
            setup.state = state  # the old state was donated: keep the live one reachable
            unread.append((step, metrics, rollout_metrics))
            if step % log_every == 0 or step in (first, num_steps):
                read()
            if bar is not None:
                bar.update(1)  # after the read: in a log, this may write the line with its loss
            profiler.after(step, state)
            if after_step is not None and after_step(step, state):
                read()
                break
        read()
    if bar is not None:
        bar.close()
    setup.state = state
    return state, history


def _initial_params(cfg, setup: Setup, log) -> Any:
    """config.checkpoint.init_from: another run's params, whole or selected by regex, over
    this run's freshly initialised ones (materialized first)."""
    from lvlm_jax.checkpoints.manager import restore_params
    from lvlm_jax.checkpoints.partial import merge_params

    # Read straight onto this run's shardings: no host holds the whole model.
    params, step = restore_params(cfg.checkpoint.init_from,
                                  target=setup.abstract_state.params)
    params = lora_lib.merge(params)  # a LoRA run hands on its merged weights
    # This run's own params stay where they are (on several hosts they cannot be fetched to
    # one); the loaded ones replace them leaf by leaf.
    merged, report = merge_params(setup.state.params, params,
                                  cfg.checkpoint.get("init_from_include"))
    log(f"init_from {cfg.checkpoint.init_from} (step {step}): {report}")
    return merged


def train(cfg, workdir: str, batches: Iterator | None = None, model_cfg=None,
          dataset_size: int | None = None, init_params: Any = None, log=print
          ) -> tuple[Setup, list[dict]]:
    """Trains cfg.stage to the configured length, logging to `workdir`; resumes from the
    workdir's latest checkpoint when there is one."""
    from lvlm_jax.checkpoints.export import check_same_model, write_model_config
    from lvlm_jax.checkpoints.manager import Checkpointer

    profile_steps = cfg.train.get("profile_steps", ())
    check_profile_steps(profile_steps)  # a bad window fails before anything is built
    # ---- input -------------------------------------------------------------------------
    own_batches = batches is None
    if batches is None:
        from lvlm_jax.train import input_pipeline

        batches, model_cfg, dataset_size = input_pipeline.make_input(cfg, workdir)
    # ---- config ------------------------------------------------------------------------
    setup = plan(cfg, model_cfg, dataset_size)
    # A workdir that holds another model's checkpoints is refused before anything is written.
    check_same_model(workdir, setup.model_cfg)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))
        # As configured ("auto" kernels stay "auto"): what export and generate rebuild, for
        # whatever platform they run on.
        write_model_config(setup.model_cfg, workdir)
        if own_batches:  # the ids it trains with, for generate, eval and later stages
            input_pipeline.save_run_tokenizer(cfg, setup.model_cfg, workdir)
    # ---- state: resumed, chained from another run, or fresh ----------------------------
    ckpt = Checkpointer(workdir, cfg.checkpoint.every_steps, cfg.checkpoint.keep,
                        every_minutes=cfg.checkpoint.every_minutes,
                        best_metric=cfg.checkpoint.best_metric,
                        best_mode=cfg.checkpoint.best_mode)
    if ckpt.latest_step() is not None:
        setup.state, step = ckpt.restore(setup.abstract_state, batches)
        log(f"resumed from {workdir}/checkpoints/{step}")
    else:
        materialize(setup, init_params)
        if init_params is None and cfg.checkpoint.init_from:
            _start_from(setup, _initial_params(cfg, setup, log))
    writer = MetricsWriter(workdir)
    t0 = time.perf_counter()

    evaluate = make_evaluator(cfg, setup.model, workdir, writer) if cfg.evals.every_steps else None

    def after_step(step: int, state: TrainState) -> bool:
        if evaluate is not None and (step % cfg.evals.every_steps == 0
                                     or step == setup.total_steps):
            metrics = evaluate(state, step)
            writer.write(step, metrics)
            ckpt.record(step, metrics)
        # Every process asks every step: on several hosts the answer is agreed among them.
        stopping = stop.should_stop(step)
        if stopping or ckpt.should_save(step):
            ckpt.save(step, state, batches)
        return stopping

    # ---- loop --------------------------------------------------------------------------
    try:
        with StopFlag() as stop:
            _, history = run_steps(setup, batches, setup.total_steps, writer,
                                   progress=cfg.train.progress, log_every=cfg.train.log_every,
                                   max_nonfinite=cfg.train.max_nonfinite_steps,
                                   after_step=after_step, log=log, profile_steps=profile_steps,
                                   profile_dir=os.path.join(workdir, "profile"))
        step = int(setup.state.step)
        if ckpt.latest_step() != step:
            ckpt.save(step, setup.state, batches)  # the end of training (or preemption)
        if history:
            # Compilation is logged apart (compile_seconds); the first step still pays for
            # first-touch allocations, so it is reported on its own. total_steps tells a
            # finished run (lvlm sweep) from a preempted one.
            writer.write(step, {"train_seconds": time.perf_counter() - t0,
                                "first_step_seconds": history[0]["step_time"],
                                "total_steps": setup.total_steps})
    except NonFiniteError as e:
        last = ckpt.latest_step()
        where = (f"the last good checkpoint is {workdir}/checkpoints/{last}" if last is not None
                 else "there is no checkpoint yet")
        raise NonFiniteError(f"{e} ({where})") from None
    finally:
        writer.close()
        ckpt.close()
        if own_batches and hasattr(batches, "close"):
            batches.close()  # stops grain worker processes (data.worker_count) now
    return setup, history
