"""The one training loop of normlab: used by the CLI, the studies, the examples and the tests.

``train(config)`` builds data, model, optimizer, schedule and callbacks from a config (see
:mod:`normlab.config`), trains for ``epochs`` epochs with an evaluation after each, and keeps a run
directory (see :mod:`normlab.train.rundir`). It ends with a status:

* ``finished``: all epochs done;
* ``diverged``: the training loss became NaN or Inf (a result, not a crash: the run stops cleanly);
* ``interrupted``: Ctrl-C; a checkpoint of the exact position is written and ``resume=true``
  continues from it with the same numbers as an uninterrupted run (on CPU);
* ``failed``: any other exception; ``summary.json`` records it (``error``: type and message) and
  it propagates.

Ctrl-C takes effect between whole steps. A step is forward, backward, the per-step callbacks,
optimizer and scheduler steps and the loop's counters; a SIGINT that lands inside one would leave a
checkpoint that is neither before nor after it (for instance BatchNorm's ``num_batches_tracked``
one ahead of the step counter). So, for the duration of :func:`train` (main thread), a SIGINT
handler only records the request; the loop looks at it before each step, and stops there: exact
checkpoint, status ``interrupted``, ``KeyboardInterrupt``. A second Ctrl-C stops at once; the
checkpoint is then the last one written at a step boundary (writes are atomic, so never a torn
file). A callback that raises ``KeyboardInterrupt`` in a per-step hook asks for the same deferred
stop. Under torch.distributed the ranks would not stop at the same step, so there Ctrl-C is
immediate (and a checkpoint is written only if it landed between steps).
"""

from __future__ import annotations

import contextlib
import gc
import math
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config as config_mod
from ..data import Augment, InMemoryLoader, TensorDataset, load_dataset, prepare_dataset
from ..errors import ConfigError, config_errors
from ..models import build_model
from .callbacks import Callback, CallbackList
from .distributed import (
    DistributedInfo,
    all_reduce_sum,
    barrier,
    close_distributed,
    distributed_info,
    init_distributed,
    pick_device,
)
from .optimizers import BuildContext, build_optimizer
from .precision import Precision
from .rundir import RunDirectory, check_resume_config, run_path
from .schedules import build_scheduler

# then the rates (``lr``, or ``lr/GROUP`` / ``elr/GROUP`` per named group, see rate_columns),
# ``time``, ``images_per_s``, ``peak_memory_mb``, ``wnorm/GROUP`` and the extensions' columns
BASE_COLUMNS = ["epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc"]
DIVERGENCE_CHECK_EVERY = 32  # steps between reads of the loss on an accelerator


@dataclass
class TrainState:
    """Everything a callback may look at. ``model`` is the bare module (never the DDP wrapper)."""

    config: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: TensorDataset
    train_loader: InMemoryLoader
    test_loader: InMemoryLoader
    device: torch.device
    dist: DistributedInfo
    run_dir: RunDirectory | None
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    batch_in_epoch: int = 0  # batches of the current epoch done
    rows: list[dict] = field(default_factory=list)
    accum: list | None = None  # [loss sum, correct, count, seconds] of the epoch in progress
    forward_model: nn.Module | None = None  # the module that runs forward (DDP wrapper or model)
    # False while a step (or an epoch's end) is half done: no checkpoint can describe that moment.
    at_boundary: bool = True
    precision: Precision | None = None  # autocast and fp16 loss scaling (see train.precision)
    step_skipped: bool = False  # the last step was skipped by fp16 loss scaling (inf/NaN grads)

    def evaluate(self, loader: InMemoryLoader | None = None, train_mode: bool = False):
        """Mean loss and accuracy of the model over ``loader`` (the test set by default).

        ``train_mode=True`` evaluates with batch statistics (BatchNorm in train mode) without
        updating running statistics, as the sphere-regimes paper measures its training loss.
        """
        return evaluate(self.model, loader or self.test_loader, train_mode=train_mode)


