r"""Training on the sphere at a fixed effective learning rate, wired into the one training loop.

This module connects the parts of Kodryan et al. (2022) to the pipeline:

* **models** ``mlp_si``, ``mlp_si_af``, ``convnet_si``, ``convnet_si_af``, ``resnet18_si``,
  ``resnet18_si_af`` (:mod:`normlab.models.scale_invariant`) in the model registry;
* **optimizer** ``sphere``: :class:`normlab.optim.SphereSGD` with two param groups, ``"si"`` (the
  scale-invariant weights on one sphere of fixed radius, stepped with ``lr = elr * rho^2``) and
  ``"other"`` (the rest, plain SGD with ``lr_other``; 0 freezes them as the original's
  ``noninvlr = 0``). The SI set comes from the model's ``scale_invariant_parameters()`` when it
  has one, else from the probe :func:`normlab.scale_invariance.find_scale_invariant` (the union of
  the individually and jointly invariant weights), so ``optim=sphere`` works on any model;
* **extension** ``sphere_metrics`` (``sphere_metrics=true``): a callback that adds to
  ``metrics.csv``, per epoch,

  - ``elr``: the effective learning rate of the SI point, ``ELR = lr / |w|^2``. Under SphereSGD it
    is the ELR that was set; under any other optimizer (the conventional "fix_lr" baseline: SGD
    with weight decay) it is ``lr / |w_t|^2`` with the group's Euclidean lr, averaged over the
    epoch's tracked steps, so its drift is visible. (With heavy-ball momentum ``mu`` the step of a
    steady state is ``lr / (1 - mu)``; the column keeps the plain definition.)
  - ``si_norm``: the joint norm ``|w|`` of the SI parameters after the epoch's last tracked step;
  - ``effective_grad_norm``: the mean over tracked steps of ``G_eff = |g_t| |w_t|``, the gradient
    norm at the unit point (the original computes its mean over the train mini-batches at each
    saved checkpoint; the per-step mean during the epoch is the same quantity along the way);
  - ``step_angle``: the mean angle between consecutive iterates; without momentum
    ``tan(theta) = ELR * G_eff`` step by step; ``epoch_angle`` (first tracked point of the epoch
    to its last) and ``cosine_to_init`` (last point against the initial one);
  - ``full_train_loss`` / ``full_train_acc``: one pass over the whole train set (no shuffling, no
    augmentation, the training batch size) with BatchNorm in **train mode** (batch statistics,
    running statistics left untouched), as the paper measures its train loss;
  - ``tracked_steps``, ``sphere_step_seconds`` (time spent in the per-step hooks, included in
    the loop's ``time``) and ``full_train_seconds`` (the extra pass, not included).

  Options: ``every`` (track every N-th step; the per-step work costs about one to two extra
  optimizer steps of memory traffic, so ``every=10`` makes it negligible), ``full_train_every``
  (epochs between full passes; 0 = never) and ``batch_size`` of that pass (0 = the training
  batch size; BN statistics depend on it).

References: Kodryan, Lobacheva, Nakhodnov, Vetrov, "Training Scale-Invariant Neural Networks on the
Sphere Can Happen in Three Regimes", NeurIPS 2022 (arXiv 2209.03695); official code
``tipt0p/three_regimes_on_the_sphere`` (``train.py`` fix_elr / fix_lr modes, ``get_info.py``).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from ... import config as config_mod
from ...data import InMemoryLoader
from ...optim import SphereSGD
from ...sphere_metrics import SphereMetricsTracker, cosine_to_init, scale_invariant_norm
from ...train.callbacks import Callback
from ...train.loop import evaluate
from ...train.optimizers import BuildContext, OptimizerSpec
from .groups import scale_invariant_param_groups

__all__ = [
    "SI_SOURCES",
    "SPHERE_METRICS_EXTENSION",
    "SPHERE_SPEC",
    "SphereMetricsCallback",
    "build_sphere_optimizer",
    "scale_invariant_split",
]

SI_SOURCES = ("auto", "model", "probe")


# ----------------------------------------------------------------------------- parameter split
def scale_invariant_split(
    model: nn.Module, probe_inputs: torch.Tensor | None = None, source: str = "auto"
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(si, other)``: the trainable scale-invariant parameters and the other trainable ones.

    ``source="model"`` asks the model (``scale_invariant_parameters()``), ``"probe"`` runs
    :func:`normlab.scale_invariance.find_scale_invariant` on ``probe_inputs`` (train mode, a few
    samples) and takes every individually invariant weight plus every joint set containing a
    weight (together they are jointly invariant: one global sphere), ``"auto"`` (default) the
    model's method when it has one, else the probe. Frozen parameters are in neither list.
    """
    if source not in SI_SOURCES:
        raise ValueError(f"Invalid si_params: {source!r} (valid: {', '.join(SI_SOURCES)})")
    has_method = callable(getattr(model, "scale_invariant_parameters", None))
    if source == "model" and not has_method:
        raise ValueError(
            f"{type(model).__name__} has no scale_invariant_parameters(); use si_params=probe"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if has_method and source != "probe":
        si = [p for p in model.scale_invariant_parameters() if p.requires_grad]
    else:
        if probe_inputs is None:
            raise ValueError("the scale-invariance probe needs a batch of inputs (probe_inputs)")
        groups = scale_invariant_param_groups(model, probe_inputs, granularity="global")
        si = [p for g in groups if g["scale_invariant"] for p in g["params"]]
    ids = {id(p) for p in si}
    return si, [p for p in trainable if id(p) not in ids]


# ----------------------------------------------------------------------------- optimizer
def build_sphere_optimizer(model: nn.Module, o: dict, context: BuildContext) -> SphereSGD:
    """The ``sphere`` optimizer: SphereSGD with groups ``"si"`` and (if non-empty) ``"other"``.

    ``lr_other`` >= 0 is the plain-SGD lr of the non-SI group (0 freezes it: the original's
    ``noninvlr = 0``); ``lr_other = -1`` gives it the SI group's Euclidean lr ``elr * rho_0^2``
    (the original's ``noninvlr = -1``), fixed at build time.
    """
    si, other = scale_invariant_split(model, context.probe_batch[0], o["si_params"])
    if not si:
        raise ValueError(
            f"optim=sphere found no scale-invariant parameters in {type(model).__name__}: only "
            "weights that feed a normalization layer can go on the sphere; use a scale-invariant "
            "model (e.g. model=mlp_si, see `normlab list models`) or one with model.norm=bn"
        )
    lr_other = o["lr_other"]
    if lr_other == -1:
        rho = o["radius"] if o["radius"] is not None else scale_invariant_norm(si)
        lr_other = o["elr"] * rho**2
    elif not (isinstance(lr_other, int | float) and lr_other >= 0):
        raise ValueError(f"Invalid lr_other: {lr_other!r} (must be >= 0, or -1: elr * rho_0^2)")
    groups = [
        {
            "params": si,
            "name": "si",
            "scale_invariant": True,
            "elr": o["elr"],
            "granularity": o["granularity"],
            "radius": o["radius"],
            "project_gradient": o["project_gradient"],
        }
    ]
    if other:
        groups.append(
            {
                "params": other,
                "name": "other",
                "scale_invariant": False,
                "lr": lr_other,
                "weight_decay": o["weight_decay_other"],
            }
        )
    return SphereSGD(
        groups, momentum=o["momentum"], foreach=o["foreach"], fused=o.get("fused") or None
    )


SPHERE_SPEC = OptimizerSpec(
    "sphere",
    build_sphere_optimizer,
    {
        "elr": 1e-3,
        "momentum": 0.0,
        "granularity": "global",
        "project_gradient": False,
        "radius": None,
        "lr_other": 0.0,
        "weight_decay_other": 0.0,
        "si_params": "auto",
        "foreach": None,
        "fused": False,
    },
    "SphereSGD: scale-invariant weights on one sphere at a fixed ELR (Kodryan et al. 2022)",
)


# ----------------------------------------------------------------------------- metrics
class SphereMetricsCallback(Callback):
    """Per-epoch sphere metrics (see the module docstring for the columns).

    Args:
        every: track the per-step metrics on every ``every``-th optimizer step (>= 1).
        full_train_every: full train-set pass in train-mode BN every this many epochs (0: never).
        batch_size: batch size of that pass (0: the training batch size).
        params: the SI parameters to follow; default: the ``"si"`` groups of a SphereSGD, else the
            model's ``scale_invariant_parameters()``, else the probe.
    """

    name = "sphere_metrics"

    def __init__(
        self,
        every: int = 1,
        full_train_every: int = 1,
        batch_size: int = 0,
        params: list[nn.Parameter] | None = None,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (must be an integer >= 1)")
        if not isinstance(full_train_every, int) or full_train_every < 0:
            raise ValueError(f"Invalid full_train_every: {full_train_every!r} (must be >= 0)")
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"Invalid batch_size: {batch_size!r} (must be >= 0)")
        self.every = every
        self.full_train_every = full_train_every
        self.batch_size = batch_size
        self._params = params
        self._init: list[torch.Tensor] | None = None
        self.tracker = SphereMetricsTracker()

    # -- setup ----------------------------------------------------------------------------
    def on_train_start(self, state) -> None:
        optimizer = state.optimizer
        si_groups = [g for g in optimizer.param_groups if g.get("scale_invariant") is True]
        self._sphere = isinstance(optimizer, SphereSGD) and bool(si_groups)
        if self._params is None:
            if self._sphere:
                self._params = [p for g in si_groups for p in g["params"]]
            else:
                x = state.dataset.x_train[: min(256, len(state.dataset.x_train))]
                self._params = scale_invariant_split(state.model, x.to(state.device))[0]
        if not self._params:
            raise ValueError("sphere_metrics: the model has no scale-invariant parameters")
        ids = {id(p) for p in self._params}
        # the groups whose step size applies to the tracked point
        self._groups = [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]
        if self._init is None:  # (restored from a checkpoint when resuming)
            self._init = [p.detach().clone() for p in self._params]
        loader = state.train_loader
        batch = self.batch_size or state.config["batch_size"]
        # A last batch of one sample cannot be normalized with batch statistics: drop it.
        self._full_loader = InMemoryLoader(
            loader.x,
            loader.y,
            batch,
            shuffle=False,
            drop_last=len(loader.x) % batch == 1,
            device=state.device,
        )
        self._tracking = False
        self._step_rate = math.nan
        self._reset_timers()

    def _reset_timers(self) -> None:
        self._step_seconds = 0.0
        self._tracked = 0

    def _current_rate(self) -> tuple[str, float]:
        """``("elr", value)`` under SphereSGD, else ``("lr", value)``; NaN if the groups differ."""
        if self._sphere:
            # SphereSGD's aliases: a scheduler writes "lr"; "elr" is the user's; "lr" wins
            # when both changed (the optimizer resolves it the same way at its step).
            values = {
                g["lr"] if g["lr"] != g.get("_elr_seen", g["lr"]) else g["elr"]
                for g in self._groups
            }
            key = "elr"
        else:
            values = {g["lr"] for g in self._groups}
            key = "lr"
        return key, float(values.pop()) if len(values) == 1 else math.nan

    # -- per step -------------------------------------------------------------------------
    def on_before_step(self, state) -> None:
        if state.step % self.every:
            return
        start = time.perf_counter()
        # The rate of the coming step (the scheduler already advanced at the end of the last one).
        self._rate = self._current_rate()
        self.tracker.before_step(self._params)
        self._tracking = True
        self._step_seconds += time.perf_counter() - start

    def on_step_end(self, state, loss) -> None:
        if not self._tracking:
            return
        start = time.perf_counter()
        key, value = self._rate
        self.tracker.after_step(self._params, [p.grad for p in self._params], **{key: value})
        self._tracking = False
        self._tracked += 1
        self._step_seconds += time.perf_counter() - start

    # -- per epoch ------------------------------------------------------------------------
    def on_epoch_end(self, state) -> dict:
        summary = self.tracker.epoch_summary()
        row = {
            "elr": summary["elr"],
            "si_norm": scale_invariant_norm(self._params),
            "effective_grad_norm": summary["effective_grad_norm"],
            "step_angle": summary["step_angle"],
            "epoch_angle": summary["epoch_angle"],
            "cosine_to_init": cosine_to_init(self._params, self._init),
            "tracked_steps": self._tracked,
            "sphere_step_seconds": self._step_seconds,
        }
        full_loss = full_acc = math.nan
        start = time.perf_counter()
        if self.full_train_every and (state.epoch + 1) % self.full_train_every == 0:
            full_loss, full_acc = evaluate(state.model, self._full_loader, train_mode=True)
        row.update(
            full_train_loss=full_loss,
            full_train_acc=full_acc,
            full_train_seconds=time.perf_counter() - start,
        )
        self._reset_timers()
        return row

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"init": self._init}

    def load_state_dict(self, state: dict) -> None:
        init = state.get("init")
        if init is not None:
            self._init = [t.clone() for t in init]


SPHERE_METRICS_EXTENSION = config_mod.Extension(
    "sphere_metrics",
    SphereMetricsCallback,
    "ELR, SI norm, effective gradient norm, step angle and the train-mode train loss per epoch "
    "(Kodryan et al. 2022)",
    internal=("params",),
)
