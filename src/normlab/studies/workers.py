"""Worker processes for a study's runs: one Ctrl-C stops them all, and none outlives its parent.

``concurrent.futures.ProcessPoolExecutor`` does neither: a worker whose run ends in
``KeyboardInterrupt`` takes the next run, and workers of a parent killed with ``kill -9`` wait
forever. So the pool is written out here:

* each worker is a spawned process in **its own process group**, so a terminal's Ctrl-C reaches
  the parent only; the parent then sends each worker exactly one SIGINT, which the training loop
  turns into a stop at the end of the current step with an exact checkpoint (a second SIGINT
  would stop at once, which is why the terminal's is not passed on as well);
* each worker asks the kernel for a SIGHUP when its parent dies (Linux ``PR_SET_PDEATHSIG``;
  elsewhere a thread watches the parent's pid) and turns the first one into one SIGINT, so a
  killed study leaves no orphan: the run checkpoints and the worker exits; the run directory's
  lock covers the moment in between. Only the first counts because the kernel sends the signal
  each time the worker is re-parented, and a dying parent re-parents it to each of its threads in
  turn before init: a SIGINT per thread would be a second Ctrl-C, which stops the run at once,
  in the middle of its checkpoint;
* after a stop no worker takes another run; the parent waits for them, then raises
  ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# what the kernel (or the watcher thread) sends when the parent dies (no SIGHUP on Windows)
_PARENT_GONE = getattr(signal, "SIGHUP", signal.SIGTERM)
_POLL_SECONDS = 0.2
_STOP_GRACE_SECONDS = 600.0  # a run finishes its step and writes a checkpoint in this time


def run_in_workers(
    configs: list[dict],
    jobs: int,
    threads: int,
    run_one: Callable[[dict], str],
    on_done: Callable[[], None] = lambda: None,
) -> list[str]:
    """``run_one(cfg)`` for every config in ``jobs`` worker processes; their statuses in order.

    ``run_one`` must be importable (spawned workers pickle it by name). Ctrl-C (or SIGTERM) of
    this process stops every worker at a step boundary and raises ``KeyboardInterrupt``.
    """
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for index, cfg in enumerate(configs):
        tasks.put((index, cfg))
    workers = [
        ctx.Process(
            target=_worker,
            args=(tasks, results, os.getpid(), threads, run_one),
            name=f"normlab-worker-{k}",
            daemon=True,
        )
        for k in range(min(jobs, len(configs)))
    ]
    for _ in workers:
        tasks.put(None)  # one end marker per worker
    statuses: list[str | None] = [None] * len(configs)
    with _sigterm_as_interrupt():
        for w in workers:
            w.start()
        try:
            _collect(workers, results, statuses, on_done)
        except KeyboardInterrupt:
            _stop(workers)
            raise
    return [s or "missing" for s in statuses]


def _collect(workers, results, statuses, on_done) -> None:
    remaining = sum(s is None for s in statuses)
    while remaining:
        try:
            index, status = results.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if not any(w.is_alive() for w in workers):
                # every worker ended (one crashed, say): what never reported stays "missing"
                _drain(results, statuses)
                return
            continue
        statuses[index] = status
        remaining -= 1
        on_done()


def _drain(results, statuses) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            index, status = results.get_nowait()
            statuses[index] = status


def _stop(workers) -> None:
    """One SIGINT to each live worker (stop after the step, checkpoint), then wait for them."""
    for w in workers:
        if w.is_alive() and w.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGINT)
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():  # stuck past the grace period: the checkpoint of its last step stays
            w.kill()
            w.join()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A SIGTERM to the study (a scheduler's stop) stops it like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------- worker
def _worker(tasks, results, parent_pid: int, threads: int, run_one) -> None:
    os.setpgrp()  # the terminal's Ctrl-C goes to the parent, which passes on exactly one
    # A study started with SIGINT ignored (`nohup`, `cmd &` in a script) passes that on to its
    # workers, which would then ignore the parent's stop and its death: here SIGINT only ever
    # comes from those two, so it always stops the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if not _die_with_parent(parent_pid):
        return
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            item = tasks.get()
        except KeyboardInterrupt:
            return  # stopped while idle
        if item is None:
            return
        index, cfg = item
        try:
            status = run_one(cfg)
        except KeyboardInterrupt:
            results.put((index, "interrupted"))
            return  # a stopped worker takes no further run
        results.put((index, status))


def _die_with_parent(parent_pid: int) -> bool:
    """Stop like one Ctrl-C (a graceful stop of the run) when the parent process dies; False
    when it is already gone."""
    _first_as_interrupt(_PARENT_GONE)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, _PARENT_GONE, 0, 0, 0)
        except (OSError, AttributeError):
            _watch_parent(parent_pid)
    else:
        _watch_parent(parent_pid)
    return os.getppid() == parent_pid  # else the parent died before the request took effect


def _first_as_interrupt(signum: int) -> None:
    """The first ``signum`` raises one SIGINT in this process; later ones are ignored.

    The kernel sends the parent-death signal on every re-parenting, so one ``kill -9`` of a
    parent with several threads delivers it several times within milliseconds.
    """
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if not fired:
            fired = True
            signal.raise_signal(signal.SIGINT)

    signal.signal(signum, handler)


def _watch_parent(parent_pid: int) -> None:
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), _PARENT_GONE)

    threading.Thread(target=watch, name="normlab-parent-watch", daemon=True).start()
