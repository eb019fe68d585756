"""``bootstrap up``: first boot of a real systemd node, end to end, plus the definitions it uses.

The node test pushes the offline CRI daemon image (Debian's containerd) and the kubelet stand-in
to the registry fixture on the host's loopback, writes /etc/bootstrap/node.yaml in a fresh node,
installs units/bootstrap-firstboot.service and starts it: the CRI daemon must answer CRI and the
stand-in (in its own system container) must report the CRI version it got over the socket.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from bootstrap.deploy import definition as defn
from tests.harness import cri
from tests.harness.cli import bootstrap
from tests.harness.node import VENV, Node
from tests.harness.registry import Registry

REPO = Path(__file__).resolve().parents[1]
STATE = "/var/lib/bootstrap"
MANIFEST = "/etc/bootstrap/node.yaml"
BUILTINS = {
    "NAME": "x",
    "DESTDIR": "/var/lib/bootstrap/containers/x",
    "IMAGE_NAME": "example.com/x:1",
    "IMAGE_ID": "sha256:" + "0" * 64,
    "RUN_DIRECTORY": "/run",
    "STATE_DIRECTORY": "/var/lib",
    "CONF_DIRECTORY": "/etc",
    "HOST_UID": "0",
    "HOST_GID": "0",
    "RUNTIME": "/usr/sbin/runc",
    "EXEC_START_PRE": "-/usr/sbin/runc delete --force x",
    "EXEC_START": "/usr/sbin/runc run --bundle /d x",
    "EXEC_STOP": "/bin/true",
    "EXEC_STOP_POST": "-/usr/sbin/runc delete --force x",
    "PIDFILE": "/run/container-x.pid",
    "UUID": "00000000-0000-0000-0000-000000000000",
    "TIMEOUT_STOP_SEC": "60",
    "TIMEOUT_START_SEC": "60",
}


# ---- the definitions (fast) --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["ocid", "images/kubelet"])
def test_definition_renders_with_its_defaults(where: str) -> None:
    d = defn.load(REPO / where)
    assert d.config_template and d.service_template and d.tmpfiles_template
    values = {**d.default_values, **BUILTINS}
    config = json.loads(d.config_template.render(values, defn.escape_json))
    unit = d.service_template.render(values, defn.unit_escaper("service.template"))
    tmpfiles = d.tmpfiles_template.render(values, defn.unit_escaper("tmpfiles.template"))
    assert "$" not in unit.replace("$$", "")
    assert config["hostname"] is None  # host UTS namespace: no hostname of its own
    types = [n["type"] for n in config["linux"]["namespaces"]]
    assert "network" not in types and "uts" not in types
    assert config["process"]["noNewPrivileges"] is False
    assert "rlimits" not in config["process"]
    mounts = {m["destination"]: m for m in config["mounts"]}
    # it sees the node as a host-installed daemon would: the node's trees at the same paths,
    # data trees peers of the node's mounts, the trees runc mounts into while building rslave
    assert config["linux"]["rootfsPropagation"] == "rshared"
    for tree in ("/var", "/tmp", "/opt", "/srv", "/mnt", "/media", "/home", "/root"):
        assert mounts[tree]["source"] == tree and "rshared" in mounts[tree]["options"], tree
    for tree in ("/etc", "/run", "/dev", "/sys", "/lib/modules"):
        assert mounts[tree]["source"] == tree and "rslave" in mounts[tree]["options"], tree
    assert "ro" in mounts["/lib/modules"]["options"]
    assert not {"/usr", "/bin", "/sbin", "/lib"} & set(mounts)  # the image's own
    assert (
        mounts["/sys/fs/cgroup"]["type"] == "bind" and "rw" in mounts["/sys/fs/cgroup"]["options"]
    )
    assert "d /var/lib/kubelet" in tmpfiles
    for tree in ("/srv", "/mnt", "/media", "/home", "/opt", "/lib/modules"):
        assert f"d {tree} - - - -" in tmpfiles  # a bind source must exist; modes kept
        assert f" {tree} " in unit.split("ExecStartPre=/bin/mkdir -p", 1)[1].split("\n")[0]
    if where == "ocid":
        assert d.readiness == "notify"
        assert types == ["pid", "mount"]  # its own pid namespace: the image's init reaps shims
        assert "d /run/crio" in tmpfiles  # CRI_RUN_DIR's default: CRI-O
        assert "CONTAINER_LISTEN=/run/crio/crio.sock" in config["process"]["env"]
        assert d.image_import is not None
        assert d.image_import.render(values) == (
            "/bin/sh",
            "-c",
            'exec skopeo copy --quiet oci-archive:/dev/stdin "containers-storage:$IMAGE"',
        )
        assert "Type=notify" in unit and "TimeoutStartSec=infinity" in unit
        assert "LimitNOFILE=524288" in unit
    else:
        assert types == ["mount"]  # host network, pid, ipc, uts
        assert (
            "--container-runtime-endpoint=unix:///run/crio/crio.sock" in config["process"]["args"]
        )
        assert "ro" in mounts["/etc/kubernetes"]["options"]
        assert "After=network-online.target ocid.service" in unit
        assert "Requires=ocid.service" in unit
        # the kubelet sends READY=1: its start job ends when it is up (no settle wait)
        assert d.readiness == "notify"
        assert "Type=notify" in unit and "NotifyAccess=all" in unit
        assert "TimeoutStartSec=60" in unit and "TimeoutStartFailureMode=kill" in unit


def test_definitions_follow_the_socket_variable() -> None:
    d = defn.load(REPO / "ocid")
    values = {**d.default_values, **BUILTINS, "CRI_RUN_DIR": "/run/containerd"}
    tmpfiles = d.tmpfiles_template.render(values, defn.unit_escaper("t"))  # type: ignore[union-attr]
    assert "d /run/containerd 0711 root root -" in tmpfiles


def test_firstboot_unit() -> None:
    text = (REPO / "units" / "bootstrap-firstboot.service").read_text()
    assert "ExecStart=/usr/local/bin/bootstrap up /etc/bootstrap/node.yaml" in text
    assert "ConditionPathExists=!/var/lib/bootstrap/.provisioned" in text
    assert "After=network-online.target" in text
    assert "Type=oneshot" in text
    # a failed run (a registry still down after registries.timeout) is started again, boundedly
    assert "Restart=on-failure" in text and "RestartPreventExitStatus=2" in text
    assert "StartLimitBurst=4" in text and "StartLimitIntervalSec=2h" in text
    doc = next(line for line in text.splitlines() if line.startswith("Documentation="))
    assert "file:///usr/local/share/doc/bootstrap/node-manifest.md" in doc


# ---- up on the host: the paths that end before any container is touched ------------------------


def _write_manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(text)
    return path


def test_up_bad_manifest_exits_2_and_changes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _write_manifest(tmp_path, "containers:\n  - {name: a, image: busybox, after: [b]}\n")
    ran = bootstrap("up", path, state=state, store=tmp_path / "store")
    assert ran.rc == 2
    assert f"{path}: containers[0].after[0]: unknown container 'b'" in ran.stderr
    assert not state.exists() and not (tmp_path / "store").exists()
    cycle = "containers:\n  - {name: a, image: busybox, after: [b]}\n"
    cycle += "  - {name: b, image: busybox, after: [a]}\n"
    ran = bootstrap("up", _write_manifest(tmp_path, cycle), state=state)
    assert ran.rc == 2 and "cycle a -> b -> a" in ran.stderr
    assert not state.exists()


def test_up_second_run_says_nothing_to_do(tmp_path: Path) -> None:
    from bootstrap.node.manifest import load

    state = tmp_path / "state"
    state.mkdir()
    path = _write_manifest(tmp_path, "containers: [{name: a, image: busybox}]\n")
    marker = {"manifest": str(path), "digest": load(path).digest, "order": ["a"], "time": "T"}
    (state / ".provisioned").write_text(json.dumps(marker))
    before = sorted(p.name for p in state.iterdir())
    ran = bootstrap("--json", "up", path, state=state, store=tmp_path / "store")
    assert ran.rc == 0, ran.stderr
    doc = ran.json()
    assert doc["changed"] is False and doc["message"].startswith("nothing to do")
    assert doc["order"] == ["a"]
    assert sorted(p.name for p in state.iterdir()) == before
    # the node was provisioned from another manifest: refuse, change nothing
    path.write_text("containers: [{name: b, image: busybox}]\n")
    ran = bootstrap("up", path, state=state)
    assert ran.rc == 2
    assert "provisioned from another manifest" in ran.stderr
    assert sorted(p.name for p in state.iterdir()) == before


def test_status_node_shows_the_last_boot_chain(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ran = bootstrap("status", "--node", state=state)
    assert ran.rc == 2 and "has not been provisioned" in ran.stderr
    assert bootstrap("status", state=state).rc == 2  # neither NAME nor --node
    assert bootstrap("status", "ocid", "--node", state=state).rc == 2  # both
    state.mkdir()
    chain = [
        {"what": "network ready", "at": 0.01, "took": 0.01},
        {"what": "pulled a (10 bytes)", "at": 0.3, "took": 0.29},
        {"what": "a: installed (checkout, unit, start): active", "at": 0.9, "took": 0.6},
    ]
    marker = {
        "manifest": "/m.yaml",
        "digest": "sha256:" + "0" * 64,
        "order": ["a"],
        "time": "T",
        "elapsed": 0.95,
        "containers": [{"name": "a", "action": "installed", "active_state": "active"}],
        "chain": chain,
    }
    (state / ".provisioned").write_text(json.dumps(marker))
    ran = bootstrap("--json", "status", "--node", state=state)
    assert ran.rc == 0, ran.stderr
    doc = ran.json()
    assert doc["chain"] == chain and doc["elapsed"] == 0.95
    text = bootstrap("status", "--node", state=state, check=True).stdout
    assert "boot chain" in text and "+ 0.900s  a: installed" in text, text
    assert doc["pending_update"] is None and doc["failed_updates"] == {}, doc
    # an interrupted node update and a remembered failure are shown, and nothing is acted on
    from bootstrap.deploy import failures
    from bootstrap.deploy.transaction import Journal, Member, Record

    journal = Journal(state)
    members = (Member("a", True, "a.0", True, image="r/a:1"), Member("b", False, "b.1", True))
    journal.write(Record("f" * 32, "update --node", "T0", "starting", members))
    failures.remember(state, "a", "r/a:1", "sha256:" + "1" * 64, "a: health check failed")
    doc = bootstrap("--json", "status", "--node", state=state, check=True).json()
    assert doc["pending_update"]["phase"] == "starting", doc
    assert doc["failed_updates"]["a"]["reason"] == "a: health check failed", doc
    text = bootstrap("status", "--node", state=state, check=True).stdout
    assert "interrupted node update ffffffffffff (update --node, started T0)" in text, text
    assert "phase starting, members a, b" in text and "rolls it back" in text, text
    assert "failed update of a: sha256:111111111111 of r/a:1 was rolled back" in text, text
    assert journal.exists()
    journal.path.write_text("{")
    text = bootstrap("status", "--node", state=state, check=True).stdout
    assert "damaged node transaction journal" in text, text
    (state / ".provisioned").write_text('{"chain": [{"what": 1}]}')
    ran = bootstrap("status", "--node", state=state)
    assert ran.rc == 2 and "unreadable provisioning marker" in ran.stderr


def test_boot_chain_is_ordered_by_end_time() -> None:
    from bootstrap.node.up import _Chain

    chain = _Chain(time.monotonic())
    first = time.monotonic()
    chain.add("b", first)
    chain.add("a", first)
    steps = chain.steps()
    assert [s.what for s in steps] == ["b", "a"]
    assert steps[0].at <= steps[1].at and all(s.took >= 0 for s in steps)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_up_network_not_ready_exits_3(tmp_path: Path) -> None:
    import subprocess
    import uuid

    ns = f"bs-up-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        path = _write_manifest(
            tmp_path, "network: {timeout: 1}\ncontainers: [{name: a, image: busybox}]\n"
        )
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, str(VENV / "bin" / "bootstrap"), "--state",
             str(tmp_path / "state"), "--store", str(tmp_path / "store"), "up", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    assert proc.returncode == 3, proc.stderr
    assert "network not ready after 1s: no default route; no global non-loopback address" in (
        proc.stderr
    )
    assert "up: waiting up to 1s for the network" in proc.stderr
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "state" / ".provisioned").exists()


# ---- end to end in a systemd node --------------------------------------------------------------


def _manifest(reg: Registry, images: dict[str, str], extra: str = "") -> str:
    return f"""\
{cri.manifest_head(reg.host)}\
{cri.ocid_entry(images["ocid"])}\
  - name: kubelet
    image: {images["kubelet"]}
    definition: {REPO}/images/kubelet
    set:
      KUBELET: {cri.STANDIN_KUBELET}
      CRI_SOCKET: {cri.CRI_SOCKET}
    after: [ocid]
{extra}pods:
  # the sandbox image of the stand-in's probe: its /healthz (the kubelet's health check)
  # answers ok only once that probe ran a pod
  images: [{cri.PAUSE_IMAGE}]
