"""Tests for normlab.scale_invariance: the probe against an independent rescaling reference.

The reference (``output_change``) rescales parameters of a float64 train-mode copy in place, with
every norm eps set to 1e-12 (structural invariance), and compares outputs: it shares no code with
the probe (no functional_call, no Euler test).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.methods.sphere.groups import scale_invariant_param_groups
from normlab.scale_invariance import (
    INERT,
    JOINT,
    NONE,
    ROW,
    TENSOR,
    UNUSED,
    InvarianceReport,
    ScaleInvarianceResult,
    default_tolerance,
    find_scale_invariant,
)

# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------

INVARIANT, CHANGED = 1e-7, 1e-3  # reference thresholds: invariant below, clearly changed above


def output_change(model: nn.Module, x: torch.Tensor, names, per_row: bool = False, seed=0):
    """Relative output change when ``names`` are scaled (by 2.7, or per output row at random).

    Evaluated at a random point near the model's weights, in train mode, float64, eps = 1e-12.
    """
    ref = copy.deepcopy(model).double().train()
    for module in ref.modules():
        if isinstance(getattr(module, "eps", None), float):
            module.eps = 1e-12
        if isinstance(module, nn.Dropout):
            module.eval()
    x = x.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # A generic point nearby (zero-initialized biases would make any scaling a no-op).
        for p in ref.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.add_(0.05 * noise)
        before = ref(x)
        params = dict(ref.named_parameters())
        rows = None
        for name in names:
            p = params[name]
            if per_row:
                if rows is None:
                    rows = torch.empty(p.shape[0], dtype=torch.float64).uniform_(
                        1 / 3, 3, generator=generator
                    )
                p.mul_(rows.reshape(-1, *([1] * (p.ndim - 1))))
            else:
                p.mul_(2.7)
        after = ref(x)
    return ((after - before).norm() / before.norm()).item()


def check_joint_sets(model, x, result):
    """Every reported joint set is invariant and minimal (dropping a member breaks it)."""
    assert result.joint_sets, "expected at least one joint set"
    for members in result.joint_sets:
        assert output_change(model, x, members) < INVARIANT, members
        for dropped in members:
            rest = [m for m in members if m != dropped]
            assert output_change(model, x, rest) > CHANGED, (members, dropped)
        for name in members:
            assert result[name].kind == JOINT
            assert name in result[name].joint_members  # its first set, if it is in several


# --------------------------------------------------------------------------------------------
# Small models
# --------------------------------------------------------------------------------------------


def conv_model(feature: nn.Module, channels: int = 8, size: int = 4) -> nn.Sequential:
    """``feature`` (mapping 3 channels to ``channels``), then pooling and a Linear head."""
    return nn.Sequential(
        OrderedDict(
            feature=feature,
            pool=nn.AdaptiveAvgPool2d(size),
            flat=nn.Flatten(),
            head=nn.Linear(channels * size * size, 3),
        )
    )


def seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def conv(cin=3, cout=8, k=3, **kw):
    kw.setdefault("bias", False)
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


CONV_CASES = {
    "conv_bn": (lambda: seq(conv=conv(), bn=nn.BatchNorm2d(8)), {"conv.weight": ROW}),
    "conv_bias_bn": (
        lambda: seq(conv=conv(bias=True), bn=nn.BatchNorm2d(8)),
        {"conv.weight": ROW, "conv.bias": INERT},
    ),
    "conv_relu_bn": (
        lambda: seq(conv=conv(), relu=nn.ReLU(), bn=nn.BatchNorm2d(8)),
        {"conv.weight": ROW},
    ),
    "conv_bias_relu_bn": (
        lambda: seq(conv=conv(bias=True), relu=nn.ReLU(), bn=nn.BatchNorm2d(8)),
        {"conv.weight": JOINT, "conv.bias": JOINT},
    ),
    "conv_maxpool_bn": (
        lambda: seq(conv=conv(), pool=nn.MaxPool2d(2), bn=nn.BatchNorm2d(8)),
        {"conv.weight": ROW},
    ),
    "grouped_conv_bn": (
        lambda: seq(stem=conv(3, 4), conv=conv(4, 8, groups=2), bn=nn.BatchNorm2d(8)),
        # stem -> grouped conv -> BN: the stem scales as a whole, its rows mix within a group.
        {"conv.weight": ROW, "stem.weight": TENSOR},
    ),
    "depthwise_conv_bn": (
        lambda: seq(stem=conv(3, 8), conv=conv(8, 8, groups=8), bn=nn.BatchNorm2d(8)),
        # stem -> depthwise conv -> BN: stem channel r only reaches output channel r.
        {"conv.weight": ROW, "stem.weight": ROW},
    ),
    "conv_groupnorm": (
        lambda: seq(conv=conv(), gn=nn.GroupNorm(2, 8)),
        {"conv.weight": TENSOR, "gn.weight": NONE, "gn.bias": NONE},
    ),
    "conv_layernorm": (
        lambda: seq(conv=conv(), ln=nn.LayerNorm([8, 6, 6])),
        {"conv.weight": TENSOR},
    ),
    "conv_transpose_bn": (
        lambda: seq(conv=nn.ConvTranspose2d(3, 8, 2, stride=1, bias=False), bn=nn.BatchNorm2d(8)),
        {"conv.weight": ROW},
    ),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_cases_against_reference(case):
    build, expected = CONV_CASES[case]
    model = conv_model(build())
    x = torch.randn(6, 3, 6, 6)
    result = find_scale_invariant(model, x)
    for name, kind in expected.items():
        assert result[f"feature.{name}"].kind == kind, (name, str(result))
    # The head of every case is not invariant.
    assert result["head.weight"].kind == NONE and result["head.bias"].kind == NONE
    assert output_change(model, x, ["head.weight"]) > CHANGED
    # Check every claim with the independent reference.
    for name, report in result.items():
        if report.kind == ROW and report.row_dim == 0:
            assert output_change(model, x, [name], per_row=True) < INVARIANT, name
        if report.kind in (ROW, TENSOR):
            assert output_change(model, x, [name]) < INVARIANT, name
        if report.kind == NONE:
            assert output_change(model, x, [name]) > CHANGED, name
        if report.kind == TENSOR and report.shape[0] > 1:
            assert output_change(model, x, [name], per_row=True) > CHANGED, name


def test_conv_bias_relu_bn_is_a_row_joint_pair():
    model = conv_model(seq(conv=conv(bias=True), relu=nn.ReLU(), bn=nn.BatchNorm2d(8)))
    x = torch.randn(6, 3, 6, 6)
    result = find_scale_invariant(model, x)
    assert result.joint_sets == [("feature.conv.weight", "feature.conv.bias")]
    assert result["feature.conv.weight"].joint_granularity == ROW
    check_joint_sets(model, x, result)


def test_conv_transpose_rows_are_output_channels():
    model = conv_model(
        seq(conv=nn.ConvTranspose2d(4, 8, 2, groups=2, bias=False), bn=nn.BatchNorm2d(8)),
        size=2,
    )
    x = torch.randn(6, 4, 5, 5)
    report = find_scale_invariant(model, x)["feature.conv.weight"]
    assert report.kind == ROW and report.row_dim == 1
    # Scaling dim 0 (input channels) row by row is not invariant.
    assert output_change(model, x, ["feature.conv.weight"], per_row=True) > CHANGED


def test_groupnorm_fed_weight_is_tensor_level_only():
    model = conv_model(seq(conv=conv(), gn=nn.GroupNorm(2, 8)))
    report = find_scale_invariant(model, torch.randn(6, 3, 6, 6))["feature.conv.weight"]
    assert report.kind == TENSOR
    assert report.row_cos > 1e-2 and report.tensor_cos < 1e-8


def test_linear_bn1d_mlp():
    model = seq(fc1=nn.Linear(6, 8), bn=nn.BatchNorm1d(8), relu=nn.ReLU(), head=nn.Linear(8, 3))
    x = torch.randn(10, 6)
    result = find_scale_invariant(model, x)
    assert result["fc1.weight"].kind == ROW
    assert result["fc1.bias"].kind == INERT  # cancelled by the BN mean
    assert "zero gradient" in result["fc1.bias"].note
    for name in ("bn.weight", "bn.bias", "head.weight", "head.bias"):
        assert result[name].kind == NONE, name
        assert not result[name].scale_invariant
    assert output_change(model, x, ["fc1.weight"], per_row=True) < INVARIANT


def test_linear_layernorm_is_tensor_level():
    model = seq(fc1=nn.Linear(6, 8, bias=False), ln=nn.LayerNorm(8), head=nn.Linear(8, 3))
    result = find_scale_invariant(model, torch.randn(5, 6))
    assert result["fc1.weight"].kind == TENSOR
    assert result["fc1.weight"].fx_path == "fc1 (Linear) -> ln (LayerNorm, per sample)"


def test_bn_affine_and_head_are_not_invariant():
    model = conv_model(seq(conv=conv(), bn=nn.BatchNorm2d(8), relu=nn.ReLU()))
    x = torch.randn(6, 3, 6, 6)
    result = find_scale_invariant(model, x)
    assert result["feature.conv.weight"].kind == ROW
    for name in ("feature.bn.weight", "feature.bn.bias", "head.weight", "head.bias"):
        assert result[name].kind == NONE, name
    assert result.joint_sets == []


# --------------------------------------------------------------------------------------------
# Residual networks
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (post-activation), reproduced."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, max-pool, stages, avg-pool, fc), two tiny stages."""

    def __init__(self, layers=(1, 1), widths=(8, 16), num_classes=5):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[1], num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PreActBlock(nn.Module):
    """Pre-activation block (kuangliu / Kodryan et al.): shortcut conv reads relu(bn1(x))."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class PreActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = PreActBlock(8, 12, stride=2)
        self.block2 = PreActBlock(12, 12)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        out = self.block2(self.block1(self.stem(x)))
        out = F.relu(self.bn(out))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


def probe_preact():
    """(model, batch, result) of ``PreActNet``; shared with the group builders' tests."""
    torch.manual_seed(1)
    model, x = PreActNet(), torch.randn(6, 3, 8, 8)
    return model, x, find_scale_invariant(model, x)


