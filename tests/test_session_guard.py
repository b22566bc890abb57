"""The suite's own safety net (tests/session_guard.py): a crashed test, a hung test and a test
that hangs where the worker's own timer cannot see it each fail once with their stacks (no
reruns), the processes they started end with them, so do those a passing test left running,
and the session finishes with the other tests run."""

import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CRASH = '''
import ctypes, os
def test_before(): pass
def test_segfaults_once():
    if not os.path.exists("segv.mark"):
        open("segv.mark", "w").close()
        ctypes.string_at(0)
def test_after(): pass
'''
HANG = '''
import os, subprocess, time
def test_hangs_once_with_a_child():
    if not os.path.exists("hang.mark"):
        open("hang.mark", "w").close()
        child = subprocess.Popen(["sleep", "600"])
        open("child.pid", "w").write(str(child.pid))
        time.sleep(600)
def test_after(): pass
'''
STALL = '''
import faulthandler, os, subprocess, time
def test_stalls_once():
    if not os.path.exists("stall.mark"):
        open("stall.mark", "w").close()
        faulthandler.cancel_dump_traceback_later()  # a hang the worker's own timer misses
        time.sleep(600)
def test_leaves_a_process_running():  # after the stall, on a fresh worker
    open("left.pid", "w").write(str(subprocess.Popen(["sleep", "600"]).pid))
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_crashed_hung_and_stalled_tests_fail_once_and_no_process_they_started_outlives_it(
        tmp_path):
    for name in ("conftest.py", "session_guard.py", "xla_env.py"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    for name, text in (("test_crash.py", CRASH), ("test_hang.py", HANG),
                       ("test_stall.py", STALL)):
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "LVLM_JAX_TEST_"))}
    # Short limits, with room for a worker to start on a busy machine (no event comes meanwhile).
    env.update(LVLM_JAX_TEST_TIMEOUT_S="8", LVLM_JAX_TEST_STALL_S="30")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile",
         "-p", "no:cacheprovider", "-p", "no:benchmark", "."],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out[-6000:]
    assert "3 failed, 4 passed" in out and "rerun" not in out, out[-6000:]
    assert "test_segfaults_once ended worker" in out and "Segmentation fault" in out
    assert "Timeout (0:00:08)!" in out  # the hung test's stacks are in its report
    assert "ended 1 processes it started" in out
    assert "no word from any test worker for" in out and "test_stalls_once" in out
    assert not _alive(int((tmp_path / "child.pid").read_text()))
    assert "processes the tests left running" in out
    assert not _alive(int((tmp_path / "left.pid").read_text()))
