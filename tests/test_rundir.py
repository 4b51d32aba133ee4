"""One run directory, one writer, one run: the lock, the resume config check and run names."""

import json
import os
import signal
import subprocess
import sys

import pytest

from normlab.errors import ConfigError, UserError
from normlab.train import RunDirectory, train
from normlab.train.rundir import RunInUseError, config_differences


def run(out, *overrides, callbacks=()):
    return train({"out": str(out), "progress": False}, list(overrides), callbacks=callbacks)


# A process that starts a run, says "ready" once it holds the run directory, and waits for a line
# on stdin before it trains.
HOLDER = r"""
import sys
from normlab.train import Callback, train

class Hold(Callback):
    name = "hold"
    def on_train_start(self, state):
        print("ready", flush=True)
        sys.stdin.readline()

out, *overrides = sys.argv[1:]
print(train({"out": out, "progress": False}, overrides, callbacks=[Hold()])["status"], flush=True)
"""


def start_holder(out, *overrides):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), *overrides],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_second_process_on_a_run_is_refused_until_the_first_ends(tmp_path):
    holder = start_holder(tmp_path, "epochs=1", "name=shared")
    rd = RunDirectory(tmp_path / "shared")
    try:
        for resume in ("true", "false"):
            with pytest.raises(RunInUseError, match="in use by another process") as err:
                run(tmp_path, "epochs=1", "name=shared", f"resume={resume}")
            assert str(rd.path) in str(err.value) and f"pid {holder.pid}" in str(err.value)
        assert isinstance(err.value, UserError)
        assert rd.read_summary()["status"] == "running"  # the refused process wrote nothing
    finally:
        holder.stdin.write("go\n")
        holder.stdin.close()
    assert holder.stdout.read().strip() == "finished" and holder.wait() == 0
    assert run(tmp_path, "epochs=2", "name=shared", "resume=true")["status"] == "finished"


def test_the_lock_dies_with_its_process(tmp_path):
    holder = start_holder(tmp_path, "epochs=1", "name=killed")
    holder.send_signal(signal.SIGKILL)  # no cleanup code runs
    holder.wait()
    rd = RunDirectory(tmp_path / "killed")
    assert rd.read_summary()["status"] == "running"
    assert run(tmp_path, "epochs=1", "name=killed", "resume=true")["status"] == "finished"


def test_one_process_cannot_hold_a_run_twice(tmp_path):
    rd = RunDirectory(tmp_path / "r")
    with rd.lock():
        with pytest.raises(RunInUseError):
            with RunDirectory(tmp_path / "r").lock():
                pass
    with rd.lock():  # released on exit
        pass


def test_resume_with_a_different_config_lists_the_differences(tmp_path):
    run(tmp_path, "epochs=1", "name=r", "optim.lr=0.1", "model.width=16")
    rd = RunDirectory(tmp_path / "r")
    before = rd.summary_path.read_text()
    with pytest.raises(ConfigError) as err:
        run(tmp_path, "epochs=1", "name=r", "resume=true", "optim.lr=0.2", "model.norm=bn")
    message = str(err.value)
    listed = message.split("config.json: ", 1)[1].split(". Resume", 1)[0].split("; ")
    assert sorted(listed) == [
        'model.norm: "none" -> "bn"',
        "model.width: 16 -> 128",  # left out: the default is a different value
        "optim.lr: 0.1 -> 0.2",
    ]
    assert str(rd.path) in message and "overwrite=true" in message
    same = ["name=r", "resume=true", "optim.lr=0.1", "model.width=16"]
    assert run(tmp_path, "epochs=3", *same)["epochs_completed"] == 3  # epochs may grow
    with pytest.raises(ConfigError, match="epochs: 3 -> 2"):
        run(tmp_path, "epochs=2", *same)  # but not shrink
    with pytest.raises(ConfigError, match=r"enorm: null -> \{"):
        run(tmp_path, "epochs=3", *same, "enorm=true")
    assert rd.read_summary()["status"] == "finished"  # the refused resumes wrote nothing
    # the run settings and a larger epochs are the same run
    summary = run(tmp_path, "epochs=4", *same, "threads=1", "checkpoint_interval=5", "device=cpu")
    assert summary["status"] == "finished" and summary["epochs_completed"] == 4
    assert json.loads(rd.config_path.read_text())["epochs"] == 4
    assert before != rd.summary_path.read_text()


def test_config_differences_compare_as_json():
    old = {"a": [1, 2], "b": {"c": 1.0, "d": None}, "epochs": 3, "threads": 1}
    assert config_differences(old, {**old, "a": (1, 2), "epochs": 5, "threads": 4}) == []
    assert config_differences(old, {**old, "b": {"c": 1.0}}) == ["b.d: null -> (absent)"]
    assert config_differences(old, {**old, "b": {"c": 1, "d": None}}) == ["b.c: 1.0 -> 1"]


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "/tmp/abs", "x/../../y"])
def test_run_names_cannot_leave_out(tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="single folder name"):
        run(out, "epochs=1", f"name={name}")
    assert not out.exists() and list(tmp_path.iterdir()) == []
