"""Benchmark: node updates — the CRI daemon (Debian's containerd) and the kubelet stand-in moved
as one transaction, judged by the node's health, rolled back together.

The node is tests/test_node_update.py's (:func:`provisioned_pod_node`: a node of its own
network, CNI plugins, containerd, the kubelet stand-in with a static pod, both on moving tags
with policy registry). Times are taken inside the node around the whole command (interpreter
start-up included), next to what bootstrap reports per phase (``--json``):

- a no-op ``auto-update`` and a no-op ``update --node --no-pull`` (nothing moved; ``rounds``
  each);
- a good node update (``update --node``: both move to a new variant, the daemon judged by CRI
  Status RuntimeReady+NetworkReady, the stand-in by its /healthz after its pod probe),
  ``rounds`` times;
- a failed one rolled back: a CRI daemon whose NetworkReady stays false (bounded by the
  manifest's ``ready.timeout``, 30 s here), and a kubelet whose /healthz never answers ok
  (bounded by its health check: 20 s start period, then 5 failures 1 s apart).

    .venv/bin/python bench/nodeupdate.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import log, machine_note, median, plain_registry, scratch
from tests.harness.node import VENV, Node
from tests.test_node_update import NODE_ENV, VERSIONS, PodNode, provisioned_pod_node

TIMER = """
import json, os, subprocess, sys, time
argv, env = json.loads(sys.argv[1]), {**os.environ, **json.loads(sys.argv[2])}
t = time.monotonic()
p = subprocess.run(argv, capture_output=True, text=True, env=env)
print(json.dumps({"rc": p.returncode, "s": time.monotonic() - t, "out": p.stdout,
                  "err": p.stderr[-3000:]}))
"""


def timed_in(node: Node, *args: str) -> tuple[int, float, dict[str, Any]]:
    """Run ``bootstrap --json ARGS`` inside ``node``; (exit code, seconds, the JSON result)."""
    argv = [str(VENV / "bin/bootstrap"), "--json", *args]
    out = node.run(
        str(VENV / "bin/python"), "-c", TIMER, json.dumps(argv), json.dumps(NODE_ENV),
        timeout=900,
    ).stdout  # fmt: skip
    doc = json.loads(out.strip().splitlines()[-1])
    try:
        result = json.loads(doc["out"])
    except ValueError:
        result = {"stderr": doc["err"]}
    return int(doc["rc"]), float(doc["s"]), result


ORDER = ("lookup", "pull", "stage", "start", "judge", "commit", "rollback")


def phases(result: dict[str, Any]) -> str:
    got = result.get("phases", {})
    return ", ".join(f"{k} {got[k]:.2f}s" for k in ORDER if k in got)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    rounds = ap.parse_args().rounds
    assert 2 + rounds <= VERSIONS, f"at most {VERSIONS - 2} rounds (image variants)"
    with (
        plain_registry() as reg,
        scratch("bench-nodeupdate-") as work,
        provisioned_pod_node(reg, work) as pods,
    ):
        run(pods, rounds)


def run(pods: PodNode, rounds: int) -> None:
    node = pods.node
    noop_auto, noop_node, good, good_phases = [], [], [], []
    for i in range(rounds):
        rc, s, _ = timed_in(node, "auto-update")
        assert rc == 0
        noop_auto.append(s)
        rc, s, _ = timed_in(node, "update", "--node", "--no-pull")
        assert rc == 0
        noop_node.append(s)
        pods.move(f"v{i + 2}", f"v{i + 2}")
        rc, s, result = timed_in(node, "update", "--node")
        assert rc == 0 and result["node"]["verdict"] == "healthy", result
        good.append(s)
        good_phases.append(result["phases"])
        log(
            f"round {i + 1}: no-op auto-update {noop_auto[-1]:.2f}s, no-op update --node "
            f"{noop_node[-1]:.2f}s, good node update {s:.2f}s ({phases(result)})"
        )
    pods.move("bad", f"v{rounds + 2}")
    rc, bad_cri, cri_result = timed_in(node, "update", "--node")
    assert rc == 5 and cri_result["node"]["failed_member"] == "ocid", cri_result
    pods.move(f"v{rounds + 2}", "bad")
    rc, bad_kubelet, kubelet_result = timed_in(node, "update", "--node")
    assert rc == 5 and kubelet_result["node"]["failed_member"] == "kubelet", kubelet_result
    log(machine_note())
    log(f"no-op auto-update (2 containers on registry policy): median {median(noop_auto):.2f}s")
    log(f"no-op update --node --no-pull (3 containers): median {median(noop_node):.2f}s")
    start = median([p["start"] for p in good_phases])
    log(
        f"good node update (CRI daemon + kubelet): median {median(good):.2f}s, of which start "
        f"(restarts, CRI Status, the stand-in's pod probe and /healthz) {start:.2f}s"
    )
    log(
        f"CRI daemon without NetworkReady, rolled back: {bad_cri:.2f}s "
        f"({phases(cri_result)}; ready.timeout 30 s)"
    )
    log(
        f"kubelet never healthy, rolled back: {bad_kubelet:.2f}s "
        f"({phases(kubelet_result)}; start period 20 s + 5 x 1 s)"
    )


if __name__ == "__main__":
    main()
