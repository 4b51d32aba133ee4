r"""ENorm in the training loop: the ``enorm`` extension and the paper's two models.

Models ``fully_connected`` (FC-15: the MLP with the original's Kaiming-normal init) and
``fully_conv`` (the fully convolutional network), see :mod:`normlab.models.fully_conv`.

``enorm.c=1.2`` (or ``enorm=true`` for the defaults) on the command line, or ``{"enorm": {...}}``
in a config, adds :class:`ENormCallback`: it builds :class:`normlab.ENorm` on the run's model and
optimizer when training starts and calls ``enorm.step()`` after every optimizer step (after the
learning-rate scheduler too: the loop's post-step hook), as the original ``main.py`` does. Options
are ENorm's own: ``c``, ``p``, ``cycles``, ``every``, ``include_bias``, ``order``, ``exclude``,
``balance_last_hidden``, ``fused`` (``enorm.fused=true``: each cycle one compiled function, compiled
at the first step; see :class:`normlab.ENorm`), plus ``apply``: ``false`` only measures (logs the columns below without ever rescaling), which gives a
run without ENorm the same weight-norm curves to compare with.

Columns added to ``metrics.csv`` at the end of every epoch:

* ``weight_sq_norm``: the total weight energy \sum_k ||W_k||_F^2 over every Linear / Conv weight of
  the model (every parameter with >= 2 dims: biases and norm scales excluded), the quantity ENorm
  minimises for c = 1 and the paper plots;
* ``enorm_objective``: the objective ENorm descends, J_c = \sum_k c^{-p k} ||W_k||_p^p over the
  parameters it rescales (k = layer depth), see :meth:`normlab.ENorm.objective`;
* ``enorm_seconds``: the time spent in ENorm cycles during the epoch (included in ``time``).

The callback checkpoints ENorm's call counter, so a resumed run with ``every > 1`` cycles on the
same steps as an uninterrupted one (the optimizer state ENorm rescales is in the loop's checkpoint).

A model ENorm cannot rebalance (a GELU, a sigmoid gate, an untraceable forward, ...) or an
optimizer whose state it cannot transform makes training stop before the first step with a
:class:`~normlab.errors.UserError` (the CLI prints it and exits with status 2).

References: Stock, Graham, Gribonval, Jegou, "Equi-normalization of Neural Networks", ICLR 2019,
arXiv:1902.10416; facebookresearch/enorm ``main.py`` (one ``enorm.step()`` after each SGD step).
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from ... import config as config_mod
from ...enorm import ENORM_PRESETS, ENorm
from ...errors import UserError
from ...train.callbacks import Callback

__all__ = ["ENORM_EXTENSION", "ENormCallback", "ENormSetupError", "weight_sq_norm"]


class ENormSetupError(UserError):
    """ENorm cannot be set up for this run (bad option or unsupported optimizer)."""


@torch.no_grad()
def weight_sq_norm(model: nn.Module) -> float:
    """Sum of ||W||_F^2 over the parameters of ``model`` with >= 2 dims (Linear/Conv weights)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.ndim >= 2:
            total += p.detach().double().pow(2).sum().cpu()
    return float(total)


class ENormCallback(Callback):
    """Runs :class:`normlab.ENorm` after each optimizer step and logs the weight norms.

    Args:
        c, p, cycles, every, include_bias, order, exclude, balance_last_hidden, fused: passed to
            :class:`normlab.ENorm` (``fused=True``: the cycle compiled into one function).
        apply: False: build ENorm only to measure (``enorm_objective``, ``weight_sq_norm``); no
            cycle is ever run, so training is that of a run without ENorm.
    """

    name = "enorm"

    @classmethod
    def config_options(cls) -> dict:
        """The ``enorm.*`` options: ENorm's keyword arguments (one source), then ``apply``."""
        options = config_mod.signature_options(ENorm, skip=("optimizer",))
        options["exclude"] = list(options["exclude"])  # a list in the config (JSON)
        return {**options, "apply": True}

    def __init__(self, apply: bool = True, **enorm_options):
        # The options are ENorm's own (see config_options): validated by the config against
        # ENorm's signature, and by ENorm itself when it is built at the start of training.
        if "exclude" in enorm_options:
            enorm_options["exclude"] = tuple(str(n) for n in (enorm_options["exclude"] or ()))
        self.options = enorm_options
        self.apply = bool(apply)
        self.enorm: ENorm | None = None
        self._pending: dict | None = None  # a checkpoint's state, loaded before on_train_start
        self._seconds = 0.0

    def on_train_start(self, state) -> None:
        try:
            self.enorm = ENorm(state.model, state.optimizer, **self.options)
        except UserError:
            raise  # ENormGraphError: the message already names the layer and the fix
        except (TypeError, ValueError) as exc:
            raise ENormSetupError(f"enorm: {exc}") from exc
        if self._pending is not None:
            self.enorm.load_state_dict(self._pending)
            self._pending = None

    def on_step_end(self, state, loss) -> None:
        if not self.apply or getattr(state, "step_skipped", False):  # fp16 skipped the step
            return
        start = time.perf_counter()
        self.enorm.step()
        self._seconds += time.perf_counter() - start

    def on_epoch_end(self, state) -> dict:
        seconds, self._seconds = self._seconds, 0.0
        return {
            "weight_sq_norm": weight_sq_norm(state.model),
            "enorm_objective": float(self.enorm.objective()) if self.enorm else float("nan"),
            "enorm_seconds": seconds,
        }

    def state_dict(self) -> dict:
        if self.enorm is not None:
            return self.enorm.state_dict()
        return dict(self._pending or {})

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.enorm is not None:
            self.enorm.load_state_dict(state)
        else:
            self._pending = dict(state)


ENORM_EXTENSION = config_mod.Extension(
    "enorm",
    ENormCallback,
    "ENorm (equi-normalization) after every optimizer step: c, p, cycles, every, include_bias, "
    "order (sequential|simultaneous), exclude (module names), fused (true: one compiled "
    "function per cycle), apply (false: only log "
    "weight_sq_norm / enorm_objective); enorm=original: the original code's cycle (simultaneous "
    "order, last hidden layer unbalanced)",
    presets=ENORM_PRESETS,
)
