"""The GPU check: everything a CUDA machine must show before a paper-scale run, in one table.

Run it on the machine you will train on (about 5 minutes on one GPU)::

    python benchmarks/gpu_check.py                 # or: make gpu-check
    python benchmarks/gpu_check.py --device cpu --quick   # the same checks, small, on a CPU

It checks, on the device:

1. each optimizer's fast path against its readable reference path (SGD-G and Adam-G with and
   without the orthogonality term, SphereSGD), 20 steps in float32 and in bfloat16;
2. batch renormalization against BatchNorm (r_max = 1, d_max = 0 make them equal) and the synced
   norms against the plain ones in a single process, forward and backward;
3. one epoch of each study's setting with ``precision=bf16 compile=true`` (the paper-scale models
   on synthetic data of the paper's shapes: no dataset files needed), which must finish with a
   finite loss; throughput in images/s;
4. the optimizer-step ratios of ``benchmarks/bench_optim.py`` (normlab against torch), timed with
   device synchronisation.

Each line says ``ok`` or ``FAIL``; the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_optim beside this file

ROWS: list[tuple[str, str, str]] = []  # (check, result, status)


def record(check: str, result: str, ok: bool) -> None:
    ROWS.append((check, result, "ok" if ok else "FAIL"))
    print(f"{'ok  ' if ok else 'FAIL'} {check}: {result}", flush=True)


@contextlib.contextmanager
def guarded(check: str):
    try:
        yield
    except Exception as exc:  # one broken check must not hide the others
        record(check, f"{type(exc).__name__}: {exc}"[:200], False)


# ------------------------------------------------------------------------------ 1. optimizers
def optimizer_cases():
    from normlab.optim import SGDG, AdamG, SphereSGD

    def rows(params):
        return [{"params": params, "grassmann": True, "lr": 0.2, "momentum": 0.9}]

    return {
        "SGDG omega 0": lambda ps, **impl: SGDG(rows(ps), lr=0.2, omega=0.0, grad_clip=0.1, **impl),
        "SGDG omega 0.1": lambda ps, **impl: SGDG(
            rows(ps), lr=0.2, omega=0.1, grad_clip=0.1, **impl
        ),
        "AdamG omega 0.1": lambda ps, **impl: AdamG(
            [{"params": ps, "grassmann": True}], lr=0.05, omega=0.1, **impl
        ),
        "SphereSGD global": lambda ps, **impl: SphereSGD(ps, elr=0.01, momentum=0.9, **impl),
    }


#: the implementations checked against the reference (``foreach=False``): the fast eager path,
#: and the compiled ``fused=True`` step (skipped by ``--quick`` on a CPU: each compile costs
#: seconds there, and tests/test_optim_fused.py covers it)
IMPLS = {"fast": {"foreach": None}, "fused": {"fused": True}}


def check_optimizers(device: torch.device, steps: int, impls=tuple(IMPLS)) -> None:
    shapes = [(64, 3, 3, 3), (128, 64, 3, 3), (256, 128), (10, 256)]
    for dtype, impl in itertools.product((torch.float32, torch.bfloat16), impls):
        tol = 1e-5 if dtype is torch.float32 else 1e-2  # relative to the largest weight
        for name, make in optimizer_cases().items():
            check = f"{name} {impl} == reference ({str(dtype).split('.')[-1]}, {steps} steps)"
            with guarded(check):
                gen = torch.Generator().manual_seed(0)
                init = [torch.randn(s, generator=gen) for s in shapes]
                grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
                finals, opts = [], []
                for kwargs in (IMPLS[impl], {"foreach": False}):
                    ps = [nn.Parameter(w.to(device, dtype, copy=True)) for w in init]  # own memory
                    opts.append(make(ps, **kwargs))
                    for g in grads:
                        for p, gi in zip(ps, g):
                            p.grad = gi.to(device, dtype)
                        opts[-1].step()
                    finals.append([p.detach().float().cpu() for p in ps])
                scale = max(b.abs().max().item() for b in finals[1])
                diff = max((a - b).abs().max().item() for a, b in zip(*finals)) / scale
                text = f"max |diff| / max |w| {diff:.2e} (tol {tol:g})"
                compiled = impl != "fused" or opts[0].fused_compiles > 0
                if not compiled:  # the eager fallback ran: say so, it is not what was asked
                    text += f"; did not compile: {opts[0]._fused_step.unavailable}"
                record(check, text, diff <= tol and compiled)


# ---------------------------------------------------------------------------------- 2. norms
def check_norms(device: torch.device) -> None:
    from normlab.nn import BatchRenorm2d
    from normlab.nn.sync import SyncBatchNorm, SyncBatchRenorm

    x = torch.randn(32, 16, 8, 8, device=device, requires_grad=True)
    cases = {
        "BatchRenorm2d (r_max 1, d_max 0) == BatchNorm2d": (
            BatchRenorm2d(16, r_max=1.0, d_max=0.0, schedule="constant"),
            nn.BatchNorm2d(16),
        ),
        "SyncBatchNorm (1 process) == BatchNorm2d": (SyncBatchNorm(16), nn.BatchNorm2d(16)),
        "SyncBatchRenorm (1 process) == BatchRenorm2d": (
            SyncBatchRenorm(16, r_max=1.0, d_max=0.0, schedule="constant"),
            BatchRenorm2d(16, r_max=1.0, d_max=0.0, schedule="constant"),
        ),
    }
    for check, (ours, ref) in cases.items():
        with guarded(check):
            ours, ref = ours.to(device).train(), ref.to(device).train()
            outs, grads = [], []
            for layer in (ours, ref):
                x.grad = None
                y = layer(x)
                (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
                outs.append(y.detach())
                grads.append(x.grad.detach().clone())
            diff = max((outs[0] - outs[1]).abs().max().item(), (grads[0] - grads[1]).abs().max())
            diff = float(diff)
            record(check, f"max |diff| forward/backward {diff:.2e}", diff <= 1e-4)


# ------------------------------------------------------------------------------- 3. studies
def study_configs(quick: bool) -> dict[str, dict]:
    """One paper-scale setting per study (quick: the same models, much smaller)."""
    vgg = {"name": "vgg", "depth": 13, "fc_layers": 2, "norm_scale": False}
    if quick:
        vgg["width_multiplier"] = 0.125
        vgg["fc_width"] = 32
    return {
        "riemannian_bn (VGG-13, SGD-G)": {
            "shape": (3, 32, 32),
            "model": vgg,
            "optim": {"name": "sgdg"},
        },
        "enorm (FC-15 + ENorm)": {
            "shape": (3, 32, 32),
            "model": {"name": "fully_connected", "width": 64 if quick else 500},
            "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
            "enorm": {"c": 1.2},
        },
        "sphere_regimes (ConvNetSI, SphereSGD)": {
            "shape": (3, 32, 32),
            "model": {"name": "convnet_si", "c": 8 if quick else 32},
            "optim": {"name": "sphere", "elr": 1e-3},
            "sphere_metrics": {"every": 10},
        },
        "batch_size (LeNet + GN, batch 16)": {
            "shape": (1, 28, 28),
            "model": {"name": "lenet", "norm": "gn", "norm_kwargs": {"num_groups": 2}},
            "optim": {"name": "sgd", "lr": 0.01},
            "batch_size": 16,
        },
    }


def check_studies(device: torch.device, quick: bool, out: Path, backend: str) -> None:
    from normlab.data import TensorDataset
    from normlab.train import train

    n_train, n_test = (512, 128) if quick else (8192, 1024)
    for label, spec in study_configs(quick).items():
        check = f"one epoch, precision=bf16 compile=true: {label}"
        with guarded(check):
            spec = dict(spec)
            shape = spec.pop("shape")
            gen = torch.Generator().manual_seed(0)
            data = TensorDataset(
                "synthetic",
                torch.randn(n_train, *shape, generator=gen),
                torch.randint(0, 10, (n_train,), generator=gen),
                torch.randn(n_test, *shape, generator=gen),
                torch.randint(0, 10, (n_test,), generator=gen),
                10,
            )
            config = {
                "epochs": 1,
                "batch_size": 128,
                "device": str(device),
                "precision": "bf16",
                "compile": True,
                "compile_backend": backend,
                "progress": False,
                "checkpoint": False,
                "out": str(out),
                "name": label.split()[0],
                "overwrite": True,
                **spec,
            }
            start = time.perf_counter()
            summary = train(config, dataset=data)
            seconds = time.perf_counter() - start
            loss = summary["final"].get("train_loss")
            ok = summary["status"] == "finished" and loss is not None and loss == loss
            record(
                check,
                f"{summary['status']}, train loss {loss:.3f}, "
                f"{summary['images_per_s']:.0f} images/s, {seconds:.1f} s with compilation",
                ok,
            )


# -------------------------------------------------------------------------------- 4. speed
def check_speed(device: torch.device, rounds: int, fused: bool) -> None:
    from bench_optim import MODELS, ParamSet, _paper_groups
    from normlab.optim import SGDG, AdamG, SphereSGD

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for model in MODELS:
        with guarded(f"step ratios on {model}"):
            pset = ParamSet(MODELS[model](), 0)

            def fresh(pset=pset):
                ps = [nn.Parameter(p.detach().to(device)) for p in pset.params]
                for p, g in zip(ps, pset.grads):
                    p.grad = g.to(device)
                return ps

            def sphere_opt(ps, pset=pset, fused=None):
                sphere, decay, no_decay = pset.split(ps)
                return SphereSGD(
                    [
                        {"params": sphere, "elr": 1e-3},
                        {"params": decay + no_decay, "scale_invariant": False, "lr": 0.01},
                    ],
                    fused=fused,
                )

            cases = {
                "torch SGD": lambda ps: torch.optim.SGD(
                    ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
                ),
                "SGDG omega 0": lambda ps, pset=pset: SGDG(_paper_groups(ps, pset, 0.2, omega=0)),
                "SGDG omega 0 fused": lambda ps, pset=pset: SGDG(
                    _paper_groups(ps, pset, 0.2, omega=0), fused=True
                ),
                "torch Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4),
                "AdamG omega 0": lambda ps, pset=pset: AdamG(_paper_groups(ps, pset, 0.05)),
                "AdamG omega 0 fused": lambda ps, pset=pset: AdamG(
                    _paper_groups(ps, pset, 0.05), fused=True
                ),
                "torch SGD (wd)": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=5e-4),
                "SphereSGD": sphere_opt,
                "SphereSGD fused": lambda ps, pset=pset: sphere_opt(ps, pset, fused=True),
            }
            if not fused:
                cases = {k: v for k, v in cases.items() if not k.endswith("fused")}
            built = {name: make(fresh()) for name, make in cases.items()}
            times = {name: [] for name in built}
            for r in range(rounds + 3):
                for name, opt in built.items():
                    sync()
                    t0 = time.perf_counter()
                    opt.step()
                    sync()
                    if r >= 3:  # warm-up rounds untimed
                        times[name].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            pairs = [
                ("SGDG omega 0", "torch SGD"),
                ("SGDG omega 0 fused", "torch SGD"),
                ("AdamG omega 0", "torch Adam"),
                ("AdamG omega 0 fused", "torch Adam"),
                ("SphereSGD", "torch SGD (wd)"),
                ("SphereSGD fused", "torch SGD (wd)"),
            ]
            text = ", ".join(f"{a} {med[a] / med[b]:.2f}x {b}" for a, b in pairs if a in med)
            record(f"step ratios on {model}", text, True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes: checks that it runs")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor "
                    "on CUDA, aot_eager on CPU, which compiles in seconds)")  # fmt: skip
    ap.add_argument("--out", default="gpu_check_runs", help="folder for the check runs")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --quick to check the script")
        return 2
    backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}, compile backend {backend}")
    # a CPU --quick run (the test's) skips the compiled steps: minutes of compiling there
    compiled = device.type == "cuda" or not args.quick
    check_optimizers(device, steps=5 if args.quick else 20, impls=tuple(IMPLS)[: 1 + compiled])
    check_norms(device)
    check_studies(device, args.quick, Path(args.out), backend)
    check_speed(device, rounds=3 if args.quick else 30, fused=compiled)
    width = max(len(c) for c, _, _ in ROWS)
    print("\n| check | result | status |\n|---|---|---|")
    for check, result, status in ROWS:
        print(f"| {check:<{width}} | {result} | {status} |")
    failed = sum(status == "FAIL" for _, _, status in ROWS)
    print(f"\n{len(ROWS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
