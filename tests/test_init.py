"""The containers' init: which one, when ``auto`` adds it, how the config runs it, the
definition keys ``init``/``initNames``/``startTimeout`` and ``--set INIT``/``--init``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bootstrap.deploy import definition as defn
from bootstrap.deploy import plan as planning
from bootstrap.deploy.records import Paths
from bootstrap.errors import SystemdError, UsageError
from bootstrap.image.model import Descriptor, Image, ImageConfig, Manifest
from bootstrap.runtime import config as rc
from bootstrap.runtime import init as rtinit

CATATONIT = shutil.which("catatonit") or "/usr/bin/catatonit"
TINI_STATIC = "/usr/bin/tini-static"


def image(entrypoint: tuple[str, ...] = (), cmd: tuple[str, ...] = ("sleep", "1")) -> Image:
    cfg = ImageConfig(
        digest="sha256:" + "1" * 64,
        os="linux",
        architecture="amd64",
        diff_ids=(),
        entrypoint=entrypoint,
        cmd=cmd,
    )
    desc = Descriptor("application/vnd.oci.image.config.v1+json", cfg.digest, 2)
    man = Manifest("application/vnd.oci.image.manifest.v1+json", "sha256:" + "2" * 64, desc, ())
    return Image("registry.test/app:1", man, cfg)


def make_plan(
    tmp_path: Path,
    manifest: dict[str, Any] | None = None,
    set_values: dict[str, str] | None = None,
    config: dict[str, Any] | None = None,
    img: Image | None = None,
) -> planning.Plan:
    files = {}
    if manifest is not None:
        files[defn.MANIFEST] = json.dumps(manifest)
    if config is not None:
        files[defn.CONFIG_TEMPLATE] = json.dumps(config)
    d = defn.from_files(files, source="directory", origin="def") if files else defn.builtin()
    return planning.plan(
        Paths(tmp_path, "app"), img or image(), d, set_values or {}, tmp_path / "units"
    )


def args_of(p: planning.Plan) -> list[str]:
    return list(p.config.document["process"]["args"])


# ---- the binary --------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(CATATONIT).exists(), reason="catatonit not installed")
def test_find_init_prefers_catatonit() -> None:
    assert rtinit.find_init({"PATH": "/usr/bin:/bin"}).path == CATATONIT


def test_find_init_override_and_errors(tmp_path: Path) -> None:
    assert rtinit.find_init({"BOOTSTRAP_INIT": TINI_STATIC}).path == TINI_STATIC
    with pytest.raises(SystemdError, match="dynamically linked"):
        rtinit.find_init({"BOOTSTRAP_INIT": "/usr/bin/tini"})
    with pytest.raises(SystemdError, match="not an executable file"):
        rtinit.find_init({"BOOTSTRAP_INIT": str(tmp_path / "nope")})
    script = tmp_path / "init.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    with pytest.raises(SystemdError, match="not an ELF executable"):
        rtinit.find_init({"BOOTSTRAP_INIT": str(script)})


def test_find_init_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rtinit, "EXTRA_DIRS", ())
    with pytest.raises(SystemdError, match="no init for the container") as err:
        rtinit.find_init({"PATH": "/nonexistent"})
    assert "apt-get install catatonit" in err.value.hint
    assert err.value.exit_code == 5


# ---- auto detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["/usr/bin/tini-static", "-s", "-g", "--", "containerd"], False),
        (["tini", "--", "x"], False),
        (["/lib/systemd/systemd"], False),
        (["/sbin/init"], False),
        (["/usr/bin/dumb-init", "x"], False),
        (["/bin/s6-svscan", "/etc/s6"], False),
        (["catatonit", "--", "x"], False),
        (["/bin/sleep", "10"], True),
        (["/bin/sh", "-c", "exec tini"], True),
        (["/usr/local/bin/kubelet"], True),
    ],
)
def test_auto_detects_inits(args: list[str], expected: bool) -> None:
    assert rtinit.wanted("auto", args, host_pid=False) is expected
    assert rtinit.wanted("always", args, host_pid=False) is True
    assert rtinit.wanted("never", args, host_pid=False) is False


def test_auto_honours_named_inits_and_host_pid() -> None:
    assert not rtinit.wanted("auto", ["/sbin/runsvdir"], host_pid=False, extra=["runsvdir"])
    assert rtinit.wanted("auto", ["/sbin/runsvdir"], host_pid=False)
    assert not rtinit.wanted("auto", ["/bin/sleep"], host_pid=True)
    assert rtinit.wanted("always", ["/bin/sleep"], host_pid=True)


# ---- the config --------------------------------------------------------------------------------


def test_apply_binds_init_on_run_and_prepends_it() -> None:
    doc = rc.base_config(image().config, hostname="app")
    out = rtinit.apply(doc, rtinit.InitBinary(CATATONIT))
    assert out["process"]["args"] == ["/run/.bootstrap-init", "--", "sleep", "1"]
    mount = out["mounts"][-1]
    assert mount == {
        "destination": "/run/.bootstrap-init",
        "type": "bind",
        "source": CATATONIT,
        "options": ["bind", "ro", "nosuid", "nodev"],
    }
    assert doc["process"]["args"] == ["sleep", "1"]  # the input is not modified


def test_apply_falls_back_to_dev_and_refuses_without_tmpfs() -> None:
    doc = rc.base_config(image().config, hostname="app")
    no_run = rc.merge(doc, {"mounts": [{"destination": "/run", "type": "bind", "source": "/run"}]})
    out = rtinit.apply(no_run, rtinit.InitBinary(CATATONIT))
    assert out["process"]["args"][0] == "/dev/.bootstrap-init"
    bare = dict(doc, mounts=[m for m in doc["mounts"] if m["type"] != "tmpfs"])
    with pytest.raises(UsageError, match="no tmpfs on /run, /dev or /tmp"):
        rtinit.apply(bare, rtinit.InitBinary(CATATONIT))


# ---- definition keys and the plan --------------------------------------------------------------


def test_manifest_init_keys_and_defaults() -> None:
    d = defn.from_files({}, source="builtin", origin="builtin")
    assert (d.init, d.start_timeout, d.init_names) == ("auto", 60, ())
    d = defn.from_files(
        {defn.MANIFEST: '{"init": "never", "startTimeout": 7, "initNames": ["runsvdir"]}'},
        source="directory",
        origin="def",
    )
    assert (d.init, d.start_timeout, d.init_names) == ("never", 7, ("runsvdir",))


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ('{"init": "yes"}', "init must be one of auto, always, never"),
        ('{"init": true}', "init must be one of"),
        ('{"startTimeout": 0}', "startTimeout must be a positive integer"),
        ('{"startTimeout": "60"}', "startTimeout must be a positive integer"),
        ('{"initNames": "runsvdir"}', "initNames must be a list"),
        ('{"initNames": ["/sbin/runsvdir"]}', "initNames must be a list of executable names"),
    ],
)
def test_manifest_init_errors(manifest: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        defn.from_files({defn.MANIFEST: manifest}, source="directory", origin="def")


def test_plan_auto_adds_init_and_start_timeout(tmp_path: Path) -> None:
    p = make_plan(tmp_path)
    assert args_of(p)[:2] == [f"/run/{rtinit.MOUNT_NAME}", "--"]
    assert args_of(p)[2:] == ["sleep", "1"]
    assert "TimeoutStartSec=60\n" in p.service
    assert p.values["INIT"] == "auto"
    p = make_plan(tmp_path, {"startTimeout": 5})
    assert "TimeoutStartSec=5\n" in p.service


def test_plan_auto_skips_an_image_running_its_own_init(tmp_path: Path) -> None:
    """The CRI daemon image runs ``tini-static -s -g --`` itself: no second init."""
    img = image(entrypoint=("/usr/bin/tini-static", "-s", "-g", "--"), cmd=("containerd",))
    assert args_of(make_plan(tmp_path, img=img))[0] == "/usr/bin/tini-static"
    # a host pid namespace (the kubelet's definition): none either
    host_pid = {"linux": {"namespaces": [{"type": "mount"}]}}
    assert args_of(make_plan(tmp_path, config=host_pid)) == ["sleep", "1"]


def test_plan_set_init_overrides_the_definition(tmp_path: Path) -> None:
    assert args_of(make_plan(tmp_path, set_values={"INIT": "never"})) == ["sleep", "1"]
    img = image(entrypoint=("/usr/bin/tini-static", "--"))
    p = make_plan(tmp_path, {"init": "always"}, img=img)
    assert args_of(p)[0] == f"/run/{rtinit.MOUNT_NAME}"
    assert args_of(make_plan(tmp_path, {"init": "never"})) == ["sleep", "1"]
    with pytest.raises(UsageError, match=r"--set INIT: init must be one of"):
        make_plan(tmp_path, set_values={"INIT": "sometimes"})


def test_plan_missing_init_binary_fails_before_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOOTSTRAP_INIT", str(tmp_path / "missing"))
    with pytest.raises(SystemdError, match=r"BOOTSTRAP_INIT"):
        make_plan(tmp_path)
    assert not (tmp_path / "containers").exists()
    assert args_of(make_plan(tmp_path, set_values={"INIT": "never"})) == ["sleep", "1"]


def test_cli_init_option_is_set_init() -> None:
    from bootstrap import cli

    parser = cli.build_parser()
    a = parser.parse_args(["install", "x", "busybox", "--init", "never"])
    assert a.init == "never"
    with pytest.raises(UsageError, match="--init: invalid choice"):
        parser.parse_args(["install", "x", "busybox", "--init", "maybe"])
