"""ENorm (equi-normalization): function-preserving weight balancing of ReLU networks.

* :class:`ENorm`: trace the model once, then ``enorm.step()`` after each ``optimizer.step()``;
* :mod:`.graph`: rescaling groups from a torch.fx trace (residual streams, flatten, norms);
* :mod:`.balance`: the sequential (Gauss-Seidel) and simultaneous (Jacobi) cycles;
* :mod:`.optim_state`: how SGD / Adam / ... state transforms with the weights.

References: Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks",
ICLR 2019, arXiv:1902.10416.
"""

from .core import ENORM_PRESETS, ENorm, last_hidden_groups
from .graph import ENormGraphError, RescalingGroup, register_norm_layer, trace_plan
from .optim_state import register_optimizer_state, supported_optimizers

__all__ = [
    "ENORM_PRESETS",
    "ENorm",
    "ENormGraphError",
    "RescalingGroup",
    "register_norm_layer",
    "register_optimizer_state",
    "last_hidden_groups",
    "supported_optimizers",
    "trace_plan",
]
