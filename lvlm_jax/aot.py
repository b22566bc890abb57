"""Ahead-of-time compile of the train step for a TPU topology on a CPU host: memory and FLOPs."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from typing import Any

import flax.linen as nn
import jax

from lvlm_jax import config as config_lib
from lvlm_jax import sharding
from lvlm_jax.train import flops as flops_lib
from lvlm_jax.train import loop

GiB = 2 ** 30
HBM_GIB: dict[str, float] = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
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
                   hbm_gib: float | None = None) -> dict[str, Any]:
    """AOT-compiles cfg's train step for `num_slices` slices of `topology`; returns its numbers.

    Memory figures are per chip, in bytes, from XLA's memory analysis. `fits` compares their
    total with the chip's HBM (`hbm_gib` overrides the table). A program the TPU compiler itself
    rejects as too large gives fits=False with the compiler's message in `error`.
    """
    topo = parse_topology(topology)  # before anything slow: a typo fails in a millisecond
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if not 0 < assumed_mfu <= 1:
        raise ValueError(f"assumed_mfu must be in (0, 1], got {assumed_mfu}")
    cfg = _unlocked_copy(cfg)
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
        lowered = setup.step_fn.lower(setup.abstract_state, setup.abstract_batch())
    hbm = (hbm_gib if hbm_gib is not None else HBM_GIB[topo.chip]) * GiB
    chips = topo.chips * num_slices
    peak = flops_lib.PEAK_FLOPS[topo.chip]
    lm = setup.model.cfg.language
    report: dict[str, Any] = {
        "topology": topology, "libtpu_topology": topo.libtpu_name, "chip": topo.chip,
        "chips_per_slice": topo.chips, "num_slices": num_slices, "chips": chips,
        "device_kind": devices[0].device_kind, "mesh": dict(setup.mesh.shape),
        "stage": cfg.stage, "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
        "grad_accum": cfg.train.grad_accum, "dtype": lm.dtype, "param_dtype": lm.param_dtype,
        "remat_policy": lm.remat_policy, "scan_layers": lm.scan_layers,
        "hbm_bytes": hbm, "memory": None, "fits": False, "error": None, "notes": notes,
        "flops_model": setup.flops_per_step, "flops_xla_per_chip": None, "flops_xla": None,
        "peak_flops_per_chip": peak, "assumed_mfu": assumed_mfu,
        "step_seconds": setup.flops_per_step / (chips * peak * assumed_mfu),
    }
    report["tokens_per_second_per_chip"] = (cfg.data.batch_size * cfg.data.seq_len
                                            / report["step_seconds"] / chips)
    try:
        compiled = lowered.compile()
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
    return report


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


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
    lines.append(f"  model (6ND + attn)   {r['flops_model']:.3e}")
    if r["flops_xla"] is not None:
        lines.append(f"  XLA cost analysis    {r['flops_xla']:.3e}  ({r['flops_xla_per_chip']:.3e}"
                     " per chip; a scanned layer's body is counted once)")
    lines.append(f"implied step time at {100 * r['assumed_mfu']:.0f}% MFU "
                 f"({r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s per chip): "
                 f"{r['step_seconds']:.2f} s, "
                 f"{r['tokens_per_second_per_chip']:.0f} tokens/s per chip")
    if "compile_seconds" in r:
        lines.append(f"compiled in {r['compile_seconds']:.0f} s on this host")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
