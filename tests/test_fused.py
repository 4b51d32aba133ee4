"""normlab._fused.FusedStep: the in-place graph, its pure fallback, and what is counted.

The optimizers' and ENorm's own tests check the maths of every fused step; these check the
machinery on small functions: in place and pure give the eager numbers, a graph that cannot be
compiled in place runs pure (with the same numbers), errors of a compiled graph are not swallowed.
"""

import warnings

import pytest
import torch

import normlab._fused as fused_mod
from normlab._fused import FusedStep

SHAPES = [(6, 4, 3, 3), (5, 7)]


def row_sphere_step(params, grads, bufs, lr, momentum):
    """A momentum step on each row's sphere, written as plainly as possible (pure)."""
    new_params, new_bufs = [], []
    for p, g, b in zip(params, grads, bufs):
        x, gx, bx = (t.reshape(p.shape[0], -1) for t in (p, g, b))
        xx = (x * x).sum(1, keepdim=True)
        d = momentum * bx + gx
        d = d - ((x * d).sum(1, keepdim=True) / xx) * x
        u = x - lr * d
        u = u / (u * u).sum(1, keepdim=True).sqrt()
        new_params.append(u.reshape(p.shape))
        new_bufs.append(d.reshape(b.shape))
    return new_params, new_bufs


def _tensors(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    bufs = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    return params, grads, bufs


def _steps(step: FusedStep, steps=5, dtype=torch.float64):
    """``steps`` steps through ``step`` (a changing LR); returns (params, bufs)."""
    params, grads, bufs = _tensors(dtype=dtype)
    lr, momentum = torch.zeros((), dtype=dtype), torch.tensor(0.9, dtype=dtype)
    for k in range(steps):
        lr.fill_(0.1 / (k + 1))
        assert step("key", (params, bufs), params, grads, bufs, lr, momentum)
    return params, bufs


def _eager(steps=5, dtype=torch.float64):
    params, grads, bufs = _tensors(dtype=dtype)
    for k in range(steps):
        lr = torch.tensor(0.1 / (k + 1), dtype=dtype)
        new_params, new_bufs = row_sphere_step(
            params, grads, bufs, lr, torch.tensor(0.9, dtype=dtype)
        )
        params, bufs = new_params, new_bufs
    return params, bufs


def _assert_same(a, b, tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("in_place", [True, False])
def test_in_place_and_pure_graphs_give_the_eager_numbers(in_place):
    step = FusedStep(row_sphere_step, "test", in_place=in_place)
    params, bufs = _steps(step)
    ref_params, ref_bufs = _eager()
    _assert_same(params, ref_params, 1e-12)
    _assert_same(bufs, ref_bufs, 1e-12)
    assert step.compiles == 1  # a new LR every step, one graph
    assert step.compile_seconds > 0
    if not in_place:
        assert step.pure_keys == {}  # chosen, not fallen back to


def test_the_written_tensors_are_the_callers_own():
    """Targets are updated where they live (a parameter must stay the same tensor)."""
    params, grads, bufs = _tensors()
    ids = [t.data_ptr() for t in params + bufs]
    step = FusedStep(row_sphere_step, "test")
    assert step.form == "not compiled yet"
    assert step("k", (params, bufs), params, grads, bufs, torch.tensor(0.1), torch.tensor(0.9))
    assert [t.data_ptr() for t in params + bufs] == ids
    for p in params:
        norms = p.reshape(p.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)


def test_a_graph_that_cannot_compile_in_place_runs_pure_with_the_same_numbers(monkeypatch):
    def unsupported_in_place(fn):
        def step_in_place(targets, *args, **kwargs):
            torch._dynamo.graph_break()  # fullgraph=True: fails while tracing, before running
            fn(*args, **kwargs)

        return step_in_place

    monkeypatch.setattr(fused_mod, "_writing_into", unsupported_in_place)
    step = FusedStep(row_sphere_step, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pure form is no reason to warn
        params, bufs = _steps(step)
    ref_params, ref_bufs = _eager()
    _assert_same(params, ref_params, 1e-12)
    _assert_same(bufs, ref_bufs, 1e-12)
    assert list(step.pure_keys) == ["key"] and "graph_break" in step.pure_keys["key"].lower()
    assert step.compiles == 1 and step.unavailable is None
    assert step.form.startswith("pure + copy (") and "graph_break" in step.form.lower()


def test_when_neither_form_compiles_it_warns_once_and_writes_nothing(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(fused_mod.torch, "compile", no_compiler)
    params, grads, bufs = _tensors()
    before = [t.clone() for t in params + bufs]
    step = FusedStep(row_sphere_step, "test step")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not step("k", (params, bufs), params, grads, bufs, 0.1, 0.9)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "test step" in messages[0] and "no C++ compiler found" in messages[0]
    assert all(torch.equal(a, b) for a, b in zip(before, params + bufs))
    assert step.compiles == 0 and step.unavailable.startswith("RuntimeError")
    assert step.form == "eager (RuntimeError: no C++ compiler found)"


def test_an_error_of_a_compiled_graph_propagates():
    """A graph that compiled and then failed running is an error, not a reason for eager."""
    step = FusedStep(row_sphere_step, "test")
    params, grads, bufs = _tensors()
    lr, momentum = torch.tensor(0.1), torch.tensor(0.9)
    assert step("k", (params, bufs), params, grads, bufs, lr, momentum)
    wrong = [torch.zeros(3), torch.zeros(3)]  # same graph inputs, targets of the wrong shape
    with pytest.raises(RuntimeError):
        step("k", (wrong, bufs), params, grads, bufs, lr, momentum)
    assert step.unavailable is None


def test_a_key_compiles_once_and_another_key_gets_its_own_graph():
    step = FusedStep(row_sphere_step, "test")
    params, grads, bufs = _tensors()
    lr, momentum = torch.tensor(0.1), torch.tensor(0.9)
    for key in ("a", "a", "b", "a", "b"):
        assert step(key, (params, bufs), params, grads, bufs, lr, momentum)
    assert step.compiles == 2


def test_a_fused_step_deepcopies_without_its_graphs():
    import copy

    step = FusedStep(row_sphere_step, "test", in_place=False)
    _steps(step, steps=1)
    clone = copy.deepcopy(step)
    assert clone.in_place is False and clone.compiles == 0 and clone._graphs == {}
    params, bufs = _steps(clone, steps=5)
    _assert_same(params, _eager()[0], 1e-12)
