"""Node manifest parsing/validation and the first-boot plan (pure; no I/O beyond tmp files)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bootstrap.errors import ExitCode, UsageError
from bootstrap.node import manifest as nm
from bootstrap.node.plan import plan

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
version: 1
registries:
  insecure: ["127.0.0.1:5000", "mirror.local:5000"]
  mirrors:
    docker.io: ["mirror.local:5000"]
network:
  timeout: 30
  require_default_route: false
  resolve: [localhost]
containers:
  - name: kubelet
    image: 127.0.0.1:5000/kubelet:1
    after: [ocid]
    set: {CRI_SOCKET: /run/containerd/containerd.sock, VERBOSE: 2, DEBUG: true}
  - name: ocid
    image: busybox
    ready: {cri_socket: /run/containerd/containerd.sock, timeout: 60}
"""


def _err(text: str, tmp_path: Path | None = None) -> str:
    with pytest.raises(UsageError) as info:
        nm.parse(text, (tmp_path or Path("/nonexistent")) / "node.yaml")
    assert info.value.exit_code == ExitCode.USAGE
    assert "\n" not in info.value.message
    return info.value.message


def test_good_manifest_parses_into_frozen_dataclasses() -> None:
    m = nm.parse(GOOD, "/etc/bootstrap/node.yaml")
    assert m.network == nm.NetworkWait(30.0, False, ("localhost",))
    assert [c.name for c in m.containers] == ["kubelet", "ocid"]
    kubelet = m.container("kubelet")
    assert kubelet.image == "127.0.0.1:5000/kubelet:1"
    assert kubelet.after == ("ocid",)
    assert kubelet.values_dict == {
        "CRI_SOCKET": "/run/containerd/containerd.sock",
        "VERBOSE": "2",
        "DEBUG": "true",
    }
    assert m.container("ocid").image == "docker.io/library/busybox:latest"
    assert m.container("ocid").ready_cri_socket == "/run/containerd/containerd.sock"
    assert m.container("ocid").ready_timeout == 60.0
    assert kubelet.ready_cri_socket is None
    assert m.digest.startswith("sha256:") and len(m.digest) == 71
    with pytest.raises(AttributeError):
        m.containers[0].name = "x"  # type: ignore[misc]
    conf = tomllib.loads(m.registries.to_registries_conf())
    assert conf["registry"][0] == {
        "location": "docker.io",
        "insecure": False,
        "mirror": [{"location": "mirror.local:5000", "insecure": True}],
    }
    assert conf["registry"][1]["location"] == "127.0.0.1:5000"
    assert conf["registry"][1]["insecure"] is True


def test_defaults() -> None:
    m = nm.parse("containers: [{name: a, image: busybox}]")
    assert m.network == nm.NetworkWait()
    assert m.registries.empty
    assert m.containers[0].definition is None and m.containers[0].values == ()


