"""ENorm's graph discovery: groups, flatten maps, norm layers, functional ops, clear errors."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from normlab.enorm import ENorm, ENormGraphError
from test_enorm import Block, TinyResNet, mlp, rel_change, unbalance


def groups_by_name(enorm):
    return {g.name: g for g in enorm.groups}


# ----------------------------------------------------------------------------------------------
# Groups
# ----------------------------------------------------------------------------------------------


def test_resnet_groups_tie_the_residual_stream_and_split_at_learned_shortcuts():
    enorm = ENorm(TinyResNet())
    groups = enorm.groups
    assert len(groups) == 6
    stream = groups[0]  # stage 1: stem + both identity blocks' last convs share one factor
    assert stream.size == 8
    assert set(stream.producers) == {
        "stem.weight", "stem.bias", "blocks.0.conv2.weight", "blocks.0.conv2.bias",
        "blocks.1.conv2.weight", "blocks.1.conv2.bias",
    }  # fmt: skip
    assert set(stream.consumers) == {
        "blocks.0.conv1.weight", "blocks.1.conv1.weight", "blocks.2.conv1.weight",
        "blocks.2.shortcut.weight",
    }  # fmt: skip
    inner = [g for g in groups if g.name.endswith("conv1")]
    assert [g.size for g in inner] == [8, 8, 16]
    stage2 = next(g for g in groups if "shortcut" in g.name)  # learned shortcut: a new group
    assert stage2.size == 16
    assert set(stage2.consumers) == {"fc1.weight"}
    assert groups[-1].name == "fc1" and groups[-1].size == 12
    assert enorm.num_variables == sum(g.size for g in groups)
    assert [g.start for g in groups] == sorted(g.start for g in groups)


def test_flatten_maps_each_conv_channel_to_its_block_of_features():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 2))  # fmt: skip
    enorm = ENorm(model)
    fc = next(s for s in enorm.plan.slots if s.name == "3.weight")
    conv_group = enorm.groups[0]
    expected = torch.arange(3).repeat_interleave(16) + conv_group.start
    assert torch.equal(fc.cols, expected)
    assert enorm.check(torch.randn(2, 2, 4, 4)) < 1e-5


def test_channels_last_flatten_tiles_the_channels():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3, 2)).double()
    enorm = ENorm(model)
    fc = next(s for s in enorm.plan.slots if s.name == "3.weight")
    assert torch.equal(fc.cols, torch.arange(5).repeat(3))
    assert enorm.check(torch.randn(6, 3, 4, dtype=torch.float64)) < 1e-12


def test_input_residual_freezes_the_stream():
    class InputResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            x = F.relu(self.a(x) + x)  # tied to the network input: cannot be rescaled
            return self.c(F.relu(self.b(x)))

    enorm = ENorm(InputResidual())
    assert [g.name for g in enorm.groups] == ["b"]


def test_shared_module_called_twice_shares_its_factors():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.hidden, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            x = F.relu(self.inp(x))
            x = F.relu(self.hidden(x))
            return self.out(F.relu(self.hidden(x)))

    model = Shared().double()
    enorm = ENorm(model)
    assert len(enorm.groups) == 1 and enorm.groups[0].size == 5
    unbalance(enorm, 1.0, 0)
    assert enorm.check(torch.randn(4, 3, dtype=torch.float64), sigma=1.0) < 1e-12


class FunctionalNet(nn.Module):
    """The usual functional spellings of homogeneous operations."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv1d(4, 6, 1)
        self.l1 = nn.Linear(6 * 4, 5)
        self.l2 = nn.Linear(5, 3)
        self.prelu = nn.PReLU(4)

    def forward(self, x):
        x = self.c1(x).clamp(min=0)
        x = F.pad(self.prelu(x), (1, 1))
        x = F.interpolate(torch.relu(self.c2(x)), scale_factor=2, mode="linear")
        x = torch.add(x, 0.5 * F.max_pool1d(x, 3, stride=1, padding=1), alpha=2.0)
        x = F.adaptive_avg_pool1d(x.unsqueeze(-1).squeeze(-1), 4) / 3
        x = torch.sub(F.relu(self.c3(x)), -x.mean(2, keepdim=True).mean(1, keepdim=True) * 0)
        return self.l2(F.relu(self.l1(x.reshape(x.size(0), -1))))