"""


@pytest.fixture(scope="module")
def node_images(_registry_plain: Registry) -> dict[str, str]:
    reg = _registry_plain
    daemon = cri.cri_daemon_image()
    standin = cri.kubelet_standin_image()
    pause = cri.pause_image()
    reg.push(daemon.layout, daemon.tag, "bootstrap/ocid:containerd")
    reg.push(standin.layout, standin.tag, "bootstrap/kubelet:standin")
    reg.push(pause.layout, pause.tag, "pause:3.9")  # served as registry.k8s.io/pause (mirror)
    return {
        "ocid": f"{reg.host}/bootstrap/ocid:containerd",
        "kubelet": f"{reg.host}/bootstrap/kubelet:standin",
    }


def _active(node: Node, unit: str) -> str:
    return node.systemctl("is-active", unit).stdout.strip()


def _wait_status_file(node: Node, after: float, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            doc = json.loads(node.read_file("/var/lib/kubelet/standin-status.json"))
            if doc["time"] > after:
                return doc
        except (OSError, ValueError, KeyError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise AssertionError(
        f"no fresh stand-in status ({last})\n{node.journal('kubelet.service', 30)}\n"
        f"{node.journal('ocid.service', 30)}"
    )


@pytest.mark.slow
@pytest.mark.node
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_first_boot_end_to_end(
    node: Node, _registry_plain: Registry, node_images: dict[str, str]
) -> None:
    reg = _registry_plain
    node.write_file(MANIFEST, _manifest(reg, node_images))
    node.run("ln", "-sf", str(VENV / "bin" / "bootstrap"), "/usr/local/bin/bootstrap")
    node.copy_in(
        REPO / "units" / "bootstrap-firstboot.service",
        "/etc/systemd/system/bootstrap-firstboot.service",
    )
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "enable", "bootstrap-firstboot.service")

    # first boot: the unit provisions the node
    t0 = time.time()
    started = time.monotonic()
    run = node.systemctl("start", "bootstrap-firstboot.service")
    elapsed = time.monotonic() - started
    journal = node.journal("bootstrap-firstboot.service", 80)
    assert run.returncode == 0, f"{run.stderr}\n{journal}\n{node.journal('ocid.service', 40)}"
    print(f"first boot provisioning took {elapsed:.1f}s")
    assert "up: pulling" in journal and "provisioned from" in journal
    assert _active(node, "ocid.service") == "active"
    assert _active(node, "kubelet.service") == "active"
    marker = json.loads(node.read_file(f"{STATE}/.provisioned"))
    assert marker["order"] == ["ocid", "kubelet"]
    print("boot chain:", json.dumps(marker["chain"], indent=1))
    steps = [s["what"] for s in marker["chain"]]
    assert steps[0] == "network ready", steps
    assert any(s.startswith("ocid: CRI answering") for s in steps), steps
    assert steps[-1].startswith("kubelet: installed"), steps
    ocid_state = marker["containers"][0]
    assert ocid_state["cri_version"].startswith("containerd 1.6")
    status = _wait_status_file(node, t0)
    assert status["runtime_name"] == "containerd"
    assert status["runtime_api_version"] == "v1"
    assert "kubelet-standin: CRI version: containerd" in node.journal("kubelet.service", 50)
    # the CRI socket answers from the host too, through the node's /run
    version = cri.cri_version(node.path(cri.CRI_SOCKET), timeout=5)
    assert version["runtime_name"] == "containerd"

    # every unit involved passes systemd-analyze verify inside the node
    for unit in ("bootstrap-firstboot.service", "ocid.service", "kubelet.service"):
        verify = node.run("systemd-analyze", "verify", f"/etc/systemd/system/{unit}", check=False)
        assert verify.returncode == 0 and not verify.stderr.strip(), (unit, verify.stderr)

    # a second run changes nothing and says so
    again = node.bootstrap("--json", "up", MANIFEST, check=True)
    doc = again.json()
    assert doc["changed"] is False
    assert doc["message"].startswith("nothing to do")
    links = {n: node.run("readlink", f"{STATE}/containers/{n}").stdout for n in ("ocid", "kubelet")}

    # reboot: both come back by themselves; the first-boot unit is skipped
    node.poweroff()
    t1 = time.time()
    node.boot()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _active(node, "kubelet.service") != "active":
        time.sleep(0.5)
    assert _active(node, "ocid.service") == "active", node.journal("ocid.service", 40)
    assert _active(node, "kubelet.service") == "active", node.journal("kubelet.service", 40)
    skipped = node.systemctl("show", "-p", "ConditionResult", "bootstrap-firstboot.service")
    assert skipped.stdout.strip() == "ConditionResult=no"
    assert _wait_status_file(node, t1)["runtime_name"] == "containerd"

    # a manifest naming a missing image: exit 3 before anything is touched
    node.run("rm", f"{STATE}/.provisioned")
    extra = f"  - name: extra\n    image: {reg.host}/bootstrap/missing:1\n    after: [kubelet]\n"
    node.write_file("/etc/bootstrap/missing.yaml", _manifest(reg, node_images, extra))
    bad = node.bootstrap("up", "/etc/bootstrap/missing.yaml")
    assert bad.rc == 3, bad.stderr
    assert "missing" in bad.stderr
    assert _active(node, "ocid.service") == "active"
    assert _active(node, "kubelet.service") == "active"
    assert not node.path(f"{STATE}/containers/extra").exists()
    assert not node.path(f"{STATE}/.provisioned").exists()
    for n, target in links.items():
        assert node.run("readlink", f"{STATE}/containers/{n}").stdout == target

    # resumable: the original manifest finishes the job (everything in place: marker only)
    resumed = node.bootstrap("--json", "up", MANIFEST, check=True).json()
    assert resumed["changed"] is False
    assert [c["action"] for c in resumed["containers"]] == ["unchanged", "unchanged"]
    assert node.path(f"{STATE}/.provisioned").exists()

    # a first boot cut short after the CRI daemon was installed (here: the daemon stopped, the
    # kubelet not installed yet, no marker): the next run starts one and installs the other
    node.bootstrap("uninstall", "kubelet", check=True)
    node.run("systemctl", "stop", "ocid.service")
    node.run("rm", f"{STATE}/.provisioned")
    t2 = time.time()
    finished = node.bootstrap("--json", "up", MANIFEST, check=True).json()
    assert finished["changed"] is True
    assert [c["action"] for c in finished["containers"]] == ["started", "installed"]
    assert _active(node, "kubelet.service") == "active"
    assert _wait_status_file(node, t2)["runtime_name"] == "containerd"


@pytest.mark.slow
@pytest.mark.node
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_first_boot_killed_midway_is_finished_by_the_next_run(
    node: Node, _registry_plain: Registry, node_images: dict[str, str]
) -> None:
    node.write_file(MANIFEST, _manifest(_registry_plain, node_images))
    node.run("ln", "-sf", str(VENV / "bin" / "bootstrap"), "/usr/local/bin/bootstrap")
    node.copy_in(
        REPO / "units" / "bootstrap-firstboot.service",
        "/etc/systemd/system/bootstrap-firstboot.service",
    )
    node.run("systemctl", "daemon-reload")
    started = time.time()
    node.run("systemctl", "--no-block", "start", "bootstrap-firstboot.service")
    # kill it (SIGKILL, no cleanup) as soon as the CRI daemon is up: mid-way through the plan
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _active(node, "ocid.service") != "active":
        time.sleep(0.1)
    assert _active(node, "ocid.service") == "active", node.journal("bootstrap-firstboot", 40)
    node.run("systemctl", "kill", "-s", "KILL", "bootstrap-firstboot.service")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _active(node, "bootstrap-firstboot.service") in (
        "activating",
        "deactivating",
    ):
        time.sleep(0.1)
    first = node.journal("bootstrap-firstboot.service", 60)
    assert not node.path(f"{STATE}/.provisioned").exists(), first

    # the next run (the next boot, or a manual start) finishes the job
    again = node.systemctl("start", "bootstrap-firstboot.service")
    journal = node.journal("bootstrap-firstboot.service", 80)
    assert again.returncode == 0, journal
    assert _active(node, "ocid.service") == "active"
    assert _active(node, "kubelet.service") == "active"
    marker = json.loads(node.read_file(f"{STATE}/.provisioned"))
    assert [c["name"] for c in marker["containers"]] == ["ocid", "kubelet"]
    assert marker["containers"][0]["action"] == "unchanged"  # kept from the killed run
    # the killed run may already have started the kubelet (the rerun then keeps it): its status
    # is fresh relative to the first start, not to the rerun
    assert _wait_status_file(node, started)["runtime_name"] == "containerd"
    assert sorted(node.run("runc", "list", "-q").stdout.split()) == ["kubelet", "ocid"]


@pytest.mark.slow
@pytest.mark.node
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_first_boot_trust_admits_signed_images_refuses_unsigned(
    node: Node, _registry_plain: Registry, node_images: dict[str, str], tmp_path: Path
) -> None:
    import functools
    import http.server
    import subprocess
    import threading

    reg = _registry_plain
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    genv = {**os.environ, "GNUPGHOME": str(gnupg)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Node Ops <ops@example.test>",
         "ed25519", "sign", "never"], env=genv, check=True, capture_output=True,
    )  # fmt: skip
    listing = subprocess.run(
        ["gpg", "--list-keys", "--with-colons"], env=genv, check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
    key = subprocess.run(["gpg", "--export", fpr], env=genv, check=True, capture_output=True)
    stage = tmp_path / "sigstore"
    sign_d = tmp_path / "sign.d"
    sign_d.mkdir()
    (sign_d / "s.yaml").write_text(f"default-docker:\n  lookaside-staging: file://{stage}\n")
    for ref in (node_images["ocid"], node_images["kubelet"]):  # sign in place: same digest
        subprocess.run(
            ["skopeo", "--registries.d", str(sign_d), "copy", "--quiet", "--sign-by", fpr,
             "--src-tls-verify=false", "--dest-tls-verify=false", f"docker://{ref}",
             f"docker://{ref}"], env=genv, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    # signing is done: leave no gpg-agent of this throwaway home running
    subprocess.run(["gpgconf", "--kill", "all"], env=genv, check=False, capture_output=True)
    unsigned = f"{reg.host}/bootstrap/unsigned:1"
    subprocess.run(
        ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
         f"docker://{node_images['kubelet']}", f"docker://{unsigned}"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(stage)),
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        trust = f"""\
trust:
  policy:
    default: [{{type: reject}}]
    transports:
      docker:
        registry.k8s.io/pause: [{{type: insecureAcceptAnything}}]
        "{reg.host}/bootstrap":
          - {{type: signedBy, keyType: GPGKeys, keyPath: /etc/pki/containers/ops.gpg}}
  files:
    - {{path: /etc/pki/containers/ops.gpg, base64: "{base64.b64encode(key.stdout).decode()}"}}
  registries.d:
    ops.yaml:
      docker:
        "{reg.host}": {{lookaside: "http://127.0.0.1:{server.server_address[1]}"}}
