"""convert_norm on a torchvision-style ResNet, and the GroupNorm group policy."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normlab.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    SyncBatchNorm,
    SyncBatchRenorm,
    convert_norm,
    group_norm_groups,
)

# ----------------------------------------------------------------------------------------------
# A small model written the way torchvision.models.resnet writes ResNet-18's BasicBlock
# ----------------------------------------------------------------------------------------------


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers=(1, 1, 1), widths=(16, 32, 48), num_classes=10, norm_layer=None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes, stride), self._norm_layer(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, self._norm_layer)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(self.inplanes, planes, norm_layer=self._norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def trained_resnet(**kwargs):
    """A float64 ResNet whose BatchNorm layers have non-trivial affine parameters and statistics."""
    torch.manual_seed(0)
    model = ResNet(**kwargs).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.train()
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    return model


def norm_types(model):
    return [type(m) for m in model.modules() if isinstance(m, NORM_TYPES)]


NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    BatchRenorm2d,
    BatchRenorm1d,
    SyncBatchRenorm,
)


def assert_close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# BatchNorm -> BatchRenorm and back
# ----------------------------------------------------------------------------------------------


def test_resnet_to_batch_renorm_shares_state_and_keeps_outputs():
    model = trained_resnet()
    reference = copy.deepcopy(model)
    params_before = {name: p for name, p in model.named_parameters()}
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_norm(model, to="batch_renorm")
    assert converted is model
    assert norm_types(model) == [BatchRenorm2d] * 9  # stem, 2 per block, 2 downsamples
    # Same Parameter objects (optimizers built before stay valid) and identical state dict.
    for name, p in model.named_parameters():
        assert p is params_before[name], name
    assert list(model.state_dict()) == list(state_before)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert model.bn1.momentum == 0.01 and model.bn1.schedule == "paper"

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model.eval()
    reference.eval()
    assert_close(model(x), reference(x))
    # Training mode: counters are 3 < 5000, so the paper schedule is still plain BatchNorm.
    model.train()
    reference.train()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), reference(xb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert_close(ya, yb)
    assert_close(xa.grad, xb.grad, tol=1e-8)
    assert_close(model.layer2[0].bn1.weight.grad, reference.layer2[0].bn1.weight.grad, tol=1e-8)


def test_batch_renorm_options_and_round_trip_back_to_batch_norm():
    model = trained_resnet()
    convert_norm(model, to="batch_renorm", r_max=2.0, d_max=1.0, schedule="constant", momentum=0.05)
    layer = model.layer1[0].bn2
    assert (layer.r_max, layer.d_max, layer.schedule, layer.momentum) == (
        2.0,
        1.0,
        "constant",
        0.05,
    )
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))  # a renormalized training step
    state = {k: v.clone() for k, v in model.state_dict().items()}
    back = convert_norm(model, to="batch_norm")
    assert norm_types(back) == [nn.BatchNorm2d] * 9
    assert back.layer1[0].bn2.momentum == 0.05
    for key, value in back.state_dict().items():
        assert torch.equal(value, state[key]), key
    fresh = ResNet().double()
    fresh.load_state_dict(state, strict=True)


def test_root_layer_and_1d_heads():
    bn = nn.BatchNorm1d(5)
    brn = convert_norm(bn, to="batch_renorm")
    assert type(brn) is BatchRenorm1d and brn.weight is bn.weight
    head = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5, affine=False), nn.ReLU())
    convert_norm(head, to="batch_renorm")
    assert type(head[1]) is BatchRenorm1d and head[1].weight is None
    assert head(torch.randn(3, 4)).shape == (3, 5)


def test_flags_and_shared_modules_carry_over():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    model.eval()
    shared.weight.requires_grad_(False)
    shared.qconfig = "marker"
    convert_norm(model, to="batch_renorm")
    assert model[1] is model[3] and type(model[1]) is BatchRenorm2d
    assert not model[1].training and not model[1].weight.requires_grad
    assert model[1].qconfig == "marker"


def test_optimizer_built_before_conversion_updates_the_new_layers():
    model = trained_resnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_norm(model, to="batch_renorm")
    before = model.bn1.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    optimizer.step()
    assert not torch.equal(model.bn1.weight, before)


def test_batch_norm_without_running_stats_cannot_become_batch_renorm():
    model = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        convert_norm(model, to="batch_renorm")
    assert type(model[0]) is nn.BatchNorm2d


def test_invalid_target():
    with pytest.raises(ValueError, match="Invalid to"):
        convert_norm(nn.BatchNorm2d(2), to="layer_norm")


# ----------------------------------------------------------------------------------------------
# -> GroupNorm
# ----------------------------------------------------------------------------------------------


def test_resnet_to_group_norm_by_num_groups():
    model = trained_resnet()
    weights = {name: p for name, p in model.named_parameters()}
    convert_norm(model, to="group_norm", num_groups=8)
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 9 and norm_types(model) == [nn.GroupNorm] * 9
    assert all(m.num_groups == 8 for m in groups)
    for name, p in model.named_parameters():
        assert p is weights[name], name
    # GroupNorm has no running statistics: the keys are gone, the rest is unchanged.
    assert not any("running" in k or "num_batches" in k for k in model.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)  # batch of one is fine now
    assert model(x).shape == (1, 10)
    # Each converted layer is exactly torch's GroupNorm with the copied affine parameters.
    layer = model.layer2[0].bn1
    h = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    expected = torch.nn.functional.group_norm(h, 8, layer.weight, layer.bias, layer.eps)
    assert_close(layer(h), expected)


def test_group_norm_by_channels_per_group_follows_width():
    model = trained_resnet()
    convert_norm(model, to="group_norm", channels_per_group=8)
    assert model.bn1.num_groups == 2  # 16 channels
    assert model.layer2[0].bn1.num_groups == 4  # 32 channels
    assert model.layer3[0].bn1.num_groups == 6  # 48 channels


def test_indivisible_channels_error_leaves_model_untouched():
    model = trained_resnet()  # widths 16, 32, 48: 48 is not divisible into 32 groups
    with pytest.raises(
        ValueError, match=r"48 channels.*32 groups.*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"
    ):
        convert_norm(model, to="group_norm", num_groups=32)
    assert norm_types(model) == [nn.BatchNorm2d] * 9
    convert_norm(model, to="group_norm", num_groups=32, on_indivisible="nearest")
    assert model.bn1.num_groups == 16  # capped at the 16 channels
    assert model.layer2[0].bn1.num_groups == 32
    assert model.layer3[0].bn1.num_groups == 24  # nearest divisor of 48 to 32


@pytest.mark.parametrize(
    "channels,kwargs,expected",
    [
        (64, {}, 32),
        (64, {"num_groups": 16}, 16),
        (20, {}, 20),  # fewer channels than groups: one channel per group
        (48, {"num_groups": 32, "on_indivisible": "nearest"}, 24),
        (40, {"num_groups": 32, "on_indivisible": "nearest"}, 40),
        (64, {"channels_per_group": 16}, 4),
        (48, {"channels_per_group": 10, "on_indivisible": "nearest"}, 4),  # 8, 12 tie -> 12
        (50, {"channels_per_group": 16, "on_indivisible": "nearest"}, 5),  # 10 per group
    ],
)
def test_group_norm_groups_policy(channels, kwargs, expected):
    groups = group_norm_groups(channels, **kwargs)
    assert groups == expected and channels % groups == 0


def test_group_norm_groups_errors():
    with pytest.raises(ValueError, match=r"valid channels_per_group for 50 channels: \[1, 2, 5"):
        group_norm_groups(50, channels_per_group=16)
    with pytest.raises(ValueError, match="not both"):
        group_norm_groups(64, num_groups=8, channels_per_group=8)
    with pytest.raises(ValueError, match="on_indivisible"):
        group_norm_groups(64, on_indivisible="round")


# ----------------------------------------------------------------------------------------------
# -> sync
# ----------------------------------------------------------------------------------------------


def test_to_sync_without_process_group_behaves_like_the_original():
    model = trained_resnet()
    model.layer3[0].bn1 = convert_norm(model.layer3[0].bn1, to="batch_renorm", schedule="constant")
    reference = copy.deepcopy(model)
    convert_norm(model, to="sync")
    types = norm_types(model)
    assert types.count(SyncBatchNorm) == 8 and types.count(SyncBatchRenorm) == 1
    assert model.layer3[0].bn1.schedule == "constant"
    for mode in (True, False):
        model.train(mode)
        reference.train(mode)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        assert_close(model(x), reference(x))
    for key, value in reference.state_dict().items():
        assert_close(model.state_dict()[key].double(), value.double())


def test_torch_sync_batch_norm_becomes_normlab_sync_layers():
    torch_sync = nn.SyncBatchNorm(6, momentum=0.2)
    ours = convert_norm(nn.Sequential(torch_sync), to="sync")[0]
    assert type(ours) is SyncBatchNorm and ours.momentum == 0.2 and ours.weight is torch_sync.weight
    brn = convert_norm(nn.Sequential(nn.SyncBatchNorm(6)), to="batch_renorm")[0]
    assert type(brn) is SyncBatchRenorm
    assert type(convert_norm(brn, to="batch_norm")) is SyncBatchNorm
