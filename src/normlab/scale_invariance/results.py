"""What the scale-invariance probe reports: the kinds, one parameter's report, the whole result.

The kinds (``KINDS``) classify each parameter of a network by how its train-mode output reacts to
rescaling it (see :mod:`normlab.scale_invariance` for the maths): per output row, per tensor,
only jointly with others, not at all, or not probed for a stated reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "FROZEN",
    "INERT",
    "JOINT",
    "KINDS",
    "NONE",
    "ROW",
    "TENSOR",
    "UNUSED",
    "InvarianceReport",
    "ScaleInvarianceResult",
]

ROW, TENSOR, JOINT, NONE, INERT, UNUSED, FROZEN = (
    "row",
    "tensor",
    "joint",
    "none",
    "inert",
    "unused",
    "frozen",
)
KINDS = (ROW, TENSOR, JOINT, NONE, INERT, UNUSED, FROZEN)

_KIND_HELP = {
    ROW: "invariant to scaling each output row (channel) separately",
    TENSOR: "invariant to scaling the whole tensor, not row by row",
    JOINT: "invariant only when scaled together with the other members of its joint set",
    NONE: "not scale-invariant",
    INERT: "the output does not depend on it in train mode (zero gradient)",
    UNUSED: "not used by the forward pass (no gradient)",
    FROZEN: "requires_grad=False; not probed",
}


@dataclass(frozen=True)
class InvarianceReport:
    """What the probe found for one parameter.

    Attributes:
        name: parameter name as in ``model.named_parameters()``.
        shape: parameter shape.
        kind: one of ``"row"``, ``"tensor"``, ``"joint"``, ``"none"``, ``"inert"``, ``"unused"``,
            ``"frozen"`` (see ``KINDS``); ``"row"`` implies tensor invariance too.
        row_dim: the dimension that indexes output channels (1 for ConvTranspose weights, else 0).
        row_cos: max over probe points and rows of |cos(g_r, w_r)| (None if not probed).
        tensor_cos: max over probe points of |cos(g, w)|.
        rescale_change: relative output change in the confirming rescale of the claim made
            (per row, per tensor, joint set); None when no claim was confirmed.
        joint_group: index into ``result.joint_sets`` for ``kind == "joint"``.
        joint_members: names of the joint set (including this one).
        joint_granularity: ``"row"`` if the members can also be scaled row by row together
            (same channel count, channel r of every member by the same c_r), else ``"tensor"``.
        fx_path: the graph path found by the fx walk, e.g. ``"conv (Conv2d) -> bn (BatchNorm2d)"``.
        note: a short explanation of unusual outcomes.
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    row_dim: int = 0
    row_cos: float | None = None
    tensor_cos: float | None = None
    rescale_change: float | None = None
    joint_group: int | None = None
    joint_members: tuple[str, ...] = ()
    joint_granularity: str | None = None
    fx_path: str | None = None
    note: str = ""

    @property
    def scale_invariant(self) -> bool:
        """True if the parameter is scale-invariant on its own (per row or per tensor)."""
        return self.kind in (ROW, TENSOR)


@dataclass
class ScaleInvarianceResult(Mapping):
    """Mapping ``name -> InvarianceReport`` plus the joint sets, tolerance and diagnostics.

    ``joint_sets`` lists the jointly invariant sets found: first a disjoint family, then sets
    that overlap it (a member of several sets reports the first). ``disjoint_joint_sets()``
    picks a non-overlapping selection. ``str(result)`` is a readable table.
    """

    reports: dict[str, InvarianceReport]
    tol: float
    joint_sets: list[tuple[str, ...]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fx_error: str | None = None
    n_points: int = 0

    def __getitem__(self, name: str) -> InvarianceReport:
        return self.reports[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.reports)

    def __len__(self) -> int:
        return len(self.reports)

    def disjoint_joint_sets(self) -> list[tuple[str, ...]]:
        """``joint_sets`` without the sets that overlap an earlier one."""
        taken: set[str] = set()
        chosen = []
        for members in self.joint_sets:
            if taken.isdisjoint(members):
                chosen.append(members)
                taken.update(members)
        return chosen

    def names(self, *kinds: str) -> list[str]:
        """Names of the parameters whose kind is one of ``kinds`` (model order)."""
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"Invalid kind: {bad[0]!r} (expected one of {KINDS})")
        return [n for n, r in self.reports.items() if r.kind in kinds]

    def __str__(self) -> str:
        def cos(v: float | None) -> str:
            return "-" if v is None else f"{v:.1e}"

        rows = [("parameter", "shape", "kind", "row|cos|", "tensor|cos|", "joint", "why")]
        for r in self.reports.values():
            joint = "-" if r.joint_group is None else f"#{r.joint_group} ({r.joint_granularity})"
            why = r.note or (r.fx_path or "")
            shape = "x".join(map(str, r.shape)) or "scalar"
            rows.append((r.name, shape, r.kind, cos(r.row_cos), cos(r.tensor_cos), joint, why))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6] for row in rows
        ]
        lines.insert(1, "-" * (sum(widths) + 12))
        lines.append(
            f"tolerance {self.tol:.1e}, {self.n_points} probe points (train mode, float64)"
        )
        for i, members in enumerate(self.joint_sets):
            lines.append(f"joint set #{i}: {', '.join(members)}")
        if self.fx_error:
            lines.append(f"fx walk unavailable: {self.fx_error}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(line.rstrip() for line in lines)
