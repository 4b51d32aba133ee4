"""Normalization layers side by side: BatchRenorm2d and GroupNorm vs torch.nn.BatchNorm2d.

Each round times one step of every variant in a freshly shuffled order (all variants see the same
background load); the figure reported is the median over rounds of the per-round ratio
time(variant) / time(BatchNorm2d), with the interquartile range, plus median milliseconds.

Cases (input (64, 64, 32, 32) float32 by default):
  train: forward + backward in training mode (targets: BatchRenorm2d <= 1.3x BatchNorm2d);
  eval:  forward under no_grad in eval mode (target: BatchRenorm2d <= 1.05x).

Usage: python benchmarks/bench_norm.py [--quick] [--rounds N] [--threads T] [--channels-last]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch
from torch import nn

from normlab.nn.batch_renorm import BatchRenorm2d, batch_renorm_reference


class ReferenceBatchRenorm2d(BatchRenorm2d):
    """The literal autograd Algorithm 1 (normlab's reference path), for scale."""

    def _train_forward(self, input, r_max, d_max, momentum):
        return batch_renorm_reference(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
            r_max,
            d_max,
            self.running_stats,
        )


def make_layers(channels: int, groups: int, with_reference: bool) -> dict[str, nn.Module]:
    # r_max = 3, d_max = 5 from the first step: the renorm correction is active (worst case).
    renorm = dict(schedule="constant", r_max=3.0, d_max=5.0)
    layers = {
        "BatchNorm2d": nn.BatchNorm2d(channels),
        "BatchRenorm2d": BatchRenorm2d(channels, **renorm),
        f"GroupNorm({groups})": nn.GroupNorm(groups, channels),
    }
    if with_reference:
        layers["BatchRenorm2d reference"] = ReferenceBatchRenorm2d(channels, **renorm)
    return layers


def time_train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x.grad = None
    start = time.perf_counter()
    layer(x).backward(grad)
    return time.perf_counter() - start


@torch.no_grad()
def time_eval_step(layer: nn.Module, x: torch.Tensor, _grad: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x)
    return time.perf_counter() - start


def run_case(layers, step, x, grad, rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    names = list(layers)
    for _ in range(warmup):
        for name in names:
            step(layers[name], x, grad)
    times = {name: [] for name in names}
    ratios = {name: [] for name in names}
    for _ in range(rounds):
        order = names[:]
        random.shuffle(order)
        this_round = {name: step(layers[name], x, grad) for name in order}
        for name in names:
            times[name].append(this_round[name])
            ratios[name].append(this_round[name] / this_round["BatchNorm2d"])
    summary = {}
    for name in names:
        q = statistics.quantiles(ratios[name], n=4) if rounds >= 2 else [ratios[name][0]] * 3
        summary[name] = {
            "ms": 1e3 * statistics.median(times[name]),
            "ratio": statistics.median(ratios[name]),
            "q1": q[0],
            "q3": q[2],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, to check it runs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 64, 32, 32])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference path")
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 60)
    warmup = 2 if args.quick else 5
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)

    x = torch.randn(*args.shape)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    layers = make_layers(args.shape[1], args.groups, with_reference=not args.no_reference)

    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"threads={torch.get_num_threads()}, input {tuple(x.shape)} float32"
        f"{' channels_last' if args.channels_last else ''}, rounds={rounds}"
        f"{' (QUICK: noisy)' if args.quick else ''}"
    )
    for case, step, mode in (
        ("train fwd+bwd", time_train_step, True),
        ("eval fwd", time_eval_step, False),
    ):
        for layer in layers.values():
            layer.train(mode)
        xin = x.detach().requires_grad_(mode)
        summary = run_case(layers, step, xin, grad, rounds, warmup)
        print(f"\n{case}")
        print(f"  {'layer':<26}{'median ms':>10}{'x BatchNorm2d':>15}{'IQR':>16}")
        for name, s in summary.items():
            iqr = f"[{s['q1']:.2f}, {s['q3']:.2f}]"
            print(f"  {name:<26}{s['ms']:>10.2f}{s['ratio']:>15.2f}{iqr:>16}")


if __name__ == "__main__":
    main()
