"""Ahead-of-time compile of a stage's train step for a TPU topology on a CPU host: per-chip memory,
FLOPs, the collectives of the optimized program, and a roofline prediction of its step time."""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
import pathlib
import re
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lvlm_jax import config as config_lib
from lvlm_jax import hlo_stats, sharding
from lvlm_jax.train import flops as flops_lib
from lvlm_jax.train import loop
from lvlm_jax.train.optimizer import trainable_mask
from lvlm_jax.train.rollout import option
from lvlm_jax.train.stages import STAGES, get_stage

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Published per-chip figures of a TPU generation, in FLOP/s and bytes/s."""

    peak_flops: float  # dense bf16
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # one direction: half the published bidirectional figure
    dcn_bytes_per_s: float
    hbm_gib: float


# GB = 1e9 bytes. ICI is priced at half the bidirectional per-chip figure: a chip sends a
# collective's wire bytes while it receives as many, over all its links at once (so an optimistic
# rate for a collective along one mesh axis).
CHIPS: dict[str, ChipSpec] = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB at 1200 GBps. The page gives no
    # ICI or DCN figure: ICI 6 links x 400 Gbps each way (2400 Gbps; the v4 paper, arXiv
    # 2304.01433, as summarised at https://glennklockwood.com/garden/processors/TPUv4); DCN
    # assumed 50 Gbps per chip, as v5p.
    "v4": ChipSpec(275e12, 1200e9, 300e9, 6.25e9, 32),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GB at 819 GBps, ICI 400 GBps
    # bidirectional, DCN 6.4 Tbps per 256-chip pod (2 x 100 Gbps NICs per 8-chip host).
    "v5e": ChipSpec(197e12, 819e9, 200e9, 3.125e9, 16),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB at 2765 GBps, ICI 1200 GBps
    # bidirectional (4800 Gbps one way), DCN 50 Gbps per chip.
    "v5p": ChipSpec(459e12, 2765e9, 600e9, 6.25e9, 95),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GB at 1638 GBps, ICI 800 GBps
    # bidirectional. DCN is not in the page's table: assumed 100 Gbps per chip.
    "v6e": ChipSpec(918e12, 1638e9, 400e9, 12.5e9, 32),
}
HBM_GIB: dict[str, float] = {chip: spec.hbm_gib for chip, spec in CHIPS.items()}
# The data each stage's loader yields (config.data.kind); plan() does not read it, a run does.
DATA_KIND = {"pretrain": "caption", "sft": "conversation", "reward": "preference",
             "dpo": "preference", "ppo": "prompt", "grpo": "prompt"}
# Chips per slice -> the slice shapes Cloud TPU sells (MaxText's accelerator_to_spec_map).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}
_SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}
ACCEPTED_FORMS = ("v5p-N or v4-N (N = TensorCores, 2 per chip: 8, 16, 32, 64, then multiples "
                  "of 128), v5e-N or v6e-N (N = chips: 1, 4, 8, 16, 32, 64, 128, 256), or "
                  "CHIP:SHAPE (v5p:4x4x4, v4:2x2x2, v5e:16x16, v6e:8x8)")


@dataclasses.dataclass(frozen=True)
class Topology:
    """One TPU slice: the chip generation and its physical chip grid."""

    name: str
    chip: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        # Torus links close only on full cubes (3-D, every side a multiple of 4) and on the
        # 16-chip sides of 2-D pods; they change collective costs, not memory.
        if len(self.shape) == 3:
            cube = all(d % 4 == 0 for d in self.shape)
            return (cube, cube, cube)
        return (self.shape[0] == 16, self.shape[1] == 16, False)


def _cube_shape(chips: int) -> tuple[int, int, int] | None:
    """v4/v5p slice shape: the small fixed ones, then sides of 4k chips, as cubic as possible."""
    if chips in _SMALL_3D:
        return _SMALL_3D[chips]
    if chips <= 0 or chips % 64:
        return None
    k = chips // 64
    best = None
    for a in range(1, k + 1):
        for b in range(a, k + 1):
            if k % (a * b) == 0 and k // (a * b) >= b:
                c = k // (a * b)
                if best is None or (c, -a) < (best[2], -best[0]):
                    best = (a, b, c)
    return tuple(4 * d for d in best)


def parse_topology(name: str) -> Topology:
    """'v5p-64', 'v5e-256', 'v4-32', 'v6e-8' or 'v5p:4x4x4' -> Topology; anything else fails."""
    bad = ValueError(f"unknown TPU topology {name!r}; expected {ACCEPTED_FORMS}")
    text = name.strip().lower()
    m = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", text)
    if m:
        chip, shape = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        if len(shape) != (3 if chip in ("v4", "v5p") else 2) or min(shape) < 1:
            raise bad
        return Topology(name, chip, shape)
    m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", text)
    if not m:
        raise bad
    chip, n = m.group(1), int(m.group(2))
    if chip in ("v4", "v5p"):
        shape = _cube_shape(n // 2) if n % 2 == 0 else None
    else:
        shape = _SHAPES_2D.get(n)
    if shape is None:
        raise bad
    return Topology(name, chip, shape)


def tpu_devices(topo: Topology, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `num_slices` slices of `topo`, on any host with libtpu."""
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if xla_bridge.get_tpu_library_path() is None:
        raise RuntimeError("AOT compiles for TPU need libtpu: pip install -e '.[tpu]'")
    platforms = jax.config.jax_platforms or ""
    if platforms and "tpu" not in platforms.split(","):
        # This process drives no TPU, so it need not hold libtpu's one-process-per-host lock;
        # without this, a second compile (or any TPU-initialising process) on the host aborts.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    megacore = topo.chip in ("v4", "v5p")  # one device per chip: both TensorCores as one
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.libtpu_name,
        chip_config_name="megacore" if megacore else "default",
        chips_per_host_bounds=(2, 2, 1) if topo.chips >= 4 else (1, 1, 1),
        num_slices=num_slices, wrap=topo.wrap)
    return list(desc.devices)


