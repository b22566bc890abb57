"""Test set-up: 8 fake CPU devices (set before jax is imported), exact fp32 matmuls and a
persistent compilation cache shared by the tests and the processes they start."""

import faulthandler
import os
import tempfile
from typing import Any

# Known XLA:CPU bug (jax 0.10): a train step on the 8 fake devices can deadlock now and then. Its
# thunk executor runs independent thunks in whatever order they become ready, per device, and
# nothing orders collectives: seen with gdb and XLA's log, 7 devices waited in a scanned loop's
# all-reduce (op 1) while 6 waited in a top-level all-gather (op 70) of the same run, with idle
# threads to spare (a bigger pool, PJRT_NPROC=32, did not help). XLA aborts the process when a
# rendezvous passes its termination timeout (XLA's default, not timed here), and the crash
# handling below reruns the test; a longer timeout only makes each deadlock cost more.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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


# --- A worker killed by a native crash (a fatal signal in XLA, PIL, ...) or a hung test -------
# xdist reports only "worker crashed". Each worker's faulthandler writes to a file instead, and
# the controller puts the test's stack into the report. A test that hangs past TEST_TIMEOUT_S
# has every thread's stack written to that file and its worker ended, so a hang becomes a crash
# with a stack instead of a CI run that never finishes. A test whose worker crashed runs again
# on a fresh worker (the file's remaining tests are re-queued anyway), up to _MAX_RERUNS times;
# it is reported as a rerun, with the dump, and fails if it crashes once more.
TEST_TIMEOUT_S = float(os.environ.get("LVLM_JAX_TEST_TIMEOUT_S", "1200"))
_FAULT_DIR = "LVLM_JAX_TEST_FAULT_DIR"
_MAX_RERUNS = 4
_crashes: dict[str, int] = {}
_fault_log = pytest.StashKey[object]()


def pytest_cmdline_main(config: pytest.Config) -> None:
    if getattr(config.option, "maxworkerrestart", "") is None:
        config.option.maxworkerrestart = "16"  # a rerun needs a fresh worker; xdist's default: 8


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler set-up, which it replaces
def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        os.environ.setdefault(_FAULT_DIR, tempfile.mkdtemp(prefix="lvlm_jax_faults_"))
    elif os.environ.get(_FAULT_DIR):
        log = open(os.path.join(os.environ[_FAULT_DIR], f"{worker}.log"), "w")  # noqa: SIM115
        config.stash[_fault_log] = log  # kept open for the worker's lifetime
        faulthandler.enable(file=log, all_threads=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    log = config.stash.get(_fault_log, None)
    if log is not None:  # a worker that cannot exit (a thread stuck in XLA) is ended, with stacks
        faulthandler.dump_traceback_later(300, exit=True, file=log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    log = item.config.stash.get(_fault_log, None)
    if log is not None:
        faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True, file=log)
    try:
        yield
    finally:
        if log is not None:
            faulthandler.cancel_dump_traceback_later()


def _crash_dump(worker: str) -> str:
    """The fatal error (or timeout) line and the test's stack from a worker's faulthandler file:
    the crashing thread's, else the thread that runs the test."""
    try:
        with open(os.path.join(os.environ.get(_FAULT_DIR, ""), f"{worker}.log")) as f:
            text = f.read()
    except OSError:
        return "(no faulthandler output)"
    head = [ln for ln in text.splitlines()
            if ln.startswith(("Fatal Python error", "Timeout ("))]
    threads = text.split("\n\n")
    stack = (next((t for t in threads if t.startswith("Current thread")), None)
             or next((t for t in threads if "pytest_runtest" in t), ""))
    stack = "\n".join(stack.splitlines()[:40])
    return "\n".join(head + [stack]).strip() or text[-4000:]


@pytest.hookimpl(optionalhook=True)
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched: object) -> None:
    worker = getattr(getattr(report, "node", None), "gateway", None)
    dump = _crash_dump(worker.id if worker is not None else "")
    report.longrepr = f"{report.longrepr}\n{dump}"
    _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
    done = _crashes[crashitem] > _MAX_RERUNS  # a failure; loadfile would rerun it until xdist quits
    _tidy_queue(sched, crashitem if done else None)
    if done:
        return
    try:
        sched.mark_test_pending(crashitem)  # type: ignore[attr-defined]
    except NotImplementedError:
        pass  # loadfile/loadscope re-queued the crashed file's unfinished tests, this one included
    report.outcome = "rerun"  # type: ignore[assignment]


def _tidy_queue(sched: object, finished: str | None) -> None:
    """After a crash, loadfile/loadscope ({scope: {nodeid: completed}}) put back every file the
    worker held, finished ones too; a fresh worker sent a finished file gets no test to run and
    the session waits for it forever (xdist 3.8). Drop those, with `finished` marked done."""
    queue = getattr(sched, "workqueue", None)
    for scope, unit in list(queue.items()) if isinstance(queue, dict) else []:
        if finished in unit:
            unit[finished] = True
        if all(unit.values()):
            del queue[scope]


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    if report.outcome == "rerun":
        return "rerun", "R", "RERUN"
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for report in terminalreporter.stats.get("rerun", []):
        terminalreporter.write_sep("=", f"worker crash, test rerun: {report.nodeid}")
        terminalreporter.write_line(str(report.longrepr))
