"""The ``sgdg`` / ``adamg`` registry entries (normlab.methods.riemannian_bn.optimizers): groups, hyper-parameters,
the seed's hand-made three-dict usage, schedules, and a tiny CLI run."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normlab.cli import main
from normlab.config import resolve
from normlab.methods.riemannian_bn.optimizers import riemannian_groups
from normlab.models import build_model
from normlab.optim import SGDG, AdamG
from normlab.train import RunDirectory, optimizer_spec
from normlab.train.optimizers import BuildContext, build_optimizer


def _options(name: str, **changes) -> dict:
    return resolve({"optim": {"name": name, **changes}})["optim"]


def _build(model: nn.Module, name: str, x: torch.Tensor, **changes) -> torch.optim.Optimizer:
    y = torch.zeros(x.shape[0], dtype=torch.long)
    return build_optimizer(model, _options(name, **changes), BuildContext((x, y), {}, 1))


def _paper_rule(model: nn.Module) -> dict[str, str]:
    """The paper's PyTorch ``main.py`` rule, restated on module types instead of names: a conv
    weight with out < in*kh*kw is on G(1, n); BN parameters and biases get no decay; the rest is
    Euclidean with decay."""
    groups = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.modules.conv._ConvNd) and p_name == "weight":
                groups[name] = "grassmann" if p.shape[0] < p[0].numel() else "euclidean"
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) or p.ndim <= 1:
                groups[name] = "no_decay"
            else:
                groups[name] = "euclidean"
    return groups


def _group_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, str]:
    owner = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    return {n: owner[id(p)] for n, p in model.named_parameters()}


def test_registered_with_the_papers_defaults():
    sgdg, adamg = optimizer_spec("sgdg").defaults, optimizer_spec("adamg").defaults
    for d in (sgdg, adamg):
        assert d["lr"] == 0.01 and d["momentum"] == 0.9 and d["nesterov"] is True
        assert d["weight_decay"] == 5e-4 and d["norm_decay"] == 0.0
        assert d["grad_clip"] == 0.1 and d["omega"] == 0.1
    assert sgdg["lrg"] == 0.2 and adamg["lrg"] == 0.05
    assert (adamg["beta1"], adamg["beta2"], adamg["eps"]) == (0.9, 0.99, 1e-8)


@pytest.mark.parametrize(
    "model_name, options",
    [("vgg", {"depth": 11, "width_multiplier": 0.125}), ("wrn", {"depth": 10, "widen": 1})],
)
def test_groups_are_the_papers_on_small_vgg_and_wrn(model_name, options):
    torch.manual_seed(0)
    model = build_model(model_name, (3, 8, 8), 10, **options)
    x = torch.randn(8, 3, 8, 8)
    opt = _build(model, "sgdg", x, probe_samples=8)
    assert _group_of(model, opt) == _paper_rule(model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"grassmann", "euclidean", "no_decay"}
    g, e, n = groups["grassmann"], groups["euclidean"], groups["no_decay"]
    assert (g["lr"], g["weight_decay"], g["momentum"], g["nesterov"]) == (0.2, 0.0, 0.9, False)
    assert (g["omega"], g["grad_clip"], g["grassmann"]) == (0.1, 0.1, True)
    assert (e["lr"], e["weight_decay"], e["nesterov"], e["grassmann"]) == (0.01, 5e-4, True, False)
    assert (n["lr"], n["weight_decay"], n["nesterov"], n["grassmann"]) == (0.01, 0.0, True, False)
    # rows of the manifold weights are unit vectors once the optimizer exists
    for p in g["params"]:
        norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    if model_name == "wrn":
        # the residual-branch convs are only jointly invariant: Euclidean when asked
        opt2 = _build(model, "adamg", x, probe_samples=8, jointly_invariant="euclidean")
        placed = _group_of(model, opt2)
        assert placed["blocks.0.conv2.weight"] == "euclidean"
        assert placed["blocks.0.conv1.weight"] == "grassmann"
        assert {g["name"]: g["lr"] for g in opt2.param_groups}["grassmann"] == 0.05


def test_options_reach_the_groups_and_bad_options_fail():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, depth=3, width=16, norm="bn")
    x = torch.randn(8, 1, 8, 8)
    opt = _build(model, "adamg", x, grad_clip=0, norm_decay=1e-3, beta2=0.9, euclidean="adam")
    assert isinstance(opt, AdamG)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["grassmann"]["grad_clip"] is None  # 0 disables clipping
    assert groups["grassmann"]["betas"] == (0.9, 0.9)
    assert groups["no_decay"]["weight_decay"] == 1e-3
    assert groups["euclidean"]["euclidean"] == "adam"
    with pytest.raises(ValueError, match="probe_samples"):
        _build(model, "sgdg", x, probe_samples=1)
    with pytest.raises(ValueError, match="overcomplete"):
        _build(model, "sgdg", x, overcomplete="sometimes")
    with pytest.raises(ValueError, match="lr must be >= 0"):  # the config's bound, before SGDG's
        _build(model, "sgdg", x, lr=-1.0)


class SeedNet(nn.Module):
    """Parameter names in the seed's convention (conv*/bn*/fc), so its name rule applies as is."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _seed_param_groups(model, lr, lrg, omega=0.1, grad_clip=0.1, wd=5e-4, bn_decay=0.0):
    """The seed's ``main.py`` code (000_*.txt), verbatim apart from ``opt.`` -> arguments."""
    params = dict(model.named_parameters())
    param_g, param_e0, param_e1 = [], [], []
    for key, value in params.items():
        if "conv" in key and value.size()[0] < np.prod(value.size()[1:]):
            param_g.append(value)
        elif "bn" in key or "bias" in key:
            param_e0.append(value)
        else:
            param_e1.append(value)
    dict_g = {
        "params": param_g,
        "lr": lrg,
        "momentum": 0.9,
        "grassmann": True,
        "omega": omega,
        "grad_clip": grad_clip,
    }
    dict_e0 = {
        "params": param_e0,
        "lr": lr,
        "momentum": 0.9,
        "grassmann": False,
        "weight_decay": bn_decay,
        "nesterov": True,
    }
    dict_e1 = {
        "params": param_e1,
        "lr": lr,
        "momentum": 0.9,
        "grassmann": False,
        "weight_decay": wd,
        "nesterov": True,
    }
    return dict_g, dict_e0, dict_e1


