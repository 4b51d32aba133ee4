"""Compiled step functions: the machinery behind every ``fused=True`` of normlab.

A fused step (of SGD-G, Adam-G, SphereSGD or an ENorm cycle) is written as a **pure function**
of tensors that returns new tensors: that function is the maths, the one the tests compare with
the references. :class:`FusedStep` compiles it with ``torch.compile`` (inductor), so a GPU gets
generated kernels and a CPU vectorized C++ loops, with no hand-written kernel, and writes the
results into the caller's tensors (parameters, optimizer state). Four choices make that fast and
dependable:

* **Written in place inside the graph.** The compiled graph is the pure function followed by a
  ``copy_`` of every result into its target, so inductor stores each new value straight into the
  parameter or state tensor in the loop that computes it: one pass over memory, no temporary
  tensors, no copy afterwards. That is what brings a step near the memory-traffic limit (on this
  CPU it halves the time of a pure graph plus a copy for SphereSGD).
* **Pure where in place fails.** torch 2.13's inductor on CPU fails (``KeyError`` in its C++
  outer-loop fusion) on some graphs that update their inputs after a row reduction and a
  broadcast multiply. Such a graph fails while compiling, before it runs, so nothing has been
  written; the same key is then compiled as the pure function alone and its results are copied
  with one ``torch._foreach_copy_`` (same numbers, a little slower). :attr:`FusedStep.pure_keys`
  records which keys took that path and why.
* **Compile once.** Hyper-parameters that change during training (learning rates, bias
  corrections, momentum) are passed as 0-d tensors, so an LR schedule never recompiles; options
  that change the maths (Nesterov, clipping on or off, granularity) are part of ``key`` and get a
  graph each. Every key compiles a fresh copy of the function's code object: dynamo keeps its
  cache on the code object, so without the copy every optimizer in the process would share one
  cache and its recompile limit (8 by default), and a study that builds many models in one
  process would silently fall back to eager for the ninth.
* **Fall back loudly, once.** Where compiling is impossible (no C++ compiler, a Python that dynamo
  does not support, an inductor bug in both forms), the first call warns in one line naming the
  reason and returns ``False``; the caller then runs its eager path, which gives the same
  numbers. Nothing was modified by the failed attempt. An error raised by a graph that did
  compile (out of memory, say) is not a reason to fall back and propagates.

:attr:`FusedStep.compiles` counts graphs compiled (backend calls that succeeded; a recompile after
a guard failure counts too) and :attr:`FusedStep.compile_seconds` the time of the calls that
compiled, failed attempts included.
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Callable, Hashable, Sequence

import torch

__all__ = ["FusedStep", "ScalarSlots"]

Targets = Sequence[Sequence[torch.Tensor]]


def _fresh_function(fn: Callable) -> Callable:
    """``fn`` with a new code object of its own (an own dynamo cache; see the module doc)."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _writing_into(fn: Callable) -> Callable:
    """``fn`` followed by a copy of its results into ``targets`` (compiled as one graph)."""

    def step_in_place(targets: Targets, *args, **kwargs) -> None:
        for dests, news in zip(targets, fn(*args, **kwargs)):
            for dest, new in zip(dests, news):
                dest.copy_(new)

    return step_in_place


def _copy_into(targets: Targets, results) -> None:
    dests = [t for ts in targets for t in ts]
    news = [t for ts in results for t in ts]
    if dests:
        torch._foreach_copy_(dests, news)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


class FusedStep:
    """``fn`` compiled once per ``key``, its results written into the caller's tensors.

    Args:
        fn: a pure function of tensors (and Python values that ``key`` determines) returning a
            sequence of tensor lists, shaped as the ``targets`` of :meth:`__call__`.
        what: the step's name for the fallback warning (``"SGDG"``, ``"ENorm cycle"``).
        in_place: compile the in-place graph first (the fast form); ``False`` compiles the pure
            function and copies (the form the in-place one falls back to).
    """

    def __init__(self, fn: Callable, what: str, *, in_place: bool = True):
        self._fn = fn
        self._what = what
        self.in_place = in_place
        self._graphs: dict[Hashable, tuple[Callable, bool]] = {}  # key -> (compiled, in place)
        self.compiles = 0
        self.compile_seconds = 0.0
        #: why compiling failed (the fallback is then permanent for this object), else None
        self.unavailable: str | None = None
        #: keys compiled as the pure function plus a copy, each with the in-place failure
        self.pure_keys: dict[Hashable, str] = {}

    @property
    def form(self) -> str:
        """How the compiled steps run, for reports: ``"in place"``, ``"pure + copy (why)"``
        when some key could not compile in place, ``"eager (why)"`` after the fallback, or
        ``"not compiled yet"``."""
        if self.unavailable is not None:
            return f"eager ({self.unavailable})"
        if self.pure_keys:
            return f"pure + copy ({next(iter(self.pure_keys.values()))})"
        return "in place" if self._graphs else "not compiled yet"

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(gm, example_inputs)
        # counted on success only: dynamo may abandon a first attempt and trace again
        # (TensorifyScalarRestartAnalysis on a cold cache), which is one graph, not two
        self.compiles += 1
        return compiled

    def _compile(self, fn: Callable) -> Callable:
        return torch.compile(
            _fresh_function(fn), backend=self._backend, fullgraph=True, dynamic=False
        )

    def __call__(self, key: Hashable, targets: Targets, *args, **kwargs) -> bool:
        """Write ``fn(*args, **kwargs)`` into ``targets`` with the graph of ``key``.

        Returns False (after one warning; nothing written) when no graph can be compiled.
        """
        if self.unavailable is not None:
            return False
        graph = self._graphs.get(key)
        if graph is not None:
            self._run(graph, targets, args, kwargs)
            return True
        start = time.perf_counter()
        try:
            self._first_run(key, targets, args, kwargs)
        except _CompileFailed as failed:
            self.unavailable = failed.reason
            warnings.warn(
                f"normlab: fused=True could not compile the {self._what} step "
                f"({self.unavailable}); running the eager step instead",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        finally:
            self.compile_seconds += time.perf_counter() - start
        return True

    def _first_run(self, key, targets, args, kwargs) -> None:
        """Compile ``key`` (in place, else pure) and run it once; _CompileFailed if neither
        compiles. A failure while compiling happens before the graph runs: nothing written."""
        forms = [True, False] if self.in_place else [False]
        for in_place in forms:
            before = self.compiles
            try:
                fn = _writing_into(self._fn) if in_place else self._fn
                graph = (self._compile(fn), in_place)
                self._run(graph, targets, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - a graph that failed to compile: next form
                if self.compiles != before:
                    raise  # it compiled, then failed running: a real error, not a fallback
                reason = _first_line(exc)
                if in_place and forms[-1] is False:
                    self.pure_keys[key] = reason
                    continue
                raise _CompileFailed(reason) from exc
            self._graphs[key] = graph
            return

    @staticmethod
    def _run(graph: tuple[Callable, bool], targets: Targets, args, kwargs) -> None:
        compiled, in_place = graph
        if in_place:
            compiled(targets, *args, **kwargs)
        else:
            _copy_into(targets, compiled(*args, **kwargs))

    def __getstate__(self):  # compiled code does not pickle (deepcopy of an optimizer)
        return {"_fn": self._fn, "_what": self._what, "in_place": self.in_place}

    def __setstate__(self, state):
        self.__init__(state["_fn"], state["_what"], in_place=state.get("in_place", True))


class _CompileFailed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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
