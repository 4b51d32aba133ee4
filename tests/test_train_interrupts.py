"""Ctrl-C then resume is the same run, bit for bit: the interrupt waits for the end of the step.

The first tests send SIGINT to this process from inside a step (deterministic); the last one sends
real SIGINTs at random moments to a separate process that trains, then resumes each interrupted run
and compares it with an uninterrupted one.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from normlab.train import Callback, RunDirectory, train

TIMING_KEYS = ("time", "images_per_s", "peak_memory_mb")  # and every "...seconds" column


def run(out, *overrides, callbacks=()):
    return train({"out": str(out), "progress": False}, list(overrides), callbacks=callbacks)


def assert_same_run(a: RunDirectory, b: RunDirectory):
    """Metrics (but timings), model, optimizer and loop position equal bit for bit."""
    rows_a, rows_b = a.read_metrics(), b.read_metrics()
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ra:
            if key not in TIMING_KEYS and not key.endswith("seconds"):
                assert ra[key] == rb[key], key
    ca, cb = a.load_checkpoint(), b.load_checkpoint()
    assert (ca["epoch"], ca["step"]) == (cb["epoch"], cb["step"])
    assert_equal_tree(ca["model"], cb["model"], "model")
    assert_equal_tree(ca["optimizer"], cb["optimizer"], "optimizer")


def assert_equal_tree(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


BN_RUN = ["data=digits", "model=mlp", "model.norm=bn", "batch_size=100", "epochs=2"]


class SigintBeforeStep(Callback):
    """Sends this process SIGINT after the forward and backward of step ``at`` (0-based), before
    the optimizer step: the moment at which stopping leaves BatchNorm's statistics one batch ahead
    of the step counter."""

    name = "sigint"

    def __init__(self, at):
        self.at = at

    def on_before_step(self, state):
        if state.step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_sigint_inside_a_step_stops_after_it(tmp_path):
    straight = run(tmp_path, *BN_RUN, "name=straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *BN_RUN, "name=cut", callbacks=[SigintBeforeStep(7)])
    cut = RunDirectory(tmp_path / "cut")
    assert cut.read_summary()["status"] == "interrupted"
    ckpt = cut.load_checkpoint()
    assert ckpt["step"] == ckpt["batch_in_epoch"] == 8  # step 7 (0-based) finished, then stop
    counts = [int(v) for k, v in ckpt["model"].items() if k.endswith("num_batches_tracked")]
    assert counts and all(c == 8 for c in counts)
    resumed = run(tmp_path, *BN_RUN, "name=cut", "resume=true")
    assert resumed["status"] == "finished" and resumed["steps"] == straight["steps"]
    assert_same_run(RunDirectory(tmp_path / "straight"), cut)


def test_sigint_handler_is_installed_for_the_run_only(tmp_path):
    seen = []

    class Look(Callback):
        name = "look"

        def on_train_start(self, state):
            seen.append(signal.getsignal(signal.SIGINT))

    def mine(signum, frame):
        raise AssertionError("not during the run")

    previous = signal.signal(signal.SIGINT, mine)
    try:
        run(tmp_path, "epochs=1", callbacks=[Look()])
        assert seen and seen[0] is not mine
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def test_second_sigint_during_the_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    """Ctrl-C, then Ctrl-C again while the interrupt's checkpoint is written: the write is
    abandoned, the epoch-end checkpoint before it stays whole, and resuming from it is exact."""
    import normlab.io

    real_save = torch.save

    def save_then_sigint(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C: raises here
        real_save(obj, path)  # not reached

    class Twice(SigintBeforeStep):
        def on_before_step(self, state):
            if state.step == self.at:
                monkeypatch.setattr(normlab.io.torch, "save", save_then_sigint)
                os.kill(os.getpid(), signal.SIGINT)

    overrides = [*BN_RUN, "epochs=3", "checkpoint_interval=0"]  # a checkpoint after each epoch
    straight = run(tmp_path, *overrides, "name=straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *overrides, "name=cut", callbacks=[Twice(20)])  # mid-epoch 2 (15 a epoch)
    monkeypatch.setattr(normlab.io.torch, "save", real_save)
    cut = RunDirectory(tmp_path / "cut")
    assert cut.read_summary()["status"] == "interrupted"
    assert [p.name for p in cut.path.iterdir() if p.name.endswith(".tmp")] == []
    ckpt = cut.load_checkpoint()
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (1, 15, 0)
    assert run(tmp_path, *overrides, "name=cut", "resume=true")["steps"] == straight["steps"]
    assert_same_run(RunDirectory(tmp_path / "straight"), cut)


def test_sigint_while_running_is_written_still_ends_interrupted(tmp_path, monkeypatch):
    """A SIGINT that lands inside the write of the "running" summary (a study killed just as its
    worker starts a run) must leave "interrupted" and a checkpoint, not "running" forever."""
    real_write = RunDirectory.write_summary

    def write_then_sigint(self, summary):
        real_write(self, summary)
        if summary["status"] == "running":
            os.kill(os.getpid(), signal.SIGINT)  # nothing deferred yet: raises here

    monkeypatch.setattr(RunDirectory, "write_summary", write_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *BN_RUN, "name=cut")
    monkeypatch.setattr(RunDirectory, "write_summary", real_write)
    cut = RunDirectory(tmp_path / "cut")
    assert cut.read_summary()["status"] == "interrupted"
    assert cut.load_checkpoint()["step"] == 0
    assert run(tmp_path, *BN_RUN, "name=cut", "resume=true")["status"] == "finished"


# ------------------------------------------------------------------ real SIGINTs, random moments
# A worker process trains the runs it reads from stdin, one line each, and answers one line: the
# run's status, or "interrupted". It says "ready" when the loop is about to start. Outside train()
# its own SIGINT handler drops signals that arrive too late (after the run); inside train() it
# raises, as Python's default would, in case train() installed no handler of its own.
WORKER = r"""
import json, signal, sys
import torch
from normlab.train import Callback, train

