"""The layer registry shared by the scale-invariance probe and ENorm's graph.

Each test looks at both users: a layer the registry describes must be handled alike by the
probe's explainer (eps-leak warning, fx path) and by ENorm (groups, exact rescaling), and a
registration must reach both.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.enorm import ENorm, ENormGraphError, register_norm_layer
from normlab.nn import BatchRenorm2d, layer_registry
from normlab.scale_invariance import ROW, TENSOR, default_tolerance, find_scale_invariant


def conv_norm_net(norm: nn.Module, weight_scale: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    with torch.no_grad():
        net[0].weight.mul_(weight_scale)
    return net


def leak_of(record, layer: str) -> float:
    """The eps/(var+eps) value quoted in the probe's warning about ``layer``."""
    texts = [str(w.message) for w in record if f"norm layer '{layer}'" in str(w.message)]
    assert len(texts) == 1, texts
    return float(re.search(r"= ([0-9.e+-]+) at", texts[0]).group(1))


@pytest.mark.parametrize("norm_cls", [nn.BatchNorm2d, BatchRenorm2d])
def test_eps_leak_warning_fires_for_batch_renorm_as_for_batch_norm(norm_cls):
    # Small weights: the pre-norm variance is ~1e-4, so a few % of a rescale leak through
    # eps = 1e-5 (the real model is only approximately invariant).
    net = conv_norm_net(norm_cls(4), weight_scale=2e-2)
    x = torch.randn(8, 3, 6, 6)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = find_scale_invariant(net, x)
    # Independent reference: the biased per-channel variance of the conv output (float64).
    with torch.no_grad():
        z = copy.deepcopy(net[0]).double()(x.double())
    var = z.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=False)
    expected = 1e-5 / (var.median().item() + 1e-5)
    assert expected > 2e-2
    assert leak_of(record, "1") == pytest.approx(expected, rel=0.06)  # printed to 2 digits
    assert result.warnings and "'1'" in result.warnings[0]
    # Structurally (eps / 1e6) the conv stays row-invariant, explained by the same fx path.
    assert result["0.weight"].kind == ROW
    assert result["0.weight"].fx_path == f"0 (Conv2d) -> 1 ({norm_cls.__name__}, per channel)"


def test_no_leak_warning_at_normal_weights():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = find_scale_invariant(conv_norm_net(BatchRenorm2d(4)), torch.randn(8, 3, 6, 6))
    assert not [w for w in record if "eps/(var+eps)" in str(w.message)]
    assert not result.warnings


class TwoStage(nn.Module):
    def __init__(self, norm_cls):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), norm_cls(4)
        self.c2, self.n2 = nn.Conv2d(4, 5, 3, padding=1), norm_cls(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.max_pool2d(F.relu(self.n2(self.c2(x))), 2)
        return self.head(x.mean((2, 3)))


def test_enorm_graph_handles_batch_renorm_like_batch_norm():
    def plan(model):
        enorm = ENorm(model)
        groups = [(g.name, g.size, g.producers, g.consumers) for g in enorm.groups]
        return enorm, groups

    torch.manual_seed(1)
    bn, renorm = TwoStage(nn.BatchNorm2d).double(), TwoStage(BatchRenorm2d).double()
    (_, bn_groups), (enorm, renorm_groups) = plan(bn), plan(renorm)
    assert renorm_groups == bn_groups
    assert [g[0] for g in renorm_groups] == ["n1", "n2"]
    assert set(renorm_groups[0][2]) == {"n1.weight", "n1.bias"}  # the norm's affine writes
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    for mode in (True, False):
        renorm.train(mode)
        assert enorm.check(x, sigma=1.0) < 1e-10  # the rescaling is exact


class Standardize(nn.Module):
    """Per-channel batch standardization with an affine output, named unlike a norm layer."""

    def __init__(self, c, eps=1e-2):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))

    def forward(self, x):
        if x.abs().max() > 0:  # data-dependent: fx cannot trace into it
            mean = x.mean((0, 2, 3), keepdim=True)
            var = x.var((0, 2, 3), unbiased=False, keepdim=True)
            x = (x - mean) / (var + self.eps).sqrt()
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def test_registering_a_norm_type_makes_both_users_aware():
    class Whiten(Standardize):
        pass  # a fresh class: the registry is process-wide

    net = conv_norm_net(Whiten(4, eps=1e-4)).double()
    x = torch.randn(8, 3, 6, 6)
    # Unknown: the probe sees no norm (its eps = 1e-4 is left as is and leaks ~1e-4 of a
    # rescale: no invariance at tol 1e-5), fx cannot trace it, ENorm refuses it.
    assert default_tolerance(net, eps_scale=1.0) == 1e-5
    before = find_scale_invariant(net, x)
    assert before["0.weight"].kind not in (ROW, TENSOR)
    assert before.fx_error is not None
    with pytest.raises(ENormGraphError, match="'1'"):
        ENorm(net)

    register_norm_layer(Whiten)  # ENorm's entry point writes into the shared registry
    entry = layer_registry.find_norm_layer(Whiten(2))
    assert entry is not None and entry.cls is Whiten and entry.normalized is None
    # The probe now scales its eps (structural invariance) and counts it in the tolerance.
    assert default_tolerance(net, eps_scale=1.0) == pytest.approx(100 * 1e-4)
    after = find_scale_invariant(net, x)
    assert after["0.weight"].kind == ROW
    assert after.fx_error is None
    assert after["0.weight"].fx_path == "0 (Conv2d) -> 1 (Whiten, custom norm)"
    enorm = ENorm(net)
    assert [g.name for g in enorm.groups] == ["1"]
    assert enorm.check(x.double()) < 1e-10


