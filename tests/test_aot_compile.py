"""AOT compiles for TPU topologies on this CPU host: per-chip memory under HBM, fits / does not fit,
topology names, and a one-line error for an unknown topology before anything compiles."""

import os

import pytest
from xla_env import without_cpu_only

pytest.importorskip("libtpu", reason="AOT compiles for TPU need the `tpu` extra (libtpu)")

from lvlm_jax import aot  # noqa: E402
from lvlm_jax import config as config_lib  # noqa: E402
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
    assert "fits                 NO" in aot.format_report(r)


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
