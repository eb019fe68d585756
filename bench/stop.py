"""Benchmark: ``systemctl restart`` and ``stop`` of a system container whose pid 1 ignores
SIGTERM, with the init (the default ``init: auto``) and without (``--init never``), and the
stop of the test harness's plain runc unit.

In a systemd node (the test harness's, booted once), two containers run busybox ``sleep 3600``
from a local plain-HTTP docker-registry with the default definition (``stopTimeout`` 5). Each
round times, inside the node (no nsenter in the figure), ``systemctl restart`` of each, and at
the end ``systemctl stop``. The reference is the same unit without an init: the figure the init
removes is the stop timeout. The harness's unit (tests/test_harness_node.py: busybox ``sleep``
under ``runc run``, ``ExecStop=runc kill KILL``) is started and stopped each round.

Targets (what tests/test_deploy.py's lifecycle and tests/test_harness_node.py check by the
unit's ``Result=success``, timed here): with the init, restart and stop < 1 s (the stop timeout
is 5 s); the harness's unit stops in < 1 s (the node's DefaultTimeoutStopSec is 15 s).

    .venv/bin/python bench/stop.py [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    insecure_registries_conf,
    log,
    machine_note,
    median,
    plain_registry,
    scratch,
)
from tests.harness.imagebuilder import build_image, busybox_spec
from tests.harness.node import Node
from tests.test_harness_node import (
    BUSYBOX_UNIT,
    CONTAINER,
    UNIT,
    make_busybox_bundle,
    runc_state,
)

SH_TIMER = 'a=$(date +%s%N); systemctl "$@"; b=$(date +%s%N); echo $((b - a))'
TARGET = 1.0
"""Seconds a restart or stop with the init, and the harness unit's stop, may take."""


def systemctl_seconds(node: Node, *args: str) -> float:
    out = node.run("sh", "-c", SH_TIMER, "sh", *args, timeout=120).stdout
    return int(out.strip().splitlines()[-1]) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    rounds = ap.parse_args().rounds
    with plain_registry() as reg, scratch("bench-stop-") as work, Node.start() as node:
        layout = work / "oci"
        build_image(layout, "sleep", busybox_spec(cmd=("sleep", "3600")))
        reg.push(layout, "sleep", "bench/sleep:1")
        ref = f"{reg.host}/bench/sleep:1"
        conf = insecure_registries_conf(work, reg.host)
        node.write_file("/etc/bench/registries.conf", conf.read_text())
        env = {
            "REGISTRIES_CONFIG_PATH": "/etc/bench/registries.conf",
            "BOOTSTRAP_SETTLE_SECONDS": "1",
        }
        node.bootstrap("install", "with-init", ref, env=env, check=True)
        node.bootstrap("install", "--init", "never", "no-init", ref, env=env, check=True)
        times: dict[str, list[float]] = {"with-init": [], "no-init": []}
        for i in range(rounds):
            for name in times:
                times[name].append(systemctl_seconds(node, "restart", f"{name}.service"))
            log(
                f"round {i + 1}: restart with init {times['with-init'][-1]:.3f}s, "
                f"without {times['no-init'][-1]:.3f}s"
            )
        stops = {name: systemctl_seconds(node, "stop", f"{name}.service") for name in times}
        make_busybox_bundle(node)
        node.write_file(f"/etc/systemd/system/{UNIT}", BUSYBOX_UNIT)
        node.systemctl("daemon-reload")
        harness: list[float] = []
        for _ in range(rounds):
            node.systemctl("start", UNIT)
            deadline = time.monotonic() + 30
            while runc_state(node).get(CONTAINER) != "running":
                if time.monotonic() > deadline:
                    raise SystemExit(f"{UNIT} did not start:\n{node.journal(UNIT)}")
                time.sleep(0.1)
            harness.append(systemctl_seconds(node, "stop", UNIT))
        log(machine_note())
        ours, theirs = median(times["with-init"]), median(times["no-init"])
        log(
            f"systemctl restart, pid 1 ignoring SIGTERM (stopTimeout 5): with init median "
            f"{ours:.3f}s, without {theirs:.3f}s; ratio {ours / theirs:.3f} "
            f"(target < {TARGET:g}s: {verdict(ours)})"
        )
        log(
            f"systemctl stop: with init {stops['with-init']:.3f}s "
            f"({verdict(stops['with-init'])}), without {stops['no-init']:.3f}s"
        )
        log(
            f"systemctl stop of the harness's runc unit: median {median(harness):.3f}s, "
            f"max {max(harness):.3f}s (target < {TARGET:g}s: {verdict(median(harness))})"
        )
        for name in times:
            node.bootstrap("uninstall", name, env=env)


def verdict(seconds: float) -> str:
    return "ok" if seconds < TARGET else "MISSED"


if __name__ == "__main__":
    main()
