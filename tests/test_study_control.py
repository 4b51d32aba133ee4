"""A study checks what it can before it starts, says when every run failed, stops on one Ctrl-C
and leaves no orphan worker (real processes and signals throughout)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.cli import main

SWEEP = [
    "sweep",
    "data=digits",
    "model.width=64",
    "epochs=400",
    "checkpoint_interval=0",
    "seed=range:0:4",
    "jobs=2",
    "threads=1",
]


def _status(run: Path) -> str | None:
    try:
        return json.loads((run / "summary.json").read_text())["status"]
    except (OSError, ValueError, KeyError):
        return None


def _holder_pid(run: Path) -> int | None:
    try:
        return int((run / ".lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _start_sweep(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "normlab", *SWEEP, f"out={out}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _running_workers(folder: Path) -> list[int]:
    runs = sorted(folder.glob("*/runs/*"))
    return [
        pid
        for r in runs
        if _status(r) == "running" and (pid := _holder_pid(r)) is not None and _alive(pid)
    ]


def test_a_missing_dataset_is_one_error_before_any_run(tmp_path, capsys):
    code = main(["study", "batch_size", "scale=paper", "data.root=/nonexistent", f"out={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "/nonexistent" in err
    assert not list(tmp_path.rglob("summary.json")), "no run may start"


def test_a_bad_run_config_fails_the_whole_sweep_up_front(tmp_path, capsys):
    code = main(["sweep", "data=digits", "seed=0,1", "optim.lr=-1", f"out={tmp_path}"])
    assert code == 2 and "optim.lr must be >= 0" in capsys.readouterr().err
    assert not list(tmp_path.rglob("summary.json"))


def test_a_study_whose_runs_all_fail_exits_non_zero(tmp_path, capsys):
    # a last batch of one sample: BN cannot train it, every run fails at its first epoch's end
    argv = ["sweep", "data=digits", "model.norm=bn", "batch_size=718", "seed=0,1"]
    code = main([*argv, "jobs=1", "epochs=1", f"out={tmp_path}"])
    captured = capsys.readouterr()
    assert code == 1 and "every run failed (2)" in captured.err
    assert "report:" in captured.out
    statuses = [_status(r) for r in sorted(tmp_path.glob("*/runs/*"))]
    assert statuses == ["failed", "failed"]


def test_study_threads_option_is_checked(capsys):
    assert main(["study", "baseline", "threads=-1"]) == 2
    assert "threads must be an integer >= 0" in capsys.readouterr().err


@pytest.mark.slow
def test_one_ctrl_c_stops_the_whole_study_and_a_rerun_resumes(tmp_path):
    proc = _start_sweep(tmp_path)
    try:
        workers = _wait(lambda: len(_running_workers(tmp_path)) == 2, 120, "two running runs")
        workers = _running_workers(tmp_path)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the parent only, as a terminal's Ctrl-C reaches it
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    for pid in workers:
        _wait(lambda pid=pid: not _alive(pid), 30, f"worker {pid} to exit")
    runs = sorted(tmp_path.glob("*/runs/*"))
    statuses = [_status(r) for r in runs]
    assert statuses.count("interrupted") == 2, statuses  # the two that ran, checkpointed
    assert "running" not in statuses and len(runs) == 2  # and no new run was started
    for run in runs:
        assert (run / "checkpoint.pt").exists()
    # a rerun of the same command resumes the two from their checkpoints (their metrics go on
    # from the rows written before the stop, not from epoch 1), then stops again on Ctrl-C
    before = {r: (r / "metrics.csv").read_text().splitlines() for r in runs}
    proc = _start_sweep(tmp_path)
    try:

        def resumed():
            for run, lines in before.items():
                now = (run / "metrics.csv").read_text().splitlines()
                if len(now) <= len(lines) or now[: len(lines)] != lines:
                    return False
            return True

        _wait(resumed, 120, "both runs to go on from their checkpoints")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130


@pytest.mark.slow
def test_kill_9_of_the_study_leaves_no_orphan_and_the_runs_checkpoint(tmp_path):
    proc = _start_sweep(tmp_path)
    try:
        _wait(lambda: len(_running_workers(tmp_path)) == 2, 120, "two running runs")
        workers = _running_workers(tmp_path)
        proc.kill()  # SIGKILL: no handler in the parent runs
        proc.wait(timeout=30)
    finally:
        proc.kill()
    for pid in workers:
        _wait(lambda pid=pid: not _alive(pid), 120, f"orphan worker {pid} to exit")
    runs = [r for r in sorted(tmp_path.glob("*/runs/*")) if _status(r) is not None]
    assert [_status(r) for r in runs] == ["interrupted", "interrupted"]
    assert all(_holder_pid(r) is None or not _alive(_holder_pid(r)) for r in runs)


# A worker learns of its parent's death from the kernel, which signals it once per re-parenting:
# a parent with several threads hands it to each of them in turn before init. The child below
# counts the SIGINTs it gets; more than one would be a second Ctrl-C (stop at once, mid-checkpoint).
_PARENT = """
import subprocess, sys, threading, time
for _ in range(16):
    threading.Thread(target=threading.Event().wait, daemon=True).start()
subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
time.sleep(120)
"""
_CHILD = """
import os, signal, sys, time
from normlab.studies.workers import _die_with_parent
count = 0
def on_interrupt(signum, frame):
    global count
    count += 1
signal.signal(signal.SIGINT, on_interrupt)
assert _die_with_parent(os.getppid())
open(sys.argv[1] + ".ready", "w").close()
deadline = time.monotonic() + 60
while count == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(1.0)  # any further signal arrives within milliseconds
open(sys.argv[1] + ".tmp", "w").write(str(count))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


@pytest.mark.slow
def test_a_parent_killed_with_many_threads_interrupts_its_worker_once(tmp_path):
    (tmp_path / "parent.py").write_text(_PARENT)
    (tmp_path / "child.py").write_text(_CHILD)
    result = tmp_path / "count"
    for attempt in range(3):  # the number of re-parentings varies with the kill's timing
        result.unlink(missing_ok=True)
        parent = subprocess.Popen(
            [sys.executable, str(tmp_path / "parent.py"), str(tmp_path / "child.py"), str(result)]
        )
        try:
            _wait(lambda: Path(f"{result}.ready").exists(), 60, "the child to start")
            parent.kill()
            parent.wait(timeout=30)
        finally:
            parent.kill()
        _wait(result.exists, 60, "the child to report")
        assert result.read_text() == "1", f"attempt {attempt}: {result.read_text()} SIGINTs"
        Path(f"{result}.ready").unlink()


@pytest.mark.slow
def test_a_study_started_with_sigint_ignored_still_stops_its_workers(tmp_path):
    # `nohup normlab sweep ... &`: SIGINT is ignored from the start, the scheduler stops it with
    # SIGTERM; the workers still stop at a step boundary and checkpoint
    # as nohup does: ignore SIGINT, then exec the command (an ignored signal stays ignored)
    ignore_then_exec = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "os.execv(sys.executable, [sys.executable, '-m', 'normlab', *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", ignore_then_exec, *SWEEP, f"out={tmp_path}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(lambda: len(_running_workers(tmp_path)) == 2, 120, "two running runs")
        workers = _running_workers(tmp_path)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    for pid in workers:
        _wait(lambda pid=pid: not _alive(pid), 30, f"worker {pid} to exit")
    runs = sorted(tmp_path.glob("*/runs/*"))
    assert [_status(r) for r in runs] == ["interrupted", "interrupted"]
    assert all((r / "checkpoint.pt").exists() for r in runs)