def _unlocked_copy(cfg: Any) -> Any:
    cfg = copy.deepcopy(cfg)
    cfg.unlock()
    return cfg


def parse_stages(text: str) -> list[str]:
    """'pretrain,sft,dpo,ppo' -> the names, each a known stage; anything else fails in one line."""
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        raise ValueError(f"unknown stage {bad[0] if bad else text!r}; expected a comma-separated "
                         f"list of {', '.join(sorted(STAGES))}")
    return stages


def stage_config(cfg: Any, stage: str) -> Any:
    """An unlocked copy of cfg that trains `stage`, on that stage's kind of data if the config
    was written for another stage."""
    cfg = _unlocked_copy(cfg)
    if cfg.stage != stage:
        cfg.stage = stage
        cfg.data.kind = DATA_KIND.get(stage, cfg.data.kind)
    return cfg


def _rollout_shape(cfg: Any) -> tuple[int, int]:
    """(rows, response tokens) of a rollout stage's training batch: group_size samples per
    prompt, max_new_tokens each (train/rollout.py)."""
    rows = cfg.data.batch_size * int(option(cfg, cfg.stage, "group_size", 1))
    return rows, int(option(cfg, cfg.stage, "max_new_tokens", 16))


def abstract_batch(setup: loop.Setup) -> dict[str, jax.ShapeDtypeStruct]:
    """The step's batch as shapes: loop.plan's, except for a stage whose batch a rollout makes
    (PPO, GRPO): prompt + response tokens [rows, seq_len + n], per-response-token floats
    [rows, n], as `rollout.sample_and_score` and `finish` hand them to the update step."""
    cfg = setup.cfg
    if getattr(get_stage(cfg.stage), "make_rollout", None) is None:
        return setup.abstract_batch()
    rows, n = _rollout_shape(cfg)
    size = cfg.data.image_size or setup.model.cfg.vision.image_size
    tokens = {"input_ids", "segment_ids", "positions"}

    def spec(field: str) -> tuple[tuple[int, ...], Any]:
        if field == "pixel_values":
            return (rows, cfg.data.max_images, size, size, 3), jnp.uint8
        if field in tokens:
            return (rows, cfg.data.seq_len + n), jnp.int32
        return (rows, n), jnp.float32

    return {f: jax.ShapeDtypeStruct(*spec(f), sharding=sh)
            for f, sh in setup.batch_shardings.items()}