def test_functional_spellings():
    # mean over the channel dim is not homogeneous channel-wise: it must be refused ...
    with pytest.raises(ENormGraphError, match="mean"):
        ENorm(FunctionalNet())

    class Fixed(FunctionalNet):
        def forward(self, x):
            x = self.c1(x).clamp(min=0)
            x = F.pad(self.prelu(x), (1, 1))
            x = F.interpolate(torch.relu(self.c2(x)), scale_factor=2, mode="linear")
            x = torch.add(x, 0.5 * F.max_pool1d(x, 3, stride=1, padding=1), alpha=2.0)
            x = F.adaptive_avg_pool1d(x.unsqueeze(-1).squeeze(-1), 4) / 3
            x = F.relu(self.c3(x)) - 0.1 * torch.relu(self.c3(x).mean(2, keepdim=True))
            return self.l2(F.relu(self.l1(x.reshape(x.size(0), -1))))

    model = Fixed().double()
    enorm = ENorm(model)
    assert len(enorm.groups) == 4
    assert enorm.check(torch.randn(3, 2, 6, dtype=torch.float64), sigma=1.5) < 1e-12


def test_data_parallel_wrapper_is_unwrapped():
    model = mlp([4, 6, 3])
    enorm = ENorm(nn.DataParallel(model))
    assert enorm.parameter_names == ("0.weight", "0.bias", "2.weight") or len(enorm.groups) == 1


# ----------------------------------------------------------------------------------------------
# Normalization layers
# ----------------------------------------------------------------------------------------------


class BNConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8 * 2 * 2, 10, bias=False)
        self.bn3 = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.c2(x))), 2)
        x = F.relu(self.gn(self.c3(x)))
        x = F.avg_pool2d(x, 2)
        return self.fc2(F.relu(self.bn3(self.fc1(torch.flatten(x, 1)))))


def _trained_bn_net():
    torch.manual_seed(0)
    model = BNConvNet().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8, dtype=torch.float64)).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_batchnorm_nets_keep_their_function(mode, order):
    """BN inputs are cuts, BN outputs are rescaled through gamma and beta: exact in both modes."""
    model, opt = _trained_bn_net()
    model.train(mode == "train")
    enorm = ENorm(model, opt, c=1.1, order=order, include_bias=True)
    names = {g.name for g in enorm.groups}
    assert names == {"bn1", "bn2", "gn", "bn3"}
    assert "c1.weight" not in enorm.parameter_names  # feeds a BN: left out
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(model)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    unbalance(enorm, 1.0, 3)
    enorm.step()
    y, y_ref = model(x), reference(x)
    assert rel_change(y, y_ref) < 1e-10
    if mode == "train":  # both forwards updated the running stats identically
        stats = {k: v for k, v in reference.state_dict().items() if "running" in k}
    for k, v in stats.items():  # never written by ENorm; equal up to rounding in train mode
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-14, msg=k)
    assert not torch.equal(model.bn1.weight, reference.bn1.weight)
    torch.testing.assert_close(model.c1.weight, reference.c1.weight, rtol=0, atol=0)


def test_norm_without_affine_output_is_frozen():
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, affine=False), nn.ReLU(),
                          nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))  # fmt: skip
    enorm = ENorm(model)
    assert [g.name for g in enorm.groups] == ["4"]  # only the LayerNorm's affine output


# ----------------------------------------------------------------------------------------------
# Clear errors and exclusions
# ----------------------------------------------------------------------------------------------


class GeluNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))


