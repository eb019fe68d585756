"""What ``up`` writes onto the node from its manifest (registries drop-in, credentials, CNI
config): written atomically, recorded, rewritten when still ours, never over an operator's file;
and later commands read the registries drop-in."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from bootstrap.errors import UsageError
from bootstrap.image import registries
from bootstrap.image.reference import Reference
from bootstrap.node import hostconf
from bootstrap.node import manifest as nm

CONFLIST = "{cniVersion: 1.0.0, name: pods, plugins: [{type: bridge}, {type: loopback}]}"


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    d = {
        "conf_d": tmp_path / "etc/containers/registries.conf.d",
        "auth": tmp_path / "etc/containers/auth.json",
        "cni": tmp_path / "etc/cni/net.d",
        "state": tmp_path / "state",
    }
    monkeypatch.setenv("BOOTSTRAP_REGISTRIES_CONF_D", str(d["conf_d"]))
    monkeypatch.setenv("BOOTSTRAP_AUTH_FILE", str(d["auth"]))
    monkeypatch.setenv("BOOTSTRAP_CNI_CONF_DIR", str(d["cni"]))
    return d


def _manifest(tmp_path: Path, extra: str = "") -> nm.NodeManifest:
    (tmp_path / "auth.json").write_text('{"auths": {"reg.local:5000": {"auth": "dTpw"}}}')
    text = f"""\
registries:
  insecure: ["reg.local:5000"]
  mirrors: {{registry.k8s.io: ["reg.local:5000"]}}
  credentials: auth.json
containers:
  - {{name: ocid, image: reg.local:5000/ocid:1, ready: {{cri_socket: /run/c.sock}}}}
pods:
  network: {{config: {CONFLIST}}}
{extra}"""
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return nm.load(path)


def test_up_writes_and_records_the_files(tmp_path: Path, dirs: dict[str, Path]) -> None:
    m = _manifest(tmp_path)
    done = list(hostconf.apply(dirs["state"], hostconf.wanted_files(m)))
    assert [(w.what, w.action) for w in done] == [
        ("registries", "written"),
        ("registries.credentials", "written"),
        ("pods.network", "written"),
    ]
    drop_in = dirs["conf_d"] / "50-bootstrap-node.conf"
    assert "written by bootstrap up from" in drop_in.read_text()
    assert stat.S_IMODE(dirs["auth"].stat().st_mode) == 0o600
    assert json.loads((dirs["cni"] / "10-bootstrap.conflist").read_text())["name"] == "pods"
    record = json.loads((dirs["state"] / "node/written.json").read_text())
    assert set(record["files"]) == {
        str(drop_in),
        str(dirs["auth"]),
        str(dirs["cni"] / "10-bootstrap.conflist"),
    }
    # later commands (pull, update, auto-update) read the drop-in as every drop-in
    conf = registries.load()
    eps = conf.endpoints(Reference.parse("registry.k8s.io/pause:3.9"))
    assert eps[0].host == "reg.local:5000"
    assert eps[0].insecure
    # again: nothing changes
    again = list(hostconf.apply(dirs["state"], hostconf.wanted_files(m)))
    assert [w.action for w in again] == ["unchanged"] * 3


def test_our_files_are_rewritten_but_an_operators_is_refused(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    m = _manifest(tmp_path)
    list(hostconf.apply(dirs["state"], hostconf.wanted_files(m)))
    changed = _manifest(tmp_path, "  images: [busybox]\n")  # same files, manifest path equal
    conflist = dirs["cni"] / "10-bootstrap.conflist"
    # a new manifest wanting another config: ours is replaced
    other = nm.parse(
        (tmp_path / "node.yaml").read_text().replace("name: pods", "name: other"),
        tmp_path / "node.yaml",
    )
    list(hostconf.apply(dirs["state"], hostconf.wanted_files(other)))
    assert json.loads(conflist.read_text())["name"] == "other"
    # the operator edits it: up refuses to overwrite it, before writing anything
    conflist.write_text('{"mine": true}')
    drop_in = dirs["conf_d"] / "50-bootstrap-node.conf"
    before = drop_in.read_bytes()
    with pytest.raises(
        UsageError,
        match=r"pods.network: .*10-bootstrap.conflist exists and was not written by bootstrap up",
    ) as info:
        list(hostconf.apply(dirs["state"], hostconf.wanted_files(changed)))
    assert info.value.exit_code == 2
    assert conflist.read_text() == '{"mine": true}'
    assert drop_in.read_bytes() == before


def test_an_operators_credentials_are_kept(tmp_path: Path, dirs: dict[str, Path]) -> None:
    dirs["auth"].parent.mkdir(parents=True)
    dirs["auth"].write_text('{"auths": {}}')
    m = _manifest(tmp_path)
    done = {w.what: w.action for w in hostconf.apply(dirs["state"], hostconf.wanted_files(m))}
    assert done["registries.credentials"] == "kept"
    assert dirs["auth"].read_text() == '{"auths": {}}'


def test_a_symlink_in_place_of_a_file_is_refused(tmp_path: Path, dirs: dict[str, Path]) -> None:
    dirs["cni"].mkdir(parents=True)
    (tmp_path / "elsewhere").write_text("x")
    (dirs["cni"] / "10-bootstrap.conflist").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="cannot read it") as info:
        list(hostconf.apply(dirs["state"], hostconf.wanted_files(_manifest(tmp_path))))
    assert "not a symlink" in info.value.hint
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_nothing_to_write_without_those_sections(tmp_path: Path) -> None:
    m = nm.parse("containers: [{name: a, image: busybox}]\n", tmp_path / "n.yaml")
    assert hostconf.wanted_files(m) == []


def test_an_identical_file_up_did_not_write_stays_the_operators(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    m = _manifest(tmp_path)
    files = hostconf.wanted_files(m)
    conflist = next(f for f in files if f.what == "pods.network")
    conflist.path.parent.mkdir(parents=True)
    conflist.path.write_bytes(conflist.data)  # the operator wrote the same bytes first
    done = {w.what: w.action for w in hostconf.apply(dirs["state"], files)}
    assert done["pods.network"] == "unchanged"
    other = nm.parse(
        (tmp_path / "node.yaml").read_text().replace("name: pods", "name: other"),
        tmp_path / "node.yaml",
    )
    with pytest.raises(UsageError, match="not written by bootstrap up"):
        list(hostconf.apply(dirs["state"], hostconf.wanted_files(other)))


def test_a_run_killed_between_the_record_and_the_rename_still_owns_the_file(
    tmp_path: Path, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _manifest(tmp_path)
    list(hostconf.apply(dirs["state"], hostconf.wanted_files(m)))
    other = nm.parse(
        (tmp_path / "node.yaml").read_text().replace("name: pods", "name: other"),
        tmp_path / "node.yaml",
    )

    def killed(path: object, data: object, mode: int = 0o644) -> None:
        raise KeyboardInterrupt  # the run dies after the record, before the rename

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(hostconf, "write_atomic", killed)  # (the fixture's env stays set)
        list(hostconf.apply(dirs["state"], hostconf.wanted_files(other)))
    done = {w.what: w.action for w in hostconf.apply(dirs["state"], hostconf.wanted_files(other))}
    assert done["pods.network"] == "written"
    assert json.loads((dirs["cni"] / "10-bootstrap.conflist").read_text())["name"] == "other"
    record = json.loads((dirs["state"] / "node/written.json").read_text())
    assert all(isinstance(v, str) for v in record["files"].values())  # one content each again
