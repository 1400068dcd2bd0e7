"""Trigger stack for multi-trigger multi-target attacks: several triggers, each with its own
target label, as in the CSAW-HackML-2020 multi-trigger multi-target BadNet, whose eyebrows,
lipstick and sunglasses triggers each map to a different label. Poisoning with a stack
(`backdoorlab.attacks.poison_training_set_multi`) uses disjoint sample sets per trigger.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from backdoorlab.errors import BadInput
from backdoorlab.triggers.base import Trigger


@dataclass
class TriggerStack:
    """An ordered list of ``(trigger, target label)`` pairs."""

    entries: list[tuple[Trigger, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.entries:
            raise BadInput("trigger stack: give at least one (trigger, target) pair")
        for i, e in enumerate(self.entries):
            if not (isinstance(e, tuple) and len(e) == 2 and isinstance(e[0], Trigger)):
                raise BadInput(f"trigger stack: entry {i} must be a (Trigger, target) pair")
            if int(e[1]) < 0:
                raise BadInput(f"trigger stack: entry {i} has a negative target {e[1]}")
        self.entries = [(t, int(y)) for t, y in self.entries]

    @classmethod
    def from_specs(cls, specs: Sequence[str], targets: Sequence[int],
                   image_shape: tuple[int, ...]) -> TriggerStack:
        """Build from CLI trigger specs and one target per spec."""
        from backdoorlab.triggers.registry import make_trigger

        if len(specs) != len(targets):
            raise BadInput(f"trigger stack: {len(specs)} triggers but {len(targets)} targets "
                           "(give one target per trigger)")
        return cls([(make_trigger(s, image_shape), int(t)) for s, t in zip(specs, targets, strict=True)])

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[tuple[Trigger, int]]:
        return iter(self.entries)

    @property
    def triggers(self) -> list[Trigger]:
        return [t for t, _ in self.entries]

    @property
    def targets(self) -> list[int]:
        return [y for _, y in self.entries]

    def check(self, shape: tuple[int, ...], num_classes: int | None = None) -> None:
        for t, y in self.entries:
            t.check(shape)
            if num_classes is not None and y >= num_classes:
                raise BadInput(f"trigger stack: target {y} out of range for {num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "stack", "entries": [{"trigger": t.to_dict(), "target": y}
                                             for t, y in self.entries]}
