"""SphereSGD step time relative to ``torch.optim.SGD(weight_decay=5e-4)``, and the metric tracker's cost.

Parameter sets: the tensor shapes of WRN-16-4 and PreAct ResNet-18 for CIFAR-10 (built here from
their layer lists, no model). SI set = all conv weights; the rest (BN gamma/beta, the head) is the
non-SI set.

Cases (each a ratio ``candidate / baseline``, measured interleaved in one process: in every round
each optimizer runs ``--steps`` steps, the ratio of the two times is taken, and the median over
``--rounds`` rounds is reported):

* ``si/<granularity>``: SphereSGD on the SI set vs SGD(wd=5e-4) on the same tensors.
* ``full/global``: SphereSGD (SI set on one sphere + the rest as a plain-SGD group with wd 5e-4)
  vs SGD(wd=5e-4) on all parameters.
* baselines: torch's default SGD (the for-loop on CPU) and SGD(foreach=True) (torch's multi-tensor
  path, the like-for-like comparison for SphereSGD's fast path).
* ``tracker``: ``SphereMetricsTracker.before_step + after_step`` time relative to a SphereSGD
  (global) step, on the SI set.

Gradients are fixed random tensors (the step cost does not depend on their values).

Usage: ``python benchmarks/bench_sphere.py [--quick] [--threads N] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from normlab.optim import SphereSGD
from normlab.sphere_metrics import SphereMetricsTracker

Shapes = tuple[list[tuple[int, ...]], list[tuple[int, ...]]]  # (SI shapes, other shapes)


def _preact_block(si, other, cin: int, cout: int, stride: int) -> None:
    other += [(cin,), (cin,)]  # bn1 gamma, beta
    si.append((cout, cin, 3, 3))  # conv1
    other += [(cout,), (cout,)]  # bn2
    si.append((cout, cout, 3, 3))  # conv2
    if stride != 1 or cin != cout:
        si.append((cout, cin, 1, 1))  # shortcut


def wrn_16_4_shapes(num_classes: int = 10) -> Shapes:
    """WRN-16-4: stem 16, three groups of 2 pre-activation blocks, widths 64/128/256."""
    si: list[tuple[int, ...]] = [(16, 3, 3, 3)]
    other: list[tuple[int, ...]] = []
    cin = 16
    for width, stride in ((64, 1), (128, 2), (256, 2)):
        for b in range(2):
            _preact_block(si, other, cin, width, stride if b == 0 else 1)
            cin = width
    other += [(cin,), (cin,), (num_classes, cin), (num_classes,)]
    return si, other


def resnet18_shapes(num_classes: int = 10) -> Shapes:
    """PreAct ResNet-18: stem 64, four stages of 2 blocks, widths 64/128/256/512."""
    si: list[tuple[int, ...]] = [(64, 3, 3, 3)]
    other: list[tuple[int, ...]] = []
    cin = 64
    for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for b in range(2):
            _preact_block(si, other, cin, width, stride if b == 0 else 1)
            cin = width
    other += [(cin,), (cin,), (num_classes, cin), (num_classes,)]
    return si, other


def _params(shapes, device, seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device))
        p.grad = torch.randn(shape, generator=gen).to(device) * 1e-2
        params.append(p)
    return params


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], steps: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _interleaved(
    candidate: Callable[[], None],
    baseline: Callable[[], None],
    rounds: int,
    steps: int,
    device: str,
) -> tuple[float, float, float]:
    """Median ratio and median per-step times (seconds) of candidate and baseline."""
    for _ in range(2):  # warm-up (lazy state, allocator)
        candidate()
        baseline()
    ratios, cand, base = [], [], []
    for r in range(rounds):
        # alternate the order so neither side always runs first in a round
        if r % 2:
            tb = _time(baseline, steps, device)
            tc = _time(candidate, steps, device)
        else:
            tc = _time(candidate, steps, device)
            tb = _time(baseline, steps, device)
        ratios.append(tc / tb)
        cand.append(tc)
        base.append(tb)
    return statistics.median(ratios), statistics.median(cand), statistics.median(base)


def run(args) -> list[dict]:
    device = args.device
    results = []
    for name, shapes in (("WRN-16-4", wrn_16_4_shapes()), ("ResNet-18", resnet18_shapes())):
        si_shapes, other_shapes = shapes
        numel = sum(torch.Size(s).numel() for s in si_shapes + other_shapes)
        print(
            f"\n{name}: {len(si_shapes)} SI tensors + {len(other_shapes)} others, {numel:,} params"
        )

        def baselines(params):
            return {
                "SGD": torch.optim.SGD(params, lr=0.1, weight_decay=5e-4),
                "SGD foreach": torch.optim.SGD(params, lr=0.1, weight_decay=5e-4, foreach=True),
            }

        cases = []
        for gran in ("global", "tensor", "row"):
            for fused in (None, True):
                sphere_params = _params(si_shapes, device, 0)
                sphere = SphereSGD(sphere_params, elr=1e-3, granularity=gran, fused=fused)
                label = f"si/{gran}" + (" fused" if fused else "")
                cases.append((label, sphere, baselines(_params(si_shapes, device, 0))))
        full_si, full_other = _params(si_shapes, device, 0), _params(other_shapes, device, 1)
        full = SphereSGD(
            [
                {"params": full_si},
                {"params": full_other, "scale_invariant": False, "lr": 0.1, "weight_decay": 5e-4},
            ],
            elr=1e-3,
        )
        all_params = _params(si_shapes, device, 0) + _params(other_shapes, device, 1)
        cases.append(("full/global", full, baselines(all_params)))
        fused_si, fused_other = _params(si_shapes, device, 0), _params(other_shapes, device, 1)
        full_fused = SphereSGD(
            [
                {"params": fused_si},
                {"params": fused_other, "scale_invariant": False, "lr": 0.1, "weight_decay": 5e-4},
            ],
            elr=1e-3,
            fused=True,
        )
        all_params = _params(si_shapes, device, 0) + _params(other_shapes, device, 1)
        cases.append(("full/global fused", full_fused, baselines(all_params)))

        for label, sphere, bases in cases:
            for base_name, base in bases.items():
                ratio, tc, tb = _interleaved(
                    sphere.step, base.step, args.rounds, args.steps, device
                )
                row = dict(
                    model=name,
                    case=label,
                    baseline=base_name,
                    ratio=ratio,
                    us=tc * 1e6,
                    base_us=tb * 1e6,
                )
                results.append(row)
                print(
                    f"  {label:18s} vs {base_name:12s}: {ratio:5.2f}x  "
                    f"({tc * 1e6:8.0f} us vs {tb * 1e6:8.0f} us)"
                )
        for label, sphere, _ in cases:
            if sphere.fused_compiles:
                print(
                    f"  compile: {label}: {sphere.fused_compiles} graph(s), "
                    f"{sphere.fused_compile_seconds:.1f} s (once, in the warm-up), "
                    f"{sphere.fused_form}"
                )

        # tracker overhead relative to one global SphereSGD step on the SI set
        params = _params(si_shapes, device, 0)
        opt = SphereSGD(params, elr=1e-3)
        tracker = SphereMetricsTracker()
        grads = [p.grad for p in params]

        def tracked(tracker=tracker, params=params, grads=grads):
            tracker.before_step(params)
            tracker.after_step(params, grads, elr=1e-3)

        ratio, tc, tb = _interleaved(tracked, opt.step, args.rounds, args.steps, device)
        tracker.epoch_summary()
        results.append(
            dict(
                model=name,
                case="tracker",
                baseline="SphereSGD global",
                ratio=ratio,
                us=tc * 1e6,
                base_us=tb * 1e6,
            )
        )
        print(
            f"  tracker (before+after_step) vs SphereSGD step: {ratio:5.2f}x "
            f"({tc * 1e6:8.0f} us vs {tb * 1e6:8.0f} us)"
        )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds: checks that it works")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps"
    )
    return run(args)


if __name__ == "__main__":
    main()
