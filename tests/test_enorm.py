"""ENorm numerics: float64 references from the paper's update, invariance, descent, uniqueness."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import normlab
from normlab.enorm import ENorm

ORDERS = ["sequential", "simultaneous"]


# ----------------------------------------------------------------------------------------------
# Independent reference, written from the paper's per-neuron update on explicit matrices.
# ----------------------------------------------------------------------------------------------


def _as_matrix_pair(w_in: torch.Tensor, w_out: torch.Tensor):
    """Rows of w_in and columns of w_out for the hidden channels between them.

    w_in: (C, ...) producer; w_out: Linear (O, C * S) after a flatten, or (O, C, ...) conv.
    Returns (incoming (C, -1), outgoing (C, -1)) as plain matrices.
    """
    c = w_in.shape[0]
    incoming = w_in.reshape(c, -1)
    if w_out.dim() == 2 and w_out.shape[1] != c:  # Linear after flatten: block of S features
        s = w_out.shape[1] // c
        outgoing = w_out.reshape(w_out.shape[0], c, s).permute(1, 0, 2).reshape(c, -1)
    else:
        outgoing = w_out.transpose(0, 1).reshape(c, -1)
    return incoming, outgoing


def _scale_pair(w_in, w_out, d):
    c = w_in.shape[0]
    w_in = w_in * d.view(c, *([1] * (w_in.dim() - 1)))
    if w_out.dim() == 2 and w_out.shape[1] != c:
        s = w_out.shape[1] // c
        w_out = (w_out.reshape(w_out.shape[0], c, s) / d.view(1, c, 1)).reshape(w_out.shape)
    else:
        w_out = w_out / d.view(1, c, *([1] * (w_out.dim() - 2)))
    return w_in, w_out


def reference_cycle(weights, c=1.0, p=2.0, order="sequential"):
    """One ENorm cycle on a chain of weights (float64), every hidden layer balanced.

    Neuron i between W_{h-1} and W_h: d_i = (||col_i(W_h)||_p / (c ||row_i(W_{h-1})||_p))^(1/2),
    row i of W_{h-1} times d_i, column i of W_h divided by d_i (Stock et al. 2019, sec. 3).
    """
    weights = [w.clone() for w in weights]
    if order == "sequential":
        for h in range(1, len(weights)):
            a, b = _as_matrix_pair(weights[h - 1], weights[h])
            d = (b.norm(p=p, dim=1) / (c * a.norm(p=p, dim=1))).sqrt()
            weights[h - 1], weights[h] = _scale_pair(weights[h - 1], weights[h], d)
        return weights
    ds = []
    for h in range(1, len(weights)):
        a, b = _as_matrix_pair(weights[h - 1], weights[h])
        ds.append((b.norm(p=p, dim=1) / (c * a.norm(p=p, dim=1))).sqrt())
    for h, d in enumerate(ds, start=1):
        weights[h - 1], weights[h] = _scale_pair(weights[h - 1], weights[h], d)
    return weights


def reference_objective(weights, c=1.0, p=2.0):
    return sum(c ** (-p * k) * float(w.abs().pow(p).sum()) for k, w in enumerate(weights))


# ----------------------------------------------------------------------------------------------
# Test networks (inline: tests do not depend on normlab.models).
# ----------------------------------------------------------------------------------------------


def mlp(widths, bias=False, act=nn.ReLU):
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def conv_chain(dim, channels=(3, 6, 5, 4), bias=False, head=10):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dim]
    layers = []
    for i in range(len(channels) - 1):
        layers += [conv(channels[i], channels[i + 1], 3, padding=1, bias=bias), nn.ReLU()]
        if i == 0:
            layers.append(pool(2))
    spatial = {1: 8, 2: 4, 3: 2}[dim]  # input 16 / 8 / 4, halved by the pool
    layers += [nn.Flatten(), nn.Linear(channels[-1] * spatial**dim, head, bias=bias)]
    return nn.Sequential(*layers), (3, *{1: (16,), 2: (8, 8), 3: (4, 4, 4)}[dim])


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.act = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        learned = stride != 1 or cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride) if learned else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.act(self.conv1(x))) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, two identity blocks, a stride-2 block with a learned 1x1 shortcut, MLP head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, 8), Block(8, 8), Block(8, 16, stride=2))
        self.fc1 = nn.Linear(16 * 2 * 2, 12)
        self.fc2 = nn.Linear(12, 10)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        x = F.max_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class PoolNet(nn.Module):
    """Biased convs, avg / max / adaptive pooling, concatenation, a global mean, LeakyReLU."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.Conv2d(6, 4, 1)
        self.b2 = nn.Conv2d(6, 5, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(9, 9, 3, padding=1, groups=9)
        self.g = nn.Conv2d(9, 6, 3, padding=1, groups=3)
        self.fc = nn.Linear(6, 7)
        self.out = nn.Linear(7, 4)

    def forward(self, x):
        x = F.leaky_relu(self.a(x), 0.2)
        x = F.avg_pool2d(x, 2)
        x = torch.cat([F.relu(self.b1(x)), F.relu(self.b2(x))], dim=1)
        x = F.relu(self.dw(x))
        x = nn.functional.adaptive_max_pool2d(F.relu(self.g(x)), 2)
        x = x.mean((2, 3))
        return self.out(F.dropout(F.relu(self.fc(x)), 0.0, self.training))


def unbalance(enorm: ENorm, sigma: float, seed: int) -> None:
    """Random function-preserving positive rescaling of every channel (log-normal factors)."""
    gen = torch.Generator().manual_seed(seed)
    factors = torch.exp(
        sigma * torch.randn(enorm.num_variables, generator=gen, dtype=torch.float64)
    )
    enorm.rescale(factors)


def rel_change(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def weights_of(model, kinds=(nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, kinds)]


# ----------------------------------------------------------------------------------------------
# Agreement with the reference update
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("c,p", [(1.0, 2.0), (1.2, 2.0), (0.9, 1.0), (1.1, 3.0)])
def test_mlp_cycle_matches_reference(order, c, p):
    torch.manual_seed(1)
    model = mlp([12, 20, 16, 9, 5]).double()
    enorm = ENorm(model, c=c, p=p, order=order)
    unbalance(enorm, 1.0, seed=3)
    before = weights_of(model)
    for _ in range(3):
        before = reference_cycle(before, c=c, p=p, order=order)
        enorm.cycle()
    for got, want in zip(weights_of(model), before):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("order", ORDERS)
def test_conv_chain_matches_reference(dim, order):
    """Conv1d (the original's issue #1), Conv2d, Conv3d, and conv -> flatten -> Linear."""
    torch.manual_seed(dim)
    model, _ = conv_chain(dim)
    model.double()
    enorm = ENorm(model, c=1.1, order=order)
    assert len(enorm.groups) == 3
    before = weights_of(model)
    for _ in range(2):
        before = reference_cycle(before, c=1.1, order=order)
        enorm.step()
    for got, want in zip(weights_of(model), before):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_objective_matches_reference_and_is_reported():
    torch.manual_seed(0)
    model = mlp([6, 8, 7, 3]).double()
    enorm = ENorm(model, c=1.3, p=1.5)
    assert enorm.objective() == pytest.approx(
        reference_objective(weights_of(model), 1.3, 1.5), rel=1e-12
    )


# ----------------------------------------------------------------------------------------------
# Function preservation
# ----------------------------------------------------------------------------------------------


def _networks():
    torch.manual_seed(0)
    return {
        "mlp_bias_leaky": (mlp([10, 16, 12, 4], bias=True, act=lambda: nn.LeakyReLU(0.1)), (10,)),
        "conv1d": conv_chain(1, bias=True),
        "conv2d": conv_chain(2, bias=True),
        "conv3d": conv_chain(3, bias=True),
        "resnet": (TinyResNet(), (3, 8, 8)),
        "poolnet": (PoolNet(), (3, 8, 8)),
    }


@pytest.mark.parametrize("name", list(_networks()))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_cycle_preserves_function(name, order, dtype, tol):
    model, shape = _networks()[name]
    model.to(dtype)
    enorm = ENorm(model, c=1.2, order=order, include_bias=name == "poolnet")
    for seed in range(2):
        unbalance(enorm, 0.5, seed)  # start away from balance so that the cycle moves a lot
        x = torch.randn(5, *shape, dtype=dtype)
        with torch.no_grad():
            y0 = model(x)
            enorm.cycle()
            assert rel_change(model(x), y0) <= tol


@pytest.mark.parametrize("name", list(_networks()))
def test_random_rescaling_check_is_at_rounding_level(name):
    model, shape = _networks()[name]
    model.double()
    enorm = ENorm(model)
    assert enorm.check(torch.randn(3, *shape, dtype=torch.float64), sigma=2.0) < 1e-12


# ----------------------------------------------------------------------------------------------
# Descent, convergence, uniqueness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("c", [1.0, 1.25])
@pytest.mark.parametrize("name", ["mlp_bias_leaky", "resnet", "poolnet"])
def test_weighted_objective_never_increases(order, c, name):
    model, _ = _networks()[name]
    model.double()
    enorm = ENorm(model, c=c, order=order, include_bias=True)
    unbalance(enorm, 1.5, seed=7)
    values = [enorm.objective()]
    for _ in range(25):
        enorm.cycle()
        values.append(enorm.objective())
    assert values[-1] < values[0]
    for before, after in zip(values, values[1:]):
        assert after <= before * (1 + 1e-12)


@pytest.mark.parametrize("order", ORDERS)
def test_fixed_point_outgoing_is_c_times_incoming(order):
    torch.manual_seed(2)
    c = 1.2
    model = mlp([8, 10, 9, 7, 3]).double()
    enorm = ENorm(model, c=c, order=order)
    unbalance(enorm, 1.0, seed=1)
    for _ in range(400 if order == "simultaneous" else 150):
        enorm.cycle()
    w = weights_of(model)
    for h in range(1, len(w)):
        ratio = w[h].norm(dim=0) / w[h - 1].norm(dim=1)
        torch.testing.assert_close(ratio, torch.full_like(ratio, c), rtol=1e-9, atol=0)
    factors = enorm.pending_factors()
    torch.testing.assert_close(factors, torch.ones_like(factors), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["mlp_bias_leaky", "resnet", "conv1d"])
def test_equivalent_networks_converge_to_the_same_weights(name):
    """The minimum of J_c over a function-equivalence class is unique."""
    model, _ = _networks()[name]
    model.double()
    twin = copy.deepcopy(model)
    first, second = ENorm(model, c=1.1), ENorm(twin, c=1.1)
    unbalance(first, 1.0, seed=11)
    unbalance(second, 1.0, seed=12)
    gap0 = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    assert gap0 > 1e-2
    for _ in range(200):
        first.cycle()
        second.cycle()
    for (name_a, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name_a)


def test_orders_reach_the_same_minimum():
    torch.manual_seed(5)
    model = TinyResNet().double()
    twin = copy.deepcopy(model)
    seq, jac = ENorm(model, order="sequential"), ENorm(twin, order="simultaneous")
    unbalance(seq, 1.0, 0)
    unbalance(jac, 1.0, 0)
    for _ in range(60):
        seq.cycle()
    for _ in range(600):
        jac.cycle()
    assert jac.objective() == pytest.approx(seq.objective(), rel=1e-9)


def test_sequential_converges_faster_than_simultaneous():
    torch.manual_seed(4)
    model = mlp([10, 30, 30, 30, 30, 4]).double()
    twin = copy.deepcopy(model)
    seq, jac = ENorm(model, order="sequential"), ENorm(twin, order="simultaneous")
    unbalance(seq, 3.0, 0)
    unbalance(jac, 3.0, 0)
    seq.cycle()
    jac.cycle()
    assert seq.objective() < jac.objective()


# ----------------------------------------------------------------------------------------------
# Biases, dead channels, scheduling, determinism
# ----------------------------------------------------------------------------------------------


def test_biases_are_rescaled_and_optionally_balanced():
    torch.manual_seed(0)
    model = mlp([5, 6, 4], bias=True).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    for include_bias in (False, True):
        m = copy.deepcopy(model)
        enorm = ENorm(m, include_bias=include_bias)
        y0 = m(x)
        d = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
        bias0 = m[0].bias.detach().clone()
        enorm.rescale(d)
        torch.testing.assert_close(m[0].bias.detach(), bias0 * d)
        torch.testing.assert_close(m(x), y0)
    # Balanced biases enter A_i: d_i^4 = ||col_i||^2 / (||row_i||^2 + b_i^2).
    m = copy.deepcopy(model)
    w0, b0, w1 = m[0].weight.detach().clone(), m[0].bias.detach().clone(), m[2].weight.detach()
    want = (w1.pow(2).sum(0) / (w0.pow(2).sum(1) + b0.pow(2))).pow(0.25)
    ENorm(m, include_bias=True).cycle()
    torch.testing.assert_close(m[0].bias.detach(), b0 * want)


@pytest.mark.parametrize("order", ORDERS)
def test_dead_channels_do_not_produce_nan(order):
    torch.manual_seed(0)
    model = mlp([4, 6, 5, 3]).double()
    with torch.no_grad():
        model[0].weight[2].zero_()  # no incoming weights
        model[2].weight[:, 4].zero_()  # no outgoing weights
    x = torch.randn(8, 4, dtype=torch.float64)
    y0 = model(x)
    enorm = ENorm(model, order=order)
    for _ in range(3):
        enorm.cycle()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    torch.testing.assert_close(model(x), y0)


def test_every_and_cycles():
    torch.manual_seed(0)
    base = mlp([6, 9, 8, 3]).double()
    ENorm(base).rescale(torch.rand(17, dtype=torch.float64) + 0.2)
    m_every, m_cycles, m_ref = (copy.deepcopy(base) for _ in range(3))
    every = ENorm(m_every, every=3)
    start = [p.detach().clone() for p in m_every.parameters()]
    every.step()
    every.step()
    assert all(torch.equal(a, b) for a, b in zip(m_every.parameters(), start))
    every.step()
    assert not all(torch.equal(a, b) for a, b in zip(m_every.parameters(), start))
    assert every.state_dict() == {"calls": 3}
    ENorm(m_cycles, cycles=2).step()
    ref = ENorm(m_ref)
    ref.cycle()
    ref.cycle()
    for a, b in zip(m_cycles.parameters(), m_ref.parameters()):
        assert torch.equal(a, b)


def test_identical_replicas_stay_bit_identical():
    """A pure function of the parameters: data-parallel ranks need no communication."""
    torch.manual_seed(0)
    model = TinyResNet()
    twin = copy.deepcopy(model)
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    ea, eb = ENorm(model, opt_a, c=1.1), ENorm(twin, opt_b, c=1.1)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        for m, opt, e in ((model, opt_a, ea), (twin, opt_b, eb)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
            e.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Construction forms and validation
# ----------------------------------------------------------------------------------------------


def test_seed_usage_with_named_parameters():
    """The original README's two-line usage: ENorm(model.named_parameters(), optimizer, c=1)."""
    torch.manual_seed(0)
    model = mlp([6, 8, 8, 3], bias=True)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    enorm = ENorm(model.named_parameters(), optimizer, c=1)
    reference = ENorm(twin)
    x = torch.randn(4, 6)
    optimizer.zero_grad()
    model(x).sum().backward()
    optimizer.step()
    enorm.step()
    assert enorm.groups == reference.groups
    assert normlab.ENorm is ENorm


def test_bad_arguments():
    model = mlp([3, 4, 2])
    for kwargs in ({"c": 0}, {"c": -1.0}, {"c": float("inf")}, {"p": 0}, {"cycles": 0},
                   {"every": 0}, {"order": "jacobi"}):  # fmt: skip
        with pytest.raises(ValueError, match="Invalid"):
            ENorm(model, **kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        ENorm(list(model.named_parameters()))
    enorm = ENorm(model)
    with pytest.raises(ValueError, match="Invalid factors"):
        enorm.rescale(torch.ones(3))
    with pytest.raises(ValueError, match="Invalid factors"):
        enorm.rescale(-torch.ones(4))


# ----------------------------------------------------------------------------------------------
# Random architectures
# ----------------------------------------------------------------------------------------------


def random_net(seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    """A random MLP or CNN: depth, widths, biases, activations, pooling and kernel sizes vary."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(n, (1,), generator=gen))

    acts = [nn.ReLU, lambda: nn.LeakyReLU(0.05 + 0.3 * torch.rand(1, generator=gen).item())]
    bias = bool(pick(2))
    torch.manual_seed(seed)
    if seed % 2 == 0:
        widths = [3 + pick(6) for _ in range(3 + pick(4))]
        return mlp(widths, bias=bias, act=acts[pick(2)]), (widths[0],)
    dim = 1 + pick(2)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    pools = [nn.MaxPool1d, nn.AvgPool1d] if dim == 1 else [nn.MaxPool2d, nn.AvgPool2d]
    chans = [2] + [2 + pick(5) for _ in range(2 + pick(3))]
    layers: list[nn.Module] = []
    for i in range(len(chans) - 1):
        k = 1 + 2 * pick(2)
        layers += [conv(chans[i], chans[i + 1], k, padding=k // 2, bias=bias), acts[pick(2)]()]
    layers += [pools[pick(2)](2), nn.Flatten(), nn.Linear(chans[-1] * 2**dim, 3, bias=bias)]
    return nn.Sequential(*layers), (2, *([4] * dim))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("order", ORDERS)
def test_random_networks(seed, order):
    model, shape = random_net(seed)
    model.double()
    c = 1.0 + 0.1 * (seed % 3)
    enorm = ENorm(model, c=c, order=order, include_bias=seed % 4 == 1)
    unbalance(enorm, 1.0, seed)
    x = torch.randn(4, *shape, dtype=torch.float64)
    with torch.no_grad():
        y0 = model(x)
    values = [enorm.objective()]
    for _ in range(40):
        enorm.cycle()
        values.append(enorm.objective())
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:]))
    with torch.no_grad():
        assert rel_change(model(x), y0) < 1e-10


# ----------------------------------------------------------------------------------------------
# The original code's cycle: the named preset
# ----------------------------------------------------------------------------------------------


def original_cycle(weights, c=1.0, p=2.0):
    """facebookresearch/enorm's cycle, transcribed: every factor from the start-of-cycle weights
    (Jacobi), and the loop over hidden layers stops before the last one (never balanced)."""
    weights = [w.clone() for w in weights]
    ds = []
    for h in range(
        1, len(weights) - 1
    ):  # the last hidden layer (weights[-2] -> weights[-1]) skipped
        a, b = _as_matrix_pair(weights[h - 1], weights[h])
        ds.append((b.norm(p=p, dim=1) / (c * a.norm(p=p, dim=1))).sqrt())
    for h, d in enumerate(ds, start=1):
        weights[h - 1], weights[h] = _scale_pair(weights[h - 1], weights[h], d)
    return weights


@pytest.mark.parametrize("c", [1.0, 1.2])
def test_original_preset_is_the_original_cycle(c):
    from normlab.enorm import ENORM_PRESETS

    torch.manual_seed(2)
    model = mlp([12, 20, 16, 9, 5]).double()
    twin = copy.deepcopy(model)
    enorm = ENorm(model, c=c, **ENORM_PRESETS["original"])
    assert len(enorm.groups) == 2  # three hidden layers, the last left alone
    unbalanced = ENorm(model, c=c)  # all three groups, to unbalance every layer
    unbalance(unbalanced, 1.5, seed=4)
    twin.load_state_dict(model.state_dict())
    want = weights_of(model)
    for _ in range(3):
        want = original_cycle(want, c=c)
        enorm.cycle()
    for got, ref in zip(weights_of(model), want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    # the same as excluding the last hidden ReLU by name ("5" in this Sequential)
    by_name = ENorm(twin, c=c, order="simultaneous", exclude=["5"])
    for _ in range(3):
        by_name.cycle()
    for a, b in zip(weights_of(model), weights_of(twin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_leaving_the_last_hidden_layer_keeps_the_function_and_its_weights():
    torch.manual_seed(0)
    model = mlp([6, 8, 8, 3]).double()  # Linear 0, ReLU 1, Linear 2, ReLU 3, Linear 4
    x = torch.randn(5, 6, dtype=torch.float64)
    out = model(x)
    unbalance(ENorm(model), 1.0, seed=1)  # unbalance both hidden layers
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-12)
    enorm = ENorm(model, balance_last_hidden=False)
    assert [g.name for g in enorm.groups] == ["0"]
    middle, last = model[2].weight.clone(), model[4].weight.clone()
    enorm.cycle()
    torch.testing.assert_close(model(x), out, rtol=1e-10, atol=1e-12)
    assert torch.equal(model[4].weight, last)  # the output layer is never touched
    assert not torch.equal(model[2].weight, middle)  # its columns follow the first group
    assert "balance_last_hidden=False" in repr(enorm)
