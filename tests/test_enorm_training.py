"""ENorm in the training loop: the ``enorm`` extension, its columns and checkpoints, the CLI, and
the paper's two models (``fully_connected``, ``fully_conv``)."""

import json
import math

import pytest
import torch
import torch.nn as nn

from normlab.cli import main
from normlab.errors import UserError
from normlab.methods.enorm.callback import ENormCallback, ENormSetupError, weight_sq_norm
from normlab.models import build_model, model_names, register_model
from normlab.train import Callback, RunDirectory, train
from normlab.train.optimizers import OptimizerSpec, optimizer_names, register_optimizer

SMALL = {
    "data": {"name": "digits", "train_limit": 320, "test_limit": 100},
    "model": {"name": "fully_connected", "depth": 5, "width": 24},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
    "batch_size": 64,
    "epochs": 2,
    "progress": False,
}


def run(tmp_path, name, config=None, overrides=(), callbacks=()):
    cfg = {**SMALL, **(config or {}), "out": str(tmp_path), "name": name}
    return train(cfg, list(overrides), callbacks=callbacks)


# ------------------------------------------------------------------------------ function kept
class OutputProbe(Callback):
    """Records the model's eval-mode output on a fixed batch at every step end."""

    def __init__(self, name, x):
        self.name = name
        self.x = x
        self.outputs = []
        self.weights = []

    @torch.no_grad()
    def on_step_end(self, state, loss):
        was_training = state.model.training
        state.model.eval()  # running statistics untouched, dropout off
        self.outputs.append(state.model(self.x.to(state.device)).double())
        state.model.train(was_training)
        self.weights.append([p.detach().clone() for p in state.model.parameters()])


@pytest.mark.parametrize(
    "model",
    [
        {"name": "fully_connected", "depth": 5, "width": 24, "norm": "none"},
        {"name": "fully_connected", "depth": 5, "width": 24, "norm": "bn", "bias": True},
        {"name": "fully_conv", "width": 4, "norm": "bn"},
    ],
    ids=["fc", "fc-bn-bias", "conv-bn"],
)
def test_enorm_step_keeps_the_function_at_every_step(tmp_path, model):
    x = torch.rand(16, 1, 8, 8)
    # Probes around the ENorm callback: its on_step_end runs between them.
    before, after = OutputProbe("before", x), OutputProbe("after", x)
    enorm = ENormCallback(c=1.2)
    summary = run(tmp_path, "fn", {"model": model}, callbacks=[before, enorm, after])
    assert summary["status"] == "finished"
    assert len(before.outputs) == summary["steps"] == 10
    moved = 0.0
    for y0, y1, w0, w1 in zip(before.outputs, after.outputs, before.weights, after.weights):
        rel = float((y1 - y0).abs().max() / y0.abs().max())
        assert rel < 2e-5, rel  # fp32 rounding only
        moved = max(moved, max(float((b - a).abs().max() / a.abs().max()) for a, b in zip(w0, w1)))
    assert moved > 1e-3  # ENorm did change the weights (the check above is not vacuous)


# ------------------------------------------------------------------------------ columns
def test_weight_norm_column_is_lower_with_enorm_and_matches_the_weights(tmp_path):
    cols = {}
    for apply in (True, False):
        run(tmp_path, f"a{apply}", {"enorm": {"c": 1.0, "apply": apply}, "epochs": 3})
        rows = RunDirectory(tmp_path / f"a{apply}").read_metrics()
        assert {"weight_sq_norm", "enorm_objective", "enorm_seconds"} <= set(rows[0])
        cols[apply] = rows
        # With c = 1, no bias and no norm layer, J_1 is the plain sum of squared weights.
        for row in rows:
            assert row["enorm_objective"] == pytest.approx(row["weight_sq_norm"], rel=1e-5)
        # The column is the model's sum ||W||^2 (independent recomputation from the checkpoint).
        state = RunDirectory(tmp_path / f"a{apply}").load_checkpoint()["model"]
        total = sum(float(v.double().pow(2).sum()) for v in state.values() if v.ndim >= 2)
        assert rows[-1]["weight_sq_norm"] == pytest.approx(total, rel=1e-9)
    for with_enorm, without in zip(cols[True], cols[False]):
        assert with_enorm["weight_sq_norm"] < 0.95 * without["weight_sq_norm"]
        assert with_enorm["enorm_seconds"] > 0 and without["enorm_seconds"] == 0


