"""ENorm(fused=True): the compiled cycle gives the eager cycle's numbers, compiles once, falls back.

Every case runs two copies of one model side by side, one with the eager cycle (the reference
the other ENorm tests check against hand-written float64 cycles) and one fused, through the
same SGD steps (same data, momentum, a learning rate that changes every step) and ENorm cycles.
Each fused ENorm costs one inductor compile (seconds on CI's 2 cores), so the cases are few and
the models tiny.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normlab._fused as fused_mod
from normlab.enorm import ENorm


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(),
        nn.Linear(7, 3),
    ).to(dtype)  # fmt: skip


class ResBlock(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ConvNet(nn.Module):
    """Conv + BN stem, a residual block (one group for the stream), a grouped conv, GELU head
    (excluded), flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = ResBlock(4)
        self.grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.proj = nn.Linear(6 * 4 * 4, 10)
        self.act = nn.GELU()
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        x = F.max_pool2d(F.relu(self.grouped(x)), 2)
        return self.head(self.act(self.proj(x.flatten(1))))


def inputs(model, dtype, n=8):
    torch.manual_seed(1)
    if isinstance(model, ConvNet):
        return torch.randn(n, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (n,))
    return torch.randn(n, 6, dtype=dtype), torch.randint(0, 3, (n,))


def twin_runs(make, dtype, cycles=100, momentum=0.9, **options):
    """Eager and fused copies through ``cycles`` rounds of (SGD step, ENorm cycle)."""
    ref = make(dtype)
    fused = copy.deepcopy(ref)
    x, y = inputs(ref, dtype)
    runs = []
    for model, is_fused in ((ref, False), (fused, True)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.05 * k))
        runs.append((model, opt, sched, ENorm(model, opt, fused=is_fused, **options)))
    for _ in range(cycles):
        for model, opt, sched, enorm in runs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
            enorm.cycle()
    return runs, x


def assert_close_runs(runs, rtol, atol):
    (m1, o1, _, _), (m2, o2, _, e2) = runs
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=name)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for key, value in s1["state"][k].items():
            other = s2["state"][k][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(other, value, rtol=rtol, atol=atol)
            else:
                assert other == value
    # the optimizer state keeps its tensors' shape and dtype (the fused cycle writes into them)
    for p in m2.parameters():
        buf = o2.state[p].get("momentum_buffer")
        if buf is not None:
            assert buf.shape == p.shape and buf.dtype == p.dtype
    assert e2.compiles == 1


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_fused_mlp_matches_eager(order, dtype, tol):
    """100 cycles interleaved with SGD momentum steps whose LR changes: same weights and
    momentum buffers, one compile."""
    runs, _ = twin_runs(mlp, dtype, c=1.2, order=order)
    assert_close_runs(runs, tol, tol)
    assert runs[1][3].compile_seconds > 0
    assert runs[1][3].fused_form == "in place"


@pytest.mark.slow
@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_fused_conv_bn_residual_matches_eager(order):
    """Conv + BN + residual stream + grouped conv + flatten, biases balanced, c != 1, an
    excluded GELU, the last hidden layer left alone."""
    options = dict(c=1.1, order=order, include_bias=True, exclude=["act"])
    runs, _ = twin_runs(lambda dtype: ConvNet().to(dtype), torch.float64, cycles=60, **options)
    assert_close_runs(runs, 1e-10, 1e-10)
    kinds = {s.kind for s in runs[1][3].plan.slots}
    assert {"weight", "bias", "norm_weight", "norm_bias"} <= kinds


def test_fused_without_state_preserves_the_function():
    """No optimizer state (momentum 0, then no optimizer): fused cycles keep the function and
    match eager; p != 2 and the original preset's unbalanced last hidden layer."""
    runs, x = twin_runs(
        mlp, torch.float64, cycles=20, momentum=0.0, c=0.9, p=1.5, balance_last_hidden=False
    )
    assert_close_runs(runs, 1e-10, 1e-10)
    model = runs[1][0]
    torch.manual_seed(3)
    enorm = ENorm(model, None, fused=True, order="sequential")
    enorm.rescale(torch.exp(torch.randn(enorm.num_variables, dtype=torch.float64)))
    before = model(x)
    objective = enorm.objective()
    for _ in range(5):
        enorm.cycle()
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-12)
    assert enorm.objective() < objective
    assert enorm.compiles == 1


def test_fallback_when_compile_fails_warns_once_and_runs_eager(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(fused_mod.torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs, _ = twin_runs(mlp, torch.float64, cycles=5, c=1.2)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "ENorm cycle" in messages[0] and "no C++ compiler" in messages[0]
    assert "\n" not in messages[0]
    (m1, o1, _, _), (m2, o2, _, e2) = runs
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)  # the eager cycle itself: identical numbers
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(o1.state[a]["momentum_buffer"], o2.state[b]["momentum_buffer"])
    assert e2.compiles == 0 and e2.fused


def test_fused_option_in_repr_and_defaults():
    enorm = ENorm(mlp(torch.float64), None)
    assert not enorm.fused and enorm.compiles == 0 and "fused=False" in repr(enorm)