def test_non_homogeneous_module_is_named_and_excludable():
    with pytest.raises(ENormGraphError, match=r"module 'act' \(GELU\).*exclude=\['act'\]"):
        ENorm(GeluNet())
    model = GeluNet().double()
    enorm = ENorm(model, exclude=["act"])
    assert [g.name for g in enorm.groups] == ["fc2"]  # fc1's output feeds the GELU: frozen
    x = torch.randn(3, 4, dtype=torch.float64)
    y0 = model(x)
    unbalance(enorm, 1.0, 0)
    enorm.step()
    torch.testing.assert_close(model(x), y0)


@pytest.mark.parametrize(
    "body,pattern",
    [
        (lambda m, x: m.b(torch.sigmoid(m.a(x))), "sigmoid"),
        (lambda m, x: m.b(torch.tanh(m.a(x))), "tanh"),
        (lambda m, x: m.b(F.relu6(m.a(x))), "relu6|hardtanh"),
        (lambda m, x: m.b(F.relu(m.a(x)) * F.relu(m.a(x))), "product of two"),
        (lambda m, x: m.b(F.relu(m.a(x)) * x[:, :1]), "product of two|multiplies"),
        (lambda m, x: m.b(F.relu(m.a(x)).softmax(-1)), "softmax"),
        (lambda m, x: m.b(F.max_pool1d(F.relu(m.a(x)), 1)), "channels-first"),
    ],
)
def test_functional_breakers_are_named(body, pattern):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return body(self, x)

    with pytest.raises(ENormGraphError, match=pattern):
        ENorm(Net())


def test_untraceable_branch_is_named_and_excludable():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.branch, self.fc2 = nn.Linear(3, 4), Branchy(), nn.Linear(4, 2)
            self.fc0 = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.branch(F.relu(self.fc1(F.relu(self.fc0(x)))))))

    with pytest.raises(ENormGraphError, match=r"'branch'.*exclude=\['branch'\]"):
        ENorm(Net())
    enorm = ENorm(Net(), exclude=["branch"])
    assert [g.name for g in enorm.groups] == ["fc0"]
    assert "branch.lin.weight" not in enorm.parameter_names


def test_bad_exclude_and_shape_mismatches():
    with pytest.raises(ValueError, match="Invalid exclude"):
        ENorm(mlp([3, 4, 2]), exclude=["nope"])
    conv_then_linear = nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ENormGraphError, match="flatten it first"):
        ENorm(conv_then_linear)
    reshaped = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Unflatten(1, (3, 1)))
    with pytest.raises(ENormGraphError, match="Unflatten"):
        ENorm(reshaped)
    with pytest.raises(ENormGraphError, match="constant"):
        ENorm(nn.Sequential(nn.Conv2d(2, 3, 1), nn.ConstantPad2d(1, 0.5), nn.Conv2d(3, 1, 1)))


def test_excluded_linear_layer_is_left_untouched():
    model = mlp([3, 5, 4, 4, 2]).double()
    enorm = ENorm(model, exclude=["2"])
    assert "2.weight" not in enorm.parameter_names
    assert [g.name for g in enorm.groups] == ["4"]
    before = model[2].weight.detach().clone()
    unbalance(enorm, 1.0, 1)
    enorm.step()
    assert torch.equal(model[2].weight, before)


def test_block_is_usable_alone():
    """Sanity of the shared test model: a learned-shortcut block is two groups."""
    enorm = ENorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Block(4, 6, stride=2),
                                nn.Flatten(), nn.Linear(6 * 2 * 2, 2)))  # fmt: skip
    assert [g.size for g in enorm.groups] == [4, 6, 6]


# ----------------------------------------------------------------------------------------------
# The original code's silent failure modes, and unusual topologies
# ----------------------------------------------------------------------------------------------


