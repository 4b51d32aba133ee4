"""How optimizer state transforms when ENorm rescales the parameters.

ENorm multiplies a parameter entry by s > 0 (s = d_row / d_col). In the new coordinates
w' = s w the gradient is g' = g / s. Each state tensor is transformed into the value it would
have had if the whole gradient history had been observed in the new coordinates:

    state                                  built from     transform
    SGD momentum_buffer                    sum of g        / s
    Adam, AdamW, NAdam, RAdam exp_avg      EMA of g        / s
    ... exp_avg_sq, Adam max_exp_avg_sq    EMA / max of g^2 / s^2
    Adagrad sum                            sum of g^2      / s^2
    RMSprop square_avg / grad_avg          EMA of g^2 / g  / s^2 / s

These are exact for the gradient part. Coupled weight decay (SGD / Adam ``weight_decay``)
folds lambda * w into the gradient, and that part transforms like w (times s): the buffers of
such runs are only approximately consistent, as in the original code. Decoupled decay (AdamW)
needs nothing. Adagrad's ``initial_accumulator_value`` must be 0 for exactness. RMSprop's
momentum buffer accumulates g / (sqrt(v) + eps), which has no exact transform: RMSprop with
momentum > 0 is refused. No optimizer becomes rescaling-equivariant: the next step in the new
coordinates is not s times the step in the old ones, which is why ENorm changes training.

Register other optimizers with :func:`register_optimizer_state`.

References: Stock et al., ICLR 2019, arXiv:1902.10416 (the original code rescales the SGD
momentum buffer of convolutional layers with the inverse factor).
"""

from __future__ import annotations

import torch

__all__ = ["register_optimizer_state", "state_powers", "supported_optimizers"]

# state key -> power k (state <- state * s^k); None marks a key with no exact transform.
_REGISTRY: dict[type, dict[str, int | None]] = {
    torch.optim.SGD: {"momentum_buffer": -1},
    torch.optim.Adam: {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2, "step": 0},
    torch.optim.AdamW: {"exp_avg": -1, "exp_avg_sq": -2, "max_exp_avg_sq": -2, "step": 0},
    torch.optim.NAdam: {"exp_avg": -1, "exp_avg_sq": -2, "step": 0, "mu_product": 0},
    torch.optim.RAdam: {"exp_avg": -1, "exp_avg_sq": -2, "step": 0},
    torch.optim.Adagrad: {"sum": -2, "step": 0},
    torch.optim.RMSprop: {"square_avg": -2, "grad_avg": -1, "step": 0, "momentum_buffer": None},
}


def register_optimizer_state(cls: type, powers: dict[str, int | None]) -> None:
    """Declare how the state of optimizer class ``cls`` transforms under ENorm.

    ``powers`` maps each per-parameter state key to the integer k with state <- state * s^k
    when the parameter entry is multiplied by s (gradient EMAs: -1, squared-gradient EMAs: -2,
    counters: 0), or to None for a key that cannot be transformed (an error if present).
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(f"Invalid optimizer class: {cls!r} is not a torch.optim.Optimizer")
    for key, power in powers.items():
        if power is not None and not isinstance(power, int):
            raise ValueError(f"Invalid power for state key {key!r}: {power!r} (int or None)")
    _REGISTRY[cls] = dict(powers)


def supported_optimizers() -> list[str]:
    return sorted(cls.__name__ for cls in _REGISTRY)


def state_powers(optimizer: torch.optim.Optimizer) -> dict[str, int | None]:
    """The transform table of ``optimizer``'s class (nearest registered base class)."""
    for cls in type(optimizer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    raise TypeError(
        f"ENorm cannot rescale the state of {type(optimizer).__name__}: supported optimizers are "
        f"{', '.join(supported_optimizers())}; register others with "
        "normlab.enorm.register_optimizer_state(cls, {state_key: power})"
    )


def check_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, int | None]:
    """Validate ``optimizer`` at ENorm construction; returns its transform table."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"Invalid optimizer: expected a torch.optim.Optimizer or None, got "
            f"{type(optimizer).__name__}"
        )
    powers = state_powers(optimizer)
    if isinstance(optimizer, torch.optim.RMSprop):
        for group in optimizer.param_groups:
            if group.get("momentum", 0) != 0:
                raise ValueError(
                    "ENorm cannot rescale RMSprop with momentum > 0: its momentum buffer "
                    "accumulates g / (sqrt(v) + eps), which has no exact transform"
                )
    return powers


def state_entries(
    optimizer: torch.optim.Optimizer, powers: dict[str, int | None], param: torch.Tensor
) -> list[tuple[dict, str, torch.Tensor, int]]:
    """``(state dict, key, tensor, power)`` of each state tensor of ``param`` to rescale.

    Lazy state (no step yet): empty list. The state dict and key let a fused cycle swap a new
    tensor in instead of copying it.
    """
    state = optimizer.state.get(param)
    if not state:
        return []
    out = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != param.shape:
            continue  # step counters, scalars, None buffers
        if key not in powers:
            raise ValueError(
                f"ENorm does not know how state {key!r} of {type(optimizer).__name__} "
                "transforms; declare it with normlab.enorm.register_optimizer_state"
            )
        power = powers[key]
        if power is None:
            raise ValueError(
                f"ENorm cannot rescale state {key!r} of {type(optimizer).__name__}: it has no "
                "exact transform"
            )
        if power != 0:
            out.append((state, key, value, power))
    return out


def state_tensors(
    optimizer: torch.optim.Optimizer, powers: dict[str, int | None], param: torch.Tensor
) -> list[tuple[torch.Tensor, int]]:
    """The state tensors of ``param`` to rescale, with their powers (lazy state: empty list)."""
    return [(t, k) for _, _, t, k in state_entries(optimizer, powers, param)]