"""
        extra = f"  - name: third\n    image: {unsigned}\n    after: [kubelet]\n"
        node.write_file(MANIFEST, _manifest(reg, node_images, extra) + trust)
        ran = node.bootstrap("up", MANIFEST)
        assert ran.rc == 7, ran.stderr
        errors = [line for line in ran.stderr.splitlines() if line.startswith("bootstrap: error")]
        assert len(errors) == 1 and unsigned in errors[0] and "no signature" in errors[0]
        assert f'transports.docker["{reg.host}/bootstrap"]' in ran.stderr
        # the policy, key and registries.d file are in place for every later command
        assert '"reject"' in node.read_file("/etc/containers/policy.json")
        assert node.path("/etc/pki/containers/ops.gpg").read_bytes() == key.stdout
        assert "lookaside" in node.read_file("/etc/containers/registries.d/ops.yaml")
        # the signed CRI daemon and kubelet images were admitted; nothing was installed
        images = {i["name"]: i for i in node.bootstrap("--json", "images", check=True).json()}
        assert set(images) == {node_images["ocid"], node_images["kubelet"], cri.PAUSE_IMAGE}
        assert all("signedBy" in images[node_images[n]]["admitted"] for n in ("ocid", "kubelet"))
        assert not node.path(f"{STATE}/containers/ocid").exists()
        assert not node.path(f"{STATE}/.provisioned").exists()
        node.bootstrap("fsck", check=True)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.node
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_first_boot_waits_for_a_registry_that_comes_up_late(
    node: Node, _registry_plain: Registry, node_images: dict[str, str]
) -> None:
    """The registry is down when the first-boot unit starts and comes up 20 s later: up keeps
    retrying (saying what it waits for), then provisions the node in the same run."""
    reg = _registry_plain
    node.write_file(MANIFEST, _manifest(reg, node_images).replace(
        "registries:\n", "registries:\n  timeout: 300\n"))  # fmt: skip
    node.run("ln", "-sf", str(VENV / "bin" / "bootstrap"), "/usr/local/bin/bootstrap")
    node.copy_in(
        REPO / "units" / "bootstrap-firstboot.service",
        "/etc/systemd/system/bootstrap-firstboot.service",
    )
    node.run("systemctl", "daemon-reload")
    reg.stop()
    try:
        node.run("systemctl", "--no-block", "start", "bootstrap-firstboot.service")
        time.sleep(20)
        waiting = node.journal("bootstrap-firstboot.service", 60)
        assert _active(node, "bootstrap-firstboot.service") == "activating", waiting
        assert "up: waiting for the registry of" in waiting, waiting
        assert "connection refused" in waiting.lower(), waiting
        assert "Retrying (" not in waiting, waiting
    finally:
        reg.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and _active(node, "bootstrap-firstboot.service") in (
        "activating",
        "inactive",
    ):
        time.sleep(0.5)
    journal = node.journal("bootstrap-firstboot.service", 80)
    assert _active(node, "bootstrap-firstboot.service") == "active", journal
    assert _active(node, "ocid.service") == "active", journal
    assert _active(node, "kubelet.service") == "active", journal
    marker = json.loads(node.read_file(f"{STATE}/.provisioned"))
    assert [c["name"] for c in marker["containers"]] == ["ocid", "kubelet"]


def test_up_unreachable_registry_retries_until_its_timeout_then_two_lines(tmp_path: Path) -> None:
    path = _write_manifest(
        tmp_path,
        "registries: {timeout: 12}\nnetwork: {timeout: 5, require_default_route: false}\n"
        "containers: [{name: a, image: '127.0.0.1:1/x/y:1'}]\n",
    )
    ran = bootstrap("up", path, store=tmp_path / "store", state=tmp_path / "state", timeout=120)
    assert ran.rc == 3, ran.stderr
    lines = ran.stderr.splitlines()
    assert lines[-2].startswith("bootstrap: error: 127.0.0.1:1: cannot reach"), ran.stderr
    assert "(still failing after 12s of retries)" in lines[-2]
    assert lines[-1].startswith("bootstrap: hint: ") and "registries.timeout" in lines[-1]
    assert sum(line.startswith("bootstrap: ") for line in lines) == 2, ran.stderr
    assert any(
        line.startswith("up: waiting for the registry of 127.0.0.1:1/x/y:1") for line in lines
    )
    assert "Retrying" not in ran.stderr and "urllib3" not in ran.stderr
    assert not (tmp_path / "state" / ".provisioned").exists()
    quiet = bootstrap("-q", "up", path, store=tmp_path / "store", state=tmp_path / "state")
    assert quiet.rc == 3 and len(quiet.stderr.splitlines()) == 2, quiet.stderr