def test_registration_order_does_not_matter():
    """The original took named_parameters() order as the layer order (4.8 % output change)."""

    class Shuffled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc2, self.subnet, self.fc1 = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(4, 6)

        def forward(self, x):
            return self.subnet(F.relu(self.fc2(F.relu(self.fc1(x)))))

    model = Shuffled().double()
    enorm = ENorm(model)
    assert [g.name for g in enorm.groups] == ["fc1", "fc2"]
    x = torch.randn(5, 4, dtype=torch.float64)
    y0 = model(x)
    unbalance(enorm, 1.0, 0)
    enorm.step()
    torch.testing.assert_close(model(x), y0)


class SelfLoop(nn.Module):
    """A 1x1 conv reading and writing the same residual stream (rows and columns in one group)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 5, 3, padding=1)
        self.mix = nn.Conv2d(5, 5, 1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.mix(x))
        return self.head(x.flatten(1))


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_self_loop_group(order):
    model = SelfLoop().double()
    enorm = ENorm(model, order=order, c=1.1)
    assert len(enorm.groups) == 1
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y0 = model(x)
    unbalance(enorm, 1.5, 2)
    values = [enorm.objective()]
    for _ in range(30):
        enorm.cycle()
        values.append(enorm.objective())
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:]))
    assert values[-1] < 0.9 * values[0]
    torch.testing.assert_close(model(x), y0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(dtype):
    """Energies accumulate in float32; the rescaling keeps the function up to the dtype's rounding."""
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(2, 3, 8, 8)
    reference = model(x)
    model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    enorm = ENorm(model, opt)
    for order in ("sequential", "simultaneous"):
        enorm.order = order
        enorm.cycle()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert rel_change(model.float()(x), reference) < 0.05


def test_check_leaves_the_model_untouched():
    model, _ = _trained_bn_net()
    model.train()
    before = copy.deepcopy(model.state_dict())
    enorm = ENorm(model)
    assert enorm.check(torch.randn(4, 3, 8, 8, dtype=torch.float64), sigma=1.0) < 1e-10
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class WSConv2d(nn.Conv2d):
    """Weight-standardised convolution: rescaling its rows would be undone by the standardisation."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PlainConv2d(nn.Conv2d):
    """A subclass that keeps Conv2d's forward: still a plain convolution."""


def test_layer_subclasses_overriding_forward_are_not_mistaken():
    ok = nn.Sequential(PlainConv2d(2, 3, 3), nn.ReLU(), PlainConv2d(3, 2, 1))
    assert len(ENorm(ok).groups) == 1
    bad = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), WSConv2d(3, 4, 1), nn.ReLU(),
                        nn.Conv2d(4, 2, 1))  # fmt: skip
    with pytest.raises(ENormGraphError, match="conv2d"):
        ENorm(bad)
    assert [g.name for g in ENorm(bad, exclude=["2"]).groups] == []


def test_batch_renorm_and_registered_norm_layers():
    from normlab.enorm import register_norm_layer
    from normlab.nn import BatchRenorm2d

    class ScaleNorm(nn.Module):
        """A custom per-channel normalization with an affine output."""

        def __init__(self, c):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(c) + 0.5)
            self.bias = nn.Parameter(torch.randn(c))

        def forward(self, x):
            if x.abs().max() > 0:  # data-dependent: not traceable
                x = x / x.pow(2).mean((0, 2, 3), keepdim=True).add(1e-5).sqrt()
            return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), BatchRenorm2d(4, schedule="constant")
            self.c2, self.n2 = nn.Conv2d(4, 5, 3, padding=1), ScaleNorm(5)
            self.c3 = nn.Conv2d(5, 2, 1)

        def forward(self, x):
            x = F.relu(self.n1(self.c1(x)))
            return self.c3(F.relu(self.n2(self.c2(x))))

    torch.manual_seed(0)
    model = Net().double()
    with pytest.raises(ENormGraphError, match="'n2'"):
        ENorm(model)
    register_norm_layer(ScaleNorm)
    enorm = ENorm(model)
    assert [g.name for g in enorm.groups] == ["n1", "n2"]
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode)
        assert enorm.check(x, sigma=1.0) < 1e-10
    with pytest.raises(TypeError, match="Invalid norm layer"):
        register_norm_layer(int)
