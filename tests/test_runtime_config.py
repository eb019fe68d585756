"""The OCI runtime config: generated from the image config, merged with a template, users
resolved in the rootfs only, capabilities cut to the bounding set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bootstrap.errors import UsageError
from bootstrap.image.model import ImageConfig
from bootstrap.runtime import config as rc


def image_config(**kw: Any) -> ImageConfig:
    base: dict[str, Any] = {
        "digest": "sha256:" + "0" * 64,
        "os": "linux",
        "architecture": "amd64",
        "diff_ids": (),
    }
    base.update(kw)
    return ImageConfig(**base)


def rootfs(tmp_path: Path, passwd: str = "", group: str = "") -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(passwd)
    (root / "etc/group").write_text(group)
    return root


def test_generated_config_from_image() -> None:
    cfg = image_config(
        entrypoint=("/bin/daemon",),
        cmd=("--flag",),
        env=("A=1",),
        working_dir="/srv",
    )
    p = rc.prepare(cfg, hostname="c1", bounding=rc.CAPABILITIES)
    doc = p.document
    assert doc["process"]["args"] == ["/bin/daemon", "--flag"]
    assert doc["process"]["env"][0].startswith("PATH=")
    assert "A=1" in doc["process"]["env"]
    assert doc["process"]["cwd"] == "/srv"
    assert doc["process"]["terminal"] is False
    assert doc["root"] == {"path": "rootfs", "readonly": True}
    assert "rlimits" not in doc["process"]
    assert "cgroupsPath" not in doc["linux"]
    assert p.readonly and p.host_network and not p.host_pid
    dests = [m["destination"] for m in doc["mounts"]]
    assert {"/proc", "/dev", "/sys", "/run", "/tmp"} <= set(dests)


def test_no_command_is_usage_error() -> None:
    with pytest.raises(UsageError, match="no Entrypoint or Cmd"):
        rc.prepare(image_config(), hostname="c")


def test_template_merge_rules() -> None:
    cfg = image_config(cmd=("/bin/sleep", "1"), env=("PATH=/bin", "A=1", "B=2"))
    template = {
        "process": {"env": ["B=3", "C=4"], "args": ["/bin/other"], "noNewPrivileges": None},
        "root": {"readonly": False},
        "mounts": [
            {"destination": "/tmp", "type": "bind", "source": "/var/tmp", "options": ["rbind"]},
            {"destination": "/data", "type": "bind", "source": "/srv", "options": ["rbind"]},
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
    }
    p = rc.prepare(cfg, hostname="c", template=template, bounding=rc.CAPABILITIES)
    doc = p.document
    assert doc["process"]["env"] == ["PATH=/bin", "A=1", "B=3", "C=4"]
    assert doc["process"]["args"] == ["/bin/other"]
    assert "noNewPrivileges" not in doc["process"]
    assert doc["root"] == {"path": "rootfs", "readonly": False}
    tmp = [m for m in doc["mounts"] if m["destination"] == "/tmp"]
    assert tmp == [template["mounts"][0]]
    assert doc["mounts"][-1]["destination"] == "/data"
    assert not p.host_network and not p.readonly


def test_a_host_bind_drops_the_generated_mounts_below_it() -> None:
    cfg = image_config(cmd=("/bin/sleep", "1"))
    bind = {"type": "bind", "options": ["rbind", "rw", "rslave"]}
    template = {
        "mounts": [
            {"destination": "/dev", "source": "/dev", **bind},
            {"destination": "/sys", "source": "/sys", **bind},
            {"destination": "/sys/fs/cgroup", "source": "/sys/fs/cgroup", **bind},
            {"destination": "/etc", "source": "/etc", **bind},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": []},
        ]
    }
    doc = rc.prepare(cfg, hostname="c", template=template, bounding=rc.CAPABILITIES).document
    dests = [m["destination"] for m in doc["mounts"]]
    # the host's /dev/pts, /dev/mqueue and /etc/resolv.conf are there already; the template's
    # own /dev/shm and /sys/fs/cgroup stay; /proc, /run and /tmp are not below a bind
    for gone in ("/dev/pts", "/dev/mqueue", "/etc/resolv.conf", "/etc/hosts"):
        assert gone not in dests
    for kept in ("/proc", "/dev", "/dev/shm", "/sys", "/sys/fs/cgroup", "/run", "/tmp", "/etc"):
        assert dests.count(kept) == 1, kept
    assert dests.index("/sys") < dests.index("/sys/fs/cgroup")
    cgroup = next(m for m in doc["mounts"] if m["destination"] == "/sys/fs/cgroup")
    assert cgroup["type"] == "bind"


def test_template_user_overrides_image_user(tmp_path: Path) -> None:
    cfg = image_config(cmd=("/x",), user="nosuchuser")
    p = rc.prepare(cfg, hostname="c", template={"process": {"user": {"uid": 7, "gid": 8}}})
    assert p.image_user is None
    assert rc.finalize(p, rootfs(tmp_path))["process"]["user"] == {"uid": 7, "gid": 8}


def test_capabilities_cut_to_bounding_set() -> None:
    cfg = image_config(cmd=("/x",))
    template = {"process": {"capabilities": {"bounding": ["CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"]}}}
    bounding = [c for c in rc.CAPABILITIES if c != "CAP_SYS_RESOURCE"]
    doc = rc.prepare(cfg, hostname="c", template=template, bounding=bounding).document
    assert doc["process"]["capabilities"]["bounding"] == ["CAP_SYS_ADMIN"]


def test_bounding_set_read_from_proc() -> None:
    caps = rc.bounding_capabilities()
    assert caps and all(c.startswith("CAP_") for c in caps)


PASSWD = "root:x:0:0::/root:/bin/sh\nsvc:x:100:200::/:/bin/false\nnobody:x:65534:65534::/:/x\n"
GROUP = "root:x:0:\nsvcgrp:x:200:\nextra:x:300:svc,other\nwheel:x:10:root\n"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", None),
        ("root", (0, 0, [10])),
        ("svc", (100, 200, [300])),
        ("100", (100, 200, [300])),
        ("svc:wheel", (100, 10, [300])),
        ("svc:42", (100, 42, [300])),
        ("4242", (4242, 0, [])),
        ("4242:4343", (4242, 4343, [])),
    ],
)
def test_resolve_user_in_rootfs(tmp_path: Path, user: str, expected: Any) -> None:
    root = rootfs(tmp_path, PASSWD, GROUP)
    if expected is None:
        p = rc.prepare(image_config(cmd=("/x",), user=user), hostname="c")
        assert rc.finalize(p, root)["process"]["user"] == {"uid": 0, "gid": 0}
        return
    assert rc.resolve_user(root, user) == expected


@pytest.mark.parametrize("user", ["ghost", "svc:ghosts"])
def test_unknown_user_or_group(tmp_path: Path, user: str) -> None:
    with pytest.raises(UsageError, match="is not in the image's"):
        rc.resolve_user(rootfs(tmp_path, PASSWD, GROUP), user)


def test_passwd_symlink_cannot_escape_rootfs(tmp_path: Path) -> None:
    """An absolute symlink is resolved inside the rootfs, never to the host's file."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "other/passwd").write_text("app:x:555:555::/:/x\n")
    (root / "etc/passwd").symlink_to("/other/passwd")
    (root / "etc/group").symlink_to("../../../../../../etc/group")  # host's: must not be read
    assert rc.resolve_user(root, "app") == (555, 555, [])
    with pytest.raises(UsageError):
        rc.resolve_user(root, "root:root")  # host's /etc/group has root; the rootfs has none


