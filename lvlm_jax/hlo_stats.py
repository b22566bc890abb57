"""Per-step, per-chip figures read from optimized HLO text: collectives, matmul FLOPs, HBM traffic.

`analyze(text)` walks the module from its entry computation (`python -m lvlm_jax.hlo_stats
FILE` prints it for a dump; lvlm_jax/aot.py passes the compiler's own). Everything inside a
`while` body counts once per iteration: the trip count comes from the loop's
`known_trip_count` backend config, or else from its condition (`i < N` on a counter that starts
at a constant); a loop whose count cannot be read counts once, with a note. Fusions, calls and
async wrappers carry their caller's multiplier; of a `conditional`, the costliest branch counts
(by FLOPs, then bytes): a skipped chunk of a chunked loss costs nothing, a real one the most.

Collectives, by kind (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute),
each counted once per execution: an async `-start`/`-done` pair at its start; of the TPU
compiler's async collective fusions, the start fusion (root `AsyncCollectiveStart`), not the
done one nor the copies carried through overlapped compute fusions; an all-reduce inside a fusion
that keeps only a dynamic slice of it (the TPU's reduce-scatter) as a reduce-scatter.
`bytes` is the full buffer: all-gather's output, reduce-scatter's input, all-reduce's and
all-to-all's operand, collective-permute's operand. `wire_bytes` is what each chip sends over
the links in a ring algorithm with n chips per replica group: all-gather and reduce-scatter
(n-1)/n x bytes, all-reduce 2(n-1)/n x bytes, all-to-all (n-1)/n x bytes, collective-permute
bytes. Across slices: the TPU compiler compiles a multi-slice program per slice, and hands each
DCN collective to the MegaScale runtime as a host `send` (the matching `recv` not counted again)
naming the transfer type and the slices it joins; those count in `dcn_wire_bytes`, with n = the
number of slices. Given `slice_of` (the slice of each device id) for a program over every
device, a collective whose replica groups span slices counts there too, wholly (an upper bound
for groups that mix ICI and DCN).

FLOPs count `dot` and `convolution` only (2 x output elements x contracted size; of a
convolution's window, only the taps that land on real input elements: the TPU compiler writes
batched matmuls as convolutions over padded or dilated inputs); elementwise work and custom calls
(Pallas kernels) are not seen.

HBM bytes are an estimate: fusion boundaries are memory traffic. Every instruction outside fused
computations reads its operands and writes its output, except parameters, constants, tuples,
get-tuple-element, bitcasts and control flow; arrays placed in another memory space (`S(1)`,
on-chip) are not HBM; a dynamic slice reads only the slice, a dynamic-update-slice writes only
the update; a fusion's parameter read only through dynamic slices costs the slices. Caches,
prefetch overlap and the compiler's own cost model are not modelled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# A multi-slice program's DCN collective: a host transfer (send) to the MegaScale runtime, with
# the slices it joins ("{1,2}x{0:3}": slices 1 and 2, devices 0-3 of each).
_MEGASCALE_TYPE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_TARGET = re.compile(r'_xla_megascale_target="\{([\d,]*)\}')
_MEGASCALE_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather",
                    "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all",
                    "ONE_TO_ONE": "collective-permute"}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([^\]]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%?(\S+) \(")
_INSTR = re.compile(r"^\s+(ROOT )?%?(\S+) = ")
# Ops whose output is an alias, a view or control flow: no memory traffic of their own.
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id",
               "opt-barrier", "add-dependency", "domain", "async-update", "async-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "send-done",
               "recv-done", "get-dimension-size"}


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the raw text between the parentheses: a parameter's index, a constant's value
    attrs: str
    root: bool


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    users: dict[str, list[Instr]]

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])


@dataclasses.dataclass
class Module:
    computations: dict[str, Computation]
    entry: str
    shapes: dict[str, str]  # instruction name -> shape text (names are unique in a module)
    by_name: dict[str, Instr]
    num_partitions: int


def _balanced(text: str, start: int, open_: str = "(", close: str = ")") -> int:
    """Index just past the bracket that closes text[start] (== open_)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    pos = m.end()
    if line[pos] == "(":  # a tuple shape: spaces and comments inside
        end = _balanced(line, pos)
    else:
        end = line.index(" ", pos)
    shape, rest = line[pos:end], line[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    args = rest[op.end():close - 1]
    operands = re.findall(r"%([\w.\-]+)", args)
    attrs = re.sub(r"metadata=\{[^}]*\}", "", rest[close:])
    return Instr(m.group(2), shape, op.group(1), operands, args, attrs, bool(m.group(1)))


def parse_module(text: str) -> Module:
    """HLO module text -> its computations, each a list of instructions."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{") and not line.startswith("HloModule"):
                current = Computation(m.group(2), [], {})
                comps[current.name] = current
                entry = current.name if m.group(1) else entry
        elif line.startswith("}"):
            current = None
        else:
            ins = _parse_instr(line)
            if ins is not None:
                current.instrs.append(ins)
    by_name = {i.name: i for c in comps.values() for i in c.instrs}
    for c in comps.values():
        for ins in c.instrs:
            for o in ins.operands:
                c.users.setdefault(o, []).append(ins)
    m = re.search(r"num_partitions=(\d+)", text[:text.find("\n")] if "\n" in text else text)
    return Module(comps, entry, {n: i.shape for n, i in by_name.items()}, by_name,
                  int(m.group(1)) if m else 1)


def arrays(shape: str) -> list[tuple[float, int]]:
    """(bytes, memory space) of each array in a shape text; tuples flattened, in order."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES:
            continue
        n = math.prod(int(d.replace("<=", "")) for d in dims.split(",") if d.strip())
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append((n * _DTYPE_BYTES[dtype], int(space.group(1)) if space else 0))
    return out


def nbytes(shape: str, hbm_only: bool = False) -> float:
    """Bytes of a shape; with hbm_only, only of its arrays in memory space 0 (HBM)."""
    return sum(b for b, space in arrays(shape) if not hbm_only or space == 0)


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d.replace("<=", "")) for d in m.group(2).split(",") if d.strip()] if m else []


