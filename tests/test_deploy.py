"""System containers end to end: ``bootstrap install/update/rollback/uninstall/list/status``.

The lifecycle tests run ``bootstrap`` inside a real systemd node (one node for the module),
talking to the node's own bus and pulling from the registry fixture on the host's loopback.
Input errors (bad definitions, --set values) and the per-container lock are checked on the host
with a private store/state/unit dir: they must fail before systemd is involved.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.locks import flocked
from tests.harness.cli import bootstrap
from tests.harness.imagebuilder import File, ImageSpec, Layer, Symlink, busybox_spec
from tests.harness.node import Node
from tests.harness.registry import Registry
from tests.harness.registry_fixtures import _ensure_running

pytestmark = pytest.mark.slow

STATE = "/var/lib/bootstrap"
CONTAINERS = f"{STATE}/containers"
REGISTRIES_CONF = "/etc/bootstrap-test/registries.conf"


def registries_env(node: Node, reg: Registry) -> dict[str, str]:
    node.write_file(REGISTRIES_CONF, f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n')
    return {"REGISTRIES_CONFIG_PATH": REGISTRIES_CONF, "BOOTSTRAP_SETTLE_SECONDS": "2"}


#: The definition of the hostfs:N images: the host's /etc/hostfs-test (installed from the
#: image's /exports/hostfs) bound into the container, which copies app.conf to /run/hostfs-out
#: at start — so the files must be in place before the unit starts.
HOSTFS_DEFINITION = [
    File(
        "exports/config.json.template",
        json.dumps(
            {
                "mounts": [
                    {
                        "destination": "/hostconf",
                        "type": "bind",
                        "source": "/etc/hostfs-test",
                        "options": ["rbind", "ro"],
                    },
                    {
                        "destination": "/out",
                        "type": "bind",
                        "source": "/run/hostfs-out",
                        "options": ["rbind", "rw"],
                    },
                ]
            }
        ).encode(),
    ),
    File("exports/tmpfiles.template", b"d /run/hostfs-out 0755 root root -\n"),
]
SELF_CHECK = "/exports/hostfs/opt/oneshot-test/bin/plugin | grep -q plugin"
SEEN_CMD = ("sh", "-c", "cat /hostconf/app.conf > /out/seen; exec sleep 3600")


def hostfs_spec(version: str, cmd: tuple[str, ...] = SEEN_CMD, **files: bytes) -> ImageSpec:
    """busybox with HOSTFS_DEFINITION and an /exports/hostfs: /etc/hostfs-test/app.conf
    ("VERSION"), keep.conf (the same in every version), /opt/hostfs-test/bin/tool (0755),
    bin/link -> ``link`` (default tool), plus ``files`` (name in bin/ -> content, 0755)."""
    h = "exports/hostfs"
    entries: list[File | Symlink] = [
        *HOSTFS_DEFINITION,
        File(f"{h}/etc/hostfs-test/app.conf", f"{version}\n".encode()),
        File(f"{h}/etc/hostfs-test/keep.conf", b"the same in every version\n"),
        File(f"{h}/opt/hostfs-test/bin/tool", f"#!/bin/sh\necho {version}\n".encode(), mode=0o755),
        Symlink(f"{h}/opt/hostfs-test/bin/link", "tool"),
    ]
    entries += [File(f"{h}/opt/hostfs-test/bin/{n}", c, mode=0o755) for n, c in files.items()]
    return busybox_spec(cmd=cmd, extra=[Layer(entries)])


def oneshot_spec(version: str, cmd: str, top: str = "oneshot-test") -> ImageSpec:
    """A files-only system container: ``"type": "oneshot"``, /opt/TOP/bin/plugin for the host,
    and ``cmd`` (a shell command, /out bound to the host's /run/oneshot-out) run once."""
    plugin = f"#!/bin/sh\necho plugin {version}\n".encode()
    config = {
        "mounts": [
            {
                "destination": "/out",
                "type": "bind",
                "source": "/run/oneshot-out",
                "options": ["rbind", "rw"],
            }
        ]
    }
    layer = Layer(
        [
            File("exports/manifest.json", b'{"type": "oneshot"}'),
            File("exports/config.json.template", json.dumps(config).encode()),
            File("exports/tmpfiles.template", b"d /run/oneshot-out 0755 root root -\n"),
            File(f"exports/hostfs/opt/{top}/bin/plugin", plugin, mode=0o755),
        ]
    )
    return busybox_spec(cmd=("sh", "-c", cmd), extra=[layer])


@pytest.fixture(scope="module")
def images(_registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Images pushed to the registry: app:1 and app:2 (busybox ``sleep``, a pid 1 that ignores
    SIGTERM), bad:1 (exits at once with status 1), exports:1 (ships a definition in /exports),
    hostfs:1, hostfs:2, hostfs-bad:1 (files for the host in /exports/hostfs, see
    :func:`hostfs_spec`; the last exits at once), oneshot:1, oneshot:2, oneshot-bad:1 (see
    :func:`oneshot_spec`; the last one's command fails)."""
    from tests.harness.imagebuilder import build_image

    reg = _ensure_running(_registry_plain)
    layout = tmp_path_factory.mktemp("deploy-images") / "oci"
    specs = {
        "app:1": busybox_spec(cmd=("sleep", "3600")),
        "app:2": busybox_spec(cmd=("sleep", "3601")),
        "bad:1": busybox_spec(cmd=("false",)),
        "exports:1": busybox_spec(
            cmd=("sleep", "3602"),
            extra=[
                Layer(
                    [
                        File(
                            "exports/manifest.json",
                            b'{"defaultValues": {"WHO": "exports"}}',
                        ),
                        File(
                            "exports/config.json.template",
                            b'{"process": {"env": ["WHO=$WHO"]}}',
                        ),
                    ]
                )
            ],
        ),
        "hostfs:1": hostfs_spec("v1", **{"old-only": b"only in v1"}),
        "hostfs:2": hostfs_spec("v2", **{"new-only": b"only in v2"}),
        "hostfs-bad:1": hostfs_spec("v3", ("sh", "-c", "exit 1"), **{"v3-only": b"v3"}),
        "oneshot:1": oneshot_spec("v1", SELF_CHECK + " && echo ran-v1 >> /out/log"),
        "oneshot:2": oneshot_spec("v2", SELF_CHECK + " && echo ran-v2 >> /out/log"),
        "oneshot-bad:1": oneshot_spec("v3", "echo self-check failed >&2; exit 3", "oneshot-bad"),
    }
    refs = {}
    for name, spec in specs.items():
        tag = name.replace(":", "-")
        build_image(layout, tag, spec)
        reg.push(layout, tag, f"deploy/{name}")
        refs[name] = f"{reg.host}/deploy/{name}"
    return refs


def runc_list(node: Node) -> dict[str, dict[str, object]]:
    out = node.run("runc", "list", "--format", "json").stdout.strip()
    return {c["id"]: c for c in json.loads(out or "null") or []}


def running_pid(node: Node, name: str, other_than: object = None, timeout: float = 10) -> object:
    """The pid of runc container ``name`` once it runs (and is not ``other_than``)."""
    deadline = time.monotonic() + timeout
    while True:
        c = runc_list(node).get(name)
        if c and c["status"] == "running" and c["pid"] != other_than:
            return c["pid"]
        assert time.monotonic() < deadline, f"container {name} not running: {c}"
        time.sleep(0.1)


def active(node: Node, unit: str) -> str:
    return node.systemctl("is-active", unit).stdout.strip()


def verify_unit(node: Node, path: str) -> None:
    out = node.run("systemd-analyze", "verify", path, check=False)
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "cgroup-rw" not in line  # the harness's own unit, not ours
    ]
    assert out.returncode == 0 and not problems, f"systemd-analyze verify {path}: {problems}"


def wait_for_text(node: Node, path: str, text: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = node.path(path)
        if p.exists() and p.read_text() == text:
            return True
        time.sleep(0.1)
    return False


def link_target(node: Node, name: str) -> str:
    return os.readlink(node.path(f"{CONTAINERS}/{name}"))


def overlay_mounts(node: Node) -> list[str]:
    """Mount points of overlay file systems in the node, relative to CONTAINERS when inside."""
    out = node.run("cat", "/proc/self/mountinfo").stdout
    points = [line.split()[4] for line in out.splitlines() if " - overlay " in line]
    return sorted(p[len(CONTAINERS) + 1 :] if p.startswith(CONTAINERS + "/") else p for p in points)


def digest_of(node: Node, slot: str) -> str:
    info = json.loads(node.path(f"{CONTAINERS}/{slot}/info.json").read_text())
    return str(info["digest"])


@pytest.mark.node
def test_lifecycle_install_update_failed_update_rollback_uninstall(
    shared_node: Node, images: dict[str, str], registry: Registry
) -> None:
    node = shared_node
    env = registries_env(node, registry)
    unit = "c1.service"

    # install: unit active, runc runs it, the unit verifies clean
    ran = node.bootstrap("--json", "install", "c1", images["app:1"], env=env)
    assert ran.rc == 0, ran.stderr
    doc = ran.json()
    assert doc["changed"] is True and doc["unit"]["active_state"] == "active"
    assert active(node, unit) == "active"
    running_pid(node, "c1")
    assert link_target(node, "c1") == "c1.0"
    verify_unit(node, f"/etc/systemd/system/{unit}")
    assert node.systemctl("is-enabled", unit).stdout.strip() == "enabled"
    config = json.loads(node.path(f"{CONTAINERS}/c1.0/config.json").read_text())
    assert config["root"]["readonly"] is True
    assert config["process"]["args"] == ["/run/.bootstrap-init", "--", "sleep", "3600"]  # init
    first = digest_of(node, "c1.0")
    # the rootfs is an overlay over the image's tree in the store; writes land in upper/ only
    assert overlay_mounts(node) == ["c1.0/rootfs"]
    lower = os.readlink(node.path(f"{CONTAINERS}/c1.0/lower"))
    assert lower.startswith(f"{STATE}/trees/sha256/")
    mode = node.path(f"{lower}/bin/busybox").stat().st_mode
    node.run("chmod", "0700", f"{CONTAINERS}/c1.0/rootfs/bin/busybox")  # copied up (busy: no write)
    node.run("sh", "-c", f"echo written > {CONTAINERS}/c1.0/rootfs/bin/new")
    assert node.path(f"{CONTAINERS}/c1.0/upper/bin/new").read_bytes() == b"written\n"
    assert node.path(f"{CONTAINERS}/c1.0/upper/bin/busybox").stat().st_mode & 0o777 == 0o700
    assert node.path(f"{lower}/bin/busybox").stat().st_mode == mode
    assert not node.path(f"{lower}/bin/new").exists()
    assert node.bootstrap("fsck", env=env).rc == 0

    # the same install again changes nothing
    ran = node.bootstrap("--json", "install", "c1", images["app:1"], env=env)
    assert ran.rc == 0, ran.stderr
    assert ran.json()["changed"] is False and "nothing changed" in ran.json()["message"]

    # systemctl restart works (new container process)
    pid = runc_list(node)["c1"]["pid"]
    assert node.systemctl("restart", unit).returncode == 0
    assert active(node, unit) == "active"
    running_pid(node, "c1", other_than=pid)

    # update to app:2: the new deployment takes the free slot
    ran = node.bootstrap("--json", "update", "c1", images["app:2"], env=env)
    assert ran.rc == 0, ran.stderr
    assert link_target(node, "c1") == "c1.1"
    second = digest_of(node, "c1.1")
    assert second != first
    assert overlay_mounts(node) == ["c1.1/rootfs"]
    assert active(node, unit) == "active"
    verify_unit(node, f"/etc/systemd/system/{unit}")

    # update to an image whose process exits at once: rolled back, both slots as they were
    ran = node.bootstrap("update", "c1", images["bad:1"], env=env)
    assert ran.rc == 5, ran.stderr
    assert "rolled back" in ran.stderr
    assert "last journal lines" in ran.stderr
    assert link_target(node, "c1") == "c1.1"
    assert digest_of(node, "c1.1") == second and digest_of(node, "c1.0") == first
    assert not node.path(f"{CONTAINERS}/c1.new").exists()
    assert active(node, unit) == "active"
    running_pid(node, "c1")
    assert "3601" in node.run("cat", f"/proc/{running_pid(node, 'c1')}/cmdline").stdout
    # the digest that failed is remembered (auto-update will not try it again)
    failed = json.loads(node.read_file(f"{STATE}/node/failed.json"))["containers"]["c1"]
    assert failed["image"] == images["bad:1"] and "c1.service" in failed["reason"]

    # rollback reaches the deployment before the failed update's predecessor
    ran = node.bootstrap("--json", "rollback", "c1", env=env)
    assert ran.rc == 0, ran.stderr
    assert link_target(node, "c1") == "c1.0"
    assert ran.json()["deployment"]["digest"] == first
    assert active(node, unit) == "active"
    assert overlay_mounts(node) == ["c1.0/rootfs"]
    assert "3600" in node.run("cat", f"/proc/{running_pid(node, 'c1')}/cmdline").stdout

    # status and list; what the operator rolled back from is remembered as failed
    ran = node.bootstrap("--json", "status", "c1", env=env)
    assert ran.rc == 0, ran.stderr
    st = ran.json()
    assert st["active"]["digest"] == first and st["previous"]["digest"] == second
    assert st["failed_update"]["image"] == images["app:2"]
    assert st["failed_update"]["reason"] == "rolled back by 'bootstrap rollback'"
    assert st["unit"]["active_state"] == "active" and st["runc"]["status"] == "running"
    ran = node.bootstrap("--json", "list", env=env)
    listed = {c["name"]: c for c in ran.json()}
    assert listed["c1"]["active_state"] == "active" and listed["c1"]["slot"] == "c1.0"
    text = node.bootstrap("status", "c1", env=env).stdout
    assert text.startswith("c1:")
    # which policy requirement admitted the image (the node's permissive default policy)
    assert st["active"]["admitted"] == "insecureAcceptAnything [default]"
    assert "trust:    insecureAcceptAnything [default]" in text

    # a pid 1 that ignores SIGTERM (busybox sleep) is stopped by the unit's own stop sequence,
    # cleanly: a stop that waited out TimeoutStopSec would leave Result=timeout
    assert node.systemctl("stop", unit).returncode == 0
    assert node.systemctl("show", "-p", "Result", "--value", unit).stdout.strip() == "success"
    assert active(node, unit) == "inactive"
    assert "c1" not in runc_list(node)
    assert overlay_mounts(node) == []
    # the same install while stopped changes nothing either: it does not start it (as
    # `atomic install --system` on a present container; `bootstrap up` starts what it needs)
    ran = node.bootstrap("install", "c1", images["app:1"], env=env)
    assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
    assert active(node, unit) == "inactive"
    assert node.systemctl("start", unit).returncode == 0

    # killed midway through an update (symlink left on a staged copy): the next operation on
    # the name repairs it first
    node.run("cp", "-a", f"{CONTAINERS}/c1.0", f"{CONTAINERS}/c1.new")
    node.write_file(f"{CONTAINERS}/c1.new/.previous", "c1.0")
    node.run("ln", "-sfn", "c1.new", f"{CONTAINERS}/c1")
    ran = node.bootstrap("update", "c1", "--no-pull", env=env)
    assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
    assert link_target(node, "c1") == "c1.0"
    assert not node.path(f"{CONTAINERS}/c1.new").exists()
    # ... killed after the proven deployment was renamed into its slot (symlink dangling)
    node.write_file(f"{CONTAINERS}/c1.1/.previous", "c1.0")
    node.run("ln", "-sfn", "c1.new", f"{CONTAINERS}/c1")
    ran = node.bootstrap("update", "c1", "--no-pull", env=env)
    assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
    assert link_target(node, "c1") == "c1.1"
    assert not node.path(f"{CONTAINERS}/c1.1/.previous").exists()

    # uninstall: no unit, no deployment, no runc state
    ran = node.bootstrap("uninstall", "c1", env=env)
    assert ran.rc == 0, ran.stderr
    assert not node.path(f"/etc/systemd/system/{unit}").exists()
    assert not [p for p in node.path(CONTAINERS).iterdir() if p.name.startswith("c1")]
    assert "c1" not in runc_list(node)
    assert node.systemctl("is-enabled", unit).stdout.strip() in ("", "not-found")
    assert active(node, unit) in ("inactive", "unknown")
    assert node.bootstrap("uninstall", "c1", env=env).rc == 2
    assert overlay_mounts(node) == []
    # gc keeps nothing for it any more (no hold is live), and never trees of installed ones
    assert node.bootstrap("gc", env=env).rc == 0
    assert not any(node.path(f"{STATE}/holds").iterdir())

    # an install whose unit does not stay up is undone: exit 5, nothing left behind
    ran = node.bootstrap("install", "c1bad", images["bad:1"], env=env)
    assert ran.rc == 5, ran.stderr
    assert "nothing installed" in ran.stderr and "last journal lines" in ran.stderr
    assert not node.path("/etc/systemd/system/c1bad.service").exists()
    assert not [p for p in node.path(CONTAINERS).iterdir() if p.name.startswith("c1bad")]
    assert "c1bad" not in runc_list(node)
    assert overlay_mounts(node) == []


@pytest.mark.node
def test_writable_rootfs_writes_stay_in_the_deployment(
    shared_node: Node, images: dict[str, str], registry: Registry
) -> None:
    """A container with ``readonly: false`` writes and deletes in its rootfs: the changes land
    in its own upper dir only; the store's tree, a second container of the same image and a
    checkout never see them; nothing stays mounted or behind after uninstall."""
    node = shared_node
    env = registries_env(node, registry)
    d = "/etc/bootstrap-test/def-rw"
    script = "echo mine > /written; rm /bin/ls; echo done > /out/ok; exec sleep 3600"
    node.write_file(
        f"{d}/config.json.template",
        json.dumps(
            {
                "root": {"readonly": False},
                "process": {"args": ["/bin/sh", "-c", script]},
                "mounts": [
                    {
                        "destination": "/out",
                        "type": "bind",
                        "source": "/run/rw-out",
                        "options": ["rbind", "rw"],
                    }
                ],
            }
        ),
    )
    node.run("mkdir", "-p", "/run/rw-out")
    node.run("rm", "-f", "/run/rw-out/ok")
    ran = node.bootstrap("install", "rw1", images["app:1"], "--definition", d, env=env)
    assert ran.rc == 0, ran.stderr
    assert wait_for_text(node, "/run/rw-out/ok", "done\n")
    upper = f"{CONTAINERS}/rw1.0/upper"
    assert node.path(f"{upper}/written").read_text() == "mine\n"
    assert node.run("stat", "-c", "%F %t:%T", f"{upper}/bin/ls").stdout.strip() in (
        "character special file 0:0",
        "character special file 0:00",
    )  # overlayfs's whiteout
    lower = os.readlink(node.path(f"{CONTAINERS}/rw1.0/lower"))
    assert not node.path(f"{lower}/written").exists() and node.path(f"{lower}/bin/ls").exists()
    # a second container of the same image and a checkout see the image as it is
    ran = node.bootstrap("install", "rw2", images["app:1"], env=env)
    assert ran.rc == 0, ran.stderr
    assert os.readlink(node.path(f"{CONTAINERS}/rw2.0/lower")) == lower  # one shared tree
    assert not node.path(f"{CONTAINERS}/rw2.0/rootfs/written").exists()
    assert node.path(f"{CONTAINERS}/rw2.0/rootfs/bin/ls").exists()
    assert node.bootstrap("checkout", images["app:1"], "/tmp/rw-co", env=env).rc == 0
    assert not node.path("/tmp/rw-co/written").exists() and node.path("/tmp/rw-co/bin/ls").exists()
    node.run("rm", "-rf", "/tmp/rw-co")
    assert node.bootstrap("fsck", env=env).rc == 0
    assert sorted(overlay_mounts(node)) == ["rw1.0/rootfs", "rw2.0/rootfs"]
    for name in ("rw1", "rw2"):
        assert node.bootstrap("uninstall", name, env=env).rc == 0
    assert overlay_mounts(node) == []
    assert not [p for p in node.path(CONTAINERS).iterdir() if p.name.startswith("rw")]


@pytest.mark.node
def test_store_and_state_made_under_umask_000_are_private_and_a_non_root_container_runs(
    shared_node: Node, images: dict[str, str], registry: Registry
) -> None:
    """``umask 000; bootstrap install``: the store and the state are 0700 with nothing open to
    other users below them but the image's own files, and a container running as an
    unprivileged user still reads its files and runs (it never walks those paths: the overlay's
    lower dirs are mounted by root, runc pivots into the rootfs)."""
    from tests.harness.node import VENV
    from tests.harness.store_support import CONTENT, exposures

    node = shared_node
    env = registries_env(node, registry)
    store, state, d = "/var/lib/bs-private/store", "/var/lib/bs-private/state", "/etc/bs-priv"
    node.run("rm", "-rf", "/var/lib/bs-private", "/run/priv-out")
    node.run("install", "-d", "-m", "0777", "/run/priv-out")
    script = "ls /bin/busybox >/dev/null && id -u > /out/uid; exec sleep 3600"
    node.write_file(
        f"{d}/config.json.template",
        json.dumps(
            {
                "process": {"args": ["/bin/sh", "-c", script], "user": {"uid": 1000, "gid": 1000}},
                "mounts": [
                    {
                        "destination": "/out",
                        "type": "bind",
                        "source": "/run/priv-out",
                        "options": ["rbind", "rw"],
                    }
                ],
            }
        ),
    )
    argv = [str(VENV / "bin/bootstrap"), "--store", store, "--state", state]
    cmd = "umask 000; exec " + " ".join(
        [*argv, "install", "priv", images["app:1"], "--definition", d, "--set", "UNUSED=1"]
    )
    ran = node.run("sh", "-c", cmd, env=env, check=False, timeout=300)
    try:
        assert ran.returncode == 0, ran.stderr
        # a --set the definition does not use is said once (not once per rendering)
        assert ran.stderr.count("--set UNUSED: not used by the definition") == 1, ran.stderr
        assert wait_for_text(node, "/run/priv-out/uid", "1000\n")
        assert exposures(node.path(store)) == []
        state_content = tuple(f"containers/*/{p}" for p in ("rootfs", "upper", "work"))
        assert exposures(node.path(state), state_content) == []
        assert CONTENT  # the store's image content kept its modes (see test_store.py, privacy)
        # an update that changes something shows it, and a rollback takes it back
        ran = node.run(*argv, "update", "--no-pull", "--set", "LEVEL=debug", "priv", env=env,
                       check=False, timeout=300)  # fmt: skip
        assert ran.returncode == 0 and ran.stderr.count("not used by the definition") == 1
        status = node.run(*argv, "status", "priv", env=env).stdout
        assert "  set:      LEVEL=debug UNUSED=1" in status and "  rollback: " in status
        assert node.run(*argv, "rollback", "priv", env=env, check=False).returncode == 0
        status = node.run(*argv, "status", "priv", env=env).stdout
        assert "  set:      UNUSED=1\n" in status, status
    finally:
        node.run(*argv, "uninstall", "priv", env=env, check=False, timeout=300)
        node.run("rm", "-rf", "/var/lib/bs-private", d, "/run/priv-out", check=False)


@pytest.mark.node
def test_definition_templates_tmpfiles_and_exports(
    shared_node: Node, images: dict[str, str], registry: Registry, tmp_path: Path
) -> None:
    node = shared_node
    env = registries_env(node, registry)
    d = "/etc/bootstrap-test/def-c2"
    node.write_file(f"{d}/manifest.json", json.dumps({"defaultValues": {"GREETING": "hi"}}))
    node.write_file(
        f"{d}/config.json.template",
        json.dumps(
            {
                "process": {
                    # $$ is a literal $: the shell reads GREETING from the environment
                    "args": ["/bin/sh", "-c", 'echo "$$GREETING" > /out/g; exec sleep 3600'],
                    "env": ["GREETING=$GREETING"],
                },
                "mounts": [
                    {
                        "destination": "/out",
                        "type": "bind",
                        "source": "$RUN_DIRECTORY/$NAME-out",
                        "options": ["rbind", "rw"],
                    }
                ],
            }
        ),
    )
    node.write_file(f"{d}/tmpfiles.template", "d $RUN_DIRECTORY/$NAME-out 0755 root root -\n")
    ran = node.bootstrap(
        "install", "c2", images["app:1"], "--definition", d, "--set", 'GREETING=a "b" 100%',
        env=env,
    )  # fmt: skip
    assert ran.rc == 0, ran.stderr
    assert active(node, "c2.service") == "active"
    deadline = time.monotonic() + 10
    while not node.path("/run/c2-out/g").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.path("/run/c2-out/g").read_text() == 'a "b" 100%\n'

    # update with new values only (same image, the copied definition): re-rendered and restarted
    ran = node.bootstrap("update", "c2", "--set", "GREETING=bye", "--no-pull", env=env)
    assert ran.rc == 0, ran.stderr
    assert link_target(node, "c2") == "c2.1"
    assert wait_for_text(node, "/run/c2-out/g", "bye\n")
    assert node.bootstrap("rollback", "c2", env=env).rc == 0
    assert wait_for_text(node, "/run/c2-out/g", 'a "b" 100%\n')
    ran = node.bootstrap("update", "c2", "--no-pull", env=env)  # nothing new
    assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
    assert node.path("/etc/tmpfiles.d/bootstrap-c2.conf").exists()
    verify_unit(node, "/etc/systemd/system/c2.service")

    # an image that ships /exports: its definition is used
    ran = node.bootstrap("install", "c3", images["exports:1"], "--no-start", env=env)
    assert ran.rc == 0, ran.stderr
    assert active(node, "c3.service") == "inactive"
    assert node.systemctl("is-enabled", "c3.service").stdout.strip() == "enabled"
    config = json.loads(node.path(f"{CONTAINERS}/c3/config.json").read_text())
    assert "WHO=exports" in config["process"]["env"]
    info = json.loads(node.path(f"{CONTAINERS}/c3/info.json").read_text())
    assert info["definition"]["source"] == "image"
    ran = node.bootstrap("update", "c3", "--no-pull", "--set", "WHO=set", env=env)
    assert ran.rc == 0, ran.stderr
    assert "not started" in ran.stdout and active(node, "c3.service") == "inactive"
    config = json.loads(node.path(f"{CONTAINERS}/c3/config.json").read_text())
    assert "WHO=set" in config["process"]["env"] and link_target(node, "c3") == "c3.1"

    for name in ("c2", "c3"):
        assert node.bootstrap("uninstall", name, env=env).rc == 0
    assert not node.path("/etc/tmpfiles.d/bootstrap-c2.conf").exists()
    assert not node.path("/etc/systemd/system/c2.service").exists()


HOSTFS_DIRS = ("/etc/hostfs-test", "/opt/hostfs-test")


def host_tree(node: Node) -> dict[str, object]:
    """Below HOSTFS_DIRS in the node: path -> "dir", "-> TARGET" or (content, mode)."""
    out: dict[str, object] = {}
    root = node.path("/")
    for top in HOSTFS_DIRS:
        if not os.path.lexists(node.path(top)):
            continue
        out[top] = "dir"
        for dirpath, dirs, files in os.walk(node.path(top)):
            for n in dirs + files:
                p = Path(dirpath) / n
                where = "/" + str(p.relative_to(root))
                if p.is_symlink():
                    out[where] = "-> " + os.readlink(p)
                elif p.is_dir():
                    out[where] = "dir"
                else:
                    out[where] = (p.read_bytes(), p.stat().st_mode & 0o7777)
    return out


def hostfs_files(version: str, **bins: bytes) -> dict[str, object]:
    """What :func:`host_tree` shows with hostfs:VERSION's files installed."""
    tree: dict[str, object] = {
        "/etc/hostfs-test": "dir",
        "/etc/hostfs-test/app.conf": (f"{version}\n".encode(), 0o644),
        "/etc/hostfs-test/keep.conf": (b"the same in every version\n", 0o644),
        "/opt/hostfs-test": "dir",
        "/opt/hostfs-test/bin": "dir",
        "/opt/hostfs-test/bin/tool": (f"#!/bin/sh\necho {version}\n".encode(), 0o755),
        "/opt/hostfs-test/bin/link": "-> tool",
    }
    tree.update({f"/opt/hostfs-test/bin/{n}": (c, 0o755) for n, c in bins.items()})
    return tree


#: A host-file transition of h1 into SLOT (from what SLOT_FROM records) with the symlink
#: flipped to SLOT, cut short like a killed command: HALF of the operations, or all of them
#: and the record (the run that follows must repair it).
INTERRUPTED_TRANSITION = """
import os
from pathlib import Path
from bootstrap.deploy import hostfs
c = Path("/var/lib/bootstrap/containers")
slot = c / SLOT
t = hostfs.prepare(
    "h1", hostfs.claims(c / SLOT_FROM), hostfs.scan(slot / "lower", "t"), strict=False
)
t.begin(slot)
os.symlink(SLOT, c / ".h1.link.tmp")
os.replace(c / ".h1.link.tmp", c / "h1")
if HALF:
    t.ops = t.ops[: len(t.ops) // 2]
    t.apply()
else:
    t.finish(slot)
"""


@pytest.mark.node
def test_host_files_install_update_rollback_interrupted_uninstall(
    shared_node: Node, images: dict[str, str], registry: Registry
) -> None:
    """An image's /exports/hostfs on the node's own /: refused over a file that is not ours
    (nothing installed), in place before the unit starts, replaced/removed by update (a file
    the operator changed is kept, with a warning), restored after a failed update, by rollback
    and by the command after a killed one, removed by uninstall (changed ones kept)."""
    node = shared_node
    env = registries_env(node, registry)
    node.run("rm", "-rf", *HOSTFS_DIRS, "/run/hostfs-out")
    v1 = hostfs_files("v1", **{"old-only": b"only in v1"})
    v2 = hostfs_files("v2", **{"new-only": b"only in v2"})
    tuned = {"/etc/hostfs-test/keep.conf": (b"tuned\n", 0o644)}

    # a host file that is not the container's: refused before anything changes
    node.write_file("/etc/hostfs-test/app.conf", "the operator's\n")
    ran = node.bootstrap("install", "h1", images["hostfs:1"], env=env)
    assert ran.rc == 2, ran.stderr
    line = "h1: /etc/hostfs-test/app.conf exists (file) and was not installed by h1"
    assert line in ran.stderr and "remove or move away /etc/hostfs-test/app.conf" in ran.stderr
    assert host_tree(node) == {
        "/etc/hostfs-test": "dir",
        "/etc/hostfs-test/app.conf": (b"the operator's\n", 0o644),
    }
    assert not [p for p in node.path(CONTAINERS).iterdir() if p.name.startswith("h1")]
    assert not node.path("/etc/systemd/system/h1.service").exists()
    node.run("rm", "-rf", "/etc/hostfs-test")

    # install: in place before the unit starts (it binds /etc/hostfs-test and reads app.conf)
    ran = node.bootstrap("--json", "install", "h1", images["hostfs:1"], env=env)
    assert ran.rc == 0, ran.stderr
    assert host_tree(node) == v1
    assert wait_for_text(node, "/run/hostfs-out/seen", "v1\n")
    files = {f["path"]: f for f in ran.json()["deployment"]["host_files"]}
    assert files["/opt/hostfs-test/bin/tool"]["mode"] == "0755"
    assert files["/opt/hostfs-test/bin/link"] == {
        "path": "/opt/hostfs-test/bin/link", "type": "symlink", "target": "tool",
        "adopted": False,
    }  # fmt: skip
    assert set(files) == set(v1) and "/etc" not in files and "/opt" not in files
    st = node.bootstrap("--json", "status", "h1", env=env).json()
    assert st["active"]["host_files"] == ran.json()["deployment"]["host_files"]
    text = node.bootstrap("status", "h1", env=env).stdout
    assert "host:     5 files/symlinks, 3 directories from /exports/hostfs" in text

    # the operator changes a file; update keeps it (one warning line) and replaces the rest
    node.write_file("/etc/hostfs-test/keep.conf", "tuned\n")
    ran = node.bootstrap("update", "h1", images["hostfs:2"], env=env)
    assert ran.rc == 0, ran.stderr
    assert [x for x in ran.stderr.splitlines() if "hostfs-test" in x] == [
        "h1: kept /etc/hostfs-test/keep.conf: changed since h1 installed it (no longer managed "
        "by bootstrap); not replaced"
    ]
    assert host_tree(node) == {**v2, **tuned}
    assert wait_for_text(node, "/run/hostfs-out/seen", "v2\n")

    # a failed update puts the files back as they were
    ran = node.bootstrap("update", "h1", images["hostfs-bad:1"], env=env)
    assert ran.rc == 5 and "rolled back" in ran.stderr, ran.stderr
    assert host_tree(node) == {**v2, **tuned}
    assert active(node, "h1.service") == "active" and link_target(node, "h1") == "h1.1"

    # rollback brings back the rollback target's files; the tuned file stays the operator's
    ran = node.bootstrap("rollback", "h1", env=env)
    assert ran.rc == 0, ran.stderr
    assert host_tree(node) == {**v1, **tuned}
    assert wait_for_text(node, "/run/hostfs-out/seen", "v1\n")

    # killed during an update (symlink on the staged slot, files half or all switched): the
    # next command goes back to the slot recorded and puts its files back
    for half in (True, False):
        node.run("cp", "-a", f"{CONTAINERS}/h1.1", f"{CONTAINERS}/h1.new")
        node.write_file(f"{CONTAINERS}/h1.new/.previous", "h1.0")
        code = INTERRUPTED_TRANSITION.replace("SLOT_FROM", '"h1.0"').replace("SLOT", '"h1.new"')
        node.python(code.replace("HALF", str(half)))
        assert link_target(node, "h1") == "h1.new" and host_tree(node) != {**v1, **tuned}
        ran = node.bootstrap("update", "h1", "--no-pull", env=env)
        assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
        assert link_target(node, "h1") == "h1.0"
        assert host_tree(node) == {**v1, **tuned}
        assert not node.path(f"{CONTAINERS}/h1.new").exists()
        assert not list(node.path(CONTAINERS).glob("*/hostfs.pending"))
    # ... killed during a rollback (symlink already on the target): the next command finishes it
    code = INTERRUPTED_TRANSITION.replace("SLOT_FROM", '"h1.0"').replace("SLOT", '"h1.1"')
    node.python(code.replace("HALF", "True"))
    assert node.path(f"{CONTAINERS}/h1.1/hostfs.pending").exists()
    ran = node.bootstrap("update", "h1", "--no-pull", env=env)
    assert ran.rc == 0 and "nothing changed" in ran.stdout, ran.stderr
    assert "a change of its host files was interrupted" in ran.stderr
    assert host_tree(node) == {**v2, **tuned}
    assert not list(node.path(CONTAINERS).glob("*/hostfs.pending"))
    assert node.bootstrap("rollback", "h1", env=env).rc == 0
    assert host_tree(node) == {**v1, **tuned}

    # uninstall removes the files that are still ours as installed; a changed one is kept
    node.run("chmod", "0700", "/opt/hostfs-test/bin/tool")
    ran = node.bootstrap("uninstall", "h1", env=env)
    assert ran.rc == 0, ran.stderr
    assert [x for x in ran.stderr.splitlines() if x.startswith("h1: kept")] == [
        "h1: kept /opt/hostfs-test/bin/tool: changed since h1 installed it (not removed; no "
        "longer managed by bootstrap)"
    ]
    assert host_tree(node) == {
        "/etc/hostfs-test": "dir",
        "/etc/hostfs-test/keep.conf": (b"tuned\n", 0o644),
        "/opt/hostfs-test": "dir",
        "/opt/hostfs-test/bin": "dir",
        "/opt/hostfs-test/bin/tool": (b"#!/bin/sh\necho v1\n", 0o700),
    }
    node.run("rm", "-rf", *HOSTFS_DIRS)


@pytest.mark.node
def test_oneshot_container(shared_node: Node, images: dict[str, str], registry: Registry) -> None:
    """``"type": "oneshot"``: the unit is Type=oneshot + RemainAfterExit=yes without Restart=;
    install counts it as started once its command succeeded (active (exited)), update runs the
    new version's command once; a failing command undoes the install (exit 5, its host files
    gone) and rolls an update back (the previous version's files and command again)."""
    node = shared_node
    env = registries_env(node, registry)
    node.run("rm", "-rf", "/opt/oneshot-test", "/opt/oneshot-bad", "/run/oneshot-out")
    plugin = "/opt/oneshot-test/bin/plugin"

    ran = node.bootstrap("--json", "install", "o1", images["oneshot:1"], env=env)
    assert ran.rc == 0, ran.stderr
    unit = ran.json()["unit"]
    assert (unit["active_state"], unit["sub_state"]) == ("active", "exited")
    show = node.systemctl("show", "-p", "Type", "-p", "RemainAfterExit", "-p", "Restart",
                          "o1.service").stdout.split()  # fmt: skip
    assert sorted(show) == ["RemainAfterExit=yes", "Restart=no", "Type=oneshot"]
    verify_unit(node, "/etc/systemd/system/o1.service")
    assert node.read_file("/run/oneshot-out/log") == "ran-v1\n"
    assert node.read_file(plugin) == "#!/bin/sh\necho plugin v1\n"
    assert "o1" not in runc_list(node)  # it ran and is gone

    # update: the new version's command runs once
    ran = node.bootstrap("update", "o1", images["oneshot:2"], env=env)
    assert ran.rc == 0, ran.stderr
    assert node.read_file("/run/oneshot-out/log") == "ran-v1\nran-v2\n"
    assert node.read_file(plugin) == "#!/bin/sh\necho plugin v2\n"
    assert active(node, "o1.service") == "active"

    # an update whose command fails rolls back: v2's files, its command once more
    ran = node.bootstrap("update", "o1", images["oneshot-bad:1"], env=env)
    assert ran.rc == 5 and "rolled back" in ran.stderr, ran.stderr
    assert "self-check failed" in ran.stderr
    assert node.read_file(plugin) == "#!/bin/sh\necho plugin v2\n"
    assert not node.path("/opt/oneshot-bad").exists()
    assert node.read_file("/run/oneshot-out/log") == "ran-v1\nran-v2\nran-v2\n"
    assert active(node, "o1.service") == "active" and link_target(node, "o1") == "o1.1"

    # an install whose command fails is undone: exit 5, no unit, no slot, no host files
    ran = node.bootstrap("install", "o2", images["oneshot-bad:1"], env=env)
    assert ran.rc == 5, ran.stderr
    assert "nothing installed" in ran.stderr and "self-check failed" in ran.stderr
    assert not node.path("/etc/systemd/system/o2.service").exists()
    assert not [p for p in node.path(CONTAINERS).iterdir() if p.name.startswith("o2")]
    assert not node.path("/opt/oneshot-bad").exists()

    assert node.bootstrap("uninstall", "o1", env=env).rc == 0
    assert not node.path("/opt/oneshot-test").exists()
    assert active(node, "o1.service") in ("inactive", "unknown")


NOTIFY_PY = (
    "import os, socket, time\n"
    "time.sleep(1.5)\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.connect(os.environ['NOTIFY_SOCKET'])\n"
    "s.send(b'READY=1')\n"
    "time.sleep(3600)\n"
)


@pytest.mark.node
def test_notify_readiness(shared_node: Node, images: dict[str, str], registry: Registry) -> None:
    """readiness "notify": Type=notify, runc relays the container's READY=1; the start job ends
    only then. The container runs the node's python (its /usr bound read-only)."""
    node = shared_node
    env = registries_env(node, registry)
    d = "/etc/bootstrap-test/def-c4"
    node.write_file(f"{d}/manifest.json", json.dumps({"readiness": "notify"}))
    ro = ["rbind", "ro"]
    node.write_file(
        f"{d}/config.json.template",
        json.dumps(
            {
                "process": {"args": ["/usr/bin/python3", "-c", NOTIFY_PY]},
                "mounts": [
                    {"destination": p, "type": "bind", "source": p, "options": ro}
                    for p in ("/usr", "/lib", "/lib64")
                ],
            }
        ),
    )
    started = time.monotonic()
    udir = "/etc/bootstrap-test/units"
    ran = node.bootstrap(
        "--json", "install", "c4", images["app:1"], "--definition", d, "--unit-dir", udir,
        env=env,
    )  # fmt: skip
    took = time.monotonic() - started
    assert ran.rc == 0, ran.stderr
    assert took > 1.5
    assert ran.json()["unit"]["active_state"] == "active"
    show = node.systemctl("show", "-p", "Type", "-p", "MainPID", "c4.service").stdout
    assert "Type=notify" in show
    verify_unit(node, f"{udir}/c4.service")
    assert node.systemctl("is-enabled", "c4.service").stdout.strip() in ("enabled", "linked")
    assert node.bootstrap("uninstall", "c4", env=env).rc == 0
    assert not node.path(f"{udir}/c4.service").exists()
    assert not os.path.lexists(node.path("/etc/systemd/system/c4.service"))
    assert node.systemctl("is-enabled", "c4.service").stdout.strip() in ("", "not-found")


@pytest.mark.node
def test_unit_exec_quoting_round_trips(shared_node: Node) -> None:
    """systemd reads a command line quoted by units.exec_command back into the same argv."""
    from bootstrap.systemd import units

    node = shared_node
    argv = ["/bin/echo", "a b", "100%", "$HOME", 'q"uote', "back\\slash", "it's", ";"]
    node.write_file(
        "/etc/systemd/system/quoting.service",
        f"[Service]\nType=oneshot\nExecStart={units.exec_command(argv)}\n",
    )
    verify_unit(node, "/etc/systemd/system/quoting.service")
    node.systemctl("daemon-reload")
    assert node.systemctl("start", "quoting.service").returncode == 0
    out = node.run("journalctl", "-u", "quoting.service", "-o", "cat", "--no-pager").stdout
    assert " ".join(argv[1:]) in out
    node.path("/etc/systemd/system/quoting.service").unlink()
    node.systemctl("daemon-reload")


@pytest.mark.node
def test_service_template_values_on_exec_lines_are_one_word(shared_node: Node) -> None:
    """A value substituted into a user's own ``ExecStart=`` is one argument, as systemd reads it
    back: alone, in the middle of a word, inside the template's own quotes, on a continued
    line."""
    from bootstrap.deploy import definition as defn

    node = shared_node
    values = {
        "A": "a b",
        "B": "100% $HOME",
        "C": 'q"uote back\\slash',
        "D": "it's ;",
        "E": "",
    }
    template = defn.TemplateFile(
        "def/service.template",
        "[Service]\nType=oneshot\n"
        'ExecStart=/usr/bin/printf [%%s] $A --opt=$B "in $C quotes" \\\n'
        "    'single $D' $E ${A}\n",
    )
    unit = template.render(values, defn.unit_escaper(template.where, commands=True))
    node.write_file("/etc/systemd/system/words.service", unit)
    verify_unit(node, "/etc/systemd/system/words.service")
    node.systemctl("daemon-reload")
    assert node.systemctl("start", "words.service").returncode == 0
    out = node.run("journalctl", "-u", "words.service", "-o", "cat", "--no-pager").stdout
    expected = [
        "a b", "--opt=100% $HOME", 'in q"uote back\\slash quotes', "single it's ;", "", "a b",
    ]  # fmt: skip
    assert "".join(f"[{w}]" for w in expected) in out, (unit, out)
    node.path("/etc/systemd/system/words.service").unlink()
    node.systemctl("daemon-reload")


# ---- on the host: bad input changes nothing; the per-container lock ----------------------------


@pytest.fixture
def host_env(
    registry: Registry, images: dict[str, str], tmp_path: Path
) -> Iterator[dict[str, object]]:
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{registry.host}"\ninsecure = true\n')
    store, state, units_dir = tmp_path / "store", tmp_path / "state", tmp_path / "units"
    units_dir.mkdir()
    env = {"REGISTRIES_CONFIG_PATH": str(conf), "BOOTSTRAP_LOCK_TIMEOUT": "1"}
    ran = bootstrap("pull", images["app:1"], store=store, env=env)
    assert ran.rc == 0, ran.stderr
    yield {"store": store, "state": state, "units": units_dir, "env": env}


def snapshot(*roots: Path) -> list[str]:
    out = []
    for root in roots:
        if root.exists():
            out += sorted(str(p) for p in root.rglob("*"))
    return out


BAD_DEFINITIONS = {
    "bad-json": ({"config.json.template": '{"process": {"args": ["/x",]}}'}, r":1:\d+: invalid"),
    "bad-manifest": ({"manifest.json": '{"defaultValues": }'}, r"manifest.json:1:\d+: invalid"),
    "unknown-var": (
        {"service.template": "[Unit]\nDescription=x\n[Service]\nExecStart=$EXEC_START $NOPE\n"},
        r"service.template:4: unknown variable \$NOPE",
    ),
    "bad-dollar": ({"tmpfiles.template": "d /run/$ 0755\n"}, r"tmpfiles.template:1: '\$'"),
    "json-injection": (
        {"config.json.template": '{"hostname": $NAME}'},
        r"config.json.template:1:\d+: invalid JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DEFINITIONS))
def test_bad_definition_exit_2_nothing_changed(
    host_env: dict[str, object], images: dict[str, str], tmp_path: Path, case: str
) -> None:
    files, pattern = BAD_DEFINITIONS[case]
    d = tmp_path / "def"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    state, units_dir = Path(str(host_env["state"])), Path(str(host_env["units"]))
    before = snapshot(state / "containers", units_dir)
    ran = bootstrap(
        "install", "c9", images["app:1"], "--definition", d, "--unit-dir", units_dir,
        store=Path(str(host_env["store"])), state=state, env=host_env["env"],  # type: ignore[arg-type]
    )  # fmt: skip
    assert ran.rc == 2, ran.stderr
    assert re.search(pattern, ran.stderr), ran.stderr
    assert snapshot(state / "containers", units_dir) == before


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("DESC=a\nExecStartPre=/bin/evil", "control character or newline"),
        ("NAME=other", "cannot be overridden"),
        ("1BAD=x", "not a valid variable name"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_set_values_exit_2_nothing_changed(
    host_env: dict[str, object], images: dict[str, str], tmp_path: Path, setting: str, message: str
) -> None:
    d = tmp_path / "def"
    d.mkdir()
    (d / "service.template").write_text(
        "[Unit]\nDescription=$DESC\n[Service]\nExecStart=$EXEC_START\n"
    )
    (d / "manifest.json").write_text('{"defaultValues": {"DESC": "ok"}}')
    state, units_dir = Path(str(host_env["state"])), Path(str(host_env["units"]))
    ran = bootstrap(
        "install", "c9", images["app:1"], "--definition", d, "--unit-dir", units_dir,
        "--set", setting,
        store=Path(str(host_env["store"])), state=state, env=host_env["env"],  # type: ignore[arg-type]
    )  # fmt: skip
    assert ran.rc == 2, ran.stderr
    assert message in ran.stderr
    assert snapshot(state / "containers", units_dir) == []


def test_second_operation_on_same_name_is_busy(host_env: dict[str, object]) -> None:
    state = Path(str(host_env["state"]))
    with flocked(state / "locks" / "containers" / "c8.lock"):
        started = time.monotonic()
        ran = bootstrap("uninstall", "c8", state=state, env=host_env["env"])  # type: ignore[arg-type]
        assert ran.rc == 6, ran.stderr
        assert "c8 is locked by another process" in ran.stderr
        assert 0.9 < time.monotonic() - started < 30
    assert bootstrap("uninstall", "c8", state=state, env=host_env["env"]).rc == 2  # type: ignore[arg-type]


def test_not_installed_and_bad_names(host_env: dict[str, object]) -> None:
    state = Path(str(host_env["state"]))
    env = host_env["env"]
    for argv in (
        ["rollback", "nope"],
        ["status", "nope"],
        ["update", "nope"],
        ["uninstall", "x.y"],
    ):
        ran = bootstrap(*argv, state=state, env=env)  # type: ignore[arg-type]
        assert ran.rc == 2, (argv, ran.stderr)
    ran = bootstrap("--json", "list", state=state, env=env)  # type: ignore[arg-type]
    assert ran.rc == 0 and ran.json() == []


@pytest.mark.node
def test_manager_over_dbus_from_host(shared_node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """Manager on the node's bus from the host ($BOOTSTRAP_DBUS_ADDRESS): enable, start with
    JobRemoved, state, a failing start as SystemdError, stop, disable."""
    from bootstrap.errors import SystemdError
    from bootstrap.systemd.manager import Manager

    node = shared_node
    monkeypatch.setenv("BOOTSTRAP_DBUS_ADDRESS", node.bus_address)
    node.write_file(
        "/etc/systemd/system/mgr-ok.service",
        "[Service]\nExecStart=/bin/sleep 300\n[Install]\nWantedBy=multi-user.target\n",
    )
    node.write_file("/etc/systemd/system/mgr-bad.service", "[Service]\nExecStart=/bin/false\n")
    m = Manager()
    assert m.address == node.bus_address
    m.reload()
    m.enable(["mgr-ok.service"])
    st = m.start("mgr-ok.service", settle=0.5)
    assert st.active_state == "active" and st.main_pid > 0
    assert m.state("mgr-ok.service").unit_file_state == "enabled"
    with pytest.raises(SystemdError, match=r"mgr-bad.service: .*(failed|inactive)"):
        m.start("mgr-bad.service", settle=1.0)
    m.stop("mgr-ok.service")
    assert m.state("mgr-ok.service").active_state == "inactive"
    m.disable(["mgr-ok.service"])
    assert m.state("mgr-ok.service").unit_file_state == "disabled"
    assert m.state("no-such.service").load_state == "not-found"
    m.stop("no-such.service")  # a unit systemd does not know is already stopped
    # inside the node, on the shared system bus connection: a second Manager subscribes again
    out = node.python(
        "from bootstrap.systemd.manager import Manager\n"
        "a, b = Manager(), Manager()\n"
        "a.stop('mgr-ok.service'); b.stop('mgr-ok.service')\n"
        "print(b.state('mgr-ok.service').active_state)\n"
    )
    assert out.strip() == "inactive"
    for unit in ("mgr-ok.service", "mgr-bad.service"):
        node.path(f"/etc/systemd/system/{unit}").unlink()
    m.reset_failed("mgr-bad.service")
    m.reload()


def test_systemd_unreachable_exit_5_nothing_changed(
    host_env: dict[str, object], images: dict[str, str], tmp_path: Path
) -> None:
    state, units_dir = Path(str(host_env["state"])), Path(str(host_env["units"]))
    env = {**host_env["env"], "BOOTSTRAP_DBUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}  # type: ignore[dict-item]
    ran = bootstrap(
        "install", "c9", images["app:1"], "--unit-dir", units_dir,
        store=Path(str(host_env["store"])), state=state, env=env,
    )  # fmt: skip
    assert ran.rc == 5, ran.stderr
    assert "cannot reach systemd over D-Bus" in ran.stderr
    assert snapshot(state / "containers", units_dir) == []


@pytest.mark.node
def test_concurrent_installs_of_one_name_serialize(
    shared_node: Node, images: dict[str, str], registry: Registry
) -> None:
    """Two installs of the same container at once: the second waits for the first's lock,
    then finds it installed with the same inputs and changes nothing."""
    from concurrent.futures import ThreadPoolExecutor

    node = shared_node
    env = registries_env(node, registry)
    with ThreadPoolExecutor(2) as pool:
        runs = list(
            pool.map(
                lambda _: node.bootstrap("--json", "install", "c5", images["app:2"], env=env),
                range(2),
            )
        )
    assert all(r.rc == 0 for r in runs), [r.stderr for r in runs]
    assert sorted(r.json()["changed"] for r in runs) == [False, True]
    assert active(node, "c5.service") == "active"
    assert node.bootstrap("uninstall", "c5", env=env).rc == 0