torch.set_num_threads(1)
inside = [False]

def handler(signum, frame):
    if inside[0]:
        raise KeyboardInterrupt

signal.signal(signal.SIGINT, handler)

class Ready(Callback):
    name = "ready"
    def on_train_start(self, state):
        inside[0] = True
        print("ready", flush=True)

for line in sys.stdin:
    out, overrides = json.loads(line)
    try:
        try:
            result = train({"out": out, "progress": False}, overrides, callbacks=[Ready()])["status"]
        except KeyboardInterrupt:
            result = "interrupted"
        finally:
            inside[0] = False
    except KeyboardInterrupt:
        result = "interrupted"
    print(result, flush=True)
"""

BASE = [
    "data=digits",
    "batch_size=32",
    "threads=1",
    "schedule=cosine",
    "optim.momentum=0.9",
    "checkpoint_interval=0.05",
]
SETUPS = {
    "plain": ["model=mlp", "model.dropout=0.2", "data.crop_padding=1", "data.flip=0.5"],
    "bn": ["model=mlp", "model.norm=bn", "data.crop_padding=1", "data.padding_mode=zeros"],
    "enorm": ["model=mlp", "enorm.c=1.2", "enorm.every=2"],
    "sphere": ["model=mlp_si", "model.width=32", "optim=sphere", "optim.elr=0.01"],
}
TRIALS = int(os.environ.get("NORMLAB_SIGINT_TRIALS", "4"))  # per setup
EPOCHS = 8


@pytest.fixture(scope="module")
def worker():
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    yield proc
    proc.stdin.close()
    proc.wait()


@pytest.mark.parametrize("setup", list(SETUPS))
def test_random_sigints_then_resume_equal_an_uninterrupted_run(tmp_path, worker, setup):
    overrides = [*BASE, *SETUPS[setup], f"epochs={EPOCHS}"]
    straight = run(tmp_path, *overrides, "name=straight")
    reference = RunDirectory(tmp_path / "straight")
    # the loop's time, to spread the signals over a run (a guide, not asserted)
    duration = sum(row["time"] for row in reference.read_metrics())
    rng = random.Random(f"sigint-{setup}")
    outcomes = []
    for trial in range(TRIALS):
        name = f"trial{trial}"
        worker.stdin.write(json.dumps([str(tmp_path), [*overrides, f"name={name}"]]) + "\n")
        worker.stdin.flush()
        assert worker.stdout.readline().strip() == "ready"
        time.sleep(0 if trial == 0 else rng.uniform(0, 1.2 * duration))
        worker.send_signal(signal.SIGINT)
        result = worker.stdout.readline().strip()
        assert result in ("interrupted", "finished"), result
        rd = RunDirectory(tmp_path / name)
        status = rd.read_summary()["status"]
        # a Ctrl-C in the last step lets the run finish (and recorded so), then raises
        assert status == "finished" or (status == "interrupted" and result == "interrupted")
        step = rd.load_checkpoint()["step"] if rd.checkpoint_path.exists() else 0
        outcomes.append((status, step))
        resumed = run(tmp_path, *overrides, f"name={name}", "resume=true")
        assert resumed["status"] == "finished" and resumed["steps"] == straight["steps"]
        assert_same_run(reference, rd)
    print(setup, "trials (outcome, checkpoint step):", outcomes)
    assert any(status == "interrupted" and s < straight["steps"] for status, s in outcomes)
