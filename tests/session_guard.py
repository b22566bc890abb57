"""Keeps a test session on xdist workers finishing whatever a test does: a crashed or hung test
fails with its stack in the report, the processes it started die with it, and a session that
hears nothing from its workers for too long says what was running and restarts them (and ends,
if that happens again). Nothing reruns: a crash is a failure to find."""

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

import pytest

# A test that runs longer fails, with every thread's stack (the slowest test takes ~90 s on 2
# cores, compiling everything it runs). Each hang costs this much of CI's 90 minutes.
TEST_TIMEOUT_S = float(os.environ.get("LVLM_JAX_TEST_TIMEOUT_S", "420"))
# No event (test start, report, worker up or down) from any worker for this long: stuck.
STALL_S = float(os.environ.get("LVLM_JAX_TEST_STALL_S", str(TEST_TIMEOUT_S + 180)))
_FAULT_DIR = "LVLM_JAX_TEST_FAULT_DIR"
# "<controller pid>" in a worker's environment, "<controller pid>/<worker id>" in everything a
# test starts (inherited), so that a dead worker's processes can be found and ended.
_OWNER = "LVLM_JAX_TEST_OWNER"

_fault_log = pytest.StashKey[object]()


class _Session:
    config: pytest.Config | None = None
    started = time.monotonic()
    last_event = time.monotonic()
    running: dict[str, float] = {}  # nodeid -> when it started