def model_flops(setup: loop.Setup) -> tuple[float, str]:
    """Model FLOPs of one step of setup's stage (6ND + attention per sequence, the vision tower
    2ND and the decoder 4ND when frozen) and what they count. plan()'s figure is one sequence
    of seq_len per example; a preference pair is two, a reference model adds a forward (2ND of
    6ND), and a rollout stage's sequences are the prompt plus the response."""
    cfg, stage = setup.cfg, get_stage(setup.cfg.stage)
    params = setup.abstract_state.params
    trainable = trainable_mask(params, loop.optimizer_config(cfg))
    trains_vision = any(jax.tree.leaves(trainable.get("vision", {})))
    trains_lm = any(jax.tree.leaves(trainable.get("decoder", {})))

    def per_sequence(seq_len: int) -> float:
        return flops_lib.train_flops_per_example(setup.model.cfg, params, seq_len,
                                                 cfg.data.max_images, trains_vision, trains_lm)

    if getattr(stage, "make_rollout", None) is not None:
        rows, n = _rollout_shape(cfg)
        return rows * per_sequence(cfg.data.seq_len + n), (
            f"{rows} sequences of {cfg.data.seq_len} prompt + {n} response tokens")
    if any(f.startswith("chosen_") for f in stage.fields):
        reference = 4 / 3 if stage.uses_reference else 1.0
        what = "chosen + rejected" + (" + the reference's forward" if stage.uses_reference
                                      else "")
        return 2 * cfg.data.batch_size * per_sequence(cfg.data.seq_len) * reference, what
    return setup.flops_per_step, f"{cfg.data.batch_size} sequences of {cfg.data.seq_len} tokens"


def roofline(chip: ChipSpec, flops: float, hbm_bytes: float, ici_bytes: float,
             dcn_bytes: float, model_flops_per_step: float, chips: int) -> dict[str, Any]:
    """Per-chip times of one step, in seconds: compute = FLOPs / peak, memory = HBM bytes / HBM
    bandwidth, collectives = wire bytes / ICI (+ DCN) bandwidth. The prediction adds the
    collectives to max(compute, memory), as if none overlapped compute; the lower bound
    overlaps all three. MFU: model FLOPs / (chips x peak x time)."""
    compute = flops / chip.peak_flops
    memory = hbm_bytes / chip.hbm_bytes_per_s
    ici, dcn = ici_bytes / chip.ici_bytes_per_s, dcn_bytes / chip.dcn_bytes_per_s
    step = max(compute, memory) + ici + dcn
    overlapped = max(compute, memory, ici + dcn)
    bound = max((compute, "compute"), (memory, "memory"), (ici + dcn, "collectives"))[1]

    def mfu(seconds: float) -> float | None:
        return model_flops_per_step / (chips * chip.peak_flops * seconds) if seconds else None

    return {"compute_s": compute, "memory_s": memory, "ici_s": ici, "dcn_s": dcn,
            "collective_s": ici + dcn, "step_s": step, "step_s_overlapped": overlapped,
            "bound": bound, "mfu": mfu(step), "mfu_overlapped": mfu(overlapped)}


def compile_with_hlo(lowered: Any) -> tuple[Any, str]:
    """(executable, its optimized HLO text). The text is the compiler's own dump: jaxlib's
    `compiled.as_text()` rebuilds the module from libtpu's proto, and fails on some large
    programs ("async-update instruction should have 1 operands but sees 3", the 7B step on
    v5p-64). Dump options change what is written, not what is compiled."""
    with tempfile.TemporaryDirectory() as d:
        compiled = lowered.compile(compiler_options={
            "xla_dump_to": d, "xla_dump_hlo_as_text": True, "xla_dump_disable_metadata": True})
        dumps = glob.glob(os.path.join(d, "*after_optimizations.txt"))
        text = pathlib.Path(max(dumps, key=os.path.getsize)).read_text() if dumps else None
    return compiled, text if text is not None else compiled.as_text()


def _bytes(text: str, unit: str) -> float:
    return float(text) * 1024 ** "BKMGT".index(unit.upper())


