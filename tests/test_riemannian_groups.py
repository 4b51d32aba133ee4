"""SGD-G / Adam-G parameter groups (``normlab.methods.riemannian_bn.groups``) from the probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.methods.riemannian_bn.groups import grassmann_param_groups
from test_scale_invariance import assert_partition, group_names, probe_mixed, probe_preact, seq


@pytest.fixture(scope="module")
def mixed():
    return probe_mixed()


@pytest.fixture(scope="module")
def preact():
    return probe_preact()


def test_grassmann_groups_follow_the_paper(mixed):
    model, _, report = mixed
    groups = grassmann_param_groups(model, None, report=report, momentum=0.9)
    assert_partition(model, groups)
    names = group_names(model, groups)
    # The depthwise conv (1 row of length 9 per group) is not overcomplete; the stem (32 > 27)
    # is, and stays Euclidean by default; the GroupNorm-fed pw conv is not row-invariant.
    # fc feeds BN1d: row-invariant with 6 rows of length 8, on the sphere.
    assert names["grassmann"] == ["dw.weight", "fc.weight"]
    assert names["euclidean"] == ["stem.weight", "pw.weight", "head.weight"]
    assert set(names["no_decay"]) == {n for n, p in model.named_parameters() if p.ndim == 1}
    by_name = {g["name"]: g for g in groups}
    assert by_name["grassmann"]["grassmann"] is True
    assert by_name["grassmann"]["weight_decay"] == 0.0 and by_name["grassmann"]["lr"] == 0.01
    assert by_name["euclidean"]["weight_decay"] == 5e-4 and by_name["euclidean"]["lr"] == 0.1
    assert by_name["no_decay"]["weight_decay"] == 0.0 and not by_name["no_decay"]["grassmann"]
    assert all(g["momentum"] == 0.9 for g in groups)
    optimizer = torch.optim.SGD(groups, lr=0.5)  # plain dicts any torch optimizer accepts
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_grassmann_overcomplete_policy(mixed):
    model, _, report = mixed
    groups = grassmann_param_groups(model, None, report=report, overcomplete="grassmann", omega=0.1)
    by_name = {g["name"]: g for g in groups}
    assert group_names(model, groups)["grassmann_overcomplete"] == ["stem.weight"]
    assert by_name["grassmann_overcomplete"]["omega"] == 0.0  # Y Y^T = I is infeasible
    assert by_name["grassmann"]["omega"] == 0.1 and by_name["grassmann_overcomplete"]["grassmann"]


def test_grassmann_jointly_invariant_policy(preact):
    model, _, report = preact
    default = group_names(model, grassmann_param_groups(model, None, report=report))
    assert "block1.conv2.weight" in default["euclidean"]
    assert "block1.conv1.weight" in default["grassmann"]
    paper = group_names(
        model, grassmann_param_groups(model, None, report=report, jointly_invariant="grassmann")
    )
    assert {"block1.conv2.weight", "block2.conv2.weight"} <= set(paper["grassmann"])
    # The 1x1 shortcut (12 rows of length 8) is overcomplete: Euclidean by default.
    assert "block1.shortcut.0.weight" in paper["euclidean"]


def test_grassmann_groups_bad_options(mixed):
    model, _, report = mixed
    for kwargs in (
        {"overcomplete": "drop"},
        {"jointly_invariant": "sphere"},
        {"lr": -1.0},
        {"weight_decay": -1.0},
    ):
        with pytest.raises(ValueError, match="Invalid"):
            grassmann_param_groups(model, None, report=report, **kwargs)
    with pytest.raises(ValueError, match="Invalid batch"):
        grassmann_param_groups(model, None)
    with pytest.raises(ValueError, match="does not cover"):
        grassmann_param_groups(nn.Linear(2, 2), None, report=report)


def test_grassmann_groups_probe_by_themselves():
    model = seq(fc=nn.Linear(6, 4, bias=False), bn=nn.BatchNorm1d(4), head=nn.Linear(4, 2))
    groups = grassmann_param_groups(model, torch.randn(8, 6), lr=0.2)
    names = group_names(model, groups)
    assert names == {
        "grassmann": ["fc.weight"],
        "euclidean": ["head.weight"],
        "no_decay": ["bn.weight", "bn.bias", "head.bias"],
    }
    try:
        from normlab.optim import SGDG
    except ImportError:
        return  # written concurrently; checked once it exists
    SGDG(groups, lr=0.2)
