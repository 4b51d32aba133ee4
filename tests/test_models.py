import pytest
import torch
import torch.nn as nn

from normlab.models import build_model, model_names
from normlab.nn import group_count, make_norm

SMALL = {
    "mlp": {"width": 16},
    "lenet": {},
    "convnet": {"c": 4},
    "vgg": {"depth": 11, "width_multiplier": 0.125},
    "wrn": {"depth": 10, "widen": 1},
    "resnet18": {"width_multiplier": 0.125},
}
NORM_OPTIONS = {"gn": {"num_groups": 2}}


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("norm", ["none", "bn", "gn", "ln"])
@pytest.mark.parametrize("shape", [(1, 40), (3, 28, 28)], ids=["1d", "2d"])
def test_forward_shape(name, norm, shape):
    model = build_model(
        name, shape, 7, norm=norm, norm_kwargs=NORM_OPTIONS.get(norm), **SMALL[name]
    )
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_every_registered_model_is_covered():
    assert set(SMALL) <= set(model_names())


def test_fc15_has_15_linear_layers():
    model = build_model("mlp", (3, 32, 32), 10, depth=15, width=500)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 15 and linears[0].in_features == 3072
    assert all(m.out_features == 500 for m in linears[:-1])


def test_lenet_matches_the_mcn_layout():
    model = build_model("lenet", (1, 28, 28), 10, norm="bn")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [
        (20, 5),
        (50, 5),
        (500, 4),
        (10, 1),
    ]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [n.num_features for n in norms] == [20, 50, 500]
    relus = [m for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 1  # the original's only ReLU sits after the third conv
    with pytest.raises(ValueError, match="resize=28"):
        build_model("lenet", (1, 8, 8), 10)


def test_wrn_and_vgg_parameter_counts():
    # WRN-16-4 on CIFAR-10 has about 2.75M parameters; VGG-16 (CIFAR) about 14.7M.
    wrn = build_model("wrn", (3, 32, 32), 10, depth=16, widen=4)
    assert 2.7e6 < sum(p.numel() for p in wrn.parameters()) < 2.8e6
    vgg = build_model("vgg", (3, 32, 32), 10, depth=16)
    assert 14.7e6 < sum(p.numel() for p in vgg.parameters()) < 14.8e6
    with pytest.raises(ValueError, match="6n"):
        build_model("wrn", (3, 32, 32), 10, depth=15)


def test_affine_off_and_dropout():
    model = build_model("wrn", (3, 8, 8), 10, depth=10, widen=1, affine=False, dropout=0.3)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.weight is None for m in bns)
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())


def test_norm_factory_errors_and_groups():
    assert group_count(64) == 32 and group_count(20) == 20 and group_count(50, 2) == 2
    assert group_count(64, channels_per_group=16) == 4
    with pytest.raises(ValueError, match="valid: \\[1, 2, 5, 10, 25, 50\\]"):
        group_count(50, 3)
    with pytest.raises(ValueError, match="not both"):
        group_count(8, 2, 4)
    with pytest.raises(ValueError, match="unknown norm 'bm'.*bn"):
        make_norm("bm", 8)
    with pytest.raises(ValueError, match="valid options"):
        build_model("mlp", (1, 40), 10, widht=3)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg17", (1, 40), 10)
    ln = make_norm("ln", 6, 2)
    x = torch.randn(4, 6, 5, 5)
    ref = torch.nn.functional.layer_norm(x, (6, 5, 5))
    torch.testing.assert_close(ln(x), ref, atol=1e-5, rtol=1e-5)


def test_norm_options_are_checked_at_real_widths():
    # 20, 50 and 500 channels all divide by 5: valid although 64 would not be
    model = build_model("lenet", (1, 28, 28), 10, norm="gn", norm_kwargs={"channels_per_group": 5})
    assert [m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)] == [
        4,
        10,
        100,
    ]
    with pytest.raises(ValueError, match="channels_per_group=3 does not divide 20"):
        build_model("lenet", (1, 28, 28), 10, norm="gn", norm_kwargs={"channels_per_group": 3})


def test_paper_vgg_has_two_fc512_bn_layers_and_bn_without_scale():
    # Cho & Lee's vgg.py: conv-BN(no gamma)-ReLU stages, then FC-512-BN(no gamma)-ReLU twice and
    # the classifier; parameters = the plain CIFAR VGG's minus the conv BN scales, plus the FCs.
    torch.manual_seed(0)
    plain = build_model("vgg", (3, 32, 32), 10, depth=13)
    paper = build_model("vgg", (3, 32, 32), 10, depth=13, fc_layers=2, norm_scale=False)
    bn_scales = sum(m.weight.numel() for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    fc = 2 * 512 * 512 + 2 * 512  # two bias-free Linear 512x512 and their BN shifts
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(paper) == count(plain) - bn_scales + fc
    norms = [m for m in paper.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 10 + 2 and all(m.weight is None and m.bias is not None for m in norms)
    linears = [m for m in paper.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 512), (512, 10)]
    out = paper(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    # BN without scale still normalizes: scaling an FC weight leaves the train-mode output alone
    xb = torch.randn(8, 3, 32, 32)
    a = paper(xb)
    with torch.no_grad():
        paper.fc[0].weight.mul_(3.0)
    torch.testing.assert_close(paper(xb), a, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fc_layers"):
        build_model("vgg", (3, 32, 32), 10, fc_layers=-1)