def _parse_oom(message: str) -> dict[str, float]:
    """The figures of the TPU compiler's out-of-memory error, where it states them."""
    for pattern in (r"required for HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM "
                    r"\(([\d.]+)([KMGT])\)",
                    r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"):
        m = re.search(pattern, message)
        if m:
            return {"required": _bytes(m.group(1), m.group(2)),
                    "available": _bytes(m.group(3), m.group(4))}
    return {}


def compile_report(cfg: Any, topology: str, num_slices: int = 1, assumed_mfu: float = 0.5,
                   hbm_gib: float | None = None, stage: str | None = None) -> dict[str, Any]:
    """AOT-compiles the train step of `stage` (default: cfg.stage) for `num_slices` slices of
    `topology`; returns its numbers.

    Memory figures are per chip, in bytes, from XLA's memory analysis. `fits` compares their
    total with the chip's HBM (`hbm_gib` overrides the table). A program the TPU compiler itself
    rejects as too large gives fits=False with the compiler's message in `error`. From the
    optimized program (lvlm_jax/hlo_stats.py), per chip and step: `collectives` by kind,
    `hlo_flops_per_chip` (loops multiplied out), `hbm_bytes_per_chip` (an estimate), and a
    `roofline` with the chip table's peaks (see `roofline`).
    """
    topo = parse_topology(topology)  # before anything slow: a typo fails in a millisecond
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if not 0 < assumed_mfu <= 1:
        raise ValueError(f"assumed_mfu must be in (0, 1], got {assumed_mfu}")
    cfg = stage_config(cfg, parse_stages(stage)[0]) if stage else _unlocked_copy(cfg)
    notes = []
    if num_slices > 1 and all(int(v) == 1 for v in cfg.mesh.dcn.values()):
        # The usual multi-slice layout: data parallelism over DCN, everything else inside.
        cfg.mesh.dcn["data"] = num_slices
        notes.append(f"mesh.dcn unset: data parallel across the {num_slices} slices")
    try:
        config_lib.total_steps(cfg)
        dataset_size = None
    except ValueError:
        # Epoch-based runs need a dataset size; it only sets the schedule's length, which
        # does not change the compiled program.
        dataset_size = cfg.data.batch_size
    devices = tpu_devices(topo, num_slices)
    t0 = time.perf_counter()
    setup = loop.plan(cfg, dataset_size=dataset_size, devices=devices)
    # Traced under the same mesh and rules as the loop, so activation constraints apply.
    with loop.mesh_context(setup.mesh), nn.logical_axis_rules(sharding.flax_rules(setup.rules)):
        lowered = setup.step_fn.lower(setup.abstract_state, abstract_batch(setup))
    chip = CHIPS[topo.chip]
    hbm = (hbm_gib if hbm_gib is not None else chip.hbm_gib) * GiB
    chips = topo.chips * num_slices
    peak = chip.peak_flops
    lm = setup.model.cfg.language
    flops_stage, flops_what = model_flops(setup)
    if getattr(get_stage(cfg.stage), "make_rollout", None) is not None:
        notes.append(f"{cfg.stage}: the update step only; the rollout (KV-cache sampling and "
                     "scoring, train/rollout.py) is a separate program, not compiled here")
    report: dict[str, Any] = {
        "topology": topology, "libtpu_topology": topo.libtpu_name, "chip": topo.chip,
        "chips_per_slice": topo.chips, "num_slices": num_slices, "chips": chips,
        "device_kind": devices[0].device_kind, "mesh": dict(setup.mesh.shape),
        "stage": cfg.stage, "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum, "dtype": lm.dtype, "param_dtype": lm.param_dtype,
        "remat_policy": lm.remat_policy, "scan_layers": lm.scan_layers,
        "hbm_bytes": hbm, "memory": None, "fits": False, "error": None, "notes": notes,
        "flops_model": setup.flops_per_step, "flops_model_stage": flops_stage,
        "flops_model_stage_counts": flops_what, "flops_xla_per_chip": None, "flops_xla": None,
        "peak_flops_per_chip": peak, "assumed_mfu": assumed_mfu,
        "step_seconds": flops_stage / (chips * peak * assumed_mfu),
        "chip_spec": dataclasses.asdict(chip), "collectives": None,
        "hlo_flops_per_chip": None, "hbm_bytes_per_chip": None, "hlo_loops": None,
        "roofline": None,
    }
    report["tokens_per_second_per_chip"] = (cfg.data.batch_size * cfg.data.seq_len
                                            / report["step_seconds"] / chips)
    try:
        compiled, hlo_text = compile_with_hlo(lowered)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        oom = _parse_oom(str(e))
        report["error"] = str(e).strip().splitlines()[0]
        # The compiler states only what it needed beyond HBM: a lower bound on the total.
        report["memory"] = ({"temporaries": oom["required"], "total": oom["required"]}
                            if oom else None)
        report["compile_seconds"] = time.perf_counter() - t0
        return report
    report["compile_seconds"] = time.perf_counter() - t0
    m = compiled.memory_analysis()
    memory = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,  # donated state: outputs reuse the arguments' buffers
        "temporaries": m.temp_size_in_bytes,
        "generated_code": m.generated_code_size_in_bytes,
    }
    memory["total"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                       + memory["temporaries"] + memory["generated_code"])
    report["memory"] = memory
    report["fits"] = memory["total"] <= hbm
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
        report["flops_xla_per_chip"] = float(cost["flops"])
        report["flops_xla"] = float(cost["flops"]) * chips
    # Program device ids are positions in the mesh's device order.
    slice_of = ([d.slice_index for d in setup.mesh.devices.flat] if num_slices > 1 else None)
    stats = hlo_stats.analyze(hlo_text, slice_of)
    report.update(collectives=stats["collectives"], hlo_flops_per_chip=stats["flops"],
                  hbm_bytes_per_chip=stats["hbm_bytes"], hlo_loops=stats["loops"])
    notes += stats["notes"]
    wire = [c["wire_bytes"] for c in stats["collectives"].values()]
    dcn = sum(c["dcn_wire_bytes"] for c in stats["collectives"].values())
    report["roofline"] = roofline(chip, stats["flops"], stats["hbm_bytes"], sum(wire) - dcn,
                                  dcn, flops_stage, chips)
    return report


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def _gib3(x: float) -> str:
    """GiB to three significant figures, without an exponent."""
    g = x / GiB
    return f"{g:.0f}" if g >= 100 else f"{g:.2f}" if g >= 1 else f"{g:.3g}"


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s "
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3f} us"