def test_symlink_loop_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").symlink_to("passwd")
    assert rc.resolve_user(root, "0") == (0, 0, [])


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runc") is None or shutil.which("busybox") is None,
    reason="needs root, runc and busybox-static",
)
def test_runc_accepts_generated_config(tmp_path: Path) -> None:
    """runc runs the generated config as is: read-only rootfs, host network, no rlimits."""
    root = rootfs(tmp_path, PASSWD, GROUP)
    (root / "bin").mkdir()
    shutil.copy(shutil.which("busybox") or "", root / "bin/busybox")
    for applet in ("sh", "id", "touch"):
        (root / f"bin/{applet}").symlink_to("busybox")
    cmd = ("/bin/sh", "-c", "id -u; id -g; touch /x 2>/dev/null && echo rw || echo ro")
    p = rc.prepare(image_config(cmd=cmd, user="svc"), hostname="rt-test")
    (tmp_path / "config.json").write_bytes(rc.dumps(rc.finalize(p, root)))
    name = f"bootstrap-test-{os.getpid()}"
    out = subprocess.run(
        ["runc", "run", "--bundle", str(tmp_path), name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    subprocess.run(["runc", "delete", "--force", name], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["100", "200", "ro"]
    assert json.loads((tmp_path / "config.json").read_text())["process"]["user"] == {
        "uid": 100,
        "gid": 200,
        "additionalGids": [300],
    }


def test_root_path_is_the_deployments_rootfs() -> None:
    """The rootfs a deployment mounts (overlay) or checks out is always ``rootfs/``."""
    with pytest.raises(UsageError, match="not the deployment's rootfs"):
        rc.prepare(image_config(cmd=("/x",)), hostname="c", template={"root": {"path": "/srv"}})
    doc = rc.prepare(
        image_config(cmd=("/x",)), hostname="c", template={"root": {"readonly": False}}
    ).document
    assert doc["root"] == {"path": "rootfs", "readonly": False}


def test_a_capability_the_host_lacks_is_explained_when_the_definition_asked_for_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rtconfig = rc
    image = image_config(cmd=("/bin/true",))
    bounding = [c for c in rtconfig.CAPABILITIES if c != "CAP_SYS_RESOURCE"]
    asked = {"process": {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_SYS_RESOURCE"]}}}
    with caplog.at_level("DEBUG", logger="bootstrap.runtime.config"):
        doc = rtconfig.prepare(image, hostname="ocid", template=asked, bounding=bounding)
        rtconfig.prepare(image, hostname="ocid", template=asked, bounding=bounding)  # again
    assert doc.document["process"]["capabilities"]["bounding"] == ["CAP_CHOWN"]
    [record] = [r for r in caplog.records if "CAP_SYS_RESOURCE" in r.getMessage()]
    assert record.levelname == "INFO"  # said once, at the level a user sees
    assert record.getMessage() == (
        "ocid: runs without CAP_SYS_RESOURCE, which its definition asks for: not in this "
        "host's capability bounding set (no process here can hold it; runc would not start "
        "the container with it)"
    )
    # bootstrap's own defaults cut by a host: nothing a definition relies on, said at DEBUG
    caplog.clear()
    narrow = [c for c in rtconfig.CAPABILITIES if c != "CAP_NET_RAW"]
    with caplog.at_level("DEBUG", logger="bootstrap.runtime.config"):
        rtconfig.prepare(image, hostname="web", template=None, bounding=narrow)
    [record] = [r for r in caplog.records if "CAP_NET_RAW" in r.getMessage()]
    assert (
        record.levelname == "DEBUG" and "which its definition asks for" not in record.getMessage()
    )
