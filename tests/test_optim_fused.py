"""``fused=True`` of SGDG, AdamG and SphereSGD: the compiled pure steps against the references.

Every option set runs 100 steps with fresh random gradients and a learning rate that changes every
step; the fused run must stay within 1e-10 (float64) / 1e-5 (float32) of the single-tensor
reference (``foreach=False``), compile one graph per group for the whole run, and leave a state
that loads into an eager optimizer (and back) to continue the same run. Each option set costs one
inductor compile (a few seconds on a cold cache), so the grid is kept to the options that change
the compiled maths.
"""

import copy
import pickle
import warnings

import pytest
import torch

import normlab._fused as fused_mod
from normlab.optim import SGDG, AdamG, SphereSGD

SHAPES = [(8, 3, 3, 3), (12, 8, 3, 3), (10, 40), (5,)]  # conv, conv, linear, a 1-D row


def _points(dtype, seed=0, zero_row=False):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    if zero_row:
        ps[1][3].zero_()  # a pruned filter: must stay zero, never NaN
    return ps


def _run(make, dtype, steps=100, seed=0, zero_row=False, lr_decay=0.98, params=None):
    """``make(params)`` trained for ``steps`` steps of shared random gradients (the LR of every
    group decays each step); returns (params, optimizer)."""
    ps = params or [p.clone().requires_grad_() for p in _points(dtype, seed, zero_row)]
    opt = make(ps)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
            if zero_row and p.shape == SHAPES[1]:
                p.grad[3].zero_()
        opt.step()
        for group in opt.param_groups:
            group["lr"] *= lr_decay
    return ps, opt


def _max_diff(a, b):
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b))


def _tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def _manifold(cls, **options):
    return lambda **impl: lambda ps: cls([{"params": ps, "grassmann": True}], **options, **impl)


def _sphere(**options):
    return lambda **impl: lambda ps: SphereSGD([{"params": ps}], **options, **impl)


CASES = {
    "SGDG-momentum": _manifold(SGDG, lr=0.1, momentum=0.9),
    "SGDG-no-momentum-clip": _manifold(SGDG, lr=0.3, grad_clip=0.05),
    "SGDG-nesterov-clip": _manifold(SGDG, lr=0.1, momentum=0.9, nesterov=True, grad_clip=0.1),
    "SGDG-omega": _manifold(SGDG, lr=0.1, momentum=0.5, omega=0.1, grad_clip=0.1),
    "AdamG": _manifold(AdamG, lr=0.05),
    "AdamG-clip-omega-betas": _manifold(
        AdamG, lr=0.05, betas=(0.8, 0.95), eps=1e-6, grad_clip=0.1, omega=0.1
    ),
    "SphereSGD-global": _sphere(elr=0.05),
    "SphereSGD-global-momentum": _sphere(elr=0.05, momentum=0.9),
    "SphereSGD-global-project": _sphere(elr=0.05, project_gradient=True),
    "SphereSGD-tensor-momentum": _sphere(elr=0.05, momentum=0.5, granularity="tensor"),
    "SphereSGD-row-project": _sphere(elr=0.05, granularity="row", project_gradient=True),
    "SphereSGD-row-momentum": _sphere(elr=0.05, granularity="row", momentum=0.9),
}


@pytest.mark.parametrize("name", CASES)
def test_fused_equals_reference_in_float64_over_100_steps(name):
    zero_row = not name.startswith("SphereSGD")  # a zero row cannot be put on a sphere
    ref, _ = _run(CASES[name](foreach=False), torch.float64, zero_row=zero_row)
    out, opt = _run(CASES[name](fused=True), torch.float64, zero_row=zero_row)
    assert _max_diff(ref, out) < 1e-10
    assert opt.fused_compiles == 1  # one graph for 100 steps of changing LRs
    assert opt.fused_form == "in place"  # the fast form compiles for every option set
    assert all(torch.isfinite(p).all() for p in out)
    if zero_row:
        assert out[1][3].abs().max().item() == 0.0