def _link(c: dict[str, float]) -> str:
    if not c["wire_bytes"]:
        return "-"
    if not c["dcn_wire_bytes"]:
        return "ICI"
    return "DCN" if c["dcn_wire_bytes"] >= c["wire_bytes"] else "ICI+DCN"


def _collective_lines(collectives: dict[str, dict[str, float]]) -> list[str]:
    lines = ["collectives per step, per chip (optimized HLO; wire: bytes each chip sends, ring)",
             f"  {'kind':<20}{'count':>8}{'GiB':>10}{'wire GiB':>10}  link"]
    for kind in hlo_stats.KINDS:
        c = collectives.get(kind)
        if c is None:
            lines.append(f"  {kind:<20}{0:>8}{'-':>10}{'-':>10}  -")
            continue
        lines.append(f"  {kind:<20}{c['count']:>8.0f}{_gib3(c['bytes']):>10}"
                     f"{_gib3(c['wire_bytes']):>10}  {_link(c)}")
    total = {k: sum(c[k] for c in collectives.values())
             for k in ("count", "bytes", "wire_bytes", "dcn_wire_bytes")}
    lines.append(f"  {'total':<20}{total['count']:>8.0f}{_gib3(total['bytes']):>10}"
                 f"{_gib3(total['wire_bytes']):>10}  {_link(total) if collectives else '-'}")
    return lines