def _train_steps(model, optimizers, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        for o in optimizers:
            o.zero_grad()
        loss.backward()
        for o in optimizers:
            o.step()


@pytest.mark.parametrize("name, cls, lrg", [("sgdg", SGDG, 0.2), ("adamg", AdamG, 0.05)])
def test_seed_three_dicts_equal_the_registry_and_torch_sgd(name, cls, lrg):
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g))
        for _ in range(6)
    ]
    torch.manual_seed(0)
    base = SeedNet().double()
    batches = [(x.double(), y) for x, y in batches]

    # 1. the seed's usage: one optimizer from the three dicts
    seed_model = copy.deepcopy(base)
    seed_opt = cls(list(_seed_param_groups(seed_model, 0.01, lrg)))
    _train_steps(seed_model, [seed_opt], batches)

    # 2. the registry entry with its defaults
    reg_model = copy.deepcopy(base)
    reg_opt = _build(reg_model, name, batches[0][0])
    assert _group_of(reg_model, reg_opt) == {
        "conv1.weight": "grassmann",
        "bn1.weight": "no_decay",
        "bn1.bias": "no_decay",
        "conv2.weight": "grassmann",
        "bn2.weight": "no_decay",
        "bn2.bias": "no_decay",
        "fc.weight": "euclidean",
        "fc.bias": "no_decay",
    }
    _train_steps(reg_model, [reg_opt], batches)

    # 3. an independent reference for the Euclidean part: torch.optim.SGD beside the manifold dict
    ref_model = copy.deepcopy(base)
    dict_g, dict_e0, dict_e1 = _seed_param_groups(ref_model, 0.01, lrg)
    manifold = cls([dict_g])
    euclid = torch.optim.SGD(
        [
            {"params": dict_e0["params"], "weight_decay": 0.0},
            {"params": dict_e1["params"], "weight_decay": 5e-4},
        ],
        lr=0.01,
        momentum=0.9,
        nesterov=True,
    )
    _train_steps(ref_model, [manifold, euclid], batches)

    for (n, a), b, c in zip(
        seed_model.named_parameters(), reg_model.parameters(), ref_model.parameters()
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=n)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12, msg=n)
    assert not torch.allclose(seed_model.fc.weight, base.fc.weight)  # it did train
    for p in (seed_model.conv1.weight, seed_model.conv2.weight):
        norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_first_sgdg_step_matches_the_papers_equations_in_float64():
    """One step of the registry's SGD-G on conv2, from Algorithm 1 plus the ortho gradient."""
    torch.manual_seed(3)
    model = SeedNet().double()
    x, y = torch.randn(16, 3, 6, 6, dtype=torch.float64), torch.randint(0, 10, (16,))
    opt = _build(model, "sgdg", x)  # normalizes the rows
    W = model.conv2.weight
    Y = W.detach().reshape(16, -1).clone()
    F.cross_entropy(model(x), y).backward()
    G = W.grad.reshape(16, -1).clone()
    opt.step()
    omega, nu, lrg = 0.1, 0.1, 0.2
    G = G + 2 * omega * (Y @ Y.T @ Y - Y)  # d/dY (omega/2)||Y Y^T - I||^2
    H = G - (Y * G).sum(1, keepdim=True) * Y
    hn = H.norm(dim=1, keepdim=True)
    H = torch.where(hn > nu, H * nu / hn, H)
    D = -lrg * H  # the momentum buffer starts at zero
    dn = D.norm(dim=1, keepdim=True)
    expected = Y * torch.cos(dn) + D / dn * torch.sin(dn)
    torch.testing.assert_close(W.detach().reshape(16, -1), expected, rtol=1e-10, atol=1e-10)


