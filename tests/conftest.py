"""Test set-up: 8 fake CPU devices (set before jax is imported), exact fp32 matmuls and a
persistent compilation cache shared by the tests and the processes they start."""

import faulthandler
import os
import tempfile
from typing import Any

# XLA:CPU aborts the process when a collective's participants do not all arrive within its
# termination timeout; 8 fake devices on 2 loaded cores can be that slow. One worker abort in CI
# (paligemma-tiny's training step) looked like it; the longer timeout rules it out.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Many tests (and the `lvlm` processes they start) compile the same tiny programs; XLA's
# compile time dominates the suite on CPU, so identical programs are compiled once. The cache
# is keyed by the program, the compile options and the jax version, so it never returns a stale
# executable. Environment variables, so that subprocesses share it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"lvlm_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# --- A worker killed by a native crash (a fatal signal in XLA, PIL, ...) ---------------------
# xdist reports only "worker crashed". Each worker's faulthandler writes to a file instead, and
# the controller puts the crashing thread's stack into the report. A test whose worker crashed
# runs once more on a fresh worker (the file's remaining tests are re-queued anyway); it is
# reported as a rerun, with the dump, and fails if it crashes again.
_FAULT_DIR = "LVLM_JAX_TEST_FAULT_DIR"
_crashed: set[str] = set()
_fault_log = pytest.StashKey[object]()


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler set-up, which it replaces
def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        os.environ.setdefault(_FAULT_DIR, tempfile.mkdtemp(prefix="lvlm_jax_faults_"))
    elif os.environ.get(_FAULT_DIR):
        log = open(os.path.join(os.environ[_FAULT_DIR], f"{worker}.log"), "w")  # noqa: SIM115
        config.stash[_fault_log] = log  # kept open for the worker's lifetime
        faulthandler.enable(file=log, all_threads=True)


def _crash_dump(worker: str) -> str:
    """The fatal error line and the crashing thread's stack from a worker's faulthandler file."""
    try:
        with open(os.path.join(os.environ.get(_FAULT_DIR, ""), f"{worker}.log")) as f:
            text = f.read()
    except OSError:
        return "(no faulthandler output)"
    lines = text.splitlines()
    head = [ln for ln in lines if ln.startswith("Fatal Python error")]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Current thread")), None)
    stack = [] if start is None else lines[start:start + 40]
    if start is not None:
        stack = stack[:next((i for i, ln in enumerate(stack) if i and not ln.strip()), len(stack))]
    return "\n".join(head + stack) or text[-4000:]


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched: object) -> None:
    worker = getattr(getattr(report, "node", None), "gateway", None)
    dump = _crash_dump(worker.id if worker is not None else "")
    report.longrepr = f"{report.longrepr}\n{dump}"
    if crashitem in _crashed:
        return  # crashed twice: a failure
    _crashed.add(crashitem)
    try:
        sched.mark_test_pending(crashitem)  # type: ignore[attr-defined]
    except NotImplementedError:
        pass  # loadfile/loadscope have re-queued the crashed file's unfinished tests already
    report.outcome = "rerun"  # type: ignore[assignment]


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    if report.outcome == "rerun":
        return "rerun", "R", "RERUN"
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for report in terminalreporter.stats.get("rerun", []):
        terminalreporter.write_sep("=", f"worker crash, test rerun: {report.nodeid}")
        terminalreporter.write_line(str(report.longrepr))
