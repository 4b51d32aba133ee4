"""Sphere parameter groups (``normlab.methods.sphere.groups``) from the probe."""

from __future__ import annotations

import pytest

from normlab.methods.sphere.groups import scale_invariant_param_groups
from test_scale_invariance import assert_partition, group_names, probe_mixed, probe_preact


@pytest.fixture(scope="module")
def mixed():
    return probe_mixed()


@pytest.fixture(scope="module")
def preact():
    return probe_preact()


def test_sphere_groups_by_granularity(preact):
    model, _, report = preact
    stream = ["block1.conv2.weight", "block1.shortcut.0.weight", "block2.conv2.weight"]
    rows = group_names(model, scale_invariant_param_groups(model, None, "row", report=report))
    assert rows["si_row"] == ["stem.weight", "block1.conv1.weight", "block2.conv1.weight"]
    assert rows["si_joint0"] == stream
    assert "head.weight" in rows["non_si"] and "block1.bn1.weight" in rows["non_si"]
    groups = scale_invariant_param_groups(model, None, "global", report=report, elr=1e-3)
    assert_partition(model, groups)
    by_name = {g["name"]: g for g in groups}
    assert by_name["si_global"]["granularity"] == "global" and by_name["si_global"]["elr"] == 1e-3
    assert group_names(model, groups)["si_global"] == [
        "stem.weight",
        "block1.conv1.weight",
        "block1.conv2.weight",
        "block1.shortcut.0.weight",
        "block2.conv1.weight",
        "block2.conv2.weight",
    ]
    assert by_name["non_si"]["scale_invariant"] is False and "elr" not in by_name["non_si"]
    # Joint sets made only of BN affine parameters count with joint_sets="all".
    everything = group_names(
        model, scale_invariant_param_groups(model, None, "tensor", report=report, joint_sets="all")
    )
    assert len([k for k in everything if k.startswith("si_joint")]) == len(report.joint_sets)
    nothing_joint = group_names(
        model, scale_invariant_param_groups(model, None, report=report, joint_sets="none")
    )
    assert set(stream) <= set(nothing_joint["non_si"])


def test_sphere_groups_tensor_granularity_and_freezing(mixed):
    model, _, report = mixed
    row = group_names(model, scale_invariant_param_groups(model, None, "row", report=report))
    assert row["si_row"] == ["stem.weight", "dw.weight", "fc.weight"]
    assert row["si_tensor"] == ["pw.weight"]  # GroupNorm-fed: one sphere per tensor
    groups = scale_invariant_param_groups(model, None, "tensor", report=report, non_si={"lr": 0.0})
    assert_partition(model, groups)
    by_name = {g["name"]: g for g in groups}
    assert by_name["non_si"]["lr"] == 0.0
    assert all(g["granularity"] == "tensor" for g in groups if g["name"] == "si_tensor")
    assert "si_row" not in by_name
    with pytest.raises(ValueError, match="Invalid granularity"):
        scale_invariant_param_groups(model, None, "filter", report=report)
    with pytest.raises(ValueError, match="Invalid joint_sets"):
        scale_invariant_param_groups(model, None, report=report, joint_sets="some")
