"""ENorm and optimizer state: rescale-then-step equals a trajectory in the rescaled coordinates."""

import copy

import pytest
import torch
import torch.nn as nn

from normlab.enorm import ENorm, register_optimizer_state, supported_optimizers

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd_nesterov_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True),
    "sgd_dampening": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.7, dampening=0.3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_amsgrad_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop_centered": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, centered=True),
}


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


def small_conv_net():
    """3x3 and grouped convs: a column is an (input channel, tap) pair sharing its channel's
    factor."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, (3, 2), padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 3, 1),
    ).double()


NETS = {"mlp": small_net, "conv": small_conv_net}


def set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


def state_tensors(opt, model):
    out = []
    for p in model.parameters():
        for key, value in sorted(opt.state[p].items()):
            if isinstance(value, torch.Tensor):
                out.append((key, value))
    return out


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
@pytest.mark.parametrize("net", list(NETS))
def test_rescaled_state_equals_state_accumulated_in_rescaled_coordinates(name, order, net):
    """State after ENorm == state of a fresh optimizer fed the history of rescaled gradients g / s;
    and the next step from both is the same point."""
    make = OPTIMIZERS[name]
    model = NETS[net]()
    opt = make(model.parameters())
    enorm = ENorm(model, opt, c=1.1, order=order)
    gen = torch.Generator().manual_seed(1)
    enorm.rescale(torch.exp(torch.randn(enorm.num_variables, generator=gen, dtype=torch.float64)))
    history = []
    for _ in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
        set_grads(model, grads)
        opt.step()
        history.append(grads)
    before = [p.detach().clone() for p in model.parameters()]
    enorm.cycle()
    scale = [p.detach() / b for p, b in zip(model.parameters(), before)]  # entry factors s
    assert any((s - 1).abs().max() > 1e-3 for s in scale)

    twin = copy.deepcopy(model)
    twin_opt = make(twin.parameters())
    for grads in history:  # the state depends on the gradients only (no coupled decay here)
        set_grads(twin, [g / s for g, s in zip(grads, scale)])
        twin_opt.step()
    with torch.no_grad():
        for a, b in zip(twin.parameters(), model.parameters()):
            a.copy_(b)
    for (key_a, a), (key_b, b) in zip(state_tensors(opt, model), state_tensors(twin_opt, twin)):
        assert key_a == key_b
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=key_a)

    new = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in model.parameters()]
    set_grads(model, [g / s for g, s in zip(new, scale)])
    set_grads(twin, [g / s for g, s in zip(new, scale)])
    opt.step()
    twin_opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_sgd_weight_times_buffer_is_invariant():
    """The momentum buffer transforms like a gradient, inversely to the weight."""
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    enorm = ENorm(model, opt)
    model(torch.randn(4, 5, dtype=torch.float64)).square().sum().backward()
    opt.step()
    enorm.rescale(torch.linspace(0.3, 3.0, enorm.num_variables, dtype=torch.float64))
    products = [(p * opt.state[p]["momentum_buffer"]).detach().clone() for p in model.parameters()]
    enorm.step()
    for p, before in zip(model.parameters(), products):
        torch.testing.assert_close(p * opt.state[p]["momentum_buffer"], before)


def test_adam_moments_scale_with_powers_of_the_weight():
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), amsgrad=True)
    enorm = ENorm(model, opt)
    model(torch.randn(4, 5, dtype=torch.float64)).square().sum().backward()
    opt.step()
    enorm.rescale(torch.linspace(0.3, 3.0, enorm.num_variables, dtype=torch.float64))

    def invariants():
        out = []
        for p in model.parameters():
            st = opt.state[p]
            out += [p * st["exp_avg"], p * p * st["exp_avg_sq"], p * p * st["max_exp_avg_sq"]]
        return [t.detach().clone() for t in out]

    before = invariants()
    enorm.step()
    for a, b in zip(invariants(), before):
        torch.testing.assert_close(a, b)


def test_step_before_any_optimizer_state_is_fine():
    """The original raised KeyError('momentum_buffer') here."""
    model = small_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ENorm(model, opt).step()
    opt_adam = torch.optim.Adam(model.parameters())
    ENorm(model, opt_adam).step()


def test_unsupported_optimizers_are_clear_errors():
    model = small_net()
    with pytest.raises(TypeError, match="Adamax.*SGD"):
        ENorm(model, torch.optim.Adamax(model.parameters()))
    with pytest.raises(TypeError, match="LBFGS"):
        ENorm(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="Invalid optimizer"):
        ENorm(model, object())
    with pytest.raises(ValueError, match="RMSprop with momentum"):
        ENorm(model, torch.optim.RMSprop(model.parameters(), momentum=0.9))
    assert "SGD" in supported_optimizers() and "AdamW" in supported_optimizers()


class _TracedSGD(torch.optim.SGD):
    """An SGD subclass that keeps an extra per-parameter tensor ENorm knows nothing about."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["last_grad"] = p.grad.clone()
        return loss


def test_unknown_state_keys_are_refused_then_registrable():
    model = small_net()
    opt = _TracedSGD(model.parameters(), lr=0.1, momentum=0.9)
    enorm = ENorm(model, opt)
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="last_grad.*_TracedSGD"):
        enorm.step()
    register_optimizer_state(_TracedSGD, {"momentum_buffer": -1, "last_grad": -1})
    before = [(p * opt.state[p]["last_grad"]).detach().clone() for p in model.parameters()]
    enorm.rescale(torch.linspace(0.5, 2.0, enorm.num_variables, dtype=torch.float64))
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p * opt.state[p]["last_grad"], b)
    with pytest.raises(ValueError, match="Invalid power"):
        register_optimizer_state(_TracedSGD, {"last_grad": 0.5})
    with pytest.raises(TypeError, match="Invalid optimizer class"):
        register_optimizer_state(dict, {})