def test_relative_paths_are_resolved_against_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "defs" / "ocid").mkdir(parents=True)
    (tmp_path / "auth.json").write_text("{}")
    text = (
        "registries: {credentials: auth.json}\n"
        "containers: [{name: ocid, image: busybox, definition: defs/ocid}]\n"
    )
    m = nm.parse(text, tmp_path / "node.yaml")
    assert m.containers[0].definition == tmp_path / "defs" / "ocid"
    assert m.registries.credentials == tmp_path / "auth.json"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the node manifest is empty"),
        ("[1, 2]", "the document: expected a mapping, got a list"),
        ("network: {}", "containers: required"),
        ("containers: []", "containers: at least one container is required"),
        ("containers: {a: 1}", "containers: expected a list, got a mapping"),
        ("containers: [{name: a}]", "containers[0].image: required"),
        (
            "containers: [{name: a, image: busybox}, {name: b}]",
            "containers[1].image: required",
        ),
        ("containers: [{image: busybox}]", "containers[0].name: required"),
        ("containers: [{name: a, image: busybox, imgae: x}]", "containers[0].imgae: unknown key"),
        ("contianers: []", "contianers: unknown key"),
        ("containers: [{name: a.0, image: busybox}]", "containers[0].name: 'a.0' is not a valid"),
        ("containers: [{name: -a, image: busybox}]", "containers[0].name: '-a' is not a valid"),
        ("containers: [{name: 7, image: busybox}]", "containers[0].name: 7 is not a valid"),
        (
            "containers: [{name: a, image: busybox}, {name: a, image: busybox}]",
            "containers[1].name: duplicate 'a' (also containers[0].name)",
        ),
        (
            "containers: [{name: a, image: busybox, after: [x]}]",
            "containers[0].after[0]: unknown container 'x'",
        ),
        (
            "containers: [{name: a, image: busybox, after: [a]}]",
            "containers[0].after[0]: a container cannot follow itself",
        ),
        ("containers: [{name: a, image: Busybox}]", "containers[0].image: invalid"),
        ("containers: [{name: a, image: [x]}]", "containers[0].image: expected an image ref"),
        (
            "containers: [{name: a, image: busybox, set: {1x: y}}]",
            "containers[0].set: '1x' is not a variable name",
        ),
        (
            "containers: [{name: a, image: busybox, set: {X: [1]}}]",
            "containers[0].set.X: expected a string or number, got a list",
        ),
        (
            "containers: [{name: a, image: busybox, set: {X: null}}]",
            "containers[0].set.X: expected a string or number, got nothing",
        ),
        (
            "containers: [{name: a, image: busybox, definition: nowhere}]",
            "containers[0].definition: /nonexistent/nowhere: no such directory",
        ),
        ("version: 2\ncontainers: []", "version: unsupported 2"),
        (
            "containers: [{name: a, image: busybox, ready: {cri_socket: x.sock}}]",
            "containers[0].ready.cri_socket: expected an absolute path",
        ),
        (
            "containers: [{name: a, image: busybox, ready: {cri_socket: /x, timeout: 0}}]",
            "containers[0].ready.timeout: expected seconds",
        ),
        (
            "containers: [{name: a, image: busybox, ready: {socket: /x}}]",
            "containers[0].ready.socket: unknown key",
        ),
        ("network: {timeout: -1}\n", "network.timeout: expected seconds"),
        ("network: {timeout: '30'}\n", "network.timeout: expected seconds"),
        ("network: {require_default_route: 1}\n", "network.require_default_route: expected"),
        ("network: {resolve: ['a b']}\n", "network.resolve[0]: expected a host name"),
        ("network: {wait: 1}\n", "network.wait: unknown key"),
        ("registries: {insecure: ['http://x']}\n", "registries.insecure[0]: expected a registry"),
        ("registries: {mirrors: {docker.io: []}}\n", "registries.mirrors.docker.io: empty list"),
        (
            "registries: {mirrors: {docker.io: ['a/b']}}\n",
            "registries.mirrors.docker.io[0]: expected a registry host",
        ),
        ("registries: {credentials: auth.json}\n", "registries.credentials: /nonexistent/auth"),
        ("registries: {proxy: x}\n", "registries.proxy: unknown key"),
        ("containers: [{name: a, image: busybox}\n", "line 2, column 1: invalid YAML"),
        (
            "containers: []\ncontainers: []\n",
            "line 2: duplicate key 'containers' (first on line 1)",
        ),
        ("a: &x [*x]\n", "line 1: recursive alias"),
        ("\xff", None),
    ],
)
def test_errors_name_their_path(text: str, message: str | None) -> None:
    if message is None:
        with pytest.raises(UsageError, match="not UTF-8"):
            nm.parse(text.encode("latin-1"))
        return
    assert message in _err(text)


def test_alias_bomb_is_refused_without_expanding_it() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines.append("containers: [{name: a, image: busybox}]")
    msg = _err("\n".join(lines))
    assert f"expands to more than {nm.MAX_NODES} nodes" in msg


def test_deep_nesting_is_refused() -> None:
    assert "nested too deeply" in _err("a: " + "[" * 100_000 + "]" * 100_000)


def test_small_aliases_are_fine() -> None:
    text = (
        "containers:\n"
        "  - {name: a, image: busybox, set: &common {A: '1', B: '2'}}\n"
        "  - {name: b, image: busybox, set: *common}\n"
    )
    m = nm.parse(text)
    assert m.containers[1].values == (("A", "1"), ("B", "2"))


def test_size_cap(tmp_path: Path) -> None:
    big = tmp_path / "node.yaml"
    big.write_bytes(b"# " + b"x" * nm.MAX_BYTES + b"\ncontainers: []\n")
    with pytest.raises(UsageError, match="larger than"):
        nm.load(big)


def test_load_prefixes_the_file_name(tmp_path: Path) -> None:
    f = tmp_path / "node.yaml"
    f.write_text("containers: [{name: a}]\n")
    with pytest.raises(UsageError) as info:
        nm.load(f)
    assert info.value.message == f"{f}: containers[0].image: required"
    with pytest.raises(UsageError, match="cannot read"):
        nm.load(tmp_path / "missing.yaml")