def _roofline_lines(r: dict[str, Any]) -> list[str]:
    f, c = r["roofline"], r["chip_spec"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    return [
        f"roofline per chip ({r['chip']}: {c['peak_flops'] / 1e12:.0f} TFLOP/s bf16, HBM "
        f"{c['hbm_bytes_per_s'] / 1e9:.0f} GB/s, ICI {c['ici_bytes_per_s'] / 1e9:.0f} GB/s "
        f"each way, DCN {c['dcn_bytes_per_s'] / 1e9:.2f} GB/s)",
        f"  compute           {_time(f['compute_s']):>12}  HLO FLOPs / peak",
        f"  memory            {_time(f['memory_s']):>12}  HBM traffic "
        f"~{_gib3(r['hbm_bytes_per_chip'])} GiB (estimate: fusion boundaries) / bandwidth",
        f"  collectives       {_time(f['collective_s']):>12}  wire bytes / ICI bandwidth"
        + (f" ({_time(f['dcn_s']).strip()} of it over DCN)" if f["dcn_s"] else ""),
        f"  predicted step    {_time(f['step_s']):>12}  max(compute, memory) + collectives, "
        f"none overlapped: MFU {pct(f['mfu'])}",
        f"  lower bound       {_time(f['step_s_overlapped']):>12}  max(compute, memory, "
        f"collectives), all overlapped: MFU {pct(f['mfu_overlapped'])}; {f['bound']}-bound",
    ]


def format_report(report: dict[str, Any]) -> str:
    """A readable table of one compile_report."""
    r = report
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    lines = [
        f"TPU AOT compile: {r['topology']} ({r['libtpu_topology']}{slices}): "
        f"{r['chips']} {r['chip']} chips ({r['device_kind']})",
        f"  mesh                 {mesh}",
        f"  step                 {r['stage']}, batch {r['batch_size']} x {r['seq_len']} tokens"
        + (f", {r['grad_accum']} micro-batches" if r["grad_accum"] > 1 else ""),
        f"  execution            {r['dtype']} compute, {r['param_dtype']} params, remat "
        f"{r['remat_policy']}, scan {'on' if r['scan_layers'] else 'off'}",
        "per-chip memory (GiB)",
    ]
    mem = r["memory"] or {}
    for key, label in (("arguments", "arguments"), ("outputs", "outputs"),
                       ("aliased", "aliased (donated)"), ("temporaries", "temporaries"),
                       ("generated_code", "generated code")):
        if key in mem:
            sign = "-" if key == "aliased" else " "
            lines.append(f"  {label:<20}{sign}{_gib(mem[key]):>8}")
    total = mem.get("total")
    share = f"  ({100 * total / r['hbm_bytes']:.0f}% of HBM)" if total is not None else ""
    at_least = ">=" if r["error"] else "  "
    lines += [
        f"  {'total':<19}{at_least}{_gib(total):>8} / {_gib(r['hbm_bytes'])} HBM{share}",
        f"  fits                 {'yes' if r['fits'] else 'NO'}",
    ]
    if r["error"]:
        lines.append(f"  compiler             {r['error']}")
    lines.append("FLOPs per step")
    lines.append(f"  model (6ND + attn)   {r['flops_model_stage']:.3e}  "
                 f"({r['flops_model_stage_counts']})")
    chips = r["chips"]
    if r["hlo_flops_per_chip"] is not None:
        ratio = r["hlo_flops_per_chip"] * chips / r["flops_model_stage"]
        lines.append(f"  optimized HLO        {r['hlo_flops_per_chip'] * chips:.3e}  "
                     f"({r['hlo_flops_per_chip']:.3e} per chip: matmuls, loops multiplied out; "
                     f"{ratio:.2f}x the model's)")
    if r["flops_xla"] is not None:
        lines.append(f"  XLA cost analysis    {r['flops_xla']:.3e}  ({r['flops_xla_per_chip']:.3e}"
                     " per chip; a scanned layer's body is counted once)")
    if r["collectives"] is not None:
        lines += _collective_lines(r["collectives"])
    if r["roofline"] is not None:
        lines += _roofline_lines(r)
    lines.append(f"implied step time at {100 * r['assumed_mfu']:.0f}% MFU "
                 f"({r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s per chip): "
                 f"{r['step_seconds']:.2f} s, "
                 f"{r['tokens_per_second_per_chip']:.0f} tokens/s per chip")
    if "compile_seconds" in r:
        lines.append(f"compiled in {r['compile_seconds']:.0f} s on this host")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
