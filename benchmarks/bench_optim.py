"""Step-time ratios of SGD-G / Adam-G against torch.optim and peer libraries.

One ``optimizer.step()`` is timed on the parameter sets of WRN-16-4 (pre-activation WRN, as in
the authors' PyTorch code) and ResNet-18 (ImageNet layout), with fixed random gradients. All cases
run in one process, interleaved: every round runs one step of every case in a random order, so
all cases see the same background load. Reported: median ms/step over rounds, and the median (with
IQR) over rounds of the per-round ratio to the baseline of the case's family:

* SGD family vs ``torch.optim.SGD(momentum=0.9, nesterov=True, weight_decay=5e-4)``;
* Adam family vs ``torch.optim.Adam(weight_decay=5e-4)``.

Manifold weights (``grassmann=True``): WRN-16-4 follows the paper's code (convs with
out < in*k*k; 1x1 shortcuts and the fc weight stay Euclidean with decay, BN and biases without);
ResNet-18: every conv (each feeds a BN), fc weight Euclidean with decay, BN/bias without.
Gradients are restored (untimed) before every step, since some peers write into ``p.grad``.

Usage: ``python benchmarks/bench_optim.py [--quick] [--threads N] [--rounds R] [--model M]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
import warnings

import torch

from normlab.optim import SGDG, AdamG

# ----------------------------------------------------------------------------------------------
# parameter sets: (shape, kind) with kind in {"sphere", "decay", "no_decay"}
# ----------------------------------------------------------------------------------------------


def wrn_param_set(depth: int = 16, width: int = 4, classes: int = 10):
    """Pre-activation WRN-d-k shapes; sphere iff conv with out < in*k*k (the authors' rule)."""
    blocks = (depth - 4) // 6
    shapes = [((16, 3, 3, 3), "conv")]
    bn_channels = []
    cin = 16
    for w in (16 * width, 32 * width, 64 * width):
        for _ in range(blocks):
            bn_channels.append(cin)
            shapes.append(((w, cin, 3, 3), "conv"))
            bn_channels.append(w)
            shapes.append(((w, w, 3, 3), "conv"))
            if cin != w:
                shapes.append(((w, cin, 1, 1), "conv"))
            cin = w
    bn_channels.append(cin)
    out = []
    for shape, _ in shapes:
        fan = shape[1] * shape[2] * shape[3]
        out.append((shape, "sphere" if shape[0] < fan else "decay"))
    for c in bn_channels:
        out += [((c,), "no_decay"), ((c,), "no_decay")]
    out += [((classes, cin), "decay"), ((classes,), "no_decay")]
    return out


def resnet18_param_set(classes: int = 1000):
    """ImageNet ResNet-18 shapes; every conv feeds a BN, so every conv is on the sphere."""
    convs = [(64, 3, 7, 7)]
    cin = 64
    for stage, w in enumerate((64, 128, 256, 512)):
        for b in range(2):
            stride_block = stage > 0 and b == 0
            convs += [(w, cin, 3, 3), (w, w, 3, 3)]
            if stride_block:
                convs.append((w, cin, 1, 1))
            cin = w
    out = [(s, "sphere") for s in convs]
    for s in convs:
        out += [((s[0],), "no_decay"), ((s[0],), "no_decay")]
    out += [((classes, 512), "decay"), ((classes,), "no_decay")]
    return out


MODELS = {"wrn16_4": wrn_param_set, "resnet18": resnet18_param_set}


class ParamSet:
    """Parameters (rows of sphere weights unit-normalized) and their fixed gradients."""

    def __init__(self, spec, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.kinds = [kind for _, kind in spec]
        self.params = []
        self.grads = []
        for shape, kind in spec:
            w = torch.randn(shape, generator=gen) * 0.05
            if kind == "sphere":
                rows = w.reshape(shape[0], -1)
                w = (rows / rows.norm(dim=1, keepdim=True)).reshape(shape)
            self.params.append(torch.nn.Parameter(w))
            self.grads.append(torch.randn(shape, generator=gen) * 1e-2)

    def fresh(self):
        """Independent copies (parameters with gradients attached)."""
        ps = [torch.nn.Parameter(p.detach().clone()) for p in self.params]
        for p, g in zip(ps, self.grads):
            p.grad = g.clone()
        return ps

    def split(self, ps):
        sphere = [p for p, k in zip(ps, self.kinds) if k == "sphere"]
        decay = [p for p, k in zip(ps, self.kinds) if k == "decay"]
        no_decay = [p for p, k in zip(ps, self.kinds) if k == "no_decay"]
        return sphere, decay, no_decay


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


def _paper_groups(ps, pset, lr_sphere, **manifold):
    sphere, decay, no_decay = pset.split(ps)
    return [
        dict(params=sphere, lr=lr_sphere, momentum=0.9, grassmann=True, grad_clip=0.1, **manifold),
        dict(params=decay, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
        dict(params=no_decay, lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.0),
    ]


def build_cases(pset: ParamSet, with_reference: bool):
    """name -> (family, optimizer, params)."""
    cases = {}

    def add(name, family, make):
        ps = pset.fresh()
        try:
            cases[name] = (family, make(ps), ps)
        except ImportError as err:  # a peer library that is not installed
            print(f"skipping {name}: {err}")

    add(
        "torch SGD (nesterov, wd 5e-4) [baseline]",
        "sgd",
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    )
    add("normlab SGDG, omega 0", "sgd", lambda ps: SGDG(_paper_groups(ps, pset, 0.2, omega=0.0)))
    add("normlab SGDG, omega 0.1", "sgd", lambda ps: SGDG(_paper_groups(ps, pset, 0.2, omega=0.1)))
    add(
        "normlab SGDG, omega 0.1, ortho_dtype=bfloat16",
        "sgd",
        lambda ps: SGDG(_paper_groups(ps, pset, 0.2, omega=0.1, ortho_dtype=torch.bfloat16)),
    )
    add(
        "normlab SGDG, omega 0, fused",
        "sgd",
        lambda ps: SGDG(_paper_groups(ps, pset, 0.2, omega=0.0), fused=True),
    )
    add(
        "normlab SGDG, omega 0.1, fused",
        "sgd",
        lambda ps: SGDG(_paper_groups(ps, pset, 0.2, omega=0.1), fused=True),
    )
    if with_reference:
        add(
            "normlab SGDG, omega 0, reference path",
            "sgd",
            lambda ps: SGDG(_paper_groups(ps, pset, 0.2, omega=0.0), foreach=False),
        )
    add("geoopt RiemannianSGD, Sphere", "sgd", lambda ps: _geoopt(ps, pset, "sgd"))
    add("adamp SGDP (nesterov, wd 5e-4)", "sgd", lambda ps: _adamp(ps, "sgd"))

    add(
        "torch Adam (wd 5e-4) [baseline]",
        "adam",
        lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=5e-4),
    )
    add("normlab AdamG, omega 0", "adam", lambda ps: AdamG(_paper_groups(ps, pset, 0.05)))
    add(
        "normlab AdamG, omega 0.1",
        "adam",
        lambda ps: AdamG(_paper_groups(ps, pset, 0.05, omega=0.1)),
    )
    add(
        "normlab AdamG, omega 0, fused",
        "adam",
        lambda ps: AdamG(_paper_groups(ps, pset, 0.05), fused=True),
    )
    add(
        "normlab AdamG, omega 0.1, fused",
        "adam",
        lambda ps: AdamG(_paper_groups(ps, pset, 0.05, omega=0.1), fused=True),
    )
    add("geoopt RiemannianAdam, Sphere", "adam", lambda ps: _geoopt(ps, pset, "adam"))
    add("adamp AdamP (wd 5e-4)", "adam", lambda ps: _adamp(ps, "adam"))
    return cases


def _geoopt(ps, pset, kind):
    import geoopt

    sphere, decay, no_decay = pset.split(ps)
    # geoopt's Sphere acts on the last dim: wrap (out, n) views of the conv weights
    manifold = []
    for p in sphere:
        mp = geoopt.ManifoldParameter(p.detach().reshape(p.shape[0], -1), manifold=geoopt.Sphere())
        mp.grad = p.grad.reshape(mp.shape)
        manifold.append(mp)
    sphere[:] = manifold
    ps[:] = manifold + decay + no_decay  # keep grads of the wrapped tensors restorable
    if kind == "sgd":
        return geoopt.optim.RiemannianSGD(
            [
                dict(params=manifold, lr=0.2, momentum=0.9),
                dict(params=decay, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
                dict(params=no_decay, lr=0.01, momentum=0.9, nesterov=True),
            ],
            lr=0.01,
        )
    return geoopt.optim.RiemannianAdam(
        [
            dict(params=manifold, lr=0.05),
            dict(params=decay, weight_decay=5e-4),
            dict(params=no_decay),
        ],
        lr=1e-3,
    )


def _adamp(ps, kind):
    import adamp

    if kind == "sgd":
        return adamp.SGDP(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return adamp.AdamP(ps, lr=1e-3, weight_decay=5e-4)


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _restore_grads(ps, grads_by_shape):
    for p in ps:
        p.grad.copy_(grads_by_shape[id(p)])


def run(model: str, rounds: int, warmup: int, with_reference: bool, seed: int = 0):
    pset = ParamSet(MODELS[model](), seed)
    cases = build_cases(pset, with_reference)
    saved = {name: {id(p): p.grad.clone() for p in ps} for name, (_, _, ps) in cases.items()}
    for name, (_, opt, ps) in cases.items():
        for _ in range(warmup):
            _restore_grads(ps, saved[name])
            opt.step()
    baseline = {f: n for n, (f, _, _) in cases.items() if "[baseline]" in n}
    times = {name: [] for name in cases}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for name in order:
            _, opt, ps = cases[name]
            _restore_grads(ps, saved[name])
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, (family, _, _ps) in cases.items():
        base = times[baseline[family]]
        ratios = [t / b for t, b in zip(times[name], base)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append(
            (name, statistics.median(times[name]) * 1e3, statistics.median(ratios), q[0], q[2])
        )
    n_params = sum(p.numel() for p in pset.params)
    n_sphere = sum(p.numel() for p, k in zip(pset.params, pset.kinds) if k == "sphere")
    compiles = compile_report(cases)
    return rows, n_params, n_sphere, len(pset.params), compiles


def compile_report(cases) -> list[tuple[str, int, float, str]]:
    """(case, graphs compiled, seconds, form) of every fused case: compiled once, in the warm-up;
    form "in place" unless inductor could only compile the pure graph plus a copy."""
    return [
        (name, opt.fused_compiles, opt.fused_compile_seconds, opt.fused_form)
        for name, (_, opt, _) in cases.items()
        if getattr(opt, "fused_compiles", 0)
    ]


def machine_info(threads: int) -> str:
    cfg = torch.__config__.parallel_info().splitlines()
    backend = next((line.strip() for line in cfg if "backend" in line.lower()), "")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {threads} intra-op threads, {backend}, "
        f"Python {platform.python_version()}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds: checks that it runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--reference", action="store_true", help="also time the reference path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # geoopt import-time deprecation notices
    rounds = args.rounds or (5 if args.quick else 60)
    warmup = 1 if args.quick else 3
    print(f"machine: {machine_info(args.threads)}")
    print(f"rounds: {rounds} (interleaved, random order), warm-up steps: {warmup}\n")
    for model in MODELS if args.model == "all" else [args.model]:
        rows, n, n_sphere, n_tensors, compiles = run(model, rounds, warmup, args.reference)
        print(f"### {model}: {n:,} params in {n_tensors} tensors, {n_sphere:,} on the sphere\n")
        print("| optimizer | ms/step (median) | ratio to baseline (median) | ratio IQR |")
        print("|---|---:|---:|---:|")
        for name, ms, ratio, q1, q3 in rows:
            print(f"| {name} | {ms:.2f} | {ratio:.2f}x | {q1:.2f}-{q3:.2f} |")
        print()
        for name, graphs, seconds, form in compiles:
            print(
                f"compile: {name}: {graphs} graph(s), {seconds:.1f} s (once, in the warm-up), {form}"
            )
        print()


if __name__ == "__main__":
    main()
