"""Checkpoints: a run killed with SIGKILL and resumed ends bitwise equal to an uninterrupted
one; SIGTERM saves; a resharded restore continues with the same loss; partial loading."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from training_utils import random_batches, tiny_config
from xla_env import cpu_env

from lvlm_jax.checkpoints.manager import Checkpointer, restore_params
from lvlm_jax.checkpoints.partial import merge_params
from lvlm_jax.param_paths import flat_paths
from lvlm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The vision tower frozen (the demo's sft trains it): these runs test the loop, not the tower,
# and its backward only adds compile time to every process.
TRAIN = ["train", "--config=experiments/demo.py:sft", "--config.optimizer.freeze=['vision/.*']",
         "--config.train.total_steps=8",
         "--config.data.batch_size=8", "--config.checkpoint.every_steps=1",
         "--config.train.progress=false"]


def start(workdir):
    env = cpu_env()
    return subprocess.Popen([sys.executable, "-m", "lvlm_jax", *TRAIN, f"--workdir={workdir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def wait_for_step(proc, workdir, step, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(s >= step for s in finished_steps(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def final_params(workdir):
    params, step = restore_params(str(workdir))
    assert step == 8
    return flat_paths(params)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    proc = start(workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return final_params(workdir)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, uninterrupted):
    kill_at = int(np.random.default_rng().integers(2, 6))
    proc = start(tmp_path)
    wait_for_step(proc, tmp_path, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(finished_steps(tmp_path)) < 8
    proc = start(tmp_path)  # resumes from the latest finished checkpoint
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    resumed = final_params(tmp_path)
    assert resumed.keys() == uninterrupted.keys()
    for path, value in uninterrupted.items():
        assert resumed[path].tobytes() == value.tobytes(), path


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = start(tmp_path)
    wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    steps = finished_steps(tmp_path)
    assert steps and steps[-1] >= 2


def test_resharded_restore_continues_with_the_same_loss(tmp_path):
    cfg = tiny_config(**{"optimizer.learning_rate": 1e-3})
    cfg.mesh.ici = {"data": 1, "fsdp": 8, "tensor": 1, "sequence": 1}
    saver = loop.build(cfg)
    batches = random_batches(cfg)
    loop.run_steps(saver, batches, 2)
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(2, saver.state)
    ckpt.close()
    next_batch = next(batches)
    _, hist = loop.run_steps(saver, iter([next_batch]), 3)
    expected = hist[0]["loss"]
    for ici, devices in (({"fsdp": 1}, jax.devices()[:1]), ({"data": 2, "fsdp": 4}, None)):
        cfg2 = tiny_config(**{"optimizer.learning_rate": 1e-3})
        cfg2.mesh.ici = {a: ici.get(a, 1) for a in ("data", "fsdp", "tensor", "sequence")}
        setup = loop.plan(cfg2, devices=devices)
        reader = Checkpointer(str(tmp_path))
        setup.state, step = reader.restore(setup.abstract_state)
        reader.close()
        assert step == 2
        _, hist = loop.run_steps(setup, iter([next_batch]), 3)
        np.testing.assert_allclose(hist[0]["loss"], expected, rtol=1e-5)


def test_partial_loading_reports_and_rejects_shape_mismatches():
    own = {"vision": {"w": np.zeros((2, 2))}, "decoder": {"w": np.zeros((3,)),
                                                          "new": np.zeros(1)}}
    loaded = {"vision": {"w": np.ones((2, 2))}, "decoder": {"w": np.ones((3,))},
              "old": {"w": np.ones(1)}}
    merged, report = merge_params(own, loaded, [r"vision/.*"])
    assert merged["vision"]["w"].sum() == 4 and merged["decoder"]["w"].sum() == 0
    assert report.startswith("loaded 1 parameters, missing 0, unexpected 0")
    merged, report = merge_params(own, loaded)
    assert "missing 1 (decoder/new)" in report and "unexpected 1 (old/w)" in report
    with pytest.raises(ValueError, match=r"parameter vision/w: checkpoint has shape \(3,\)"):
        merge_params(own, {"vision": {"w": np.ones(3)}})


def test_export_params_then_from_pretrained_gives_the_training_logits(tmp_path, uninterrupted):
    import lvlm_jax
    from lvlm_jax.checkpoints.export import export_checkpoint

    workdir = tmp_path / "run"
    proc = start(workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    out = tmp_path / "exported"
    export_checkpoint(str(workdir), "params", str(out))
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        export_checkpoint(str(workdir), "params", str(out))
    for source in (out, workdir):
        vlm = lvlm_jax.from_pretrained(str(source))
        loaded = flat_paths(jax.device_get(vlm.params))
        assert all(loaded[p].tobytes() == v.tobytes() for p, v in uninterrupted.items())
        ids = np.full((1, 80), 5, np.int32)
        ids[0, 2:2 + vlm.config.image_tokens] = vlm.config.image_token_id
        size = vlm.config.vision.image_size
        logits = vlm.logits(ids, np.zeros((1, 3, size, size), np.float32))
        assert logits.shape == (1, 80, vlm.config.language.vocab_size)
        assert np.all(np.isfinite(logits))


def test_resuming_with_another_model_config_fails_and_keeps_the_workdir(tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    proc = start(workdir)
    assert proc.wait(timeout=600) == 0
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    env = cpu_env()
    out = subprocess.run([sys.executable, "-m", "lvlm_jax", *TRAIN, f"--workdir={workdir}",
                          "--config.model.language.num_layers=2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "holds checkpoints of a different model (model.language.num_layers: checkpoint " \
           "has 3, this config has 2)" in out.stderr
    after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


def test_keeps_the_last_k_plus_the_best_by_eval_loss(tmp_path):
    state = {"w": np.zeros(3, np.float32)}
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
    for step, loss in zip(range(1, 7), [5.0, 1.0, 3.0, 4.0, 6.0, 7.0], strict=True):
        ckpt.record(step, {"eval_loss": loss})
        ckpt.save(step, jax.tree.map(lambda x, s=step: x + s, state))
    ckpt.close()
    assert finished_steps(tmp_path) == [2, 5, 6]  # the last two, and step 2 (best loss)


def test_init_from_loads_the_selected_params_of_another_run(tmp_path):
    cfg = tiny_config(steps=2)
    first, _ = loop.train(cfg, str(tmp_path / "a"), batches=random_batches(cfg), log=lambda m: 0)
    trained = flat_paths(jax.device_get(first.state.params))
    cfg2 = tiny_config(steps=2, **{"checkpoint.init_from": str(tmp_path / "a"),
                                   "checkpoint.init_from_include": [r"connector/.*"]})
    messages = []
    setup = loop.build(cfg2)
    fresh = flat_paths(jax.device_get(setup.state.params))
    merged = flat_paths(loop._initial_params(cfg2, setup, messages.append))
    assert messages[0].endswith("missing 0, unexpected 0")
    for path, value in merged.items():
        expected = trained[path] if path.startswith("connector/") else fresh[path]
        assert np.array_equal(value, expected), path
    assert not np.array_equal(fresh["connector/linear_1/kernel"],
                              trained["connector/linear_1/kernel"])


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, {"w": np.full(4, 3.0, np.float32)})
    ckpt.close()
    # What a process killed mid-save leaves behind: orbax's temporary folder for step 4, with
    # part of its files.
    partial = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half.bin").write_bytes(b"\0" * 10)
    reader = Checkpointer(str(tmp_path))
    assert reader.latest_step() == 3
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(
                                              jax.devices()[0]))}
    state, step = reader.restore(abstract)
    reader.close()
    assert step == 3 and np.array_equal(np.asarray(state["w"]), np.full(4, 3.0))