def test_multistep_schedule_decays_both_learning_rates(tmp_path):
    out = RunDirectory(tmp_path / "r")
    code = main(
        [
            "train",
            "data=digits",
            "data.train_limit=128",
            "data.test_limit=64",
            "model=mlp",
            "model.width=16",
            "model.norm=bn",
            "optim=adamg",
            "optim.probe_samples=8",
            "batch_size=64",
            "epochs=10",
            "schedule=multistep",
            "schedule.milestones=[0.3, 0.6, 0.8]",
            "schedule.gamma=0.2",
            f"out={tmp_path}",
            "name=r",
            "progress=false",
            "checkpoint=false",
        ]
    )
    assert code == 0
    rows = out.read_metrics()
    assert len(rows) == 10
    for row in rows:
        # a row holds the lr of the next step: after epoch e, milestones 3, 6, 8 passed
        decay = 0.2 ** sum(row["epoch"] >= m for m in (3, 6, 8))
        assert math.isclose(row["lr/grassmann"], 0.05 * decay, rel_tol=1e-9)
        assert math.isclose(row["lr/euclidean"], 0.01 * decay, rel_tol=1e-9)
        assert math.isclose(row["lr/no_decay"], 0.01 * decay, rel_tol=1e-9)


def test_cli_tiny_vgg_run_keeps_grassmann_rows_on_the_sphere(tmp_path):
    args = [
        "train",
        "data=digits",
        "data.train_limit=256",
        "data.test_limit=64",
        "model=vgg",
        "model.depth=11",
        "model.width_multiplier=0.125",
        "optim=sgdg",
        "optim.probe_samples=8",
        "batch_size=64",
        "epochs=2",
        f"out={tmp_path}",
        "name=vgg",
        "progress=false",
    ]
    assert main(args) == 0
    run = RunDirectory(tmp_path / "vgg")
    assert run.read_summary()["status"] == "finished"
    rows = run.read_metrics()
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    cfg = run.read_config()
    model = build_model("vgg", (1, 8, 8), 10, depth=11, width_multiplier=0.125)
    model.load_state_dict(run.load_checkpoint()["model"])
    rule = _paper_rule(model)
    params = dict(model.named_parameters())
    on_sphere = [n for n, k in rule.items() if k == "grassmann"]
    assert len(on_sphere) == 8  # every conv: even the first (1 -> 8 channels, n = 9 > 8 rows)
    total_rows = 0
    for name in on_sphere:
        p = params[name].detach()
        norms = p.reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=1e-5, atol=1e-5)
        total_rows += p.shape[0]
    # the Euclidean classifier is not on a sphere (the check above can fail)
    head = params["classifier.weight"].detach().norm(dim=1)
    assert rule["classifier.weight"] == "euclidean"
    assert not torch.allclose(head, torch.ones_like(head), atol=1e-2)
    for row in rows:  # logged per group: ||grassmann|| = sqrt(number of unit rows)
        assert math.isclose(row["wnorm/grassmann"], math.sqrt(total_rows), rel_tol=1e-5)
        assert row["lr/grassmann"] == 0.2 and row["lr/euclidean"] == 0.01
    assert cfg["optim"]["name"] == "sgdg" and cfg["optim"]["lrg"] == 0.2


def test_riemannian_groups_accept_a_bare_input_batch():
    model = build_model("mlp", (1, 8, 8), 10, depth=2, width=8, norm="bn")
    groups = riemannian_groups(model, _options("sgdg"), torch.randn(32, 1, 8, 8))
    assert [g["name"] for g in groups] == ["grassmann", "euclidean", "no_decay"]
