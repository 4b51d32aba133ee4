"""Scale-invariant model zoo: invariance, Euler orthogonality, fixed head, Af variants."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from normlab.models.scale_invariant import (
    MLPSI,
    SCALE_INVARIANT_MODELS,
    ConvNetSI,
    ConvNetSIAf,
    MLPSIAf,
    ResNet18SI,
    ResNet18SIAf,
    make_head,
)
from normlab.optim import SphereSGD
from normlab.sphere_metrics import radial_cosine, scale_invariant_norm

CASES = [
    (MLPSI, (1, 20), dict(width=16)),
    (ConvNetSI, (3, 8, 8), dict(c=4)),
    (ConvNetSI, (2, 16), dict(c=4)),
    (MLPSIAf, (20,), dict(width=16)),
    (ConvNetSIAf, (3, 8, 8), dict(c=4)),
]


def _model(cls, in_shape, kwargs, eps: float | None = None) -> nn.Module:
    model = cls(in_shape, 5, **kwargs).double().train()
    if eps is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = eps
    return model


def _batch(in_shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((16,) + tuple(in_shape), generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("cls,in_shape,kwargs", CASES)
def test_forward_shape_and_parameter_split(cls, in_shape, kwargs):
    model = _model(cls, in_shape, kwargs)
    assert model(_batch(in_shape)).shape == (16, 5)
    si, other = model.scale_invariant_parameters(), model.other_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in si} | {id(p) for p in other} == {id(p) for p in trainable}
    assert not {id(p) for p in si} & {id(p) for p in other}
    if cls in (MLPSI, ConvNetSI):
        assert other == []  # fully SI: the head is frozen and BN has no parameters


@pytest.mark.parametrize("cls,in_shape,kwargs", CASES)
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_output_is_invariant_to_rescaling_si_params(cls, in_shape, kwargs, scale):
    torch.manual_seed(1)
    model = _model(cls, in_shape, kwargs, eps=1e-30)  # torch rejects eps=0; 1e-30 is exact enough
    x = _batch(in_shape, 1)
    out = model(x)
    # every SI tensor alone, then all of them jointly
    si_ids = {id(p) for p in model.scale_invariant_parameters()}
    si_names = [n for n, p in model.named_parameters() if id(p) in si_ids]
    for names in [[n] for n in si_names] + [si_names]:
        scaled = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in scaled.named_parameters():
                if n in names:
                    p.mul_(scale)
        torch.testing.assert_close(scaled(x), out, rtol=1e-10, atol=1e-10)
    if scale < 1:
        return  # BN's default eps breaks the invariance at small norms (eps / var grows)
    # with the default eps the invariance holds to the note's detector tolerance
    model_eps = _model(cls, in_shape, kwargs)
    ref = model_eps(x)
    with torch.no_grad():
        for p in model_eps.scale_invariant_parameters():
            p.mul_(scale)
    assert (model_eps(x) - ref).norm() <= 1e-3 * ref.norm()


@pytest.mark.parametrize("cls,in_shape,kwargs", CASES)
def test_gradient_is_orthogonal_to_each_si_tensor(cls, in_shape, kwargs):
    model = _model(cls, in_shape, kwargs, eps=1e-30)
    x, y = _batch(in_shape, 2), torch.randint(0, 5, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.scale_invariant_parameters():
        assert abs(radial_cosine([p.grad], [p])) < 1e-10


def test_fixed_head_is_frozen_rescaled_and_shared_across_global_seeds():
    torch.manual_seed(0)
    a = MLPSI((20,), 10)
    torch.manual_seed(1)
    b = MLPSI((20,), 10)
    assert not a.head.weight.requires_grad and not a.head.bias.requires_grad
    assert a.head.weight.norm().item() == pytest.approx(10.0, rel=1e-6)
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    assert not torch.equal(a.body[1].weight, b.body[1].weight)  # the seed still changes the body
    c = MLPSI((20,), 10, head_seed=229)
    assert not torch.equal(a.head.weight, c.head.weight)
    # the head's private generator leaves the global RNG alone: same body whatever the head seed
    torch.manual_seed(5)
    d = ConvNetSI((3, 8, 8), 10, c=4, head_seed=1)
    after_d = torch.rand(3)
    torch.manual_seed(5)
    e = ConvNetSI((3, 8, 8), 10, c=4, head_seed=2)
    assert torch.equal(d.body[0].weight, e.body[0].weight)
    assert torch.equal(after_d, torch.rand(3))
    assert d.head.weight.norm().item() == pytest.approx(10.0, rel=1e-6)


def test_head_options():
    head = make_head(8, 3, init_scale=None, head_seed=4, frozen=False)
    assert head.weight.requires_grad
    bound = 1 / 8**0.5
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    assert make_head(8, 3, init_scale=2.5).weight.norm().item() == pytest.approx(2.5, rel=1e-6)
    with pytest.raises(ValueError, match="Invalid head"):
        make_head(0, 3)


def test_af_variants_train_bn_and_head():
    model = ConvNetSIAf((3, 8, 8), 10, c=4)
    assert model.head.weight.requires_grad
    assert model.head.weight.norm().item() < 5.0  # default init scale, not rescaled to 10
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.affine for m in bn)
    assert len(model.other_parameters()) == 2 * len(bn) + 2
    assert len(model.scale_invariant_parameters()) == len(ConvNetSI((3, 8, 8), 10, c=4).body) // 4


def test_parameter_counts_of_the_note():
    assert (
        sum(p.numel() for p in ConvNetSI((3, 32, 32), 10).scale_invariant_parameters()) == 387_936
    )
    assert sum(p.numel() for p in MLPSI((40,), 10).scale_invariant_parameters()) == 37_888
    conv1d = ConvNetSI((1, 40), 10, c=16)
    assert sum(p.numel() for p in conv1d.scale_invariant_parameters()) == 32_304
    assert isinstance(conv1d.body[0], nn.Conv1d)


def test_registry_dict_and_bad_arguments():
    assert SCALE_INVARIANT_MODELS == {
        "mlp_si": MLPSI,
        "mlp_si_af": MLPSIAf,
        "convnet_si": ConvNetSI,
        "convnet_si_af": ConvNetSIAf,
        "resnet18_si": ResNet18SI,
        "resnet18_si_af": ResNet18SIAf,
    }
    with pytest.raises(ValueError, match="Invalid width"):
        MLPSI((20,), 10, width=0)
    with pytest.raises(ValueError, match="Invalid num_classes"):
        ConvNetSI((3, 8, 8), 1)
    with pytest.raises(ValueError, match="Invalid depth"):
        ConvNetSI((3, 8, 8), 10, depth=0)
    with pytest.raises(ValueError):
        ConvNetSI((20,), 10)  # a conv net needs (C, L) or (C, H, W)


def test_sphere_training_of_a_fully_si_mlp_lowers_the_loss_at_fixed_norm():
    torch.manual_seed(0)
    model = MLPSI((20,), 4, width=32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 20, generator=gen)
    y = (x[:, :4].argmax(1)).long()
    si = model.scale_invariant_parameters()
    rho = scale_invariant_norm(si)
    opt = SphereSGD([{"params": si}], elr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert scale_invariant_norm(si) == pytest.approx(rho, rel=1e-6)


# ------------------------------------------------------------------------------ ResNet18SI
RESNET_CASES = [(ResNet18SI, (3, 8, 8)), (ResNet18SI, (2, 16)), (ResNet18SIAf, (3, 8, 8))]


def _scaled_copy(model: nn.Module, names: set[str], factor: float) -> nn.Module:
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in scaled.named_parameters():
            if n in names:
                p.mul_(factor)
    return scaled


@pytest.mark.parametrize("cls,in_shape", RESNET_CASES)
def test_resnet18_si_is_jointly_but_not_individually_invariant(cls, in_shape):
    torch.manual_seed(0)
    model = _model(cls, in_shape, dict(width_multiplier=1 / 16), eps=1e-30)
    x = _batch(in_shape, 3)
    out = model(x)
    assert out.shape == (16, 5)
    si_ids = {id(p) for p in model.scale_invariant_parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in si_ids}
    convs = {
        n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d)
    }
    assert names == convs  # every conv weight, nothing else
    for factor in (0.2, 4.0):
        torch.testing.assert_close(_scaled_copy(model, names, factor)(x), out, rtol=1e-9, atol=1e-9)
    # a block's first conv feeds BN directly: SI alone; the stem feeds the residual stream: not
    torch.testing.assert_close(
        _scaled_copy(model, {"blocks.1.conv1.weight"}, 4.0)(x), out, rtol=1e-9, atol=1e-9
    )
    assert (_scaled_copy(model, {"stem.weight"}, 4.0)(x) - out).norm() > 1e-3 * out.norm()
    # Euler's identity holds for the joint point, not tensor by tensor
    y = torch.randint(0, 5, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    si = model.scale_invariant_parameters()
    assert abs(radial_cosine([p.grad for p in si], si)) < 1e-10
    assert max(abs(radial_cosine([p.grad], [p])) for p in si) > 1e-4


def test_resnet18_si_head_and_af_variant():
    torch.manual_seed(0)
    a = ResNet18SI((3, 8, 8), 10, width_multiplier=1 / 8)
    torch.manual_seed(1)
    b = ResNet18SI((3, 8, 8), 10, width_multiplier=1 / 8)
    assert a.head.bias is None and not a.head.weight.requires_grad
    assert a.head.in_features == 64 and a.head.weight.norm().item() == pytest.approx(10.0, rel=1e-6)
    assert torch.equal(a.head.weight, b.head.weight)  # the same fixed head for every seed
    assert not torch.equal(a.stem.weight, b.stem.weight)
    assert a.other_parameters() == []
    assert all(not m.affine for m in a.modules() if isinstance(m, nn.BatchNorm2d))
    af = ResNet18SIAf((3, 8, 8), 10, width_multiplier=1 / 8)
    bn = [m for m in af.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.affine for m in bn) and af.head.weight.requires_grad
    assert len(af.other_parameters()) == 2 * len(bn) + 1  # gamma, beta per BN; the head weight
    assert len(af.scale_invariant_parameters()) == len(a.scale_invariant_parameters()) == 20
    with pytest.raises(ValueError, match="Invalid width_multiplier"):
        ResNet18SI((3, 8, 8), 10, width_multiplier=0)
    with pytest.raises(ValueError, match="Invalid num_classes"):
        ResNet18SI((3, 8, 8), 1)


def test_resnet18_si_trains_on_one_joint_sphere():
    torch.manual_seed(0)
    model = ResNet18SI((3, 8, 8), 4, width_multiplier=1 / 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    y = x[:, 0, 0, :4].argmax(1)
    si = model.scale_invariant_parameters()
    rho = scale_invariant_norm(si)
    opt = SphereSGD([{"params": si}], elr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert scale_invariant_norm(si) == pytest.approx(rho, rel=1e-6)
