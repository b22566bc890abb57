"""AOT compiles for TPU topologies on this CPU host: per-chip memory under HBM, fits / does not fit,
topology names, and a one-line error for an unknown topology before anything compiles; the
collectives, FLOPs and roofline read from the optimized program, for every stage, and `lvlm
compile --stages --json`."""

import contextlib
import io
import json
import os
import re

import numpy as np
import pytest
from xla_env import without_cpu_only

pytest.importorskip("libtpu", reason="AOT compiles for TPU need the `tpu` extra (libtpu)")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from lvlm_jax import aot, cli, hlo_stats  # noqa: E402
from lvlm_jax import config as config_lib  # noqa: E402
from lvlm_jax.models import layers  # noqa: E402
from lvlm_jax.train import flops as flops_lib  # noqa: E402
from lvlm_jax.train import loop  # noqa: E402

LLAVA15 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "llava15.py")


@pytest.fixture(scope="module", autouse=True)
def _flags_libtpu_knows():
    """libtpu parses XLA_FLAGS at its first compile and aborts on a flag it does not know."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = without_cpu_only(flags)
    yield
    os.environ["XLA_FLAGS"] = flags


def tiny(**overrides):
    return config_lib.load(f"{LLAVA15}:tiny", [(k, str(v)) for k, v in overrides.items()])


@pytest.fixture(scope="module")
def v5e_8_report():
    return aot.compile_report(tiny(), "v5e-8")


def test_tiny_llava_compiles_for_v5e_8_and_fits(v5e_8_report):
    r = v5e_8_report
    assert (r["chip"], r["chips"], r["libtpu_topology"]) == ("v5e", 8, "v5e:2x4")
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    mem = r["memory"]
    for key in ("arguments", "outputs", "temporaries", "generated_code", "total"):
        assert 0 < mem[key] < 16 * 2 ** 30, key
    # The donated train state is aliased: outputs reuse the arguments' buffers.
    assert 0 < mem["aliased"] <= mem["arguments"]
    assert r["fits"] is True and r["error"] is None
    assert r["flops_model"] > 0 and r["flops_xla"] > 0 and r["step_seconds"] > 0
    text = aot.format_report(r)
    assert "v5e-8" in text and "fits                 yes" in text and "GiB" in text


def test_huge_batch_on_a_small_slice_does_not_fit():
    # ~50 GiB of attention temporaries per chip: the TPU compiler itself refuses it.
    r = aot.compile_report(tiny(**{"data.batch_size": 4096, "data.seq_len": 2048}), "v5e-8")
    assert r["fits"] is False
    assert "RESOURCE_EXHAUSTED" in r["error"]
    assert r["memory"]["total"] > 16 * 2 ** 30


def test_two_slices_put_data_parallelism_on_dcn_and_a_small_hbm_does_not_fit():
    r = aot.compile_report(tiny(), "v5p-8", num_slices=2, hbm_gib=1e-4)
    assert (r["chips"], r["num_slices"]) == (8, 2)
    assert r["mesh"]["data"] == 2 and r["mesh"]["fsdp"] == 4
    assert r["memory"]["total"] > r["hbm_bytes"]
    assert r["fits"] is False and r["error"] is None
    text = aot.format_report(r)
    assert "fits                 NO" in text
    # The gradients' reduction over `data` joins the slices: priced at DCN bandwidth.
    dcn = sum(c["dcn_wire_bytes"] for c in r["collectives"].values())
    assert 0 < dcn < sum(c["wire_bytes"] for c in r["collectives"].values())
    assert r["roofline"]["dcn_s"] == pytest.approx(dcn / aot.CHIPS["v5p"].dcn_bytes_per_s)
    assert "of it over DCN" in text and re.search(r"  (DCN|ICI\+DCN)\n", text)


def test_unknown_topology_fails_with_one_line_before_compiling(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("reached the compile path")

    monkeypatch.setattr(aot, "tpu_devices", boom)
    monkeypatch.setattr(loop, "plan", boom)
    for name in ("v5x-8", "v5p-7", "v5e-3", "v5p:4x4", "tpu"):
        with pytest.raises(ValueError) as e:
            aot.compile_report(tiny(), name)
        msg = str(e.value)
        assert "\n" not in msg and f"unknown TPU topology {name!r}" in msg
        assert "v5p-N" in msg and "v5e-N" in msg and "v5p:4x4x4" in msg


@pytest.mark.parametrize("name,shape,chips", [
    ("v5p-8", (2, 2, 1), 4), ("v5p-64", (2, 4, 4), 32), ("v5p-128", (4, 4, 4), 64),
    ("v5p-1536", (8, 8, 12), 768), ("v4-32", (2, 2, 4), 16), ("v5e-8", (2, 4), 8),
    ("v5e-256", (16, 16), 256), ("v6e-64", (8, 8), 64), ("v5p:4x4x8", (4, 4, 8), 128),
    ("V5E:4x8", (4, 8), 32),
])
def test_topology_names_give_maxtexts_slice_shapes(name, shape, chips):
    topo = aot.parse_topology(name)
    assert (topo.shape, topo.chips) == (shape, chips)


# fsdp x tensor: weights all-gathered over fsdp, gradients reduce-scattered, tensor all-reduces.
SHARDED = {"mesh.ici.fsdp": 4, "mesh.ici.tensor": 2}
UNSCANNED = {**SHARDED, "model.language.scan_layers": False, "model.vision.scan_layers": False}


@pytest.fixture(scope="module")
def unscanned():
    """The sft step of the tiny model without layer loops: (report, its optimized HLO text)."""
    texts = []
    compile_with_hlo = aot.compile_with_hlo

    def keeping_text(lowered):
        compiled, text = compile_with_hlo(lowered)
        texts.append(text)
        return compiled, text

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot, "compile_with_hlo", keeping_text)
        report = aot.compile_report(tiny(**UNSCANNED), "v5e-8")
    return report, texts[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`lvlm compile --stages=sft,ppo --json=...` of the tiny model (scanned): (exit code,
    printed text, JSON reports)."""
    path = tmp_path_factory.mktemp("compile") / "reports.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["compile", f"--config={LLAVA15}:tiny", "--topology=v5e-8",
                         "--stages=sft,ppo", f"--json={path}",
                         *(f"--config.{k}={v}" for k, v in SHARDED.items())])
    return code, out.getvalue(), json.loads(path.read_text())