@pytest.fixture(scope="module")
def preact():
    return probe_preact()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(2)
    model, x = ResNet(), torch.randn(6, 3, 16, 16)
    return model, x, find_scale_invariant(model, x)


def test_preact_block_kinds(preact):
    model, x, result = preact
    # The stem only feeds block1.bn1 (the shortcut reads relu(bn1(x))); conv1s feed bn2.
    for name in ("stem.weight", "block1.conv1.weight", "block2.conv1.weight"):
        assert result[name].kind == ROW, name
    # The residual stream: conv2 of both blocks and the shortcut conv, summed before `bn`.
    stream = ("block1.conv2.weight", "block1.shortcut.0.weight", "block2.conv2.weight")
    assert stream in result.joint_sets
    assert result["block1.conv2.weight"].joint_granularity == ROW
    for name in stream:
        assert output_change(model, x, [name]) > CHANGED, name
    assert output_change(model, x, list(stream), per_row=True) < INVARIANT
    assert result["head.weight"].kind == NONE and result["bn.weight"].kind == NONE
    check_joint_sets(model, x, result)


def test_torchvision_style_resnet(resnet):
    model, x, result = resnet
    convs = [n for n, p in model.named_parameters() if p.ndim == 4]
    assert len(convs) == 6
    for name in convs:
        assert result[name].kind == ROW, name
        assert result[name].fx_path is not None and "BatchNorm2d" in result[name].fx_path
    assert result["layer2.0.downsample.0.weight"].fx_path.endswith(
        "layer2.0.downsample.1 (BatchNorm2d, per channel)"
    )
    assert result["fc.weight"].kind == NONE and result["fc.bias"].kind == NONE
    bn_params = [n for n in result if ".bn" in n or n.startswith("bn") or "downsample.1" in n]
    for name in bn_params:
        assert result[name].kind in (NONE, JOINT), name
    # Stage 1's stream is read only through normalized paths: (gamma, beta) of the stem BN and of
    # layer1's bn2 are jointly invariant; a block's bn1 feeds ReLU -> conv2 -> bn2.
    assert ("bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer1.0.bn2.bias") in (
        result.joint_sets
    )
    assert ("layer1.0.bn1.weight", "layer1.0.bn1.bias") in result.joint_sets
    # The last stage feeds the head: its bn2 and downsample BN are not invariant at all.
    assert result["layer2.0.bn2.weight"].kind == NONE
    check_joint_sets(model, x, result)


