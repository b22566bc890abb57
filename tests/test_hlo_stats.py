"""The HLO-text statistics on hand-written modules: loop multipliers (known trip counts, trip
counts from the condition, unknown ones), async collective pairs counted once, the TPU's fused
reduce-scatter, replica groups in all three printed forms, FLOPs, and the HBM-traffic estimate."""
# ruff: noqa: E501 (HLO text keeps one instruction a line, as the compiler prints it)

import pytest

from lvlm_jax import hlo_stats

# The forms the TPU compiler prints (see a compiled step's text): an all-gather as an async
# start fusion, a compute fusion that carries a copy of it, and a done fusion; a reduce-scatter as
# a fusion that all-reduces and keeps a dynamic slice. The body runs 12 + 3 + 1 times; a second
# loop, unrolled by the compiler's habit of stepping its counter by 2, 4 times (0, 2, 4, 6 < 7).
LOOPS = """HloModule loops, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%gather_start (p0: bf16[32,64]) -> (bf16[32,64], bf16[128,64], u32[]) {
  %p0 = bf16[32,64]{1,0} parameter(0)
  %ag.1 = bf16[128,64]{1,0} all-gather(%p0), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %cc.1 = (bf16[32,64]{1,0}, bf16[128,64]{1,0}, u32[]{:S(2)}) custom-call(%ag.1), custom_call_target="AsyncCollectiveStart"
}

%overlapped (p0.1: bf16[32,64], p1.1: bf16[128,64], p2.1: f32[16,64], p3.1: bf16[64,64]) -> (f32[16,64], bf16[32,64], bf16[128,64]) {
  %p0.1 = bf16[32,64]{1,0} parameter(0)
  %p1.1 = bf16[128,64]{1,0} parameter(1)
  %ag.2 = bf16[128,64]{1,0} all-gather(%p0.1), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  %p2.1 = f32[16,64]{1,0} parameter(2)
  %p3.1 = bf16[64,64]{1,0} parameter(3)
  %dot.1 = f32[16,64]{1,0} dot(%p2.1, %p3.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t.1 = (f32[16,64]{1,0}, bf16[32,64]{1,0}, bf16[128,64]{1,0}) tuple(%dot.1, %p0.1, %ag.2)
}

%gather_done (p0.2: bf16[32,64], p1.2: bf16[128,64]) -> bf16[128,64] {
  %p0.2 = bf16[32,64]{1,0} parameter(0)
  %p1.2 = bf16[128,64]{1,0} parameter(1)
  %ag.3 = bf16[128,64]{1,0} all-gather(%p0.2), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, use_global_device_ids=true
  ROOT %cc.3 = bf16[128,64]{1,0} custom-call(%p0.2, %p1.2, %ag.3), custom_call_target="AsyncCollectiveDone"
}

%reduce_scatter (in.4: f32[128,64]) -> f32[32,64] {
  %in.4 = f32[128,64]{1,0} parameter(0)
  %ar.4 = f32[128,64]{1,0} all-reduce(%in.4), channel_id=2, replica_groups=mesh['x'=2,'y'=4] {'y'}, use_global_device_ids=true, to_apply=%add
  %pid = u32[] partition-id()
  %zero.4 = u32[] constant(0)
  ROOT %ds.4 = f32[32,64]{1,0} dynamic-slice(%ar.4, %pid, %zero.4), dynamic_slice_sizes={32,64}
}

%body (bp: (s32[], bf16[32,64], f32[16,64], f32[128,64])) -> (s32[], bf16[32,64], f32[16,64], f32[128,64]) {
  %bp = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, /*index=3*/f32[128,64]{1,0}) parameter(0)
  %i.b = s32[] get-tuple-element(%bp), index=0
  %one = s32[] constant(1)
  %i.next = s32[] add(%i.b, %one)
  %w = bf16[32,64]{1,0} get-tuple-element(%bp), index=1
  %h = f32[16,64]{1,0} get-tuple-element(%bp), index=2
  %start = (bf16[32,64]{1,0}, bf16[128,64]{1,0}, u32[]{:S(2)}) fusion(%w), kind=kCustom, calls=%gather_start
  %s0 = bf16[32,64]{1,0} get-tuple-element(%start), index=0
  %s1 = bf16[128,64]{1,0} get-tuple-element(%start), index=1
  %wsq = bf16[64,64]{1,0} constant({...})
  %cont = (f32[16,64]{1,0}, bf16[32,64]{1,0}, bf16[128,64]{1,0}) fusion(%s0, %s1, %h, %wsq), kind=kOutput, calls=%overlapped
  %h.new = f32[16,64]{1,0} get-tuple-element(%cont), index=0
  %c1 = bf16[32,64]{1,0} get-tuple-element(%cont), index=1
  %c2 = bf16[128,64]{1,0} get-tuple-element(%cont), index=2
  %full = bf16[128,64]{1,0} fusion(%c1, %c2), kind=kCustom, calls=%gather_done
  %full.f32 = f32[128,64]{1,0} convert(%full)
  %rs = f32[32,64]{1,0} fusion(%full.f32), kind=kCustom, calls=%reduce_scatter
  %ar = f32[16,64]{1,0} all-reduce(%h.new), channel_id=3, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add
  ROOT %bt = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) tuple(%i.next, %w, %ar, %full.f32)
}

%cond (cp: (s32[], bf16[32,64], f32[16,64], f32[128,64])) -> pred[] {
  %cp = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) parameter(0)
  %i.c = s32[] get-tuple-element(%cp), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.c, %n), direction=LT
}

%opaque_cond (op: (s32[], bf16[32,64], f32[16,64], f32[128,64])) -> pred[] {
  %op = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) parameter(0)
  ROOT %flag = pred[] custom-call(%op), custom_call_target="keep_going"
}

%body_by_two (bb: (s32[], f32[16,64])) -> (s32[], f32[16,64]) {
  %bb = (s32[], f32[16,64]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%bb), index=0
  %step = s32[] constant(2)
  %i.2next = s32[] add(%step, %i.2)
  %x.2 = f32[16,64]{1,0} get-tuple-element(%bb), index=1
  %k.2 = bf16[64,64]{1,0} constant({...})
  %y.2 = f32[16,64]{1,0} dot(%x.2, %k.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %bt.2 = (s32[], f32[16,64]{1,0}) tuple(%i.2next, %y.2)
}

%cond_by_two (cb: (s32[], f32[16,64])) -> pred[] {
  %cb = (s32[], f32[16,64]{1,0}) parameter(0)
  %i.3 = s32[] get-tuple-element(%cb), index=0
  %seven = s32[] constant(7)
  ROOT %gt.3 = pred[] compare(%seven, %i.3), direction=GT
}

%wrapped_a2a (wp: f32[8,64]) -> f32[8,64] {
  %wp = f32[8,64]{1,0} parameter(0)
  ROOT %a2a = f32[8,64]{1,0} all-to-all(%wp), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

%branch_cheap (bp0: f32[16,64]) -> f32[16,64] {
  ROOT %bp0 = f32[16,64]{1,0} parameter(0)
}

%branch_dot (bp1: f32[16,64]) -> f32[16,64] {
  %bp1 = f32[16,64]{1,0} parameter(0)
  %k1 = bf16[64,64]{1,0} constant({...})
  ROOT %dot.b = f32[16,64]{1,0} dot(%bp1, %k1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (w0: bf16[32,64], h0: f32[16,64], g0: f32[128,64], x8: f32[8,64], x4: f32[4,64], pr: s32[], cl: f32[64,64,1], cr: f32[4,128,64]) -> f32[16,64] {
  %w0 = bf16[32,64]{1,0} parameter(0)
  %h0 = f32[16,64]{1,0} parameter(1)
  %g0 = f32[128,64]{1,0} parameter(2)
  %x8 = f32[8,64]{1,0} parameter(3)
  %x4 = f32[4,64]{1,0} parameter(4)
  %pr = s32[] parameter(5)
  %cl = f32[64,64,1]{2,1,0} parameter(6)
  %cr = f32[4,128,64]{2,1,0} parameter(7)
  %zero = s32[] constant(0)
  %init.a = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) tuple(%zero, %w0, %h0, %g0)
  %loop.a = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) while(%init.a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %two = s32[] constant(2)
  %start.b = s32[] copy(%two)
  %init.b = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) tuple(%start.b, %w0, %h0, %g0)
  %loop.b = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) while(%init.b), condition=%cond, body=%body
  %loop.c = (s32[], bf16[32,64]{1,0}, f32[16,64]{1,0}, f32[128,64]{1,0}) while(%init.a), condition=%opaque_cond, body=%body
  %init.d = (s32[], f32[16,64]{1,0}) tuple(%zero, %h0)
  %loop.d = (s32[], f32[16,64]{1,0}) while(%init.d), condition=%cond_by_two, body=%body_by_two
  %ags = (f32[4,64]{1,0}, f32[32,64]{1,0}) all-gather-start(%x4), channel_id=5, replica_groups={}, dimensions={0}, use_global_device_ids=true
  %agd = f32[32,64]{1,0} all-gather-done(%ags)
  %a2a-start = ((f32[8,64]{1,0}), f32[8,64]{1,0}, s32[]) async-start(%x8), calls=%wrapped_a2a
  %a2a-done = f32[8,64]{1,0} async-done(%a2a-start), calls=%wrapped_a2a
  %perm = f32[4,64]{1,0} collective-permute(%x4), channel_id=6, source_target_pairs={{0,4},{4,0}}
  %pick = f32[16,64]{1,0} conditional(%pr, %h0, %h0), branch_computations={%branch_cheap, %branch_dot}
  %conv = f32[4,128,64]{2,1,0} convolution(%cl, %cr), window={size=4 pad=3_3 rhs_reversal=1}, dim_labels=bf0_0oi->0fb
  ROOT %out = f32[16,64]{1,0} get-tuple-element(%loop.a), index=2
}
"""
BODY_RUNS = 12 + 3 + 1  # known_trip_count; 5 - 2 from the condition; unknown: once
SLICES = [0, 0, 0, 0, 1, 1, 1, 1]  # two slices of four devices