@torch.no_grad()
def evaluate(model: nn.Module, loader: InMemoryLoader, train_mode: bool = False):
    was_training = model.training
    saved = None
    if train_mode:
        # Batch statistics without touching running statistics: save and restore the BN buffers.
        saved = {
            k: v.clone()
            for k, v in model.state_dict().items()
            if "running" in k or "num_batches" in k
        }
    model.train(train_mode)
    total_loss = torch.zeros((), dtype=torch.float64, device=loader.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.x.device)
    count = 0
    for x, y in loader:
        try:
            logits = model(x)
        except ValueError as exc:
            if train_mode and _is_single_value_error(exc):
                raise ConfigError(
                    f"a train-mode evaluation batch has {y.shape[0]} sample(s) "
                    f"({loader.x.shape[0]} samples in batches of {loader.batch_size}): "
                    "batch-norm layers need more than one value per channel; pick a batch size "
                    "that does not leave a last batch of one sample"
                ) from exc
            raise
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += y.shape[0]
    model.train(was_training)
    if saved:
        model.load_state_dict(saved, strict=False)
    if count == 0:
        return float("nan"), float("nan")
    return total_loss.item() / count, correct.item() / count


def train(
    config: dict | None = None,
    overrides=(),
    *,
    callbacks: list[Callback] = (),
    dataset: TensorDataset | None = None,
) -> dict:
    """Train one run and return its summary (the content of ``summary.json``).

    Args:
        config: a (partial) nested config dict; see :func:`normlab.config.resolve`.
        overrides: dotted ``key=value`` strings applied on top of ``config``.
        callbacks: extra :class:`Callback` objects (besides those the config's extensions build).
        dataset: use this dataset instead of loading ``config["data"]`` (preprocessing still applies).
    """
    cfg = config_mod.resolve(config, overrides)
    with _torch_settings(cfg), _DeferredInterrupt() as stop:
        return _train(cfg, callbacks, dataset, stop)


class _ImmediateInterrupt(KeyboardInterrupt):
    """A Ctrl-C that could not wait for the end of the step (a second one, or outside the loop)."""