@pytest.mark.parametrize(
    "name", ["SGDG-nesterov-clip", "AdamG-clip-omega-betas", "SphereSGD-row-momentum"]
)
def test_fused_equals_reference_in_float32_over_100_steps(name):
    ref, _ = _run(CASES[name](foreach=False), torch.float32)
    out, opt = _run(CASES[name](fused=True), torch.float32)
    assert _max_diff(ref, out) < 1e-5
    assert opt.fused_compiles == 1


def test_fused_rows_stay_on_the_sphere_and_radii_stay_fixed():
    out, _ = _run(CASES["SGDG-nesterov-clip"](fused=True), torch.float64, steps=30)
    for p in out[:3]:
        norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
    ps = [p.clone().requires_grad_() for p in _points(torch.float64)]
    before = [p.detach().reshape(p.shape[0] if p.dim() > 1 else 1, -1).norm(dim=1) for p in ps]
    _run(CASES["SphereSGD-row-momentum"](fused=True), torch.float64, steps=30, params=ps)
    after = [p.detach().reshape(p.shape[0] if p.dim() > 1 else 1, -1).norm(dim=1) for p in ps]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["SGDG-nesterov-clip", "AdamG", "SphereSGD-global-momentum"])
def test_state_dicts_of_fused_and_eager_match_and_load_into_each_other(name):
    """k steps, save, a fresh optimizer of the other kind loads it and continues: fused -> eager
    and eager -> fused both equal the uninterrupted reference run; the fused and eager states hold
    the same keys, dtypes, shapes and values."""
    dtype, k, steps = torch.float64, 20, 40
    straight, _ = _run(CASES[name](foreach=False), dtype, steps=steps, lr_decay=1.0)
    _, eager = _run(CASES[name](foreach=False), dtype, steps=k, lr_decay=1.0)
    eager_state = eager.state_dict()["state"]
    for first, second in (({"fused": True}, {}), ({}, {"fused": True})):
        ps, opt = _run(CASES[name](**first), dtype, steps=k, lr_decay=1.0)
        saved = copy.deepcopy(opt.state_dict())
        for index, entries in saved["state"].items():
            assert entries.keys() == eager_state[index].keys()
            for key, value in entries.items():
                assert value.dtype == eager_state[index][key].dtype, key
                assert value.shape == eager_state[index][key].shape, key
                torch.testing.assert_close(value, eager_state[index][key], rtol=1e-10, atol=1e-12)
        resumed = CASES[name](**second)(ps)
        resumed.load_state_dict(saved)
        gen = torch.Generator().manual_seed(1)  # the gradient stream of _run, from step k on
        for step in range(steps):
            grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in ps]
            if step >= k:
                for p, g in zip(ps, grads):
                    p.grad = g
                resumed.step()
        assert _max_diff(straight, ps) < 1e-10, (first, second)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps, **kw: SGDG([{"params": ps, "grassmann": True}], lr=0.1, momentum=0.9, **kw),
        lambda ps, **kw: AdamG([{"params": ps, "grassmann": True}], lr=0.05, **kw),
        lambda ps, **kw: SphereSGD([{"params": ps}], elr=0.05, momentum=0.9, **kw),
    ],
    ids=["SGDG", "AdamG", "SphereSGD"],
)
def test_a_schedule_never_recompiles(make):
    ps = [p.clone().requires_grad_() for p in _points(torch.float32)]
    opt = make(ps, fused=True)
    schedulers = [
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    ]
    for step in range(25):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        for s in schedulers:
            s.step()
        opt.param_groups[0]["momentum"] = 0.9 - 0.1 * (step % 3)  # new values, same graph
    assert opt.fused_compiles == 1
    assert opt.fused_compile_seconds > 0