def end_processes(owner: str, *, with_descendants: bool = False,
                  sig: int = signal.SIGKILL, only: set[int] | None = None) -> list[int]:
    """Sends `sig` to every other process whose environment has _OWNER == owner (with_descendants:
    or starting with owner + '/'), of the pids in `only` if given (sig 0: none, just lists them).
    Returns their pids."""
    tag, me, killed = f"{_OWNER}=".encode(), os.getpid(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        value = next((e[len(tag):].decode() for e in env if e.startswith(tag)), None)
        if only is not None and int(name) not in only:
            continue
        if value is not None and (value == owner or (
                with_descendants and value.startswith(owner + "/"))):
            try:
                os.kill(int(name), sig)
                killed.append(int(name))
            except OSError:
                pass
    return killed


def _say(line: str) -> None:
    """A line on the terminal now (CI logs keep it even if the session never ends)."""
    elapsed = time.monotonic() - _Session.started
    print(f"\n[session guard, {elapsed:.0f} s] {line}", file=sys.__stderr__, flush=True)


@pytest.hookimpl(trylast=True)  # after pytest's own faulthandler set-up, which it replaces
def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        _Session.config = config
        if getattr(config.option, "numprocesses", None):  # an xdist controller
            os.environ[_FAULT_DIR] = tempfile.mkdtemp(prefix="lvlm_jax_faults_")
            os.environ[_OWNER] = str(os.getpid())  # before the workers start: they inherit it
            threading.Thread(target=_watch, args=(config,), daemon=True).start()
    elif os.environ.get(_FAULT_DIR):
        os.environ[_OWNER] = f"{os.environ.get(_OWNER, '')}/{worker}"
        log = open(os.path.join(os.environ[_FAULT_DIR], f"{worker}.log"), "w")  # noqa: SIM115
        config.stash[_fault_log] = log  # kept open for the worker's lifetime
        faulthandler.enable(file=log, all_threads=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    log = config.stash.get(_fault_log, None)
    if log is not None:  # a worker that cannot exit (a thread stuck in XLA) is ended, with stacks
        faulthandler.dump_traceback_later(300, exit=True, file=log)
    elif os.environ.get(_OWNER) == str(os.getpid()):
        # The controller, last: whatever the tests left running would hold on to the cores and
        # to the output pipes that the session's caller (CI) reads until they close.
        left = end_processes(os.environ[_OWNER], with_descendants=True)
        if left:
            _say(f"ended {len(left)} processes the tests left running (pids {left})")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    # faulthandler's own thread: it ends the worker even if a native call holds the GIL.
    log = item.config.stash.get(_fault_log, None)
    if log is not None and item.nodeid in _crashed():
        # xdist hands a crashed worker's files to the live workers, the crashed test with them;
        # it has failed already, and running it again would be a rerun.
        item.runtest = lambda: pytest.skip("crashed its worker before (reported as failed there)")
    if log is not None:
        faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True, file=log)
    try:
        yield
    finally:
        if log is not None:
            faulthandler.cancel_dump_traceback_later()


# --- the controller's view: what runs, and when it last heard from a worker -----------------
def _heard() -> None:
    _Session.last_event = time.monotonic()


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    _heard()
    _Session.running[nodeid] = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _heard()
    if report.when == "teardown":
        _Session.running.pop(report.nodeid, None)


def pytest_testnodeready(node: object) -> None:
    _heard()


def pytest_testnodedown(node: object, error: object) -> None:
    _heard()
    if error is None:
        return
    # Before xdist re-queues the dead worker's tests (and hands them to a live worker): the
    # test it was running, the first one not completed, must not run again.
    sched = getattr(_Session.config.pluginmanager.get_plugin("dsession"), "sched", None)
    for unit in (getattr(sched, "assigned_work", None) or {}).get(node, {}).values():
        running = next((nodeid for nodeid, done in unit.items() if not done), None)
        if running is not None:
            with open(os.path.join(os.environ[_FAULT_DIR], "crashed"), "a") as f:
                f.write(running + "\n")
            return


def _crashed() -> set[str]:
    """Tests that crashed a worker in this session (their nodeids)."""
    try:
        with open(os.path.join(os.environ[_FAULT_DIR], "crashed")) as f:
            return set(f.read().split("\n")) - {""}
    except OSError:
        return set()


def _watch(config: pytest.Config) -> None:
    """Controller thread: after STALL_S without a word from any worker, report what ran and
    the scheduler's queue, end every worker (their running tests fail, xdist replaces them for
    the rest); if it happens again, end the session rather than wait for CI's limit."""
    stalls = 0
    while True:
        time.sleep(min(10.0, STALL_S / 4))
        quiet = time.monotonic() - _Session.last_event
        if quiet < STALL_S:
            continue
        stalls += 1
        now = time.monotonic()
        running = [f"{now - t:.0f} s in {nodeid}" for nodeid, t in _Session.running.items()]
        sched = getattr(config.pluginmanager.get_plugin("dsession"), "sched", None)
        queued = list(getattr(sched, "workqueue", None) or {})
        held = {getattr(getattr(node, "gateway", None), "id", "?"):
                sum(not done for unit in work.values() for done in unit.values())
                for node, work in (getattr(sched, "assigned_work", None) or {}).items()}
        _say(f"no word from any test worker for {quiet:.0f} s; running: {running or 'nothing'}; "
             f"tests still held per worker: {held}; files queued: {queued}")
        if stalls > 1:
            _say("stalled twice: ending the session")
            os._exit(3)
        # SIGABRT first: each worker's faulthandler writes every thread's stack to its file,
        # which the crash report then shows; xdist replaces the workers.
        owner = os.environ[_OWNER]
        # Those that run now; the workers xdist starts to replace them, and what those start,
        # must not be ended with them.
        doomed = set(end_processes(owner, with_descendants=True, sig=0))
        workers = end_processes(owner, sig=signal.SIGABRT)
        _say(f"aborted the workers (pids {workers}) to restart them")
        time.sleep(5)
        end_processes(owner, with_descendants=True, only=doomed)  # their children, and stragglers
        _heard()


# --- a crashed (or timed-out) worker: its processes end, the test fails ---------------------
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
    worker_id = worker.id if worker is not None else ""
    # A test's subprocesses (an `lvlm` run, loader workers) outlive a crashed worker and would
    # hold on to cores, ports and files.
    orphans = end_processes(f"{os.environ.get(_OWNER, '')}/{worker_id}") if worker_id else []
    dump = _crash_dump(worker_id)
    report.longrepr = f"{report.longrepr}\n{dump}"
    cause = next(iter(dump.splitlines()), "")
    _say(f"{crashitem} ended worker {worker_id} ({cause}); ended {len(orphans)} processes it "
         "started; failed")
    _Session.running.pop(crashitem, None)
    _tidy_queue(sched, crashitem)


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