@pytest.fixture(scope="module")
def loops():
    return hlo_stats.analyze(LOOPS, slice_of=SLICES)


def test_loop_bodies_count_once_per_trip_known_read_from_the_condition_or_once(loops):
    assert [(x["while"], x["trip_count"], x["from"]) for x in loops["loops"]] == [
        ("loop.a", 12, "known_trip_count"), ("loop.b", 3, "condition"),
        ("loop.c", None, "unknown"), ("loop.d", 4, "condition")]
    assert [n for n in loops["notes"] if "loop" in n] == [
        "loop loop.c: trip count unknown, counted once"]
    # One dot of 16x64x64 per run of either body, the costlier branch of the conditional, and
    # a weight gradient written as a convolution whose window is the batch (4 real taps, not
    # 4 x 4).
    dot = 2 * 16 * 64 * 64
    assert loops["flops"] == (BODY_RUNS + 4) * dot + dot + 2 * 128 * 64 * 4 * 64


def test_async_pairs_and_fused_copies_count_once_and_bytes_follow_the_definitions(loops):
    c = loops["collectives"]
    # The fused start counts; its done and the copy carried through the compute fusion do not.
    # Plus the entry's all-gather-start (its -done not again): replica_groups={} is all 8.
    assert c["all-gather"]["ops"] == 2
    assert c["all-gather"]["count"] == BODY_RUNS + 1
    assert c["all-gather"]["bytes"] == BODY_RUNS * 4 * 32 * 64 * 2 + 8 * 4 * 64 * 4
    assert c["all-gather"]["wire_bytes"] == (BODY_RUNS * 3 / 4 * 4 * 32 * 64 * 2
                                             + 7 / 8 * 8 * 4 * 64 * 4)
    # All-reduce then keep a dynamic slice: a reduce-scatter of the full f32[128,64], n = 4.
    assert c["reduce-scatter"] == {"count": BODY_RUNS, "bytes": BODY_RUNS * 128 * 64 * 4,
                                   "wire_bytes": BODY_RUNS * 3 / 4 * 128 * 64 * 4,
                                   "dcn_wire_bytes": 0.0, "ops": 1}
    # Groups {0,4},... join the two slices: priced at DCN. A ring all-reduce sends 2(n-1)/n.
    assert c["all-reduce"] == {"count": BODY_RUNS, "bytes": BODY_RUNS * 16 * 64 * 4,
                               "wire_bytes": BODY_RUNS * 16 * 64 * 4,
                               "dcn_wire_bytes": BODY_RUNS * 16 * 64 * 4, "ops": 1}
    # async-start/async-done around an all-to-all: once, from the start.
    assert (c["all-to-all"]["count"], c["all-to-all"]["bytes"]) == (1, 8 * 64 * 4)
    assert c["all-to-all"]["dcn_wire_bytes"] == 7 / 8 * 8 * 64 * 4
    assert c["collective-permute"] == {"count": 1, "bytes": 4 * 64 * 4, "wire_bytes": 4 * 64 * 4,
                                       "dcn_wire_bytes": 4 * 64 * 4, "ops": 1}