# ---- replica groups -------------------------------------------------------------------------

def _iota(dims: Sequence[int], reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    """XLA's iota tile assignment [dims]<=[reshape]T(perm) as an array of device ids."""
    a = np.arange(math.prod(reshape)).reshape(reshape)
    if perm:
        a = a.transpose(perm)
    return a.reshape(dims)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _iota_from_text(text: str) -> np.ndarray | None:
    m = re.fullmatch(r"\s*\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", text)
    if not m:
        return None
    return _iota(_ints(m.group(1)), _ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)


def _mesh_axes_groups(text: str) -> list[list[int]]:
    """`mesh['a'=4,'b'=2] {'a'}` (and sub-axes `'a':(1)2`, explicit `device_ids=(...)`): the
    devices that share every coordinate outside the named axes form one group, ordered by the
    named axes in the order given (XLA's MeshAxesReplicaGroupList)."""
    head, _, axes_text = text.rpartition("{")
    mesh = re.match(r"mesh\[([^\]]*)\]", head)
    names, sizes = [], []
    for name, size in re.findall(r"'?([^,'=]+)'?=(\d+)", mesh.group(1)):
        names.append(name.strip())
        sizes.append(int(size))
    ids = re.search(r"device_ids=\((.*)\)", head)
    total = math.prod(sizes)
    devices = np.arange(total)
    if ids:
        iota = _iota_from_text(ids.group(1))
        devices = iota.reshape(-1) if iota is not None else np.asarray(_ints(ids.group(1)))
    refs = []  # (axis index, pre-size, size) of each named axis or sub-axis
    for name, pre, size in re.findall(r"'?([^,'{}:]+)'?(?::\((\d+)\)(\d+))?", axes_text):
        if name.strip():
            i = names.index(name.strip())
            refs.append((i, int(pre) if pre else 1, int(size) if size else sizes[i]))
    # Split each mesh axis into the sub-axes the refs name, then move the named ones last.
    dims, grouped = [], {}
    for i, full in enumerate(sizes):
        cuts = sorted((pre, size, k) for k, (ax, pre, size) in enumerate(refs) if ax == i)
        done = 1
        for pre, size, k in cuts:
            if pre != done:
                dims.append(pre // done)
                done = pre
            grouped[k] = len(dims)
            dims.append(size)
            done *= size
        if done != full or not cuts:
            dims.append(full // done)
    order = [d for d in range(len(dims)) if d not in grouped.values()]
    order += [grouped[k] for k in range(len(refs))]
    per_group = math.prod(size for _, _, size in refs)
    return devices.reshape(dims).transpose(order).reshape(-1, per_group).tolist()


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective's attribute text, in any of XLA's three printed forms:
    explicit `{{0,1},{2,3}}`, iota `[G,S]<=[dims]T(perm)`, or mesh axes `mesh[...] {axes}`.
    No groups (or `{}`): one group of all `num_devices`."""
    i = attrs.find("replica_groups=")
    if i < 0:
        return [list(range(num_devices))]
    text = attrs[i + len("replica_groups="):]
    if text.startswith("{"):
        body = text[:_balanced(text, 0, "{", "}")]
        groups = [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1])]
        return groups or [list(range(num_devices))]
    if text.startswith("mesh"):
        end = text.find("{")
        return _mesh_axes_groups(text[:_balanced(text, end, "{", "}")])
    m = re.match(r"\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?", text)
    if m:
        return _iota_from_text(m.group(0)).tolist()
    raise ValueError(f"unrecognised replica_groups: {text[:80]!r}")


# ---- statistics -----------------------------------------------------------------------------

@dataclasses.dataclass
class Stats:
    """Per-step totals; `add` folds in a callee's totals times its multiplier."""

    flops: float = 0.0
    hbm_bytes: float = 0.0
    collectives: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def add(self, other: Stats, times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.hbm_bytes += times * other.hbm_bytes
        for kind, c in other.collectives.items():
            mine = self.collectives.setdefault(kind, dict.fromkeys(c, 0.0))
            for k, v in c.items():
                mine[k] = mine.get(k, 0.0) + times * v

    def cost(self) -> tuple[float, float, float]:
        wire = sum(c["wire_bytes"] for c in self.collectives.values())
        return (self.flops, self.hbm_bytes, wire)


def _through(comp: Computation, name: str, ops: tuple[str, ...] = ("bitcast",)) -> list[Instr]:
    """Users of `name`, looking through the view ops `ops` to their users."""
    out = []
    for u in comp.users.get(name, []):
        out += _through(comp, u.name, ops) if u.opcode in ops else [u]
    return out


def _source(module: Module, name: str) -> Instr | None:
    """The instruction behind `name`, looking through bitcasts and copies."""
    ins = module.by_name.get(name)
    while ins is not None and ins.opcode in ("bitcast", "copy", "convert") and ins.operands:
        ins = module.by_name.get(ins.operands[0])
    return ins


class _Walker:
    def __init__(self, module: Module, slice_of: Sequence[int] | None):
        self.m = module
        self.slice_of = slice_of
        self.memo: dict[str, Stats] = {}
        self.loops: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.ops: dict[str, int] = {}  # static count of the collective instructions, by kind
        self._groups: dict[str, tuple[int, bool]] = {}

    # -- collectives --
    def _group_info(self, ins: Instr) -> tuple[int, bool]:
        """(group size n, whether any group spans slices)."""
        key = ins.attrs
        if key not in self._groups:
            n_dev = self.m.num_partitions
            if ins.opcode.startswith("collective-permute"):
                m = re.search(r"source_target_pairs=(\{(?:\{\d+,\d+\},?)*\})", ins.attrs)
                groups = [_ints(p) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))] if m else []
            else:
                groups = replica_groups(ins.attrs, n_dev)
            n = max((len(g) for g in groups), default=1)
            crosses = self.slice_of is not None and any(
                len({self.slice_of[d] for d in g}) > 1 for g in groups)
            self._groups[key] = (n, crosses)
        return self._groups[key]

    def _collective(self, ins: Instr, kind: str, stats: Stats) -> None:
        target = _MEGASCALE_TARGET.search(ins.attrs) if ins.opcode == "send" else None
        if target:
            # A multi-slice program is compiled per slice; its DCN collectives are host
            # transfers to the MegaScale runtime, over the slices listed in the target.
            n, crosses = len(_ints(target.group(1))), True
        else:
            n, crosses = self._group_info(ins)
        operand = sum(nbytes(self.m.shapes.get(o, "")) for o in ins.operands)
        full = n * operand if kind == "all-gather" else operand
        factor = {"all-gather": (n - 1) / n, "reduce-scatter": (n - 1) / n,
                  "all-reduce": 2 * (n - 1) / n, "all-to-all": (n - 1) / n,
                  "collective-permute": 1.0}[kind]
        wire = factor * full
        c = stats.collectives.setdefault(kind, {"count": 0.0, "bytes": 0.0, "wire_bytes": 0.0,
                                                "dcn_wire_bytes": 0.0})
        c["count"] += 1
        c["bytes"] += full
        c["wire_bytes"] += wire
        c["dcn_wire_bytes"] += wire if crosses else 0.0
        self.ops[kind] = self.ops.get(kind, 0) + 1

    def _collective_kind(self, comp: Computation, ins: Instr, fused: bool) -> str | None:
        if ins.opcode == "send":
            m = _MEGASCALE_TYPE.search(ins.attrs)
            if m is None or not _MEGASCALE_TARGET.search(ins.attrs):
                return None
            if m.group(1) not in _MEGASCALE_KINDS:
                self.notes.append(f"{ins.name}: DCN transfer {m.group(1)} priced as a "
                                  "collective-permute")
            return _MEGASCALE_KINDS.get(m.group(1), "collective-permute")
        op = ins.opcode.removesuffix("-start")
        if op == "ragged-all-to-all":
            op = "all-to-all"
        if op not in KINDS or ins.opcode.endswith(("-done", "-update")):
            return None
        if fused:
            root = comp.root
            if root.opcode == "custom-call" and "AsyncCollectiveDone" in root.attrs:
                return None  # the done half of an async pair: counted at its start
            users = _through(comp, ins.name)
            if users and all(u.opcode == "tuple" and u.root for u in users):
                return None  # a copy carried through a compute fusion it overlaps
            if op == "all-reduce" and users and all(
                    u.opcode == "dynamic-slice"
                    for u in _through(comp, ins.name, ("bitcast", "get-tuple-element"))):
                return "reduce-scatter"  # the TPU's reduce-scatter: all-reduce, keep a slice
        return op

    # -- FLOPs --
    def _flops(self, ins: Instr) -> float:
        out = math.prod(_dims(ins.shape))
        if ins.opcode == "dot":
            lhs = _dims(self.m.shapes.get(ins.operands[0], ""))
            m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
            contracted = math.prod(lhs[d] for d in _ints(m.group(1))) if m else 1
            return 2.0 * out * contracted
        lhs = _dims(self.m.shapes.get(ins.operands[0], ""))
        rhs = _dims(self.m.shapes.get(ins.operands[1], ""))
        m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
        if not m or (len(m.group(1)), len(m.group(2))) != (len(lhs), len(rhs)):
            return 0.0
        lhs_labels, rhs_labels, out_labels = m.groups()
        features = math.prod(d for d, lab in zip(rhs, rhs_labels, strict=True) if lab == "i")
        out_dims = _dims(ins.shape)
        spatial = range(len(out_labels) - 2)  # spatial dims are labelled 0, 1, ...
        per_position = out / max(math.prod(out_dims[out_labels.index(str(s))]
                                           for s in spatial), 1)
        w = re.search(r"window=\{([^}]*)\}", ins.attrs)
        window = dict(re.findall(r"(\w+)=([\d_x]+)", w.group(1))) if w else {}

        def field(key: str, s: int, default: list[int]) -> list[int]:
            return _ints(window[key].split("x")[s]) if key in window else default

        taps = math.prod(_real_taps(lhs[lhs_labels.index(str(s))], *field("size", s, [1]),
                                    *field("stride", s, [1]), *field("pad", s, [0, 0]),
                                    *field("lhs_dilate", s, [1]), *field("rhs_dilate", s, [1]))
                         for s in spatial)
        return 2.0 * per_position * taps * features

    # -- HBM traffic --
    def _traffic(self, ins: Instr) -> float:
        op, shapes = ins.opcode, self.m.shapes
        if op in _NO_TRAFFIC:
            return 0.0
        reads = [nbytes(shapes.get(o, ""), hbm_only=True) for o in ins.operands]
        if op == "fusion":
            return self._fusion_traffic(ins, reads)
        if op == "dynamic-slice":
            return 2 * nbytes(ins.shape) if reads and reads[0] else nbytes(ins.shape, True)
        if op == "dynamic-update-slice":
            update = nbytes(shapes.get(ins.operands[1], ""))
            return reads[1] + (update if nbytes(ins.shape, True) else 0.0)
        # Async copies (prefetch into on-chip memory, eviction from it) and host transfers: the
        # start reads, the done writes; their tuples also hold the source and sync flags.
        if op in ("copy-start", "send"):
            return reads[0] if reads else 0.0
        if op in ("copy-done", "recv"):
            return sum(size for size, space in arrays(ins.shape)[:1] if space == 0)
        out = nbytes(ins.shape, hbm_only=True)
        if op.endswith("-start"):  # async collectives: the output tuple repeats the operand
            out = max(out - sum(reads), 0.0)
        return sum(reads) + out

    def _fusion_traffic(self, ins: Instr, reads: list[float]) -> float:
        fc = self.m.computations.get(self._callee(ins, "calls") or "")
        if fc is None:
            return sum(reads) + nbytes(ins.shape, True)
        root = fc.root
        if root.opcode == "custom-call" and "AsyncCollectiveDone" in root.attrs:
            return 0.0  # its buffer was written by the start
        if root.opcode == "custom-call" and "AsyncCollectiveStart" in root.attrs:
            return sum(reads) + sum(nbytes(self.m.shapes.get(o, ""), True)
                                    for o in root.operands)
        params = {int(p.args): p for p in fc.instrs if p.opcode == "parameter"}
        total = 0.0
        for i, read in enumerate(reads):
            p = params.get(i)
            if not read or p is None:
                continue
            chain = {p.name} | {u.name for u in _views(fc, p.name)}
            users = _through(fc, p.name)
            if users and all(u.opcode == "dynamic-slice" and u.operands[0] in chain
                             for u in users):
                total += sum(nbytes(u.shape) for u in users)
            elif users and all(u.opcode == "dynamic-update-slice" and u.operands[0] in chain
                               for u in users):
                pass  # updated in place: the write side counts the update
            elif users and all(u.opcode == "tuple" and u.root for u in users):
                pass  # passed through untouched
            else:
                total += read
        outs = arrays(ins.shape)
        elems = root.operands if root.opcode == "tuple" else [root.name]
        if len(elems) != len(outs):
            return total + nbytes(ins.shape, True)
        for name, (size, space) in zip(elems, outs, strict=True):
            src = self.m.by_name.get(name)
            while src is not None and src.opcode == "bitcast":
                src = self.m.by_name.get(src.operands[0])
            if space != 0 or src is None or src.opcode == "parameter":
                continue
            if src.opcode == "dynamic-update-slice":
                total += nbytes(self.m.shapes.get(src.operands[1], ""))
            else:
                total += size
        return total

    # -- control flow --
    @staticmethod
    def _callee(ins: Instr, key: str) -> str | None:
        m = re.search(rf"\b{key}=%?([\w.\-]+)", ins.attrs)
        return m.group(1) if m else None

    def _trip_count(self, ins: Instr) -> tuple[int | None, str]:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attrs)
        if m:
            return int(m.group(1)), "known_trip_count"
        cond = self.m.computations.get(self._callee(ins, "condition") or "")
        if cond is None or cond.root.opcode != "compare":
            return None, "unknown"
        direction = re.search(r"direction=(\w+)", cond.root.attrs)
        a, b = (self.m.by_name.get(o) for o in cond.root.operands[:2])
        if a is None or b is None or direction is None:
            return None, "unknown"
        d = direction.group(1)
        if a.opcode == "constant":  # N > i is i < N
            a, b, d = b, a, {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(d, d)
        bound = _scalar(b)
        if a.opcode != "get-tuple-element" or bound is None or d not in ("LT", "LE"):
            return None, "unknown"
        index = int(re.search(r"index=(\d+)", a.attrs).group(1))
        init = self.m.by_name.get(ins.operands[0]) if ins.operands else None
        start = None
        if init is not None and init.opcode == "tuple" and index < len(init.operands):
            src = _source(self.m, init.operands[index])
            start = _scalar(src) if src is not None else None
        if start is None:
            self.notes.append(f"loop {ins.name}: counter start not found, assumed 0")
            start = 0
        step = self._step(ins, index)
        if step is None:
            self.notes.append(f"loop {ins.name}: counter step not found, assumed 1")
            step = 1
        # The compiler unrolls loops (a windowed einsum's body doing two steps, i += 2).
        return max(-(-(bound - start + (d == "LE")) // step), 0), "condition"

    def _step(self, ins: Instr, index: int) -> int | None:
        """The constant the loop body adds to tuple element `index` (the counter)."""
        body = self.m.computations.get(self._callee(ins, "body") or "")
        if body is None or body.root.opcode != "tuple" or index >= len(body.root.operands):
            return None
        add = _source(self.m, body.root.operands[index])
        if add is None or add.opcode != "add" or len(add.operands) != 2:
            return None
        for counter, other in (add.operands, add.operands[::-1]):
            gte = _source(self.m, counter)
            if (gte is not None and gte.opcode == "get-tuple-element"
                    and re.search(rf"index={index}\b", gte.attrs)):
                step = _scalar(_source(self.m, other))
                return step if step and step > 0 else None
        return None

    def visit(self, name: str, fused: bool = False) -> Stats:
        if name in self.memo:
            return self.memo[name]
        comp = self.m.computations[name]
        stats = Stats()
        for ins in comp.instrs:
            kind = self._collective_kind(comp, ins, fused)
            if kind is not None:
                self._collective(ins, kind, stats)
            if ins.opcode in ("dot", "convolution"):
                stats.flops += self._flops(ins)
            if not fused:
                stats.hbm_bytes += self._traffic(ins)
            if ins.opcode == "fusion":
                callee = self._callee(ins, "calls")
                if callee in self.m.computations:
                    stats.add(self.visit(callee, fused=True))
            elif ins.opcode == "while":
                trips, source = self._trip_count(ins)
                self.loops.append({"while": ins.name, "trip_count": trips, "from": source})
                if trips is None:
                    self.notes.append(f"loop {ins.name}: trip count unknown, counted once")
                for key in ("body", "condition"):
                    callee = self._callee(ins, key)
                    if callee in self.m.computations:
                        stats.add(self.visit(callee), 1 if trips is None else trips)
            elif ins.opcode == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                names = (re.findall(r"%?([\w.\-]+)", m.group(1)) if m else
                         [c for c in (self._callee(ins, "true_computation"),
                                      self._callee(ins, "false_computation")) if c])
                branches = [self.visit(b) for b in names if b in self.m.computations]
                if branches:
                    stats.add(max(branches, key=Stats.cost))
            elif ins.opcode in ("call", "async-start") or (
                    ins.opcode == "custom-call" and "called_computations=" in ins.attrs):
                for callee in re.findall(r"(?:to_apply|calls|called_computations)=\{?%?"
                                         r"([\w.\-]+)", ins.attrs):
                    if callee in self.m.computations:
                        stats.add(self.visit(callee, fused))
        self.memo[name] = stats
        return stats


@functools.lru_cache(maxsize=4096)
def _real_taps(n: int, k: int, stride: int, lo: int, hi: int, lhs_dilate: int,
               rhs_dilate: int) -> int:
    """Window taps, summed over a convolution's output positions along one spatial dim, that
    land on a real input element (not padding, not a dilation hole). The TPU compiler writes
    batched matmuls and weight gradients as convolutions whose window is the batch, over
    padded or dilated inputs: counting every tap would overcount them by the window size.
    `pad` is lo_hi in XLA's text, hence _ints giving both."""
    span = (n - 1) * lhs_dilate + 1
    out = (span + lo + hi - (k - 1) * rhs_dilate - 1) // stride + 1
    pos = np.arange(max(out, 0))[:, None] * stride + np.arange(k)[None, :] * rhs_dilate - lo
    return int(((pos >= 0) & (pos < span) & (pos % lhs_dilate == 0)).sum())


def _views(comp: Computation, name: str) -> list[Instr]:
    out = []
    for u in comp.users.get(name, []):
        if u.opcode == "bitcast":
            out += [u, *_views(comp, u.name)]
    return out


def _scalar(ins: Instr | None) -> int | None:
    if ins is None or ins.opcode != "constant":
        return None
    return int(ins.args) if re.fullmatch(r"\s*-?\d+\s*", ins.args) else None


def analyze(text: str, slice_of: Sequence[int] | None = None) -> dict[str, Any]:
    """Per-step, per-chip figures of an optimized HLO module (see the module docstring):
    {"flops", "hbm_bytes", "collectives": {kind: {"count", "bytes", "wire_bytes",
    "dcn_wire_bytes", "ops"}}, "loops": [{"while", "trip_count", "from"}], "notes"}.
    `count` is per step (loops multiplied out); `ops` is the number of such instructions."""
    module = parse_module(text)
    if slice_of is not None and len(slice_of) != module.num_partitions:
        # A program compiled per slice (TPU multi-slice): its device ids are within the slice.
        slice_of = None
    walker = _Walker(module, slice_of)
    stats = walker.visit(module.entry)
    collectives = {k: {**stats.collectives[k], "ops": walker.ops.get(k, 0)}
                   for k in KINDS if k in stats.collectives}
    return {"flops": stats.flops, "hbm_bytes": stats.hbm_bytes, "collectives": collectives,
            "loops": walker.loops, "notes": walker.notes}


if __name__ == "__main__":
    import sys

    print(json.dumps(analyze(open(sys.argv[1]).read()), indent=1))
