"""The first-boot plan: the order in which a node manifest's containers are installed and started.

The order is topological by ``after:`` and otherwise follows the document: among the containers
whose dependencies are all placed, the one written first goes next (so a manifest that is already
in a valid order is kept as written). A cycle is a usage error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bootstrap.errors import UsageError
from bootstrap.node.manifest import ContainerSpec, NodeManifest


@dataclass(frozen=True)
class Plan:
    """Containers in start order; ``order[i]`` depends only on containers before it."""

    order: tuple[ContainerSpec, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """The container names in start order."""
        return tuple(c.name for c in self.order)


def plan(manifest: NodeManifest) -> Plan:
    """Order ``manifest.containers`` by ``after:`` (stable, see the module doc).

    Raises :class:`UsageError` (exit 2) naming the cycle, e.g.
    ``containers[0].after: cycle a -> b -> a``, when ``after:`` edges form one. Pure: no I/O.
    """
    containers = manifest.containers
    by_name = {c.name: c for c in containers}
    placed: set[str] = set()
    order: list[ContainerSpec] = []
    while len(order) < len(containers):
        for c in containers:
            if c.name not in placed and all(dep in placed for dep in c.after):
                order.append(c)
                placed.add(c.name)
                break
        else:
            cycle = _find_cycle([c for c in containers if c.name not in placed], by_name)
            first = by_name[cycle[0]]
            raise UsageError(
                f"containers[{first.index}].after: cycle {' -> '.join(cycle)}",
                "remove one of the 'after:' entries in the cycle",
            )
    return Plan(tuple(order))


def _find_cycle(left: list[ContainerSpec], by_name: dict[str, ContainerSpec]) -> list[str]:
    """A cycle among ``left`` (every one of which has an unplaced dependency), as names with the
    first repeated at the end; starts from the container written first."""
    pending = {c.name for c in left}
    path: list[str] = []
    name = left[0].name
    while name not in path:
        path.append(name)
        name = next(dep for dep in by_name[name].after if dep in pending)
    cycle = path[path.index(name) :]
    # rotate so the cycle starts at the container written first
    start = min(range(len(cycle)), key=lambda i: by_name[cycle[i]].index)
    cycle = cycle[start:] + cycle[:start]
    return [*cycle, cycle[0]]