def test_without_a_slice_map_everything_is_ici():
    c = hlo_stats.analyze(LOOPS)["collectives"]
    assert all(k["dcn_wire_bytes"] == 0 for k in c.values())


@pytest.mark.parametrize("attrs,groups", [
    ("replica_groups={{0,1},{2,3}}, dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups={}, to_apply=%add", [[0, 1, 2, 3, 4, 5, 6, 7]]),
    ("channel_id=1, to_apply=%add", [[0, 1, 2, 3, 4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[8], use_global_device_ids=true", [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ("replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}", [[0, 2, 4, 6], [1, 3, 5, 7]]),
    ("replica_groups=[4,2]<=[2,2,2]T(2,1,0),", [[0, 4], [2, 6], [1, 5], [3, 7]]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, use_global_device_ids=true",
     [[0, 2, 4, 6], [1, 3, 5, 7]]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, x", [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0','axis_1'}", [list(range(8))]),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1','axis_0'}",
     [[0, 2, 4, 6, 1, 3, 5, 7]]),
    # A sub-axis a:(pre)size: a=8 splits into [2, 2, 2] (major to minor); the middle groups.
    ("replica_groups=mesh['a'=8] {'a':(2)2}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ("replica_groups=mesh['x'=2,'y'=2], device_ids=(0,2,1,3) {'x'}", [[0, 1], [2, 3]]),
])
def test_replica_groups_in_explicit_iota_and_mesh_axes_forms(attrs, groups):
    assert hlo_stats.replica_groups(attrs, 8 if "{}" in attrs or "replica" not in attrs
                                    else 0) == groups


def test_iota_groups_equal_their_explicit_list():
    # XLA prints [G,S]<=[dims]T(perm) for the explicit list it stands for: iota over dims,
    # transposed by perm, cut into G groups of S.
    explicit = hlo_stats.replica_groups("replica_groups={{0,4,8,12},{1,5,9,13},{2,6,10,14},"
                                        "{3,7,11,15}}", 0)
    assert hlo_stats.replica_groups("replica_groups=[4,4]<=[4,4]T(1,0)", 0) == explicit


HBM = """HloModule hbm, num_partitions=1

%slice_then_square (p.0: f32[10,256,256], p.1: s32[]) -> f32[256,256] {
  %p.0 = f32[10,256,256]{2,1,0} parameter(0)
  %p.1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = f32[1,256,256]{2,1,0} dynamic-slice(%p.0, %p.1, %z, %z), dynamic_slice_sizes={1,256,256}
  %b = f32[256,256]{1,0} bitcast(%ds)
  ROOT %m = f32[256,256]{1,0} multiply(%b, %b)
}

%update (q.0: f32[10,256,256], q.1: f32[256,256], q.2: s32[]) -> f32[10,256,256] {
  %q.0 = f32[10,256,256]{2,1,0} parameter(0)
  %q.1 = f32[256,256]{1,0} parameter(1)
  %q.2 = s32[] parameter(2)
  %z.1 = s32[] constant(0)
  %u = f32[1,256,256]{2,1,0} bitcast(%q.1)
  ROOT %dus = f32[10,256,256]{2,1,0} dynamic-update-slice(%q.0, %u, %q.2, %z.1, %z.1)
}

ENTRY %main (stack: f32[10,256,256], i: s32[], v: f32[256,256]) -> (f32[10,256,256], f32[256,256]) {
  %stack = f32[10,256,256]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %v = f32[256,256]{1,0:T(8,128)S(1)} parameter(2)
  %layer = f32[256,256]{1,0} fusion(%stack, %i), kind=kLoop, calls=%slice_then_square
  %onchip = f32[256,256]{1,0:T(8,128)S(1)} add(%v, %v)
  %sum = f32[256,256]{1,0} add(%layer, %onchip)
  %new = f32[10,256,256]{2,1,0} fusion(%stack, %sum, %i), kind=kLoop, calls=%update
  %copy = f32[256,256]{1,0} copy(%sum)
  ROOT %t = (f32[10,256,256]{2,1,0}, f32[256,256]{1,0}) tuple(%new, %copy)
}
"""


def test_hbm_traffic_reads_slices_updates_in_place_and_skips_on_chip_memory():
    layer = 256 * 256 * 4
    expected = (layer + 4 + layer      # one layer of the stack read (and its index), one written
                + 0                    # an add wholly in on-chip memory (S(1))
                + layer + layer        # reads the layer (the S(1) operand is free), writes one
                + layer + 4 + layer    # the stack updated in place: read and write one layer
                + layer + layer)       # copy
    assert hlo_stats.analyze(HBM)["hbm_bytes"] == expected


MULTISLICE = """HloModule per_slice, num_partitions=8

ENTRY %main (g: bf16[1024,128]) -> bf16[1024,128] {
  %g = bf16[1024,128]{1,0} parameter(0)
  %after-all = token[] after-all(), frontend_attributes={MegascaleRendezvousKeyName="psum.7_0"}
  %send = (bf16[1024,128]{1,0}, u32[]{:S(2)}, token[]) send(%g, %after-all), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2,3,4}x{0:7}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (bf16[1024,128]{1,0}, u32[]{:S(2)}, token[]) recv(%after-all), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_megascale_reduce_operation="SUM",_xla_megascale_target="{1,2,3,4}x{0:7}",_xla_megascale_transfer_type="ALL_REDUCE"}
  %send-done = token[] send-done(%send), channel_id=2, is_host_transfer=true
  %recv-done = (bf16[1024,128]{1,0}, token[]) recv-done(%recv), channel_id=1, is_host_transfer=true
  ROOT %out = bf16[1024,128]{1,0} get-tuple-element(%recv-done), index=0
}
"""


def test_a_multi_slice_programs_dcn_transfer_is_one_collective_over_its_slices():
    # The TPU compiler compiles per slice and hands a DCN all-reduce to the MegaScale runtime
    # as a send/recv pair naming the slices it joins (here 4): counted once, priced at DCN.
    buffer = 1024 * 128 * 2
    assert hlo_stats.analyze(MULTISLICE)["collectives"] == {"all-reduce": {
        "count": 1, "bytes": buffer, "wire_bytes": 2 * 3 / 4 * buffer,
        "dcn_wire_bytes": 2 * 3 / 4 * buffer, "ops": 1}}