class ResMLP(nn.Module):
    """Residual MLP with biases: overlapping joint sets."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.l1, self.n1, self.l2 = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.out_norm, self.head = nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.l2(F.relu(self.n1(self.l1(h))))
        return self.head(F.relu(self.out_norm(h)))


def test_residual_mlp_with_biases_has_overlapping_joint_sets():
    model, x = ResMLP(), torch.randn(10, 5)
    result = find_scale_invariant(model, x)
    # The stream: inp (weight and bias), the branch's l2.weight, and l1.bias so that the
    # LayerNorm sees W1 (c h) + c b1; l2.bias is cancelled by out_norm.
    stream = ("inp.weight", "inp.bias", "l1.bias", "l2.weight")
    assert result.joint_sets[0] == stream
    assert result["l2.bias"].kind == INERT
    # l1 alone feeds a LayerNorm together with its bias: a second set, overlapping on l1.bias.
    assert ("l1.weight", "l1.bias") in result.joint_sets
    assert result["l1.weight"].joint_members == ("l1.weight", "l1.bias")
    assert result["l1.bias"].joint_members == stream
    assert result.disjoint_joint_sets() == [stream]
    check_joint_sets(model, x, result)
    groups = scale_invariant_param_groups(model, None, report=result)
    assert_partition(model, groups)
    assert group_names(model, groups)["si_joint0"] == list(stream)


def test_vgg_style_stack():
    model = seq(
        c1=conv(3, 8),
        b1=nn.BatchNorm2d(8),
        r1=nn.ReLU(),
        c2=conv(8, 8),
        b2=nn.BatchNorm2d(8),
        r2=nn.ReLU(),
        p2=nn.MaxPool2d(2),
        c3=conv(8, 16),
        b3=nn.BatchNorm2d(16),
        r3=nn.ReLU(),
        p3=nn.MaxPool2d(2),
        flat=nn.Flatten(),
        fc1=nn.Linear(16 * 2 * 2, 12),
        b4=nn.BatchNorm1d(12),
        r4=nn.ReLU(),
        drop=nn.Dropout(0.5),
        head=nn.Linear(12, 3),
    )
    x = torch.randn(8, 3, 8, 8)
    result = find_scale_invariant(model, x)
    for name in ("c1.weight", "c2.weight", "c3.weight", "fc1.weight"):
        assert result[name].kind == ROW, name
    assert result["fc1.bias"].kind == INERT
    assert result["head.weight"].kind == NONE
    assert result["b4.weight"].kind == NONE  # feeds the head
    # b1..b3 each feed ReLU -> conv -> BN: (gamma, beta) pairs are jointly invariant.
    assert ("b1.weight", "b1.bias") in result.joint_sets
    check_joint_sets(model, x.double(), result)


# --------------------------------------------------------------------------------------------
# Probe mechanics
# --------------------------------------------------------------------------------------------


class WithExtras(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6, bias=False)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 2)
        self.spare = nn.Linear(3, 3)  # never called
        self.frozen = nn.Linear(4, 6, bias=False)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.bn(self.fc(x) + 0.1 * self.frozen(x)))


def test_unused_and_frozen_parameters_are_reported():
    result = find_scale_invariant(WithExtras(), torch.randn(8, 4))
    assert result["spare.weight"].kind == UNUSED and result["spare.bias"].kind == UNUSED
    assert result["frozen.weight"].kind == "frozen"
    assert result["frozen.weight"].row_cos is None
    # fc alone is not invariant any more: the frozen path adds an unscaled term before the BN.
    assert result["fc.weight"].kind == NONE
    assert list(result) == [n for n, _ in WithExtras().named_parameters()]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train", [True, False])
def test_model_mode_state_grads_and_rng_untouched(train):
    model = seq(
        fc=nn.Linear(5, 6), bn=nn.BatchNorm1d(6), drop=nn.Dropout(0.3), head=nn.Linear(6, 2)
    )
    model.train(train)
    before = snapshot(model)
    x = torch.randn(7, 5)
    rng = torch.get_rng_state()
    result = find_scale_invariant(model, x)
    assert result["fc.weight"].kind == ROW  # eval-mode models are probed in train mode
    assert model.training is train and all(m.training is train for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BN running stats
    assert model.fc.weight.dtype == torch.float32
    assert torch.equal(torch.get_rng_state(), rng)


def test_wrong_batch_shape_names_the_failing_layer():
    model = seq(stem=conv(3, 8), bn=nn.BatchNorm2d(8), flat=nn.Flatten(), head=nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer 'stem' \(Conv2d\).*\[2, 4, 6, 6\]"):
        find_scale_invariant(model, torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"layer 'head' \(Linear\)"):
        find_scale_invariant(model, torch.randn(2, 3, 6, 6))


def test_batch_of_one_gets_a_train_mode_hint():
    model = seq(fc=nn.Linear(4, 3), bn=nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"layer 'bn'.*more than one sample"):
        find_scale_invariant(model, torch.randn(1, 4))


def test_bad_arguments():
    model = seq(fc=nn.Linear(4, 3), bn=nn.BatchNorm1d(3))
    x = torch.randn(4, 4)
    for kwargs in ({"tol": 0.0}, {"tol": 1.5}, {"n_points": 1}, {"eps_scale": 0.0}):
        with pytest.raises(ValueError, match="Invalid"):
            find_scale_invariant(model, x, **kwargs)
    with pytest.raises(TypeError, match="Invalid batch"):
        find_scale_invariant(model, "not a batch")
    with pytest.raises(TypeError, match="Invalid model"):
        find_scale_invariant(lambda t: t, x)
    with pytest.raises(ValueError, match="Invalid kind"):
        find_scale_invariant(model, x).names("sideways")


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = conv(3, 4)
        self.relu = nn.ReLU()
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.relu(self.conv(x)))
        if x.sum() > 0:
            y = y * 1.0
        return self.head(y.mean((2, 3)))


def test_fx_path_and_fallback():
    traced = find_scale_invariant(
        conv_model(seq(conv=conv(), relu=nn.ReLU(), bn=nn.BatchNorm2d(8))), torch.randn(4, 3, 6, 6)
    )
    assert traced.fx_error is None
    path = traced["feature.conv.weight"].fx_path
    assert path == (
        "feature.conv (Conv2d) -> feature.relu (ReLU) -> feature.bn (BatchNorm2d, per channel)"
    )
    result = find_scale_invariant(Branchy(), torch.randn(4, 3, 6, 6))
    assert result.fx_error is not None and "fx walk unavailable" in str(result)
    assert result["conv.weight"].kind == ROW and result["conv.weight"].fx_path is None
    plain = find_scale_invariant(Branchy(), torch.randn(4, 3, 6, 6), use_fx=False)
    assert plain.fx_error is None and plain["conv.weight"].kind == ROW


class FlatPenalty(nn.Module):
    """Loss-flat terms: relu(||w|| - 2 ||w_0||) is zero with zero gradient near w_0.

    The Euler test cannot see them (zero gradient), rescaling by 2.7 can.
    """

    def __init__(self):
        super().__init__()
        self.conv = conv(3, 4)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.knob = nn.Parameter(torch.randn(5))
        self.register_buffer("conv_norm", self.conv.weight.detach().norm())
        self.register_buffer("knob_norm", self.knob.detach().norm())

    def forward(self, x):
        y = self.head(self.bn(self.conv(x)).mean((2, 3)))
        penalty = F.relu(self.conv.weight.norm() - 2 * self.conv_norm)
        return y + penalty + F.relu(self.knob.norm() - 2 * self.knob_norm)


def test_rescale_check_catches_what_the_euler_test_cannot():
    result = find_scale_invariant(FlatPenalty(), torch.randn(6, 3, 5, 5))
    conv_report, knob = result["conv.weight"], result["knob"]
    assert conv_report.row_cos < 1e-8  # Euler's identity holds at every probe point ...
    assert conv_report.kind == NONE and "moved the output" in conv_report.note  # ... but no
    assert knob.kind == NONE and "zero gradient" in knob.note


def test_loss_fn_replaces_the_readout():
    model = seq(fc=nn.Linear(5, 6), bn=nn.BatchNorm1d(6), relu=nn.ReLU(), head=nn.Linear(6, 3))
    x, y = torch.randn(9, 5), torch.randint(0, 3, (9,))
    calls = []

    def loss_fn(out):
        calls.append(out.dtype)
        return F.cross_entropy(out, y)

    result = find_scale_invariant(model, x, loss_fn=loss_fn)
    assert calls and set(calls) == {torch.float64}
    assert result["fc.weight"].kind == ROW and result["fc.bias"].kind == INERT
    assert result["head.weight"].kind == NONE
    with pytest.raises(TypeError, match="scalar"):
        find_scale_invariant(model, x, loss_fn=lambda out: out)


def test_tuple_and_dict_batches():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4, bias=False), nn.Linear(2, 4, bias=False)
            self.bn, self.head = nn.BatchNorm1d(4), nn.Linear(4, 1)

        def forward(self, u, v):
            return {"out": self.head(self.bn(self.a(u) + self.b(v))), "n": torch.tensor(1)}

    model, u, v = TwoInputs(), torch.randn(6, 3), torch.randn(6, 2)
    for batch in ((u, v), {"u": u, "v": v}):
        result = find_scale_invariant(model, batch)
        # Two paths into one BN: neither alone, both together (per channel) are invariant.
        assert result.joint_sets == [("a.weight", "b.weight")]
        assert result["a.weight"].joint_granularity == ROW


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_is_stable_across_seeds(seed):
    torch.manual_seed(10 + seed)
    model = PreActNet()
    result = find_scale_invariant(model, torch.randn(6, 3, 8, 8), seed=seed)
    assert result.names(ROW) == ["stem.weight", "block1.conv1.weight", "block2.conv1.weight"]
    assert ("block1.conv2.weight", "block1.shortcut.0.weight", "block2.conv2.weight") in (
        result.joint_sets
    )


def test_tolerance_from_the_eps_floor():
    bn = seq(fc=nn.Linear(4, 6), bn=nn.BatchNorm1d(6))
    assert default_tolerance(bn) == 1e-5  # eps x 1e-6 leaves the lower clip
    assert default_tolerance(bn, eps_scale=1.0) == pytest.approx(1e-3)  # 100 x eps
    keras_like = seq(fc=nn.Linear(4, 6), bn=nn.BatchNorm1d(6, eps=1e-3))
    assert default_tolerance(keras_like, eps_scale=1.0) == 5e-2  # clipped
    assert default_tolerance(nn.Linear(3, 3)) == 1e-5
    # Probing the model with its own eps (the note's rule) still separates the classes.
    model = conv_model(seq(conv=conv(), relu=nn.ReLU(), bn=nn.BatchNorm2d(8)))
    own_eps = find_scale_invariant(model, torch.randn(6, 3, 6, 6), eps_scale=1.0)
    assert own_eps.tol == pytest.approx(1e-3)
    assert own_eps["feature.conv.weight"].kind == ROW
    assert 1e-9 < own_eps["feature.conv.weight"].row_cos < 1e-3  # the eps floor is visible
    assert own_eps["head.weight"].kind == NONE


def test_tiny_weights_warn_but_stay_structurally_invariant():
    model = conv_model(seq(conv=conv(), bn=nn.BatchNorm2d(8)))
    with torch.no_grad():
        model.feature.conv.weight.mul_(1e-2)  # pre-BN variance ~3e-5, comparable to eps
    with pytest.warns(UserWarning, match="only approximate"):
        result = find_scale_invariant(model, torch.randn(6, 3, 6, 6))
    assert result["feature.conv.weight"].kind == ROW
    assert any("feature.bn" in w for w in result.warnings)


def test_result_table_and_mapping():
    result = find_scale_invariant(
        conv_model(seq(conv=conv(bias=True), bn=nn.BatchNorm2d(8))), torch.randn(4, 3, 6, 6)
    )
    assert isinstance(result, ScaleInvarianceResult)
    assert isinstance(result["feature.conv.weight"], InvarianceReport)
    assert len(result) == len(dict(result.items())) == 6
    text = str(result)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["parameter", "shape", "kind"]
    assert any(line.startswith("feature.conv.weight") and " row " in line for line in lines)
    assert any(line.startswith("feature.conv.bias") and " inert " in line for line in lines)
    assert "tolerance 1.0e-05" in text
    assert result.names(ROW) == ["feature.conv.weight"]


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}


def assert_partition(model, groups):
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(seen) == sorted(trainable) and len(seen) == len(set(seen))


class Mixed(nn.Module):
    """Overcomplete stem (32 rows of length 27), depthwise conv, GroupNorm, BN1d, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.pw = nn.Conv2d(32, 8, 1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 6)
        self.bn2 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw(x)))
        x = F.relu(self.gn(self.pw(x))).mean((2, 3))
        return self.head(F.relu(self.bn2(self.fc(x))))