def test_example_manifest_is_valid() -> None:
    m = nm.load(REPO / "examples" / "node.yaml")
    assert plan(m).names == ("cni", "ocid", "kubelet")
    assert m.pods is not None and m.pods.cri == "ocid" and m.pods.network_ready
    assert m.pods.images[0] == "registry.k8s.io/pause:3.9"


# ---- plan --------------------------------------------------------------------------------------


def _m(*entries: tuple[str, list[str]]) -> nm.NodeManifest:
    items = ", ".join(f"{{name: {n}, image: busybox, after: [{', '.join(a)}]}}" for n, a in entries)
    return nm.parse(f"containers: [{items}]")


def test_plan_is_topological_and_stable() -> None:
    assert plan(_m(("a", []), ("b", []), ("c", []))).names == ("a", "b", "c")
    assert plan(_m(("kubelet", ["ocid"]), ("ocid", []))).names == ("ocid", "kubelet")
    m = _m(("d", ["b", "c"]), ("c", ["a"]), ("b", []), ("a", []), ("e", []))
    assert plan(m).names == ("b", "a", "c", "d", "e")


def test_plan_names_the_cycle() -> None:
    with pytest.raises(UsageError) as info:
        plan(_m(("x", []), ("a", ["c"]), ("b", ["a"]), ("c", ["b"]), ("d", ["a"])))
    assert info.value.message == "containers[1].after: cycle a -> c -> b -> a"
    with pytest.raises(UsageError, match=r"cycle p -> q -> p"):
        plan(_m(("p", ["q"]), ("q", ["p"])))


def test_auto_update_policy_and_timer() -> None:
    m = nm.parse(
        "auto_update: {timer: true}\n"
        "containers:\n"
        "  - {name: a, image: busybox, auto_update: registry}\n"
        "  - {name: b, image: busybox, after: [a]}\n"
    )
    assert m.auto_update_timer is True
    assert m.containers[0].auto_update == "registry"
    assert m.containers[1].auto_update is None
    assert nm.parse("containers: [{name: a, image: busybox}]").auto_update_timer is False
    for text, where in [
        ("containers: [{name: a, image: busybox, auto_update: daily}]", "containers[0]"),
        ("auto_update: {timer: yes please}\ncontainers: [{name: a, image: b}]", "timer"),
        ("auto_update: {when: daily}\ncontainers: [{name: a, image: b}]", "auto_update"),
    ]:
        with pytest.raises(UsageError) as info:
            nm.parse(text)
        assert info.value.message.startswith(where) or where in info.value.message


def test_registry_timeout() -> None:
    base = "containers: [{name: a, image: busybox}]\n"
    assert nm.parse(base).registries.timeout == nm.DEFAULT_REGISTRY_TIMEOUT == 600
    m = nm.parse("registries: {timeout: 20}\n" + base)
    assert m.registries.timeout == 20.0 and m.registries.empty  # no registries.conf needed
    assert nm.parse("registries: {timeout: 0}\n" + base).registries.timeout == 0
    for bad in ("-1", "yes", "90000"):
        msg = _err(f"registries: {{timeout: {bad}}}\n" + base)
        assert "registries.timeout: expected seconds between 0 and 86400" in msg


def test_registry_jitter() -> None:
    base = "containers: [{name: a, image: busybox}]\n"
    assert nm.parse(base).registries.jitter == 0
    m = nm.parse("registries: {jitter: 7.5}\n" + base)
    assert m.registries.jitter == 7.5 and m.registries.empty
    for bad in ("-1", "yes", "4000", "'5'"):
        msg = _err(f"registries: {{jitter: {bad}}}\n" + base)
        assert "registries.jitter: expected seconds between 0 and 3600" in msg


