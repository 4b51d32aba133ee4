"""Compiled pure step functions: the machinery behind every ``fused=True`` of normlab.

A fused step (of SGD-G, Adam-G, SphereSGD or an ENorm cycle) is written as a **pure function**
of tensors that returns new tensors; the caller copies the results into the parameters. It is
compiled with ``torch.compile`` (inductor), so a GPU gets generated kernels and a CPU vectorized
C++ loops, with no hand-written kernel. Three choices make that dependable:

* **Pure, never in place.** torch 2.13's inductor on CPU fails (``KeyError`` in its C++ code
  generator) on the sphere pattern when the graph updates its inputs in place (a row reduction,
  a broadcast multiply, then ``copy_`` into the input). Returning new tensors compiles everywhere;
  the copy back is one ``torch._foreach_copy_`` outside the graph.
* **Compile once.** Hyper-parameters that change during training (learning rates, bias
  corrections, momentum) are passed as 0-d tensors, so an LR schedule never recompiles; options
  that change the maths (Nesterov, clipping on or off, granularity) are part of ``key`` and get a
  graph each. Every key compiles a fresh copy of the function's code object: dynamo keeps its
  cache on the code object, so without the copy every optimizer in the process would share one
  cache and its recompile limit (8 by default), and a study that builds many models in one
  process would silently fall back to eager for the ninth.
* **Fall back loudly, once.** Where compiling is impossible (no C++ compiler, a Python that dynamo
  does not support, an inductor bug), the first call warns in one line naming the reason and
  returns ``None``; the caller then runs its eager path, which gives the same numbers. Nothing was
  modified by the failed attempt, since the function is pure.

:attr:`FusedStep.compiles` counts graphs compiled (backend calls; a recompile after a guard
failure counts too) and :attr:`FusedStep.compile_seconds` the time of the calls that compiled.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Callable, Hashable

import torch

__all__ = ["FusedStep", "ScalarSlots"]


def _fresh_function(fn: Callable) -> Callable:
    """``fn`` with a new code object of its own (an own dynamo cache; see the module doc)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


class FusedStep:
    """``fn`` compiled once per ``key``; ``None`` from :meth:`__call__` means "use eager".

    Args:
        fn: a pure function of tensors (and Python values that ``key`` determines).
        what: the step's name for the fallback warning (``"SGDG"``, ``"ENorm cycle"``).
    """

    def __init__(self, fn: Callable, what: str):
        self._fn = fn
        self._what = what
        self._compiled: dict[Hashable, Callable] = {}
        self.compiles = 0
        self.compile_seconds = 0.0
        #: why compiling failed (the fallback is then permanent for this object), else None
        self.unavailable: str | None = None

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
        # counted on success only: dynamo may abandon a first attempt and trace again
        # (TensorifyScalarRestartAnalysis on a cold cache), which is one graph, not two
        self.compiles += 1
        return compiled

    def __call__(self, key: Hashable, *args, **kwargs):
        """``fn(*args, **kwargs)`` compiled for ``key``; None (after one warning) if impossible."""
        if self.unavailable is not None:
            return None
        before, start = self.compiles, time.perf_counter()
        try:
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = torch.compile(
                    _fresh_function(self._fn), backend=self._backend, fullgraph=True, dynamic=False
                )
                self._compiled[key] = compiled
            out = compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure to compile means: run eager
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.unavailable = f"{type(exc).__name__}: {reason}"[:300]
            warnings.warn(
                f"normlab: fused=True could not compile the {self._what} step "
                f"({self.unavailable}); running the eager step instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        if self.compiles != before:
            self.compile_seconds += time.perf_counter() - start
        return out

    def __getstate__(self):  # compiled code does not pickle (deepcopy of an optimizer)
        return {"_fn": self._fn, "_what": self._what}

    def __setstate__(self, state):
        self.__init__(state["_fn"], state["_what"])


class ScalarSlots:
    """0-d tensors holding a step's hyper-parameters, one per (name, device, dtype), reused.

    ``fill_`` with a Python number is an asynchronous kernel on an accelerator: no host
    synchronisation, and the compiled graph sees the same tensor (no recompile) every step. A
    hyper-parameter that already is a tensor (a scheduler's) is cast, not filled.
    """

    def __init__(self) -> None:
        self._slots: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, value, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach().to(device=device, dtype=dtype).reshape(())
        key = (name, device, dtype)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = torch.empty((), device=device, dtype=dtype)
        return slot.fill_(value)
