"""The norm factory's ``brn`` and ``gn`` choices, through make_norm and through every model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.models import build_model, model_names, model_options
from normlab.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    group_count,
    group_norm_groups,
    make_norm,
)

# Small variants so that building every model stays cheap.
SMALL = {
    "mlp": {"width": 16},
    "convnet": {"c": 8},
    "vgg": {"depth": 11, "width_multiplier": 0.125},
    "wrn": {"depth": 10, "widen": 1},
    "resnet18": {"width_multiplier": 0.125},
    "fully_conv": {"width": 16},
}
INPUTS = {"1d": (1, 40), "2d": (3, 32, 32)}
BRN_OPTIONS = {"r_max": 2.0, "d_max": 0.5, "warmup_steps": 7, "r_max_ramp_steps": 11}


def models_with_norm():
    return [name for name in model_names() if "norm" in model_options(name)]


def test_models_with_a_norm_choice_include_the_core_models():
    assert {"mlp", "lenet", "convnet", "vgg", "wrn", "resnet18"} <= set(models_with_norm())


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("name", models_with_norm())
def test_brn_through_every_model(name, kind):
    in_shape = INPUTS[kind]
    model = build_model(
        name, in_shape, 10, norm="brn", norm_kwargs=BRN_OPTIONS, **SMALL.get(name, {})
    )
    layers = [m for m in model.modules() if isinstance(m, BatchRenorm1d | BatchRenorm2d)]
    assert layers, f"{name} has no batch renorm layer"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if kind == "1d":
        assert all(type(m) is BatchRenorm1d for m in layers)
    # For images each layer checks its input's dims in forward (1d: (N, C) of an MLP, 2d: maps),
    # so the forward below fails if the factory picked the wrong class for a layer.
    for layer in layers:  # the options reached every layer
        assert (layer.r_max, layer.d_max, layer.warmup_steps) == (2.0, 0.5, 7)
        assert layer.r_max_ramp_steps == 11 and layer.schedule == "paper"
    x = torch.randn(4, *in_shape)
    model.train()
    out = model(x)
    assert out.shape == (4, 10)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(int(m.num_batches_tracked) == 1 for m in layers)  # every layer ran
    if name == "lenet" and kind == "2d":
        assert all(type(m) is BatchRenorm2d for m in layers)
    model.eval()
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("dim,cls", [(0, BatchRenorm1d), (1, BatchRenorm1d), (2, BatchRenorm2d)])
def test_brn_layer_class_by_spatial_dims(dim, cls):
    assert type(make_norm("brn", 6, dim)) is cls
    assert type(make_norm("brn", 6, 3)) is BatchRenorm3d


def test_brn_at_identity_limits_is_batch_norm_in_training():
    # Independent reference: torch's BatchNorm2d (r_max = 1, d_max = 0 is plain BN).
    torch.manual_seed(1)
    brn = make_norm("brn", 5, 2, schedule="constant", r_max=1.0, d_max=0.0).double()
    bn = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        for layer in (brn, bn):
            layer.weight.copy_(torch.linspace(0.5, 1.5, 5))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 5))
    x = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    y, y_ref = brn(x), bn(x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad, atol=1e-12, rtol=1e-12)


def test_brn_option_errors():
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['rmax'\].*valid options:.*r_max"):
        make_norm("brn", 8, 2, rmax=3.0)
    with pytest.raises(ValueError, match="Invalid r_max"):
        make_norm("brn", 8, 2, r_max=0.5)
    with pytest.raises(ValueError, match="Invalid schedule"):
        make_norm("brn", 8, 2, schedule="cosine")
    with pytest.raises(ValueError, match="rmax"):  # a model fails at construction, not in forward
        build_model("lenet", (1, 28, 28), 10, norm="brn", norm_kwargs={"rmax": 3})


# ------------------------------------------------------------------------------------------ gn
def test_group_count_is_the_converters_group_norm_groups():
    assert group_norm_groups is group_count


@pytest.mark.parametrize(
    "channels,options,groups",
    [
        (20, {"num_groups": 2}, 2),
        (64, {}, 32),
        (20, {}, 20),  # the default 32 capped at the channels
        (64, {"channels_per_group": 16}, 4),
        (48, {"num_groups": 32, "on_indivisible": "nearest"}, 24),
        (50, {"num_groups": 3, "on_indivisible": "nearest"}, 2),
        (48, {"channels_per_group": 10, "on_indivisible": "nearest"}, 4),
    ],
)
def test_gn_options_through_make_norm(channels, options, groups):
    layer = make_norm("gn", channels, 2, **options)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == groups
    x = torch.randn(3, channels, 4, 4)
    ref = F.group_norm(x, groups, layer.weight, layer.bias, layer.eps)
    torch.testing.assert_close(layer(x), ref)


def test_gn_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match=r"valid: \[1, 2, 5, 10, 25, 50\].*nearest"):
        make_norm("gn", 50, 2, num_groups=3)
    with pytest.raises(ValueError, match=r"valid channels_per_group for 50 channels: \[1, 2, 5"):
        make_norm("gn", 50, 2, channels_per_group=16)
    with pytest.raises(ValueError, match="Invalid on_indivisible"):
        make_norm("gn", 50, 2, num_groups=3, on_indivisible="round")
    with pytest.raises(ValueError, match="not both"):
        make_norm("gn", 8, 2, num_groups=2, channels_per_group=4)
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['groups'\].*num_groups"):
        make_norm("gn", 8, 2, groups=2)


def test_gn_options_through_lenet():
    model = build_model("lenet", (1, 28, 28), 10, norm="gn", norm_kwargs={"num_groups": 2})
    assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [2, 2, 2]
    nearest = build_model(
        "lenet",
        (1, 28, 28),
        10,
        norm="gn",
        norm_kwargs={"num_groups": 3, "on_indivisible": "nearest"},
    )
    # 20, 50 and 500 channels: the divisor nearest to 3 (ties to the larger).
    assert [m.num_groups for m in nearest.modules() if isinstance(m, nn.GroupNorm)] == [4, 2, 4]
    out = nearest(torch.randn(1, 1, 28, 28))  # GN trains at batch 1, where BN cannot
    assert out.shape == (1, 10)
