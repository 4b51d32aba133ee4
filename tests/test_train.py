import json

import pytest
import torch

from normlab.errors import ConfigError
from normlab.train import BASE_COLUMNS, Callback, RunDirectory, train


def run(tmp_path, *overrides, callbacks=()):
    return train({"out": str(tmp_path), "progress": False}, list(overrides), callbacks=callbacks)


def test_digits_mlp_reaches_90_percent(tmp_path):
    summary = run(tmp_path, "data=digits", "model=mlp", "epochs=5")
    assert summary["status"] == "finished"
    assert summary["final"]["test_acc"] >= 0.90


def test_mnist1d_mlp_with_bn_learns_well_above_chance(tmp_path):
    summary = run(
        tmp_path,
        "data=mnist1d",
        "model=mlp",
        "model.norm=bn",
        "model.width=256",
        "optim.lr=0.05",
        "epochs=8",
    )
    assert summary["final"]["test_acc"] > 0.45  # chance is 0.10


def test_run_directory_layout(tmp_path):
    summary = run(
        tmp_path, "epochs=2", "name=layout", "optim.no_decay_norm_and_bias=true", "model.norm=bn"
    )
    rd = RunDirectory(tmp_path / "layout")
    assert summary["run_dir"] == str(rd.path)
    config = json.loads(rd.config_path.read_text())
    assert config["optim"]["momentum"] == 0.9 and config["epochs"] == 2  # fully resolved
    rows = rd.read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list(rows[0])[: len(BASE_COLUMNS)] == BASE_COLUMNS
    assert {"lr/decay", "lr/no_decay", "wnorm/decay", "wnorm/no_decay"} <= set(rows[0])
    assert rd.read_summary()["status"] == "finished"
    ckpt = rd.load_checkpoint()
    assert {"model", "optimizer", "scheduler", "rng", "epoch"} <= set(ckpt)
    with pytest.raises(ConfigError, match="resume=true"):
        run(tmp_path, "epochs=2", "name=layout")


def test_diverged_run_ends_cleanly(tmp_path):
    summary = run(tmp_path, "optim.lr=1e9", "optim.momentum=0", "epochs=3", "name=boom")
    assert summary["status"] == "diverged"
    assert RunDirectory(tmp_path / "boom").read_summary()["status"] == "diverged"
    assert summary["epochs_completed"] <= 3


class InterruptAt(Callback):
    name = "interrupt"

    def __init__(self, step):
        self.at = step

    def on_step_end(self, state, loss):
        if state.step == self.at:
            raise KeyboardInterrupt


RESUME_RUN = [
    "data=digits",
    "model=mlp",
    "model.norm=bn",
    "model.dropout=0.2",
    "data.crop_padding=1",
    "data.padding_mode=zeros",
    "data.flip=0.5",
    "epochs=3",
    "batch_size=100",
    "schedule=cosine",
    "optim.nesterov=true",
    "optim.momentum=0.9",
]


def test_interrupt_then_resume_equals_uninterrupted(tmp_path):
    straight = run(tmp_path, *RESUME_RUN, "name=straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *RESUME_RUN, "name=cut", callbacks=[InterruptAt(20)])  # mid-epoch 2
    cut = RunDirectory(tmp_path / "cut")
    assert cut.read_summary()["status"] == "interrupted"
    assert cut.load_checkpoint()["step"] == 20
    resumed = run(tmp_path, *RESUME_RUN, "name=cut", "resume=true")
    assert resumed["status"] == "finished" and resumed["steps"] == straight["steps"]
    a, b = RunDirectory(tmp_path / "straight").read_metrics(), cut.read_metrics()
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            if key not in ("time", "images_per_s", "peak_memory_mb"):
                assert ra[key] == rb[key], key
    sa = RunDirectory(tmp_path / "straight").load_checkpoint()["model"]
    sb = cut.load_checkpoint()["model"]
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_callbacks_see_steps_and_add_columns(tmp_path):
    class Counter(Callback):
        name = "counter"

        def __init__(self):
            self.before = self.after = 0

        def on_before_step(self, state):
            self.before += 1
            assert all(p.grad is not None for p in state.model.parameters())

        def on_step_end(self, state, loss):
            self.after += 1

        def on_epoch_end(self, state):
            return {"counted": self.after}

    counter = Counter()
    summary = run(tmp_path, "epochs=2", "batch_size=500", callbacks=[counter])
    assert counter.before == counter.after == summary["steps"] == 6
    assert summary["final"]["counted"] == 6


def test_multistep_schedule_at_fractions(tmp_path):
    summary = run(
        tmp_path,
        "epochs=10",
        "schedule=multistep",
        "schedule.milestones=[0.3,0.6,0.8]",
        "schedule.gamma=0.2",
        "optim.lr=0.1",
        "batch_size=1000",
        "name=ms",
    )
    lrs = [r["lr"] for r in RunDirectory(tmp_path / "ms").read_metrics()]
    # the lr logged after epoch e is the one the next epoch uses
    expected = [0.1, 0.1, 0.02, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008, 0.0008]
    assert lrs == pytest.approx(expected)
    assert summary["status"] == "finished"


def test_run_settings_are_applied_then_restored(tmp_path):
    """threads and deterministic hold during the run and the caller's settings come back after."""

    class Seen(Callback):
        name = "seen"

        def on_train_start(self, state):
            self.during = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())

    seen = Seen()
    torch.set_num_threads(1)  # conftest's setting, stated here for clarity
    run(tmp_path, "epochs=1", "threads=2", "deterministic=true", callbacks=[seen])
    assert seen.during == (2, True)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (1, False)


# ------------------------------------------------------------------------------ failed runs
@pytest.mark.parametrize("norm", ["bn", "brn"])
def test_batch_of_one_sample_is_a_config_error_and_the_run_says_failed(tmp_path, norm):
    # digits has 1437 training samples = 2 * 718 + 1: the last batch of each epoch is one sample
    with pytest.raises(ConfigError, match="data.drop_last=true") as err:
        run(tmp_path, "data=digits", f"model.norm={norm}", "batch_size=718", "name=one")
    assert "batch_size=718" in str(err.value) and "1 sample" in str(err.value)
    summary = RunDirectory(tmp_path / "one").read_summary()
    assert summary["status"] == "failed" and summary["steps"] == 2
    assert summary["error"].startswith("ConfigError: the last batch of each epoch has 1 sample")
    ok = run(tmp_path, f"model.norm={norm}", "batch_size=718", "data.drop_last=true", "epochs=1")
    assert ok["status"] == "finished"


def test_a_crash_is_recorded_then_raised(tmp_path):
    class Boom(Callback):
        name = "boom"

        def on_step_end(self, state, loss):
            if state.step == 3:
                raise RuntimeError("boom at step 3")

    with pytest.raises(RuntimeError, match="boom at step 3"):
        run(tmp_path, "epochs=2", "name=crash", callbacks=[Boom()])
    summary = RunDirectory(tmp_path / "crash").read_summary()
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom at step 3"
    assert summary["steps"] == 3