def test_without_a_compiler_fused_warns_once_and_runs_the_eager_step(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(fused_mod.torch, "compile", no_compiler)
    eager, _ = _run(CASES["SGDG-nesterov-clip"](), torch.float32, steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, opt = _run(CASES["SGDG-nesterov-clip"](fused=True), torch.float32, steps=10)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "could not compile the SGDG step" in messages[0] and "no C++ compiler" in messages[0]
    assert _max_diff(eager, out) == 0.0  # the eager fast path, bit for bit
    assert opt.fused_compiles == 0


def test_fused_euclidean_groups_are_torch_fused_sgd_and_adam():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(20)]
    cases = [
        (
            lambda ps, **kw: SGDG(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, **kw),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ),
        (
            lambda ps, **kw: AdamG(ps, lr=0.01, euclidean="adam", weight_decay=1e-3, **kw),
            lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=1e-3),
        ),
        (
            lambda ps, **kw: SphereSGD(
                [{"params": ps, "scale_invariant": False, "lr": 0.1, "weight_decay": 1e-3}],
                momentum=0.9,
                **kw,
            ),
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
        ),
    ]
    for ours, theirs in cases:
        a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
        oa, ob = ours([a], fused=True), theirs([b])
        for g in grads:
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_bfloat16_keeps_float32_state_and_follows_the_eager_step():
    """bf16 parameters: maths and state in float32, one rounding per step, as the eager path."""

    def make(**impl):
        return lambda ps: SGDG(
            [{"params": ps, "grassmann": True}], lr=0.1, momentum=0.9, grad_clip=0.1, **impl
        )

    eager, eager_opt = _run(make(), torch.bfloat16, steps=5)
    out, opt = _run(make(fused=True), torch.bfloat16, steps=5)
    for p in out:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["momentum_buffer"].dtype == torch.float32
    for a, b in zip(eager, out):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2)  # a few bf16 ulps
    for pa, pb in zip(eager, out):
        torch.testing.assert_close(
            eager_opt.state[pa]["momentum_buffer"],
            opt.state[pb]["momentum_buffer"],
            atol=2e-3,
            rtol=0,
        )


def test_fused_channels_last_weight_equals_contiguous():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(16, 8, 3, 3, generator=gen, dtype=torch.float64) for _ in range(10)]
    a = w.clone().requires_grad_()
    b = w.clone().to(memory_format=torch.channels_last).requires_grad_()
    oa = SGDG([{"params": [a], "grassmann": True}], lr=0.1, momentum=0.9, foreach=False)
    ob = SGDG([{"params": [b], "grassmann": True}], lr=0.1, momentum=0.9, fused=True)
    for g in grads:
        a.grad, b.grad = g.clone(), g.clone().to(memory_format=torch.channels_last)
        oa.step()
        ob.step()
    assert b.is_contiguous(memory_format=torch.channels_last)  # updated in place
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_fused_optimizer_deepcopies_and_pickles_after_steps():
    ps, opt = _run(CASES["SGDG-momentum"](fused=True), torch.float64, steps=3)
    clone = copy.deepcopy(opt)
    again = pickle.loads(pickle.dumps(opt))
    for o in (clone, again):
        assert o.param_groups[0]["fused"] is True
        assert o.fused_compiles == 0  # compiled code is not copied; it compiles again on use
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    clone.step()
    assert clone.fused_compiles == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda ps: SGDG(ps, lr=0.1, grassmann=True, fused="yes"), "Invalid fused: 'yes'"),
        (lambda ps: SGDG(ps, lr=0.1, fused=True, foreach=True), "leave foreach=None"),
        (lambda ps: AdamG(ps, lr=0.1, fused=True, foreach=False), "leave foreach=None"),
        (lambda ps: SphereSGD(ps, elr=0.1, fused=1.5), "Invalid fused: 1.5"),
        (lambda ps: SphereSGD(ps, elr=0.1, fused=True, foreach=False), "leave foreach=None"),
    ],
)
def test_bad_fused_values_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make([torch.randn(4, 3, requires_grad=True)])


def test_fused_euclidean_tensor_whose_first_gradient_comes_late_equals_torch():
    """torch's fused SGD refuses a mix of tensors with and without momentum buffers; normlab
    splits such a step, and the result is torch.optim.SGD's (unfused)."""
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    ours = [w.clone().requires_grad_() for w in ws]
    theirs = [w.clone().requires_grad_() for w in ws]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)
    oa, ob = SGDG(ours, fused=True, **kw), torch.optim.SGD(theirs, **kw)
    for step in range(6):
        for a, b, k in zip(ours, theirs, range(2)):
            g = torch.randn(4, 3, generator=gen, dtype=torch.float64)
            a.grad = b.grad = None
            if k == 0 or step >= 3:  # the second tensor gets its first gradient at step 3
                a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