class _DeferredInterrupt:
    """SIGINT handler for one run: while ``defer`` is on, the first Ctrl-C only sets ``requested``
    (the loop stops at the next step boundary); a second one, or any while ``defer`` is off,
    raises at once. Installed only in the main thread (the only one Python delivers signals to)
    and not when SIGINT is ignored (``nohup``, background jobs); the previous handler comes back
    on exit."""

    def __init__(self):
        self.requested = False
        self.defer = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous not in (signal.SIG_IGN, None):  # None: a handler set outside Python
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
                self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
        return False

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum, frame):
        if self.requested or not self.defer:
            raise _ImmediateInterrupt
        self.requested = True
        print(
            "\nnormlab: stopping after the current step (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


@contextlib.contextmanager
def _torch_settings(cfg: dict):
    """The run's thread count and deterministic mode, restored afterwards: a run started from a
    study, a notebook or a test leaves the caller's process as it found it."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: dict, callbacks, dataset: TensorDataset | None, stop) -> dict:
    info = distributed_info()
    device = pick_device(cfg["device"], info)
    owns_group = init_distributed(info, device)
    seed_everything(cfg["seed"])

    run_dir = RunDirectory(run_path(cfg["out"], config_mod.run_name(cfg)))
    # Each component's constructor checks its own arguments (ValueError, as in torch); those come
    # from the config, so they reach the user as a ConfigError naming the section to fix.
    with config_errors("data", "fix the data.* options; see `normlab list datasets`"):
        data = _prepare_data(cfg, dataset)
        train_loader, test_loader = _loaders(cfg, data, device, info)

    loaders = (train_loader, test_loader)
    state, cbs = _build(cfg, callbacks, data, loaders, device, info, run_dir)

    # One writer per run directory (only the main rank writes); every check of what is already
    # there happens under the lock, and nothing before this point has touched the directory (a
    # config refused while building leaves no trace). From here on, an exception is recorded.
    with run_dir.lock() if info.is_main else contextlib.nullcontext():
        # Every rank checks what is there (the same answer, the same error) before the main
        # rank writes anything: a rank that looked only after rank 0 had recorded "running"
        # would find the run "already existing" and stop (a race that failed DDP starts).
        _check_run_dir(run_dir, cfg, prepare=info.is_main)
        if info.enabled:
            barrier()
        started = False
        try:
            accum = _resume(state, cbs, run_dir)
            # From here the summary says how the run ended. `started` is set before "running"
            # is written: a Ctrl-C (or a dying study's SIGINT) that lands inside that write must
            # still leave "interrupted", never a "running" that nothing will ever update.
            started = True
            if info.is_main:
                run_dir.write_config(cfg)
                run_dir.write_summary(_summary(state, "running"))
            cbs.on_train_start(state)
            stop.defer = not info.enabled
            status = _run_epochs(state, cbs, accum, stop)
            summary = _summary(state, status)
            cbs.on_train_end(state, summary)
            if info.is_main:
                run_dir.write_summary(summary)
        except KeyboardInterrupt:
            if info.is_main and started:
                _write_interrupted(state, cbs)
            raise
        except Exception as exc:
            if info.is_main:
                run_dir.write_summary(_failed_summary(run_dir, state if started else None, exc))
            raise
    if stop.requested:
        # Ctrl-C during the last step or the last epoch's end: the run is complete and recorded
        # as such, but the caller (a study's loop, a script) still has to stop.
        raise KeyboardInterrupt
    if owns_group:
        del state, cbs  # DDP's reducer (held by state.forward_model) goes before its group
        gc.collect()
        close_distributed()
    return summary


def _build(cfg, callbacks, data: TensorDataset, loaders, device, info, run_dir: RunDirectory):
    """Model, optimizer, schedule and callbacks (nothing is written yet)."""
    train_loader, test_loader = loaders
    with config_errors("model", "fix the model.* options; see `normlab list models`"):
        model = build_model(
            cfg["model"]["name"],
            data.in_shape,
            data.num_classes,
            **{k: v for k, v in cfg["model"].items() if k != "name"},
        ).to(device)
    probe = (
        data.x_train[: min(256, len(data.x_train))].to(device),
        data.y_train[: min(256, len(data.y_train))].to(device),
    )
    with config_errors("optim", "fix the optim.* options; see `normlab list optimizers`"):
        optimizer = build_optimizer(
            model, cfg["optim"], BuildContext(probe, cfg, len(train_loader))
        )
    with config_errors("schedule", "fix the schedule.* options; see `normlab list schedules`"):
        scheduler = build_scheduler(optimizer, cfg["schedule"], len(train_loader), cfg["epochs"])
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)  # 4-D weights; others unchanged
    forward_model: nn.Module = model
    if info.enabled:
        forward_model = nn.parallel.DistributedDataParallel(model)
    if cfg["compile"]:
        # Training forwards run compiled; evaluation and callbacks use the bare module, whose
        # parameters the compiled one shares (checkpoints keep plain state_dict keys).
        forward_model = torch.compile(forward_model, backend=cfg["compile_backend"])

    state = TrainState(
        cfg,
        model,
        optimizer,
        scheduler,
        data,
        train_loader,
        test_loader,
        device,
        info,
        run_dir if info.is_main else None,
        forward_model=forward_model,
        precision=Precision(cfg["precision"], device),
    )
    extension_callbacks = []
    for name, ext in config_mod.extensions().items():
        if cfg.get(name) is not None:
            with config_errors(name, f"fix the {name}.* options; see `normlab list extensions`"):
                extension_callbacks.append(ext.build(state, cfg[name]))
    return state, CallbackList([*extension_callbacks, *callbacks])


def _resume(state: TrainState, cbs: CallbackList, run_dir: RunDirectory):
    """Restore the checkpoint's position (``resume=true`` and one exists; every rank does);
    returns the epoch accumulator of a run resumed mid-epoch, else None."""
    if state.config["resume"] and run_dir.checkpoint_path.exists():
        return _restore(state, cbs, run_dir.load_checkpoint(map_location=state.device))
    return None


def _write_interrupted(state: TrainState, cbs: CallbackList) -> None:
    """Checkpoint the position (if it is one: between steps) and record ``interrupted``.

    A Ctrl-C that lands here (or one mid-step) leaves the last checkpoint written at a boundary:
    the writes are atomic, so it is the previous file, whole. The summary is written in any case.
    """
    try:
        if state.at_boundary:
            _save_checkpoint(state, cbs, state.accum)
    finally:
        state.run_dir.write_summary(_summary(state, "interrupted"))


def _failed_summary(run_dir: RunDirectory, state: TrainState | None, exc: BaseException) -> dict:
    if state is not None:
        summary = _summary(state, "failed")
    else:  # failed while starting: keep what the directory said (a resumed run's progress)
        summary = {**(run_dir.read_summary() or {}), "status": "failed"}
        summary["run_dir"] = str(run_dir.path)
    summary["error"] = f"{type(exc).__name__}: {exc}"
    return summary


# ----------------------------------------------------------------------------------- internals
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_run_dir(run_dir: RunDirectory, cfg: dict, prepare: bool = True) -> None:
    """Refuse a run directory that exists unless resumed or overwritten; ``prepare`` (the main
    rank only) also clears what ``overwrite=true`` starts over."""
    if not run_dir.exists():
        return
    if cfg["resume"]:
        check_resume_config(run_dir, cfg)
        return
    if cfg["overwrite"]:
        if not prepare:
            return
        for path in (run_dir.checkpoint_path, run_dir.metrics_path, run_dir.summary_path):
            path.unlink(missing_ok=True)
        return
    raise ConfigError(
        f"run directory {run_dir.path} already exists; pass resume=true to continue it, "
        "overwrite=true to start it over, or name=NEW for a new run"
    )


def _prepare_data(cfg: dict, dataset: TensorDataset | None) -> TensorDataset:
    d = cfg["data"]
    raw = dataset if dataset is not None else load_dataset(d["name"], d["root"], d)
    return prepare_dataset(
        raw,
        resize=d["resize"],
        standardize=d["standardize"],
        train_limit=d["train_limit"],
        test_limit=d["test_limit"],
    )


def _loaders(cfg, data: TensorDataset, device, info: DistributedInfo):
    d = cfg["data"]
    augment = Augment(d["crop_padding"], d["padding_mode"], d["flip"])
    train_loader = InMemoryLoader(
        data.x_train,
        data.y_train,
        cfg["batch_size"],
        shuffle=True,
        drop_last=d["drop_last"],
        seed=cfg["seed"],
        augment=augment,
        device=device,
        rank=info.rank,
        world_size=info.world_size,
    )
    test_loader = InMemoryLoader(data.x_test, data.y_test, cfg["eval_batch_size"], device=device)
    if len(train_loader) == 0:
        raise ConfigError(
            f"batch_size {cfg['batch_size']} with drop_last leaves no batch of the "
            f"{len(data.x_train)} training samples"
        )
    return train_loader, test_loader


def _run_epochs(state: TrainState, cbs: CallbackList, accum, stop) -> str:
    cfg = state.config
    progress = cfg["progress"] and state.dist.is_main
    loss_fn = F.cross_entropy
    model, optimizer, scheduler = state.forward_model, state.optimizer, state.scheduler
    before_step, step_end = cbs.before_step, cbs.step_end
    precision = state.precision
    channels_last = cfg["channels_last"]
    # Reading the loss back (to stop a diverged run at once) costs nothing on a CPU but stalls an
    # accelerator's queue; there it is checked every DIVERGENCE_CHECK_EVERY steps instead.
    check_every = 1 if state.device.type == "cpu" else DIVERGENCE_CHECK_EVERY
    last_checkpoint = time.monotonic()
    while state.epoch < cfg["epochs"]:
        epoch_start = time.perf_counter()
        loader = state.train_loader
        loader.set_epoch(state.epoch)
        # accum = [loss sum, correct, count, seconds] of the epoch so far (kept for resuming).
        state.accum = accum if accum is not None else [0.0, 0, 0, 0.0]
        accum = None
        skip = state.batch_in_epoch
        bar = _progress_bar(progress, len(loader), state, skip)
        state.model.train()
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue  # resuming mid-epoch: these batches were trained on before the stop
            if stop.requested:  # Ctrl-C: here, between two steps, the checkpoint is exact
                state.accum[3] += time.perf_counter() - epoch_start
                if bar is not None:
                    bar.close()
                raise KeyboardInterrupt
            state.at_boundary = False
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                with precision.autocast():
                    logits = model(x)
                    loss = loss_fn(logits, y)
            except ValueError as exc:
                if _is_single_value_error(exc):
                    raise _single_sample_batch_error(state, i, y.shape[0], exc) from exc
                raise
            loss_sum = loss.detach().double() * y.shape[0]
            if (state.step + 1) % check_every == 0 or i + 1 == len(loader):
                # the epoch's running sum: a NaN or Inf since the last check shows in it
                if not math.isfinite(float(state.accum[0] + loss_sum)):
                    state.accum[0] += loss_sum
                    state.accum[2] += y.shape[0]
                    _record_epoch(state, cbs, epoch_start, diverged=True)
                    if bar is not None:
                        bar.close()
                    return "diverged"
            optimizer.zero_grad(set_to_none=True)
            if state.dist.enabled:
                # DDP averages gradients over ranks; weighting each rank's mean loss by its share
                # of the global batch makes that average the global-batch mean, also for an uneven
                # last batch.
                precision.backward(
                    loss * (state.dist.world_size * y.shape[0] / loader.global_batch_size(i))
                )
            else:
                precision.backward(loss)
            for c in before_step:
                try:
                    c.on_before_step(state)
                except _ImmediateInterrupt:
                    raise
                except KeyboardInterrupt:  # a callback asks to stop: after this step
                    stop.request()
            state.step_skipped = not precision.step(optimizer)
            scheduler.step()
            state.step += 1
            state.batch_in_epoch = i + 1
            acc = state.accum
            acc[0] += loss_sum  # a tensor: no host sync per step
            acc[1] += (logits.argmax(1) == y).sum()  # a tensor: no host sync per step
            acc[2] += y.shape[0]
            for c in step_end:
                try:
                    c.on_step_end(state, loss)
                except _ImmediateInterrupt:
                    raise
                except KeyboardInterrupt:
                    stop.request()
            state.at_boundary = True
            if bar is not None:
                bar.update(1)
                if (i + 1) % 10 == 0 or i + 1 == len(loader):
                    bar.set_postfix(loss=f"{acc[0] / acc[2]:.4f}", acc=f"{acc[1] / acc[2]:.3f}")
        if bar is not None:
            bar.close()
        state.accum[3] += time.perf_counter() - epoch_start
        state.at_boundary = False
        row = _record_epoch(state, cbs, None, diverged=False)
        state.at_boundary = True
        if progress:
            _print_row(row, cfg["epochs"])
        if state.run_dir is not None and cfg["checkpoint"]:
            # Checkpoints cost a full copy of model and optimizer state: on short epochs write one
            # every checkpoint_interval seconds (a crash loses at most that much), and always at
            # the end; Ctrl-C writes its own.
            now = time.monotonic()
            last_epoch = state.epoch >= cfg["epochs"]
            if last_epoch or now - last_checkpoint >= cfg["checkpoint_interval"]:
                _save_checkpoint(state, cbs, None)
                last_checkpoint = now
    return "finished"


def _record_epoch(state: TrainState, cbs: CallbackList, epoch_start, diverged: bool) -> dict:
    loss_sum, correct, count, seconds = state.accum
    if epoch_start is not None:
        seconds += time.perf_counter() - epoch_start
    totals = all_reduce_sum(
        torch.tensor([float(loss_sum), float(correct), float(count)], dtype=torch.float64),
        state.dist,
    )
    loss_sum, correct, count = totals.tolist()
    row = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": loss_sum / count if count else float("nan"),
        "train_acc": correct / count if count else float("nan"),
    }
    if diverged:
        row["test_loss"], row["test_acc"] = float("nan"), float("nan")
    else:
        row["test_loss"], row["test_acc"] = state.evaluate()
    groups = state.optimizer.param_groups
    row.update(rate_columns(groups))
    row["time"] = seconds
    row["images_per_s"] = count / seconds if seconds > 0 else float("nan")
    row["peak_memory_mb"] = peak_memory_mb(state.device)
    names = [g.get("name", f"g{i}") for i, g in enumerate(groups)]
    with torch.no_grad():
        for name, group in zip(names, groups):
            params = [p for p in group["params"]]
            norm = (
                torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params)) if params else 0.0
            )
            row[f"wnorm/{name}"] = float(norm)
    if not diverged:
        row.update(cbs.on_epoch_end(state))
    state.rows.append(row)
    state.epoch += 1
    state.batch_in_epoch = 0
    state.accum = None  # the next epoch starts from zero (a checkpoint now must not carry these)
    if state.run_dir is not None:
        state.run_dir.write_metrics(state.rows)
    return row


def rate_columns(groups: list[dict]) -> dict[str, float]:
    """The step sizes of the optimizer's groups, each column named by its group and its kind:
    ``lr/euclidean``, ``lr/grassmann``, ``elr/si`` (a group that sets an effective learning rate
    reports it, not the ``lr`` it implies). A single plain group is the bare ``lr``."""

    def sets_elr(group: dict) -> bool:  # torch copies defaults into every group: ask the group
        return "elr" in group and group.get("scale_invariant", True) is not False

    if len(groups) == 1 and not sets_elr(groups[0]):
        return {"lr": groups[0].get("lr", float("nan"))}
    columns = {}
    for i, group in enumerate(groups):
        kind = "elr" if sets_elr(group) else "lr"
        columns[f"{kind}/{group.get('name', f'g{i}')}"] = group.get(kind, float("nan"))
    return columns


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the run so far: allocated on a CUDA device, the process's resident set on
    a CPU (Linux reports ``ru_maxrss`` in KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):  # not on this platform
        return float("nan")


def _is_single_value_error(exc: ValueError) -> bool:
    # torch's BatchNorm, normlab's BatchRenorm* and the synced norms all raise this message.
    return "Expected more than 1 value per channel" in str(exc)


def _single_sample_batch_error(state: TrainState, index: int, size: int, exc) -> ConfigError:
    cfg, loader = state.config, state.train_loader
    n = len(state.dataset.x_train)
    ranks = f", {state.dist.world_size} ranks" if state.dist.enabled else ""
    # torch's own words stay at the end: tools (the batch_size study) recognize the case by them
    if loader.global_batch_size(index) < loader.batch_size:  # the short last batch
        return ConfigError(
            f"the last batch of each epoch has {size} sample(s) ({n} training samples, "
            f"batch_size={cfg['batch_size']}{ranks}), and the model's batch-norm layers need "
            "more than one value per channel in training; set data.drop_last=true to drop the "
            f"short last batch, or pick a batch_size that does not leave one sample over ({exc})"
        )
    return ConfigError(
        f"a batch of {size} sample(s) (batch_size={cfg['batch_size']}{ranks}) gives the model's "
        "batch-norm layers one value per channel; use batch_size of at least 2, or a norm that "
        f"works per sample (model.norm=gn or ln) ({exc})"
    )


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save_checkpoint(state: TrainState, cbs: CallbackList, accum) -> None:
    state.run_dir.save_checkpoint(
        {
            "model": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "callbacks": cbs.state_dict(),
            "precision": state.precision.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "batch_in_epoch": state.batch_in_epoch,
            "accum": accum,
            "rows": state.rows,
            "rng": _rng_state(),
            "config": state.config,
        }
    )


def _restore(state: TrainState, cbs: CallbackList, ckpt: dict):
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    cbs.load_state_dict(ckpt.get("callbacks", {}))
    state.precision.load_state_dict(ckpt.get("precision", {}))
    state.epoch, state.step = ckpt["epoch"], ckpt["step"]
    state.batch_in_epoch = ckpt["batch_in_epoch"]
    state.rows = list(ckpt["rows"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ckpt.get("accum")


def _summary(state: TrainState, status: str) -> dict:
    last = state.rows[-1] if state.rows else {}
    test_accs = [r["test_acc"] for r in state.rows if _finite(r.get("test_acc"))]
    return {
        "status": status,
        "epochs_completed": state.epoch,
        "epochs": state.config["epochs"],
        "steps": state.step,
        "final": last,
        "best_test_acc": max(test_accs) if test_accs else None,
        "images_per_s": _mean([r.get("images_per_s") for r in state.rows]),
        "peak_memory_mb": max(
            (r["peak_memory_mb"] for r in state.rows if _finite(r.get("peak_memory_mb"))),
            default=None,
        ),
        "run_dir": str(state.run_dir.path) if state.run_dir else None,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": str(state.device),
            "threads": torch.get_num_threads(),
            "world_size": state.dist.world_size,
        },
    }


def _finite(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x)


def _mean(values) -> float | None:
    finite = [v for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else None


def _progress_bar(enabled: bool, total: int, state: TrainState, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {state.epoch + 1}/{state.config['epochs']}",
        leave=False,
        dynamic_ncols=True,
    )


def _print_row(row: dict, epochs: int) -> None:
    from tqdm.auto import tqdm

    tqdm.write(
        f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_acc']:5.1f}%  test loss {row['test_loss']:.4f} "
        f"acc {100 * row['test_acc']:5.1f}%  {_first_rate(row)}  {row['time']:.1f}s"
    )


def _first_rate(row: dict) -> str:
    for key, value in row.items():
        if key == "lr" or key.startswith(("lr/", "elr/")):
            return f"{key} {value:.3g}"
    return ""
