"""The GPU-ready options of the loop, all checked on CPU: precision (bf16 autocast, fp16 with
loss scaling whose skipped steps every normlab optimizer and ENorm honour), channels_last,
torch.compile (a quickly compiling backend), throughput and memory columns."""

import math

import pytest
import torch

from normlab.train import Callback, RunDirectory, train

BASE = {"data": "digits", "progress": False, "checkpoint": False, "seed": 0, "threads": 1}


def _run(tmp_path, name, **config):
    summary = train({**BASE, "out": str(tmp_path), "name": name, **config})
    return summary, RunDirectory(tmp_path / name).read_metrics()


def test_bf16_autocast_learns_and_keeps_float32_parameters(tmp_path):
    class Dtypes(Callback):
        name = "dtypes"
        seen: set = set()

        def on_step_end(self, state, loss):
            Dtypes.seen |= {p.dtype for p in state.model.parameters()}

    summary = train(
        {**BASE, "out": str(tmp_path), "name": "bf16", "precision": "bf16", "epochs": 5},
        callbacks=[Dtypes()],
    )
    assert summary["status"] == "finished" and summary["final"]["test_acc"] > 0.85
    assert Dtypes.seen == {torch.float32}


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or fp16"):
        train({**BASE, "precision": "fp8"})


class PoisonStep(Callback):
    """Puts an inf into one gradient at step ``at`` and records the parameters around it."""

    name = "poison"

    def __init__(self, at: int):
        self.at, self.before, self.after, self.skipped = at, None, None, []

    def on_before_step(self, state):
        if state.step == self.at:
            self.before = [p.detach().clone() for p in state.model.parameters()]
            next(p for p in state.model.parameters() if p.grad is not None).grad.view(-1)[0] = (
                float("inf")
            )

    def on_step_end(self, state, loss):
        self.skipped.append(state.step_skipped)
        if state.step == self.at + 1:  # state.step counts the step just taken
            self.after = [p.detach().clone() for p in state.model.parameters()]


@pytest.mark.parametrize(
    "config",
    [
        {"model": {"name": "mlp", "norm": "bn", "width": 32}, "optim": "sgdg"},
        {"model": {"name": "mlp", "norm": "bn", "width": 32}, "optim": "adamg"},
        {"model": {"name": "mlp_si", "width": 32}, "optim": "sphere"},
        {"model": {"name": "fully_connected", "depth": 4, "width": 32}, "enorm": True},
    ],
    ids=["sgdg", "adamg", "sphere", "enorm"],
)
def test_fp16_skipped_step_moves_nothing(tmp_path, config):
    poison = PoisonStep(at=3)
    summary = train(
        {**BASE, "out": str(tmp_path), "name": "fp16", "precision": "fp16", "epochs": 1, **config},
        callbacks=[poison],
    )
    assert summary["status"] == "finished"
    assert poison.skipped[3] is True and not any(poison.skipped[:3])
    for before, after in zip(poison.before, poison.after, strict=True):
        assert torch.equal(before, after)  # no sphere step, no ENorm rescale, nothing
    assert all(math.isfinite(p.abs().sum().item()) for p in poison.after)


def test_fp16_loss_scaler_state_is_checkpointed_for_an_exact_resume(tmp_path):
    config = {"precision": "fp16", "model": {"name": "mlp", "norm": "bn"}, "checkpoint": True}
    straight, rows = _run(tmp_path, "straight", epochs=3, **config)
    _run(tmp_path, "cut", epochs=1, **config)
    ckpt = RunDirectory(tmp_path / "cut").load_checkpoint()
    assert ckpt["precision"]["scale"] > 0
    resumed = train(
        {**BASE, **config, "out": str(tmp_path), "name": "cut", "epochs": 3, "resume": True}
    )
    assert resumed["final"]["train_loss"] == straight["final"]["train_loss"]


def test_channels_last_matches_the_contiguous_run(tmp_path):
    config = {"data": {"name": "digits", "resize": 28}, "model": "lenet", "epochs": 1}
    plain, rows_plain = _run(tmp_path, "plain", **config)
    last, rows_last = _run(tmp_path, "last", channels_last=True, **config)
    assert last["status"] == "finished"
    assert rows_last[0]["train_loss"] == pytest.approx(rows_plain[0]["train_loss"], rel=1e-4)
    assert last["final"]["test_acc"] == pytest.approx(plain["final"]["test_acc"], abs=0.01)


def test_channels_last_puts_conv_weights_in_that_format(tmp_path):
    class Check(Callback):
        name = "check"
        formats = []

        def on_train_start(self, state):
            convs = [p for p in state.model.parameters() if p.dim() == 4]
            Check.formats = [p.is_contiguous(memory_format=torch.channels_last) for p in convs]

    train(
        {**BASE, "data": {"name": "digits", "resize": 28}, "model": "lenet", "epochs": 0,
         "channels_last": True, "out": str(tmp_path), "name": "cl"},
        callbacks=[Check()],
    )  # fmt: skip
    assert Check.formats and all(Check.formats)


def test_compiled_model_trains_like_the_eager_one(tmp_path):
    config = {"model": {"name": "mlp", "norm": "bn", "width": 32}, "epochs": 2}
    eager, rows_eager = _run(tmp_path, "eager", **config)
    compiled, rows_compiled = _run(
        tmp_path, "compiled", compile=True, compile_backend="aot_eager", **config
    )
    assert compiled["status"] == "finished"
    for a, b in zip(rows_eager, rows_compiled, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["test_acc"] == pytest.approx(a["test_acc"], abs=1 / 360 + 1e-9)


def test_throughput_and_peak_memory_are_reported(tmp_path):
    summary, rows = _run(tmp_path, "speed", epochs=2)
    for row in rows:
        assert row["images_per_s"] > 0 and row["peak_memory_mb"] > 0
        assert row["images_per_s"] == pytest.approx(1437 / row["time"], rel=1e-6)
    assert summary["images_per_s"] > 0 and summary["peak_memory_mb"] >= rows[0]["peak_memory_mb"]
