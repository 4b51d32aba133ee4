"""The lazy registry of methods: each method package is loaded the first time a name is looked up.

The core registries (models, optimizers, config extensions, studies) hold what the core provides
(``mlp``, ``sgd``, ``baseline``, ...). Everything a method adds (its optimizers, models, training
loop callbacks, studies) is registered by the method package's own ``register()``, which this
module calls once, the first time any registry is asked for a name. So the training loop knows no
method, ``import normlab`` stays light, and a new method is its own package plus one line below.
"""

from __future__ import annotations

import importlib
import threading

# One line per method: the package whose ``register()`` adds its names to the registries.
METHOD_PACKAGES: tuple[str, ...] = (
    "normlab.methods.riemannian_bn",
    "normlab.methods.enorm",
    "normlab.methods.sphere",
    "normlab.methods.norm_layers",
)

_lock = threading.RLock()
_state = {"loaded": False, "loading": False}


def load_methods() -> None:
    """Register every method once (cheap after the first call; re-entrant while registering)."""
    if _state["loaded"] or _state["loading"]:
        return
    with _lock:
        if _state["loaded"] or _state["loading"]:
            return
        _state["loading"] = True
        try:
            for package in METHOD_PACKAGES:
                importlib.import_module(package).register()
            _state["loaded"] = True
        finally:
            _state["loading"] = False


__all__ = ["METHOD_PACKAGES", "load_methods"]
