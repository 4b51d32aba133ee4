"""Sphere training through the one loop: optim=sphere, the SI model registry, sphere_metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from normlab.errors import ConfigError
from normlab.methods.sphere.training import SphereMetricsCallback, scale_invariant_split
from normlab.models import build_model, model_names
from normlab.optim import SphereSGD
from normlab.scale_invariance import JOINT, ROW, TENSOR, find_scale_invariant
from normlab.train import RunDirectory, train
from normlab.train.loop import seed_everything

SI_COLUMNS = {
    "elr",
    "si_norm",
    "effective_grad_norm",
    "step_angle",
    "epoch_angle",
    "cosine_to_init",
    "tracked_steps",
    "sphere_step_seconds",
    "full_train_loss",
    "full_train_acc",
    "full_train_seconds",
}


def run(tmp_path, *overrides, name="run", callbacks=()):
    summary = train(
        {"out": str(tmp_path), "progress": False, "name": name, "checkpoint": False},
        ["data=digits", *overrides],
        callbacks=callbacks,
    )
    return summary, RunDirectory(tmp_path / name).read_metrics()


def column(rows, key):
    return [float(r[key]) for r in rows]


def initial_si_norm(name: str, seed: int = 0, **options) -> float:
    """The joint SI norm of a freshly built model, as train() builds it for ``seed``."""
    seed_everything(seed)
    model = build_model(name, (1, 8, 8), 10, **options)
    params = model.scale_invariant_parameters()
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))


def test_si_models_are_registered():
    for name in ("mlp_si", "mlp_si_af", "convnet_si", "convnet_si_af", "resnet18_si"):
        assert name in model_names()
    assert "resnet18_si_af" in model_names()


@pytest.mark.parametrize("seed", [0, 1])
def test_sphere_optimizer_keeps_the_si_norm_at_its_initial_value(tmp_path, seed):
    summary, rows = run(
        tmp_path,
        "model=mlp_si",
        "model.width=32",
        "optim=sphere",
        "optim.elr=0.05",
        "epochs=3",
        "data.train_limit=512",
        f"seed={seed}",
        "sphere_metrics=true",
    )
    assert summary["status"] == "finished"
    rho0 = initial_si_norm("mlp_si", seed, width=32)
    for key in ("si_norm", "wnorm/si"):
        for value in column(rows, key):
            assert value == pytest.approx(rho0, rel=2e-6)
    assert "wnorm/other" not in rows[0]  # fully SI: no trainable non-SI parameter, no group
    assert column(rows, "elr") == [0.05] * 3 and column(rows, "elr/si") == [0.05] * 3
    assert "lr" not in rows[0]  # the SI group reports its ELR, not a bare lr
    assert rows[-1]["full_train_loss"] < rows[0]["full_train_loss"]  # and it learns


def test_metrics_columns_and_tan_angle_equals_elr_times_effective_gradient_norm(tmp_path):
    # one step per epoch: each row's means are one step's values, so the identity is exact
    elr = 2e-3
    _, rows = run(
        tmp_path,
        "model=mlp_si",
        "model.width=32",
        "optim=sphere",
        f"optim.elr={elr}",
        "epochs=6",
        "batch_size=64",
        "data.train_limit=64",
        "sphere_metrics=true",
    )
    assert SI_COLUMNS <= set(rows[0])
    for r in rows:
        assert r["tracked_steps"] == 1
        assert math.tan(r["step_angle"]) == pytest.approx(elr * r["effective_grad_norm"], rel=1e-3)
        assert r["epoch_angle"] == pytest.approx(r["step_angle"], rel=1e-3)  # one step = epoch
        assert 0 <= r["full_train_acc"] <= 1 and r["full_train_loss"] > 0
        assert r["sphere_step_seconds"] >= 0 and r["full_train_seconds"] >= 0
    cosines = column(rows, "cosine_to_init")
    assert all(-1 <= c < 1 for c in cosines) and cosines[-1] < cosines[0]


def test_full_train_pass_uses_batch_statistics(tmp_path):
    # an independent train-mode pass over the (unshuffled) train set must match the column
    captured = {}

    class Capture(SphereMetricsCallback):
        name = "capture"

        def on_epoch_end(self, state):
            row = super().on_epoch_end(state)
            model, data = state.model, state.dataset
            saved = {k: v.clone() for k, v in model.state_dict().items()}
            model.train()
            with torch.no_grad():
                losses = [
                    nn.functional.cross_entropy(model(x), y, reduction="sum")
                    for x, y in zip(data.x_train.split(50), data.y_train.split(50))
                ]
            model.load_state_dict(saved)
            captured["reference"] = float(sum(losses)) / len(data.y_train)
            captured["column"] = row["full_train_loss"]
            return {}

    run(
        tmp_path,
        "model=mlp_si",
        "model.width=32",
        "optim=sphere",
        "epochs=1",
        "batch_size=50",
        "data.train_limit=200",
        callbacks=[Capture()],
    )
    assert captured["column"] == pytest.approx(captured["reference"], rel=1e-5)


def test_conventional_sgd_with_weight_decay_has_a_drifting_elr(tmp_path):
    lr = 0.5
    _, rows = run(
        tmp_path,
        "model=mlp_si",
        "model.width=32",
        "optim=sgd",
        f"optim.lr={lr}",
        "optim.momentum=0",
        "optim.weight_decay=0.05",
        "epochs=8",
        "batch_size=64",
        "data.train_limit=64",
        "sphere_metrics=true",
    )
    elr, norm = column(rows, "elr"), column(rows, "si_norm")
    assert max(elr) / min(elr) > 1.2  # the norm moves, so the ELR does
    assert norm == pytest.approx(column(rows, "wnorm/all"), rel=1e-5)
    # ELR_t = lr / |w_t|^2 at the point of the step: epoch e+1's step starts where epoch e ended
    for before, after in zip(rows, rows[1:]):
        assert after["elr"] == pytest.approx(lr / before["si_norm"] ** 2, rel=1e-5)
    assert rows[0]["elr"] == pytest.approx(lr / initial_si_norm("mlp_si", width=32) ** 2, rel=1e-5)


def test_every_tracks_a_subset_of_steps(tmp_path):
    _, rows = run(
        tmp_path,
        "model=mlp_si",
        "model.width=16",
        "optim=sphere",
        "epochs=2",
        "batch_size=32",
        "data.train_limit=320",
        "sphere_metrics.every=4",
        "sphere_metrics.full_train_every=2",
    )
    assert column(rows, "tracked_steps") == [3, 2]  # steps 0, 4, 8 | 12, 16 of 10 per epoch
    assert math.isnan(rows[0]["full_train_loss"]) and math.isfinite(rows[1]["full_train_loss"])


def test_sphere_on_a_plain_bn_model_finds_the_si_weights_with_the_probe(tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, width=16, depth=2, norm="bn")
    x = torch.randn(32, 1, 8, 8)
    si, other = scale_invariant_split(model, x)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert {id(p) for p in si} == {id(m.weight) for m in linear[:-1]}  # not the head
    assert {id(linear[-1].weight), id(linear[-1].bias)} <= {id(p) for p in other}
    _, rows = run(
        tmp_path,
        "model=mlp",
        "model.width=16",
        "model.depth=2",
        "model.norm=bn",
        "optim=sphere",
        "optim.elr=0.01",
        "optim.lr_other=0.05",
        "epochs=2",
        "data.train_limit=256",
        "sphere_metrics=true",
    )
    assert rows[0]["lr/other"] == 0.05 and rows[0]["elr/si"] == 0.01
    assert rows[0]["wnorm/si"] == pytest.approx(rows[1]["wnorm/si"], rel=1e-5)
    assert rows[0]["wnorm/other"] != rows[1]["wnorm/other"]  # the head and BN train


def test_model_and_probe_agree_on_the_si_set():
    torch.manual_seed(0)
    model = build_model("convnet_si_af", (1, 40), 10, c=4)
    x = torch.randn(16, 1, 40)
    by_model = scale_invariant_split(model, source="model")
    by_probe = scale_invariant_split(model, x, source="probe")
    assert [id(p) for p in by_model[0]] == [id(p) for p in by_probe[0]]
    assert {id(p) for p in by_model[1]} == {id(p) for p in by_probe[1]}


@pytest.mark.parametrize(
    "name,options,in_shape",
    [
        ("mlp_si", {"width": 16}, (1, 20)),
        ("convnet_si", {"c": 4}, (1, 20)),
        ("resnet18_si", {"width_multiplier": 1 / 16}, (3, 8, 8)),
    ],
)
def test_probe_confirms_the_si_models_are_jointly_invariant(name, options, in_shape):
    torch.manual_seed(0)
    model = build_model(name, in_shape, 10, **options)
    result = find_scale_invariant(model, torch.randn(16, *in_shape))
    si = model.scale_invariant_parameters()
    names = {id(p): n for n, p in model.named_parameters()}
    kinds = {names[id(p)]: result[names[id(p)]].kind for p in si}
    assert set(kinds.values()) <= {ROW, TENSOR, JOINT}
    # the joint sets cover exactly the SI weights that are not invariant on their own
    joint = {n for members in result.disjoint_joint_sets() for n in members}
    assert joint == {n for n, k in kinds.items() if k == JOINT}
    assert result["head.weight"].kind == "frozen"
    if name == "resnet18_si":
        assert kinds["blocks.0.conv1.weight"] == ROW  # feeds norm2 directly
        assert kinds["stem.weight"] == JOINT and kinds["blocks.0.conv2.weight"] == JOINT
    else:
        assert JOINT not in kinds.values()


def test_lr_other_minus_one_uses_the_si_groups_euclidean_lr():
    from normlab.train.optimizers import BuildContext, build_optimizer

    torch.manual_seed(0)
    model = build_model("mlp_si_af", (1, 8, 8), 10, width=16)
    rho = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in model.scale_invariant_parameters()))
    options = {
        "name": "sphere",
        "elr": 1e-3,
        "momentum": 0.0,
        "granularity": "global",
        "project_gradient": False,
        "radius": None,
        "lr_other": -1,
        "weight_decay_other": 0.0,
        "si_params": "auto",
        "foreach": None,
    }
    context = BuildContext((torch.randn(8, 1, 8, 8), torch.zeros(8).long()), {}, 1)
    opt = build_optimizer(model, options, context)
    assert isinstance(opt, SphereSGD)
    assert [g["name"] for g in opt.param_groups] == ["si", "other"]
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * rho**2, rel=1e-6)
    with pytest.raises(ValueError, match="Invalid lr_other"):
        build_optimizer(model, {**options, "lr_other": -2}, context)
    with pytest.raises(ValueError, match="Invalid si_params"):
        build_optimizer(model, {**options, "si_params": "names"}, context)


def test_clear_errors(tmp_path):
    plain = {"out": str(tmp_path), "progress": False, "model": {"name": "mlp", "norm": "none"}}
    with pytest.raises(ValueError, match="no scale-invariant parameters"):
        train({**plain, "name": "a"}, ["data=digits", "optim=sphere", "epochs=1"])
    with pytest.raises(ValueError, match="no scale_invariant_parameters"):
        run(tmp_path, "model=mlp", "optim=sphere", "optim.si_params=model", "epochs=1", name="b")
    with pytest.raises(ValueError, match="Invalid every"):
        run(tmp_path, "model=mlp_si", "sphere_metrics.every=0", "epochs=1", name="c")
    with pytest.raises(ConfigError, match="valid options"):
        run(tmp_path, "model=mlp_si", "sphere_metrics.evry=2", "epochs=1", name="d")


def test_resumed_run_has_the_same_sphere_metrics(tmp_path):
    options = [
        "model=mlp_si",
        "model.width=16",
        "optim=sphere",
        "optim.elr=0.01",
        "data.train_limit=256",
        "sphere_metrics=true",
    ]
    config = {"out": str(tmp_path), "progress": False}
    train({**config, "name": "straight"}, [*options, "epochs=3"])
    train({**config, "name": "resumed"}, [*options, "epochs=2"])
    train({**config, "name": "resumed", "resume": True}, [*options, "epochs=3"])
    a = RunDirectory(tmp_path / "straight").read_metrics()
    b = RunDirectory(tmp_path / "resumed").read_metrics()
    for key in (
        "si_norm",
        "effective_grad_norm",
        "step_angle",
        "cosine_to_init",
        "full_train_loss",
    ):
        assert column(a, key) == pytest.approx(column(b, key), rel=1e-6)