def test_what_a_norm_normalizes_reaches_the_leak_warning():
    class Batchwise(Standardize):
        pass

    layer_registry.register_norm_layer(Batchwise, normalized="batch")
    net = conv_norm_net(Batchwise(4, eps=1e-5), weight_scale=2e-2)
    with pytest.warns(UserWarning, match="norm layer '1'"):
        result = find_scale_invariant(net, torch.randn(8, 3, 6, 6))
    assert result["0.weight"].fx_path == "0 (Conv2d) -> 1 (Batchwise, per channel)"


def test_rms_norm_for_both_users():
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Linear(5, 6, bias=False), nn.RMSNorm(6, eps=1e-5), nn.ReLU(), nn.Linear(6, 2)
    )
    x = torch.randn(7, 5)
    result = find_scale_invariant(net, x)
    # RMSNorm's statistic runs over all features of a sample: invariance per tensor only.
    assert result["0.weight"].kind == TENSOR
    assert result["0.weight"].fx_path == "0 (Linear) -> 1 (RMSNorm, per sample)"
    entry = layer_registry.find_norm_layer(net[1])
    # Not centred: the statistic is the mean square (an independent computation).
    assert torch.allclose(entry.statistic(net[1], x), x.square().mean(dim=1))
    enorm = ENorm(net.double())
    assert [g.name for g in enorm.groups] == ["1"]
    assert enorm.groups[0].producers == ("1.weight",)
    assert enorm.check(x.double()) < 1e-10


class Clip(nn.Module):
    """ReLU written with data-dependent control flow (not traceable)."""

    def forward(self, x):
        return x.clamp_min(0) if x.abs().max() > 0 else x


def test_registering_a_pass_through_op_makes_both_users_aware():
    class MyClip(Clip):
        pass

    def net():
        torch.manual_seed(3)
        return nn.Sequential(nn.Conv2d(3, 4, 3), MyClip(), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 2, 1))  # fmt: skip

    x = torch.randn(6, 3, 5, 5)
    assert find_scale_invariant(net(), x).fx_error is not None
    with pytest.raises(ENormGraphError):
        ENorm(net())
    layer_registry.register_pass_through(MyClip)
    result = find_scale_invariant(net(), x)
    assert result["0.weight"].fx_path == "0 (Conv2d) -> 1 (MyClip) -> 2 (BatchNorm2d, per channel)"
    # ENorm rescales the first conv's channels through the op into the next conv.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyClip(), nn.Conv2d(4, 2, 1)).double()
    enorm = ENorm(model)
    assert [g.name for g in enorm.groups] == ["0"]
    assert enorm.check(x.double()) < 1e-10


@pytest.mark.parametrize(
    "op, homogeneous",
    [
        (nn.ReLU(), True),
        (nn.ZeroPad2d(1), True),
        (nn.GELU(), False),
        (nn.Tanh(), False),
        (nn.ConstantPad2d(1, 0.5), False),
        (nn.MaxPool2d(2, return_indices=True), False),
    ],
)
def test_pass_through_properties_decide_for_both_users(op, homogeneous):
    entry = layer_registry.find_pass_through(op)
    assert entry is not None
    assert (entry.refusal(op) is None) == homogeneous
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), op, nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(6, 3, 6, 6)
    if isinstance(op, nn.MaxPool2d):  # returns (values, indices): nothing downstream runs
        assert entry.refusal(op) == "pooling with return_indices is not supported"
        return
    path = find_scale_invariant(model, x)["0.weight"].fx_path
    assert (path is not None) == homogeneous
    # ENorm: the first conv's output channels are rescalable only through a homogeneous op.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), op, nn.Conv2d(4, 2, 1)).double()
    if homogeneous:
        enorm = ENorm(model)
        assert enorm.groups[0].name == "0"
        assert enorm.check(x.double()) < 1e-10
    else:
        with pytest.raises(ENormGraphError, match="'1'"):
            ENorm(model)


def test_subclasses_that_override_forward():
    class Reweighted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    module = Reweighted(3)
    # The probe reads a subclass's eps and statistics whatever its forward ...
    assert layer_registry.find_norm_layer(module).cls is nn.BatchNorm2d
    # ... ENorm only trusts the affine output of the registered forward.
    assert layer_registry.find_norm_layer(module, same_forward=True) is None
    assert layer_registry.find_norm_layer(nn.BatchNorm2d(3), same_forward=True).cls is (
        nn.BatchNorm2d
    )


def test_registry_validation():
    with pytest.raises(TypeError, match="Invalid norm layer"):
        layer_registry.register_norm_layer(int)
    with pytest.raises(ValueError, match="Invalid normalized"):
        layer_registry.register_norm_layer(Standardize, normalized="channel")
    with pytest.raises(ValueError, match="Invalid layout"):
        layer_registry.register_pass_through(Clip, "diagonal")
    with pytest.raises(TypeError, match="Invalid pass-through class"):
        layer_registry.register_pass_through(int)
    # Re-declaring a known layer keeps what the registry knows about it.
    register_norm_layer(nn.GroupNorm)
    assert layer_registry.find_norm_layer(nn.GroupNorm(2, 4)).normalized == "group"
    names = {e.cls for e in layer_registry.norm_layers()}
    from normlab.nn import SyncBatchNorm, SyncBatchRenorm

    assert {nn.BatchNorm2d, nn.SyncBatchNorm, BatchRenorm2d.__mro__[1], SyncBatchNorm} <= names
    assert SyncBatchRenorm in names