def probe_mixed():
    """(model, batch, result) of ``Mixed``; shared with the group builders' tests."""
    torch.manual_seed(3)
    model, x = Mixed(), torch.randn(6, 3, 6, 6)
    # bn2's input variance at PyTorch's default init is ~1e-3: the eps-leak warning is expected.
    with pytest.warns(UserWarning, match="'bn2'"):
        return model, x, find_scale_invariant(model, x)


@pytest.fixture(scope="module")
def mixed():
    return probe_mixed()


def test_row_count_of_mixed_model(mixed):
    _, _, report = mixed
    assert report.names(ROW) == ["stem.weight", "dw.weight", "fc.weight"]
    assert report["pw.weight"].kind == TENSOR
    assert math.isclose(report.tol, 1e-5)


def test_moved_group_builders_resolve_lazily():
    """The group builders live with their methods; the old names still resolve, on first use."""
    code = (
        "import sys\n"
        "import normlab.scale_invariance as si\n"
        "assert not any(m.startswith('normlab.methods') for m in sys.modules), 'eager'\n"
        "from normlab.methods.riemannian_bn.groups import grassmann_param_groups as g\n"
        "from normlab.methods.sphere.groups import scale_invariant_param_groups as s\n"
        "assert si.grassmann_param_groups is g and si.scale_invariant_param_groups is s\n"
        "from normlab.scale_invariance import grassmann_param_groups\n"
        "assert grassmann_param_groups is g\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        import normlab.scale_invariance as si

        si.nothing  # noqa: B018
