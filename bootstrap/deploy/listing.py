"""What ``bootstrap list`` prints: kept apart from :mod:`bootstrap.deploy.deploy` so that a
``list`` with nothing installed imports neither the deployer nor systemd's bus."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bootstrap.deploy.deploy import ContainerStatus


@dataclass(frozen=True)
class ListResult:
    containers: tuple[ContainerStatus, ...] = field(default_factory=tuple)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {
                "name": c.name,
                "image": c.active.image if c.active else None,
                "digest": c.active.digest if c.active else None,
                "slot": c.active.path.name if c.active else None,
                "active_state": c.unit.active_state if c.unit else None,
                "sub_state": c.unit.sub_state if c.unit else None,
                "rollback": c.previous.image if c.previous else None,
                "auto_update": c.active.auto_update if c.active else None,
            }
            for c in self.containers
        ]

    def to_text(self) -> str:
        if not self.containers:
            return "no system containers installed"
        rows = [("NAME", "STATE", "SLOT", "UPDATE", "IMAGE")]
        for c in self.containers:
            rows.append(
                (
                    c.name,
                    c.unit.active_state if c.unit else "?",
                    c.active.path.name if c.active else "-",
                    c.active.auto_update if c.active else "-",
                    c.active.image if c.active else "-",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows
        )
