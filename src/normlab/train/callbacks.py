"""Callbacks: how metrics, post-step hooks (ENorm, sphere metrics, ...) plug into the one loop.

The loop calls, in order, for each run::

    on_train_start(state)
    per step:  on_before_step(state)        # gradients ready, parameters not yet updated
               on_step_end(state, loss)     # after optimizer.step() and the scheduler
    per epoch: on_epoch_end(state) -> dict  # extra columns for metrics.csv
    on_train_end(state, summary)

``state`` is the loop's :class:`~normlab.train.loop.TrainState` (model, optimizer, scheduler, config,
device, epoch, step, ...). A callback with state that matters for resuming implements
``state_dict`` / ``load_state_dict``; the checkpoint stores it under the callback's ``name``.
"""

from __future__ import annotations

import torch


class Callback:
    name: str = "callback"

    def on_train_start(self, state) -> None:
        pass

    def on_before_step(self, state) -> None:
        pass

    def on_step_end(self, state, loss: torch.Tensor) -> None:
        pass

    def on_epoch_end(self, state) -> dict | None:
        return None

    def on_train_end(self, state, summary: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CallbackList:
    def __init__(self, callbacks):
        self.callbacks = [c for c in callbacks if c is not None]
        names = [c.name for c in self.callbacks]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"callbacks need distinct names for checkpoints; repeated: {dupes}")
        # Only callbacks that override a per-step method are called per step (cheap hot loop).
        self.before_step = [c for c in self.callbacks if _overrides(c, "on_before_step")]
        self.step_end = [c for c in self.callbacks if _overrides(c, "on_step_end")]

    def __iter__(self):
        return iter(self.callbacks)

    def on_train_start(self, state):
        for c in self.callbacks:
            c.on_train_start(state)

    def on_epoch_end(self, state) -> dict:
        extra = {}
        for c in self.callbacks:
            extra.update(c.on_epoch_end(state) or {})
        return extra

    def on_train_end(self, state, summary):
        for c in self.callbacks:
            c.on_train_end(state, summary)

    def state_dict(self) -> dict:
        return {c.name: c.state_dict() for c in self.callbacks}

    def load_state_dict(self, states: dict) -> None:
        for c in self.callbacks:
            if c.name in states:
                c.load_state_dict(states[c.name])


def _overrides(obj, method: str) -> bool:
    return getattr(type(obj), method) is not getattr(Callback, method)