def test_apply_false_only_measures(tmp_path):
    run(tmp_path, "plain")
    run(tmp_path, "measured", {"enorm": {"c": 1.2, "apply": False}})
    a = RunDirectory(tmp_path / "plain").read_metrics()
    b = RunDirectory(tmp_path / "measured").read_metrics()
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "test_acc", "test_loss"):
            assert ra[key] == rb[key]
    assert "weight_sq_norm" not in a[0] and math.isfinite(b[-1]["enorm_objective"])


def test_weight_sq_norm_counts_matrices_and_kernels_only():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    expected = sum(
        float(p.detach().double().pow(2).sum()) for p in (model[0].weight, model[3].weight)
    )
    assert weight_sq_norm(model) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------ resume
class InterruptAt(Callback):
    name = "interrupt"

    def __init__(self, step):
        self.at = step

    def on_step_end(self, state, loss):
        if state.step == self.at:
            raise KeyboardInterrupt


def test_interrupt_then_resume_equals_uninterrupted_with_enorm(tmp_path):
    # every=2 with 5 steps per epoch: a lost call counter would move the cycles to other steps.
    config = {"enorm": {"c": 1.2, "every": 2}, "epochs": 3, "schedule": {"name": "linear"}}
    straight = run(tmp_path, "straight", config)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "cut", config, callbacks=[InterruptAt(7)])  # mid-epoch 2
    cut = RunDirectory(tmp_path / "cut")
    assert cut.load_checkpoint()["callbacks"]["enorm"] == {"calls": 7}
    resumed = run(tmp_path, "cut", config, overrides=["resume=true"])
    assert resumed["steps"] == straight["steps"] == 15
    a, b = RunDirectory(tmp_path / "straight").read_metrics(), cut.read_metrics()
    for ra, rb in zip(a, b, strict=True):
        for key in ra:
            if key not in ("time", "enorm_seconds", "images_per_s", "peak_memory_mb"):
                assert ra[key] == rb[key], key
    sa = RunDirectory(tmp_path / "straight").load_checkpoint()
    sb = cut.load_checkpoint()
    assert sb["callbacks"]["enorm"] == {"calls": 15}
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), key


def test_callback_state_loads_before_and_after_start():
    cb = ENormCallback(every=3)
    cb.load_state_dict({"calls": 4})  # from a checkpoint, before on_train_start
    assert cb.state_dict() == {"calls": 4}
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))

    class State:
        pass

    state = State()
    state.model, state.optimizer = model, torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_train_start(state)
    assert cb.enorm.state_dict() == {"calls": 4}
    cb.on_step_end(state, None)
    assert cb.state_dict() == {"calls": 5}


# ------------------------------------------------------------------------------ CLI and errors
def test_cli_train_with_enorm_c(tmp_path):
    args = ["train", "data=digits", "data.train_limit=200", "model=fully_connected"]
    args += ["model.depth=4", "model.width=16", "epochs=1", "enorm.c=1.2", "progress=false"]
    assert main([*args, f"out={tmp_path}", "name=cli"]) == 0
    rd = RunDirectory(tmp_path / "cli")
    config = json.loads(rd.config_path.read_text())
    assert config["enorm"]["c"] == 1.2 and config["enorm"]["order"] == "sequential"
    row = rd.read_metrics()[-1]
    assert row["weight_sq_norm"] > 0 and row["enorm_seconds"] > 0


def test_cli_train_with_enorm_fused_matches_eager(tmp_path):
    """``enorm.fused=true`` from the command line: the compiled cycle, the eager run's numbers."""
    args = ["train", "data=digits", "data.train_limit=200", "model=fully_connected"]
    args += ["model.depth=4", "model.width=16", "epochs=2", "enorm.c=1.2", "progress=false"]
    assert main([*args, f"out={tmp_path}", "name=eager"]) == 0
    assert main([*args, "enorm.fused=true", f"out={tmp_path}", "name=fused"]) == 0
    eager, fused = RunDirectory(tmp_path / "eager"), RunDirectory(tmp_path / "fused")
    assert json.loads(fused.config_path.read_text())["enorm"]["fused"] is True
    assert json.loads(eager.config_path.read_text())["enorm"]["fused"] is False
    for a, b in zip(eager.read_metrics(), fused.read_metrics()):
        for key in ("train_loss", "weight_sq_norm", "enorm_objective"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


class GeluNet(nn.Sequential):
    def __init__(self, in_shape, num_classes, width: int = 8):
        super().__init__(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), width),
            nn.GELU(),
            nn.Linear(width, num_classes),
        )