def printed_counts(text):
    """kind -> count, from the collectives table(s) of format_report's text."""
    return [{line.split()[0]: int(line.split()[1]) for line in block.splitlines()
             if line.split() and line.split()[0] in hlo_stats.KINDS}
            for block in text.split("TPU AOT compile:")[1:]]


def test_printed_collective_counts_equal_a_count_of_the_hlo_text(unscanned):
    """Without loops each collective runs once a step. Counted apart from the parser: distinct
    channel ids per op (the TPU compiler's async copies of one collective share its channel),
    and reduce-scatters by the name the compiler gives their fusions (all-reduce-scatter.N:
    an all-reduce that keeps a slice; the parser goes by that structure, not the name)."""
    report, text = unscanned
    assert report["hlo_loops"] == []
    [printed] = printed_counts(aot.format_report(report))

    def channels(op):
        return {m.group(1) for m in re.finditer(
            rf" {op}(?:-start)?\([^\n]*?channel_id=(\d+)", text)}

    assert printed["all-gather"] == len(channels("all-gather")) > 0
    assert printed["reduce-scatter"] == len(set(re.findall(r"calls=%(all-reduce-scatter[\w.]*)",
                                                           text))) > 0
    assert printed["all-reduce"] + printed["reduce-scatter"] == len(channels("all-reduce"))
    assert printed["all-reduce"] > 0
    assert printed["all-to-all"] == len(channels("all-to-all"))
    assert printed["collective-permute"] == len(channels("collective-permute"))
    # Every replica-group form the compiler printed partitions the 8 devices.
    for attrs in set(re.findall(r"replica_groups=[^\n]*", text)):
        groups = hlo_stats.replica_groups(attrs, 8)
        assert sorted(d for g in groups for d in g) == list(range(8)), attrs


def test_scanned_and_unscanned_steps_agree_on_flops_where_cost_analysis_does_not(unscanned,
                                                                                cli_run):
    """The same step with its layers in loops: the loop bodies count once per layer, so the
    matmul FLOPs match the unrolled program's (measured 2.914e8 vs 2.877e8 per chip; the
    scanned backward also computes the first layer's unused input gradient). XLA's cost
    analysis counts each body once (2.01e8 vs 3.21e8). The collectives differ, by the
    partitioner's choice, not the count: at this toy size it gathers activations instead of
    weights inside the loop bodies (25 all-gathers a step vs 50)."""
    flat, _ = unscanned
    scanned = cli_run[2][0]
    assert scanned["stage"] == "sft" and scanned["scan_layers"] is True
    assert sorted({(x["trip_count"], x["from"]) for x in scanned["hlo_loops"]}) == [
        (2, "condition"), (3, "condition")]  # 2 decoder layers (forward, backward), 3 vision
    assert scanned["hlo_flops_per_chip"] == pytest.approx(flat["hlo_flops_per_chip"], rel=0.03)
    assert scanned["flops_xla_per_chip"] < 0.8 * flat["flops_xla_per_chip"]
    assert any(c["count"] > c["ops"] for c in scanned["collectives"].values())
    assert all(c["count"] == c["ops"] for c in flat["collectives"].values())