def test_retry_delay_is_capped_exponential_with_jitter() -> None:
    from bootstrap.node.up import RETRY_BASE, RETRY_CAP, retry_delay

    for attempt in range(1, 30):
        ceiling = min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1))
        delays = {retry_delay(attempt) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered
    assert max(retry_delay(50) for _ in range(50)) <= RETRY_CAP


# ---- pods: -------------------------------------------------------------------------------------

PODS_BASE = """\
containers:
  - name: cni
    image: 127.0.0.1:5000/cni:1
  - name: ocid
    image: 127.0.0.1:5000/ocid:1
    after: [cni]
    ready: {cri_socket: /run/containerd/containerd.sock}
  - name: kubelet
    image: 127.0.0.1:5000/kubelet:1
    after: [ocid]
"""

CONFLIST = (
    "{cniVersion: 1.0.0, name: pods, plugins: [{type: bridge, bridge: cni0, "
    "ipam: {type: host-local, ranges: [[{subnet: 198.51.100.128/25}]]}}, {type: portmap, "
    "capabilities: {portMappings: true}}, {type: loopback}]}"
)


def test_pods_section_parses() -> None:
    text = PODS_BASE + (
        f"pods:\n  network:\n    config: {CONFLIST}\n"
        "  images: [registry.k8s.io/pause:3.9, busybox]\n"
    )
    m = nm.parse(text, "/etc/bootstrap/node.yaml")
    assert m.pods is not None
    assert m.pods.cri == "ocid"  # the one container with ready.cri_socket
    assert m.pods.socket == "/run/containerd/containerd.sock"
    assert m.pods.network_ready is True  # the default with a network config
    assert m.pods.images == ("registry.k8s.io/pause:3.9", "docker.io/library/busybox:latest")
    assert m.pods.network is not None and m.pods.network.name == "10-bootstrap.conflist"
    import json

    doc = json.loads(m.pods.network.data)
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "portmap", "loopback"]
    assert doc["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "198.51.100.128/25"}]]


def test_pods_network_from_a_file_and_no_network_wait(tmp_path: Path) -> None:
    (tmp_path / "net.conf").write_text('{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}')
    text = PODS_BASE + (
        "pods:\n  cri: ocid\n  network: {name: 20-net.conf, from: net.conf}\n"
        "  network_ready: false\n"
    )
    m = nm.parse(text, tmp_path / "node.yaml")
    assert m.pods is not None and m.pods.network is not None
    assert m.pods.network.name == "20-net.conf"
    assert m.pods.network_ready is False
    assert m.pods.images == ()


def test_no_pods_section_means_none() -> None:
    assert nm.parse(PODS_BASE).pods is None


@pytest.mark.parametrize(
    ("pods", "message"),
    [
        ("pods: {images: [Bad::ref]}", "pods.images[0]: "),
        ("pods: {images: [busybox, busybox]}", "pods.images[1]: docker.io/library/busybox:latest "
         "is listed twice"),
        ("pods: {cri: nope}", "pods.cri: unknown container 'nope'"),
        ("pods: {cri: kubelet}", "pods.cri: container 'kubelet' has no ready.cri_socket"),
        ("pods: {bogus: 1}", "pods.bogus: unknown key"),
        ("pods: {network_ready: yes please}", "pods.network_ready: expected true or false"),
        ("pods: {network: {config: {name: x, plugins: [{type: bridge}]}}}",
         "pods.network.config.cniVersion: required"),
        ("pods: {network: {config: {cniVersion: 1.0.0, name: x, plugins: []}}}",
         "pods.network.config.plugins: at least one plugin"),
        ("pods: {network: {config: {cniVersion: 1.0.0, name: x, plugins: [{}]}}}",
         "pods.network.config.plugins[0].type: required"),
        ("pods: {network: {name: 10-x.conf, config: {cniVersion: 1.0.0, name: x, "
         "plugins: [{type: bridge}]}}}", "pods.network.config.type: required"),
        ("pods: {network: {name: ../evil.conflist, config: {}}}", "pods.network.name: "
         "'../evil.conflist' is not a CNI config file name"),
        ("pods: {network: {from: missing.conflist}}", "pods.network.from: "),
        ("pods: {network: {}}", "pods.network: exactly one of config, from"),
    ],
)  # fmt: skip
def test_pods_errors_name_their_path(pods: str, message: str) -> None:
    assert _err(PODS_BASE + pods + "\n").startswith(message)


def test_pods_needs_a_cri_daemon() -> None:
    text = "containers: [{name: a, image: busybox}]\npods: {images: [busybox]}\n"
    assert _err(text).startswith("pods.cri: required: no container has a ready.cri_socket")
    two = (
        "containers:\n  - {name: a, image: busybox, ready: {cri_socket: /run/a.sock}}\n"
        "  - {name: b, image: busybox, ready: {cri_socket: /run/b.sock}}\n"
        "pods: {images: [busybox]}\n"
    )
    assert "several containers have a ready.cri_socket (a, b)" in _err(two)
