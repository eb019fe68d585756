"""Benchmark: ``bootstrap auto-update`` with nothing to update, and an update that rolls back.

In a systemd node (the test harness's, booted once), three containers are installed with
``--auto-update registry`` from small busybox images in a local plain-HTTP docker-registry.
Each round times, inside the node (no nsenter in the figure):

- ``bootstrap auto-update`` with nothing to update (target: one HEAD per container, < 0.5 s for
  the three), counting the requests in the registry's access log;
- as the reference, ``skopeo inspect --raw docker://REF`` for each of the three references, one
  after the other (what a shell loop over ``skopeo`` would cost for the same question);

(the node image has no skopeo: then the host's, against the same registry on the same loopback)
(the node image has no skopeo: then the host's, against the same registry on the same loopback);
then, once, an update to an image that exits at once, rolled back (exit 5).

    .venv/bin/python bench/autoupdate.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    check,
    insecure_registries_conf,
    log,
    machine_note,
    median,
    plain_registry,
    scratch,
    timed,
)
from tests.harness.imagebuilder import build_image, busybox_spec
from tests.harness.node import VENV, Node

NAMES = ("au-a", "au-b", "au-c")
TIMER = """
import json, os, subprocess, sys, time
argv, env = json.loads(sys.argv[1]), {**os.environ, **json.loads(sys.argv[2])}
t = time.monotonic()
p = subprocess.run(argv, capture_output=True, text=True, env=env)
print(json.dumps({"rc": p.returncode, "s": time.monotonic() - t, "err": p.stderr[-2000:]}))
"""


def timed_in(node: Node, argv: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    out = node.run(
        str(VENV / "bin/python"), "-c", TIMER, json.dumps(argv), json.dumps(env), timeout=600
    ).stdout
    doc = json.loads(out.strip().splitlines()[-1])
    return int(doc["rc"]), float(doc["s"]), str(doc["err"])


def heads(reg_log: str) -> int:
    return len(re.findall(r'"HEAD /v2/[^"]*/manifests/', reg_log))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    rounds = ap.parse_args().rounds
    with plain_registry() as reg, scratch("bench-au-") as work, Node.start() as node:
        layout = work / "oci"
        build_image(layout, "ok", busybox_spec(cmd=("sleep", "3600")))
        build_image(layout, "bad", busybox_spec(cmd=("false",)))
        conf = insecure_registries_conf(work, reg.host)
        node.write_file("/etc/bench/registries.conf", conf.read_text())
        env = {
            "REGISTRIES_CONFIG_PATH": "/etc/bench/registries.conf",
            "BOOTSTRAP_SETTLE_SECONDS": "2",
        }
        refs = []
        for name in NAMES:
            reg.push(layout, "ok", f"bench/{name}:live")
            refs.append(f"{reg.host}/bench/{name}:live")
            node.bootstrap(
                "install", "--auto-update", "registry", name, refs[-1], env=env, check=True
            )
        ours, theirs, per_run = [], [], []
        has_skopeo = node.run("sh", "-c", "command -v skopeo", check=False).returncode == 0
        for i in range(rounds):
            before = heads(reg.log())
            rc, s, err = timed_in(node, [str(VENV / "bin/bootstrap"), "auto-update"], env)
            assert rc == 0, err
            ours.append(s)
            per_run.append(heads(reg.log()) - before)
            argv = [
                "sh",
                "-c",
                " && ".join(
                    f"skopeo inspect --raw --tls-verify=false docker://{r} >/dev/null" for r in refs
                ),
            ]
            if has_skopeo:
                rc, t, err = timed_in(node, argv, {})
                assert rc == 0, err
            else:  # the node has no skopeo: the host's, same registry, same loopback
                t = check(timed(argv), "skopeo inspect").seconds
            theirs.append(t)
            log(
                f"round {i + 1}: auto-update no-op {s:.3f}s ({per_run[-1]} HEADs)"
                + (f", skopeo inspect x3 {theirs[-1]:.3f}s" if theirs else "")
            )
        reg.push(layout, "bad", "bench/au-a:live")
        rc, rollback, err = timed_in(node, [str(VENV / "bin/bootstrap"), "auto-update"], env)
        assert rc == 5, err
        log(machine_note())
        log(
            f"no-op auto-update of 3 containers: median {median(ours):.3f}s (target < 0.5 s), "
            f"{max(per_run)} HEAD requests per run (target 3)"
        )
        if theirs:
            log(
                f"skopeo inspect --raw x3: median {median(theirs):.3f}s; "
                f"ratio ours/skopeo {median(ours) / median(theirs):.2f}"
            )
        log(f"update to a broken image, rolled back (settle 2 s): {rollback:.2f}s")
        for name in NAMES:
            node.bootstrap("uninstall", name, env=env)


if __name__ == "__main__":
    main()