def _toy_compile(f, out_spec):
    mesh = jax.sharding.Mesh(np.array(aot.tpu_devices(aot.parse_topology("v5e-8"))).reshape(4, 2),
                             ("fsdp", "tensor"))
    args = [jax.ShapeDtypeStruct((16, 128, 256), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P("fsdp"))),
            jax.ShapeDtypeStruct((6, 256, 256), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(*out_spec)))]
    compiled, text = aot.compile_with_hlo(
        jax.jit(f, out_shardings=NamedSharding(mesh, P(*out_spec))).lower(*args))
    return hlo_stats.analyze(text), compiled.cost_analysis()["flops"]


def test_every_iteration_of_a_scanned_stack_counts():
    """Six [256, 256] layers on 16 x 128 tokens, weights FSDP x tensor sharded over 8 chips:
    the gradient does 18 matmuls scanned (dW and dX for each layer) and 17 unrolled (the first
    layer's dX is not needed), each 2 x 2048 x 256 x 256 FLOPs split 8 ways."""
    def layers(x, ws, scan):
        if scan:
            return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]
        for i in range(6):
            x = jnp.tanh(x @ ws[i])
        return x

    matmul = 2 * 16 * 128 * 256 * 256 / 8
    for scan, matmuls in ((True, 18), (False, 17)):
        grad = jax.grad(lambda x, ws, scan=scan: jnp.sum(layers(x, ws, scan)), argnums=1)
        stats, xla_flops = _toy_compile(grad, (None, "fsdp", "tensor"))
        assert stats["flops"] == matmuls * matmul
        if scan:
            assert [x["trip_count"] for x in stats["loops"]] == [6, 6]
            ag = stats["collectives"]["all-gather"]
            assert ag["count"] == 6 * ag["ops"]  # every gather sits in one of the two loops
            assert xla_flops < 0.25 * stats["flops"]  # the cost analysis sees one iteration


def test_roofline_adds_collectives_to_the_slower_of_compute_and_memory(v5e_8_report):
    r = v5e_8_report
    chip = aot.CHIPS["v5e"]
    f = r["roofline"]
    assert r["chip_spec"]["peak_flops"] == chip.peak_flops == flops_lib.PEAK_FLOPS["v5e"]
    assert f["compute_s"] == pytest.approx(r["hlo_flops_per_chip"] / chip.peak_flops)
    assert f["memory_s"] == pytest.approx(r["hbm_bytes_per_chip"] / chip.hbm_bytes_per_s)
    wire = sum(c["wire_bytes"] for c in r["collectives"].values())
    assert wire > 0 and f["collective_s"] == pytest.approx(wire / chip.ici_bytes_per_s)
    assert f["dcn_s"] == 0
    assert f["step_s"] == pytest.approx(max(f["compute_s"], f["memory_s"]) + f["collective_s"])
    assert f["step_s_overlapped"] == max(f["compute_s"], f["memory_s"], f["collective_s"])
    assert f["mfu"] == pytest.approx(r["flops_model_stage"] / (8 * chip.peak_flops * f["step_s"]))
    assert 0.9 < r["hlo_flops_per_chip"] * 8 / r["flops_model"] < 2  # full remat: ~4/3
    text = aot.format_report(r)
    assert "collectives per step, per chip" in text and "predicted step" in text
    assert f"MFU {100 * f['mfu']:.0f}%" in text


