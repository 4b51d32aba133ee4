"""Small models and data shared by the SGD-G and Adam-G tests (tests/test_sgdg.py, test_adamg.py)."""

import torch

F64 = torch.float64


def row_norms(p):
    return p.detach().reshape(p.shape[0] if p.dim() > 1 else 1, -1).double().norm(dim=1)


def random_grads(shapes, seed, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def bn_model(seed):
    """Linear -> BatchNorm1d -> ReLU -> Linear in float64: the first weight feeds a BN."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).double()


def train(model, opt, steps, seed=0):
    """``steps`` steps of cross-entropy on fresh random batches; the losses."""
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen, dtype=F64)
        y = torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def seed_groups(model, lr_manifold):
    """The three parameter groups of the seed's usage (manifold, BN/biases, the rest)."""
    lin1, bn, _, lin2 = model
    dict_g = {
        "params": [lin1.weight],
        "lr": lr_manifold,
        "momentum": 0.9,
        "grassmann": True,
        "omega": 0.1,
        "grad_clip": 0.1,
    }
    dict_e0 = {
        "params": [bn.weight, bn.bias, lin1.bias, lin2.bias],
        "lr": 0.01,
        "momentum": 0.9,
        "grassmann": False,
        "weight_decay": 0.0,
        "nesterov": True,
    }
    dict_e1 = {
        "params": [lin2.weight],
        "lr": 0.01,
        "momentum": 0.9,
        "grassmann": False,
        "weight_decay": 5e-4,
        "nesterov": True,
    }
    return [dict_g, dict_e0, dict_e1]


def paper_groups(model, lr_manifold, lr_euclidean, **manifold):
    """The paper's three groups of :func:`bn_model`: manifold, no-decay, decay."""
    lin1, bn, _, lin2 = model
    return [
        dict(params=[lin1.weight], lr=lr_manifold, momentum=0.9, grassmann=True, **manifold),
        dict(
            params=[bn.weight, bn.bias, lin1.bias, lin2.bias],
            lr=lr_euclidean,
            momentum=0.9,
            nesterov=True,
            weight_decay=0.0,
        ),
        dict(params=[lin2.weight], lr=lr_euclidean, momentum=0.9, nesterov=True, weight_decay=5e-4),
    ]