class PlainDescent(torch.optim.Optimizer):
    """An optimizer ENorm has no state transform for."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_cli_rejects_what_enorm_cannot_rescale(tmp_path, capsys):
    if "gelu_net_test" not in model_names():
        register_model("gelu_net_test", GeluNet)
    if "plain_descent_test" not in optimizer_names():
        register_optimizer(
            OptimizerSpec(
                "plain_descent_test", lambda m, o, ctx: PlainDescent(m.parameters(), o["lr"]),
                {"lr": 0.1},
            )
        )  # fmt: skip
    base = ["train", "data=digits", "epochs=1", "progress=false", f"out={tmp_path}"]
    assert main([*base, "model=gelu_net_test", "enorm=true", "name=gelu"]) == 2
    err = capsys.readouterr().err
    assert "GELU" in err and "exclude" in err and "Traceback" not in err
    assert main([*base, "model.width=8", "enorm.c=-1", "name=badc"]) == 2
    assert "Invalid c" in capsys.readouterr().err
    assert main([*base, "model.width=8", "enorm.order=random", "name=badorder"]) == 2
    assert "Invalid order" in capsys.readouterr().err
    assert main([*base, "model.width=8", "optim=plain_descent_test", "enorm=true", "name=o"]) == 2
    assert "PlainDescent" in capsys.readouterr().err
    # excluding the GELU leaves the channels around it unscaled and trains
    assert main([*base, "model=gelu_net_test", "enorm.exclude=[2]", "name=gelu_ok"]) == 0


def test_setup_errors_are_user_errors():
    assert issubclass(ENormSetupError, UserError)


# ------------------------------------------------------------------------------ the two models
def test_fully_conv_matches_the_original_layout():
    model = build_model("fully_conv", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [
        (128, 3), (128, 128), (128, 128), (256, 128), (256, 256), (256, 256),
        (320, 256), (320, 320), (10, 320),
    ]  # fmt: skip
    assert [c.kernel_size for c in convs] == [(3, 3)] * 7 + [(1, 1)] * 2
    assert all(c.bias is None for c in convs)
    assert sum(p.numel() for p in model.parameters()) == 2_616_576  # the original's count
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = build_model("fully_conv", (1, 40), 10, width=4, norm="none")
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert plain(torch.randn(3, 1, 40)).shape == (3, 10)


def test_fully_connected_is_the_kaiming_initialised_mlp():
    torch.manual_seed(0)
    model = build_model("fully_connected", (3, 32, 32), 10, width=500)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 15 and all(m.bias is None for m in linears)
    assert sum(p.numel() for p in model.parameters()) == 4_791_000  # the original's weights
    for m in linears[1:-1]:
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.02)
    # The signal keeps its scale through 14 ReLU layers (the default init shrinks it ~6x each).
    x = torch.randn(64, 3, 32, 32)
    assert 0.05 < model(x).std().item() < 20


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40)])
def test_enorm_finds_every_hidden_layer_of_fully_conv(shape):
    from normlab import ENorm

    model = build_model("fully_conv", shape, 10, width=4, norm="none")
    enorm = ENorm(model, None, c=1.1)
    assert len(enorm.groups) == 8  # nine convs: eight hidden layers
    assert enorm.check(torch.randn(4, *shape)) < 1e-5


def test_enorm_original_preset_in_the_config():
    from normlab import resolve_config
    from normlab.enorm import ENORM_PRESETS

    cfg = resolve_config({"enorm": "original"})
    assert {k: cfg["enorm"][k] for k in ENORM_PRESETS["original"]} == ENORM_PRESETS["original"]
    assert cfg["enorm"]["c"] == 1.0  # the rest keeps ENorm's defaults
    with pytest.raises(ValueError, match="enorm=original"):
        resolve_config({"enorm": "origin"})