def test_tiny_llava_with_splash_attention_compiles_for_v5p_8_under_shard_map(monkeypatch):
    """fsdp=2 x tensor=2 on a v5p-8's 4 chips, splash in both towers. The Pallas kernel runs in
    a shard_map over the mesh (models/splash.py); given no mesh, it is left to the partitioner,
    which refuses it, as every multi-chip splash step did before."""
    cfg = tiny(**{"mesh.ici.fsdp": 2, "mesh.ici.tensor": 2, "data.batch_size": 4,
                  "model.language.attention": "splash", "model.vision.attention": "splash",
                  "model.language.num_kv_heads": 1})  # one kv head: a copy per tensor shard
    # At the default precision: the suite's "highest" (exact fp32 CPU matmuls) has no Mosaic
    # form for bf16 operands (test_splash_refuses_a_matmul_precision_mosaic_cannot_compile).
    with monkeypatch.context() as mp, jax.default_matmul_precision("default"):
        mp.setattr(layers, "current_activation_mesh", lambda: None)
        with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
            aot.compile_report(cfg, "v5p-8")
    texts = []
    compile_with_hlo = aot.compile_with_hlo

    def keeping_text(lowered):
        compiled, text = compile_with_hlo(lowered)
        texts.append(text)
        return compiled, text

    monkeypatch.setattr(aot, "compile_with_hlo", keeping_text)
    with jax.default_matmul_precision("default"):
        r = aot.compile_report(cfg, "v5p-8")
    assert (r["chip"], r["chips"]) == ("v5p", 4)
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert r["fits"] is True and r["error"] is None
    kernels = re.findall(r"%(splash_mqa_[\w.]+) = (.*?) custom-call\(", texts[0])
    names = {name.split(".")[0] for name, _ in kernels}
    # The decoder's unpacked rows take the causal mask alone, forward and backward; the frozen
    # vision tower's 17 tokens, padded to a 128 block, segment ids, forward only.
    assert {"splash_mqa_fwd_residuals", "splash_mqa_dq_no_residuals",
            "splash_mqa_dkv_no_residuals"} <= names
    assert any(name.startswith("splash_mqa_fwd_segmented") for name in names), names
    # Per chip: 2 of the 4 rows, and of the 4 query heads the 2 that share its kv head copy.
    decoder = [shapes for name, shapes in kernels if name.startswith("splash_mqa_fwd_res")]
    assert all(re.search(r"bf16\[2,2,128,16\]", shapes) for shapes in decoder), decoder


def test_chip_table_covers_every_generation():
    assert set(aot.CHIPS) == set(aot.HBM_GIB) == {"v4", "v5e", "v5p", "v6e"}
    for name, chip in aot.CHIPS.items():
        assert chip.peak_flops == flops_lib.PEAK_FLOPS[name]
        assert chip.hbm_bytes_per_s > chip.ici_bytes_per_s > chip.dcn_bytes_per_s > 0


def test_ppo_update_step_batch_is_prompt_plus_response():
    cfg = aot.stage_config(tiny(), "ppo")
    assert cfg.data.kind == "prompt"
    setup = loop.plan(cfg)
    batch = aot.abstract_batch(setup)
    n = cfg.ppo.max_new_tokens
    assert batch["input_ids"].shape == (16, 128 + n) and batch["input_ids"].dtype == jnp.int32
    assert batch["pixel_values"].shape == (16, 1, 56, 56, 3)
    for field in ("response_mask", "old_log_probs", "old_values", "advantages", "returns"):
        assert (batch[field].shape, batch[field].dtype) == ((16, n), jnp.float32), field
    flops, what = aot.model_flops(setup)
    assert what == f"16 sequences of 128 prompt + {n} response tokens"
    assert flops > setup.flops_per_step  # 144 tokens a sequence, not 128


def test_cli_compiles_each_stage_prints_it_and_writes_json(cli_run):
    code, text, reports = cli_run
    assert code == 0
    assert [r["stage"] for r in reports] == ["sft", "ppo"]
    assert "step                 sft" in text and "step                 ppo" in text
    # The table prints every kind, 0 for one the program lacks.
    assert printed_counts(text) == [
        {k: round(r["collectives"].get(k, {"count": 0})["count"]) for k in hlo_stats.KINDS}
        for r in reports]
    sft, ppo = reports
    assert ppo["flops_model_stage"] > sft["flops_model_stage"]
    assert any("the update step only" in n for n in ppo["notes"])
    for r in reports:
        assert r["fits"] and r["roofline"]["step_s"] > 0 and r["hlo_flops_per_chip"] > 0


def test_cli_refuses_an_unknown_stage_before_compiling(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise AssertionError("reached the compile path")

    monkeypatch.setattr(aot, "compile_report", boom)
    code = cli.main(["compile", f"--config={LLAVA15}:tiny", "--topology=v5e-8",
                     "--stages=sft,dpoo"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown stage 'dpoo'" in err and "ppo" in err and "\n" not in err.strip()
