"""The node manifest: the YAML document ``bootstrap up`` provisions a node from.

The document is read once, bounded (:data:`MAX_BYTES`, :data:`MAX_NODES` after alias expansion,
no recursive aliases, no duplicate keys), parsed with PyYAML's ``SafeLoader`` (what
``yaml.safe_load`` uses) and validated into frozen dataclasses. Every error is a
:class:`~bootstrap.errors.UsageError` (exit 2) whose message starts with the path of the offending
value in the document, e.g. ``containers[1].image: required``; nothing on disk is touched. The
format is documented in docs/node-manifest.md, with an example in examples/node.yaml::

    version: 1                       # optional; only 1 is known
    registries:                      # optional
      credentials: /etc/bootstrap/auth.json       # containers-auth.json; relative to this file
      insecure: ["registry.local:5000"]           # plain HTTP / unverified TLS
      mirrors:                                    # tried in order before the registry itself
        docker.io: ["mirror.local:5000"]
      timeout: 600                   # seconds to keep retrying registries that cannot be
                                     # reached or answer 5xx (default 600; 0: fail at once)
    network:                         # optional
      timeout: 120                   # seconds to wait for the network (default 120)
      require_default_route: true    # default true
      resolve: [registry.example.com]   # names that must resolve (default none)
    containers:                      # required, at least one
      - name: ocid                   # systemd-unit-safe: [A-Za-z0-9][A-Za-z0-9_-]*, <= 64
        image: registry.example.com/ocid:1.0
        definition: /usr/share/bootstrap/ocid   # optional; relative to this file
        set: {CRI_SOCKET: /run/crio/crio.sock}  # optional template values (--set K=V)
      - name: kubelet
        image: registry.example.com/kubelet:1.30
        after: [ocid]                # started only once these are active/ready
        auto_update: registry        # optional: registry | local | off (default: definition's)
    auto_update:                     # optional
      timer: true                    # enable bootstrap-auto-update.timer (daily auto-update)
    # a container may also say when it is ready beyond its unit being active:
    #   ready: {cri_socket: /run/crio/crio.sock, timeout: 300}   # answers CRI Version
    trust:                           # optional; written before the first pull (docs/trust.md)
      policy: {default: [{type: reject}], transports: {docker: {...}}}  # or a path to a file
      files:                         # keys the policy names, written first
        - {path: /etc/pki/containers/ops.gpg, from: ops.gpg}   # or base64: ... or data: ...
      registries.d: {ops.yaml: {docker: {registry.example.com: {lookaside: https://...}}}}
    pods:                            # optional; what the node needs to run pods
      cri: ocid                      # the CRI daemon (default: the container with ready.cri_socket)
      network:                       # a CNI config written before the CRI daemon starts
        name: 10-bootstrap.conflist  # its file name in /etc/cni/net.d (default)
        config: {cniVersion: 1.0.0, name: pods, plugins: [...]}   # or from: FILE
      network_ready: true            # wait for CRI NetworkReady (default: true with network:)
      images: [registry.k8s.io/pause:3.9]   # pulled, verified, imported into the CRI daemon
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bootstrap.deploy import api as deploy_api
from bootstrap.errors import BootstrapError, UsageError
from bootstrap.image.api import Reference
from bootstrap.systemd import units

MAX_BYTES = 1 << 20
"""Largest manifest accepted, in bytes."""

MAX_NODES = 20_000
"""Largest number of YAML nodes accepted, counting every alias as the size of what it names."""

NAME_RE = units.NAME_RE
"""A container name (the deploy stage's rule): safe as a systemd unit name, a runc container id
and a directory name (no dots, so it cannot collide with the ``NAME.0``/``NAME.1`` slots)."""

VAR_RE = deploy_api.VAR_NAME
"""A template variable name (a key of ``set:``; the definition's rule)."""

HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?")
"""A registry host, optionally with a port (``registry.local:5000``)."""

_HINT = "fix the node manifest (see docs/node-manifest.md)"

DEFAULT_NETWORK_TIMEOUT = 120.0
DEFAULT_REGISTRY_TIMEOUT = 600.0
MAX_JITTER = 3600.0
DEFAULT_READY_TIMEOUT = 300.0
DEFAULT_CNI_NAME = "10-bootstrap.conflist"
CNI_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.(conflist|conf|json)")
MAX_POD_IMAGES = 64


@dataclass(frozen=True)
class Mirrors:
    """Mirrors for one registry, tried in order before the registry itself."""

    registry: str
    mirrors: tuple[str, ...]


@dataclass(frozen=True)
class Registries:
    """How to reach registries: credentials file, insecure hosts, mirrors, ``timeout``: how
    long ``up`` keeps retrying registries that cannot be reached (seconds), and ``jitter``:
    the most ``up`` waits, a random share of it, before its first pull (seconds; 0: none), so
    that nodes booted together do not reach a mirror in the same instant."""

    credentials: Path | None = None
    insecure: tuple[str, ...] = ()
    mirrors: tuple[Mirrors, ...] = ()
    timeout: float = DEFAULT_REGISTRY_TIMEOUT
    jitter: float = 0.0

    @property
    def empty(self) -> bool:
        """True when the manifest asks for no registry configuration beyond the defaults
        (``timeout`` is not registry configuration)."""
        return self.credentials is None and not self.insecure and not self.mirrors

    def to_registries_conf(self) -> str:
        """Render ``insecure`` and ``mirrors`` as a containers-registries.conf(5) v2 TOML text.

        Every registry named in either list gets one ``[[registry]]`` table; a mirror is insecure
        when its host is in ``insecure``. Strings are TOML basic strings (hosts are validated,
        so they need no escaping)."""
        hosts = [m.registry for m in self.mirrors]
        hosts += [h for h in self.insecure if h not in hosts]
        by_host = {m.registry: m.mirrors for m in self.mirrors}
        lines = ["# written by bootstrap up from the node manifest", ""]
        for host in hosts:
            lines += [
                "[[registry]]",
                f'location = "{host}"',
                f"insecure = {_toml_bool(host in self.insecure)}",
            ]
            for mirror in by_host.get(host, ()):
                lines += [
                    "[[registry.mirror]]",
                    f'location = "{mirror}"',
                    f"insecure = {_toml_bool(mirror in self.insecure)}",
                ]
            lines.append("")
        return "\n".join(lines)


@dataclass(frozen=True)
class NetworkWait:
    """What "the network is up" means for this node, and how long to wait for it."""

    timeout: float = DEFAULT_NETWORK_TIMEOUT
    require_default_route: bool = True
    resolve: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerSpec:
    """One system container to install: ``bootstrap install NAME IMAGE [--definition DIR]
    [--set K=V]...``, started once everything in ``after`` is active/ready.

    ``image`` is the fully normalized reference (``str(Reference.parse(...))``); ``values`` are
    the ``set:`` pairs in document order; ``index`` is the position in ``containers``;
    ``ready_cri_socket``: once the unit is active, wait (``ready_timeout`` seconds at most) until
    this socket answers the CRI ``Version`` RPC."""

    name: str
    image: str
    definition: Path | None
    values: tuple[tuple[str, str], ...]
    after: tuple[str, ...]
    index: int
    ready_cri_socket: str | None = None
    ready_timeout: float = DEFAULT_READY_TIMEOUT
    auto_update: str | None = None

    @property
    def values_dict(self) -> dict[str, str]:
        """``values`` as a fresh dict."""
        return dict(self.values)


@dataclass(frozen=True)
class TrustFile:
    """A file the ``trust:`` section writes (a key): absolute ``path`` and its bytes."""

    path: Path
    data: bytes


@dataclass(frozen=True)
class Trust:
    """The ``trust:`` section: ``policy`` (containers-policy.json bytes, validated),
    ``files`` (keys) and ``registries_d`` (file name -> YAML text for registries.d)."""

    policy: bytes
    files: tuple[TrustFile, ...] = ()
    registries_d: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CniConfig:
    """A CNI network configuration ``up`` writes as ``/etc/cni/net.d/NAME`` before the CRI
    daemon starts: ``data`` is its JSON text (a ``.conflist`` with ``plugins``, or a single
    plugin ``.conf``/``.json``), validated for the keys every CNI runtime needs."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Pods:
    """The ``pods:`` section: what the CRI daemon ``cri`` (a container of the manifest whose
    ``ready.cri_socket`` is ``socket``) needs before the containers after it start: the CNI
    config ``network`` (None: the node has its own, or an image ships one), whether ``up``
    waits for CRI ``NetworkReady`` (``network_ready``), and ``images`` (normalized
    references) pulled and verified by bootstrap and imported into the daemon."""

    cri: str
    socket: str
    network: CniConfig | None = None
    network_ready: bool = False
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeManifest:
    """A validated node manifest. ``digest`` is ``sha256:`` of the file's bytes."""

    path: Path
    digest: str
    registries: Registries
    network: NetworkWait
    containers: tuple[ContainerSpec, ...]
    auto_update_timer: bool = False
    trust: Trust | None = None
    pods: Pods | None = None

    def container(self, name: str) -> ContainerSpec:
        """The container called ``name``; KeyError when there is none."""
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)


# ---- loading -----------------------------------------------------------------------------------


def load(path: str | Path) -> NodeManifest:
    """Read, bound, parse and validate the manifest at ``path``.

    Raises :class:`UsageError` (exit 2) when the file cannot be read, is larger than
    :data:`MAX_BYTES`, is not UTF-8 YAML, expands to more than :data:`MAX_NODES` nodes, has a
    recursive alias or a duplicate key, or does not match the schema; the message starts with the
    file name and the path in the document. Reads only ``path`` (and checks that referenced
    definition directories and credentials files exist); writes nothing.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise UsageError(
            f"{path}: cannot read the node manifest: {exc.strerror or exc}",
            "pass the path of a readable YAML file",
        ) from exc
    if len(data) > MAX_BYTES:
        raise UsageError(
            f"{path}: the node manifest is larger than {MAX_BYTES} bytes", "is this the right file?"
        )
    try:
        return parse(data, path.absolute())
    except BootstrapError as err:
        raise err.with_context(str(path)) from err


def parse(data: bytes | str, path: str | Path = "<manifest>") -> NodeManifest:
    """Parse and validate manifest text; ``path`` anchors relative paths (its directory) and is
    recorded in the result. Raises :class:`UsageError` as :func:`load` does, without the file
    name in the message."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_BYTES:
        raise UsageError(f"the node manifest is larger than {MAX_BYTES} bytes", _HINT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"not UTF-8 text (byte {exc.start})", _HINT) from exc
    doc = _safe_load_bounded(text)
    return _Validator(path.parent).manifest(doc, path, "sha256:" + hashlib.sha256(raw).hexdigest())


class _Loader(yaml.SafeLoader):
    """SafeLoader; construction is only run after :func:`_check_graph` bounded the node graph."""


def _safe_load_bounded(text: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        raise UsageError(f"{where}invalid YAML: {what}", _HINT) from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"invalid YAML: {exc}", _HINT) from exc
    except RecursionError as exc:  # the composer and the bound check both recurse by depth
        raise UsageError("the document is nested too deeply", _HINT) from exc
    finally:
        loader.dispose()


def _check_graph(root: yaml.Node) -> None:
    """Refuse alias bombs, recursive aliases and duplicate mapping keys, without expanding."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise UsageError(f"line {node.start_mark.line + 1}: recursive alias", _HINT)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                _bound(total, child)
        elif isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        raise UsageError(
                            f"line {k.start_mark.line + 1}: duplicate key {k.value!r} "
                            f"(first on line {seen[k.value]})",
                            _HINT,
                        )
                    seen[k.value] = k.start_mark.line + 1
                total += size(k) + size(v)
                _bound(total, v)
        active.discard(key)
        sizes[key] = total
        return total

    _bound(size(root), root)


def _bound(total: int, node: yaml.Node) -> None:
    if total > MAX_NODES:
        raise UsageError(
            f"line {node.start_mark.line + 1}: the document expands to more than {MAX_NODES} "
            "nodes (too many aliases?)",
            _HINT,
        )


# ---- validation --------------------------------------------------------------------------------


class _Validator:
    """Turns the parsed document into dataclasses; every error names its path."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def manifest(self, doc: Any, path: Path, digest: str) -> NodeManifest:
        if doc is None:
            raise UsageError("the node manifest is empty", "it needs at least 'containers:'")
        top = self.mapping(
            doc,
            "",
            {"version", "registries", "network", "containers", "auto_update", "trust", "pods"},
        )
        if "version" in top and (type(top["version"]) is not int or top["version"] != 1):
            raise UsageError(f"version: unsupported {top['version']!r} (only 1 is known)", _HINT)
        registries = self.registries(top.get("registries"), "registries")
        network = self.network(top.get("network"), "network")
        if "containers" not in top:
            raise UsageError("containers: required", _HINT)
        containers = self.containers(top["containers"], "containers")
        timer = False
        if top.get("auto_update") is not None:
            au = self.mapping(top["auto_update"], "auto_update", {"timer"})
            timer = au.get("timer", False)
            if type(timer) is not bool:
                raise UsageError("auto_update.timer: expected true or false", _HINT)
        trust = self.trust(top.get("trust"), "trust")
        pods = self.pods(top.get("pods"), "pods", containers)
        return NodeManifest(path, digest, registries, network, containers, timer, trust, pods)

    def pods(self, value: Any, at: str, containers: tuple[ContainerSpec, ...]) -> Pods | None:
        if value is None:
            return None
        m = self.mapping(value, at, {"cri", "network", "network_ready", "images"})
        daemons = [c for c in containers if c.ready_cri_socket]
        if m.get("cri") is not None:
            name = m["cri"]
            found = [c for c in containers if c.name == name]
            if not found:
                raise UsageError(f"{at}.cri: unknown container {name!r}", _HINT)
            if not found[0].ready_cri_socket:
                raise UsageError(
                    f"{at}.cri: container {name!r} has no ready.cri_socket",
                    "give the CRI daemon 'ready: {cri_socket: SOCKET}' so up can talk to it",
                )
            daemon = found[0]
        elif len(daemons) == 1:
            daemon = daemons[0]
        else:
            raise UsageError(
                f"{at}.cri: required: "
                + (
                    "no container has a ready.cri_socket"
                    if not daemons
                    else "several containers "
                    f"have a ready.cri_socket ({', '.join(c.name for c in daemons)})"
                ),
                "name the CRI daemon container, and give it 'ready: {cri_socket: SOCKET}'",
            )
        network = None
        if m.get("network") is not None:
            network = self.cni(m["network"], f"{at}.network")
        network_ready = m.get("network_ready", network is not None)
        if type(network_ready) is not bool:
            raise UsageError(f"{at}.network_ready: expected true or false", _HINT)
        images: list[str] = []
        raw = self.sequence(m.get("images", []), f"{at}.images")
        if len(raw) > MAX_POD_IMAGES:
            raise UsageError(f"{at}.images: more than {MAX_POD_IMAGES} images", _HINT)
        for i, ref in enumerate(raw):
            name = self.reference(ref, f"{at}.images[{i}]")
            if name in images:
                raise UsageError(f"{at}.images[{i}]: {name} is listed twice", _HINT)
            images.append(name)
        assert daemon.ready_cri_socket is not None
        return Pods(daemon.name, daemon.ready_cri_socket, network, network_ready, tuple(images))

    def cni(self, value: Any, at: str) -> CniConfig:
        m = self.mapping(value, at, {"name", "config", "from"})
        name = m.get("name", DEFAULT_CNI_NAME)
        if not isinstance(name, str) or not CNI_NAME_RE.fullmatch(name):
            raise UsageError(
                f"{at}.name: {name!r} is not a CNI config file name",
                "e.g. 10-bootstrap.conflist (a .conflist, .conf or .json file name)",
            )
        sources = [k for k in ("config", "from") if k in m]
        if len(sources) != 1:
            raise UsageError(f"{at}: exactly one of config, from", _HINT)
        if "from" in m:
            src = self.path(m["from"], f"{at}.from")
            try:
                raw = src.read_bytes()
            except OSError as exc:
                raise UsageError(f"{at}.from: {src}: {exc.strerror or exc}", _HINT) from exc
            try:
                doc = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise UsageError(f"{at}.from: {src}: not JSON: {exc}", _HINT) from exc
            where = f"{at}.from ({src.name})"
        else:
            doc = m["config"]
            where = f"{at}.config"
        self.cni_doc(doc, where, conflist=name.endswith(".conflist"))
        return CniConfig(name, (json.dumps(doc, indent=2) + "\n").encode())

    def cni_doc(self, doc: Any, at: str, *, conflist: bool) -> None:
        """The keys a CNI runtime (libcni) requires: ``cniVersion`` and ``name``, and
        ``plugins`` (a non-empty list, each with a ``type``) in a conflist or ``type`` in a
        single plugin's config."""
        d = self.mapping(doc, at, None)
        for key in ("cniVersion", "name"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise UsageError(f"{at}.{key}: required, a string", "see the CNI specification")
        if conflist:
            plugins = self.sequence(d.get("plugins"), f"{at}.plugins")
            if not plugins:
                raise UsageError(f"{at}.plugins: at least one plugin is required", _HINT)
            for i, plugin in enumerate(plugins):
                p = self.mapping(plugin, f"{at}.plugins[{i}]", None)
                if not isinstance(p.get("type"), str) or not p["type"]:
                    raise UsageError(f"{at}.plugins[{i}].type: required, a string", _HINT)
        elif not isinstance(d.get("type"), str) or not d["type"]:
            raise UsageError(
                f"{at}.type: required, a string",
                "a .conf/.json file holds one plugin; name the file .conflist for a plugin list",
            )

    def trust(self, value: Any, at: str) -> Trust | None:
        from bootstrap.trust.policy import parse_policy
        from bootstrap.trust.registries_d import parse_registries_d_doc

        if value is None:
            return None
        m = self.mapping(value, at, {"policy", "files", "registries.d"})
        if "policy" not in m:
            raise UsageError(f"{at}.policy: required", _HINT)
        raw = m["policy"]
        if isinstance(raw, str):
            src = self.path(raw, f"{at}.policy")
            try:
                policy = src.read_bytes()
            except OSError as exc:
                raise UsageError(f"{at}.policy: {src}: {exc.strerror or exc}", _HINT) from exc
        else:
            policy = json.dumps(self.mapping(raw, f"{at}.policy", None), indent=2).encode()
        try:
            parse_policy(policy, Path(f"{at}.policy"))
        except UsageError as err:
            raise UsageError(f"{at}.policy: {err.message}", _HINT) from err
        files: list[TrustFile] = []
        for i, item in enumerate(self.sequence(m.get("files", []), f"{at}.files")):
            where = f"{at}.files[{i}]"
            f = self.mapping(item, where, {"path", "from", "base64", "data"})
            if "path" not in f or not str(f["path"]).startswith("/"):
                raise UsageError(f"{where}.path: required, an absolute path", _HINT)
            sources = [k for k in ("from", "base64", "data") if k in f]
            if len(sources) != 1:
                raise UsageError(f"{where}: exactly one of from, base64, data", _HINT)
            kind = sources[0]
            if kind == "from":
                src = self.path(f["from"], f"{where}.from")
                try:
                    data = src.read_bytes()
                except OSError as exc:
                    raise UsageError(f"{where}.from: {src}: {exc.strerror or exc}", _HINT) from exc
            elif kind == "base64":
                try:
                    data = base64.b64decode(str(f["base64"]), validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise UsageError(f"{where}.base64: not valid base64", _HINT) from exc
            else:
                if not isinstance(f["data"], str):
                    raise UsageError(f"{where}.data: expected text", _HINT)
                data = f["data"].encode()
            files.append(TrustFile(self.path(f["path"], f"{where}.path"), data))
        regd: list[tuple[str, str]] = []
        for name, doc in self.mapping(
            m.get("registries.d", {}), f"{at}.registries.d", None
        ).items():
            where = f"{at}.registries.d.{name}"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.yaml", name):
                raise UsageError(f"{where}: a file name ending in .yaml", _HINT)
            try:
                parse_registries_d_doc(doc, Path(where))
            except UsageError as err:
                raise UsageError(err.message, _HINT) from err
            regd.append((name, yaml.safe_dump(doc, default_flow_style=False)))
        return Trust(policy, tuple(files), tuple(regd))

    # -- sections --

    def registries(self, value: Any, at: str) -> Registries:
        if value is None:
            return Registries()
        m = self.mapping(value, at, {"credentials", "insecure", "mirrors", "timeout", "jitter"})
        timeout = m.get("timeout", DEFAULT_REGISTRY_TIMEOUT)
        if type(timeout) not in (int, float) or not 0 <= timeout <= 86400:
            raise UsageError(f"{at}.timeout: expected seconds between 0 and 86400", _HINT)
        jitter = m.get("jitter", 0)
        if type(jitter) not in (int, float) or not 0 <= jitter <= MAX_JITTER:
            raise UsageError(f"{at}.jitter: expected seconds between 0 and {MAX_JITTER:g}", _HINT)
        credentials = None
        if m.get("credentials") is not None:
            credentials = self.path(m["credentials"], f"{at}.credentials")
            if not credentials.is_file():
                raise UsageError(f"{at}.credentials: {credentials}: no such file", _HINT)
        insecure = tuple(
            self.host(h, f"{at}.insecure[{i}]")
            for i, h in enumerate(self.sequence(m.get("insecure", []), f"{at}.insecure"))
        )
        mirrors: list[Mirrors] = []
        raw = self.mapping(m.get("mirrors", {}), f"{at}.mirrors", None)
        for registry, hosts in raw.items():
            where = f"{at}.mirrors.{registry}"
            self.host(registry, f"{at}.mirrors")
            items = self.sequence(hosts, where)
            if not items:
                raise UsageError(f"{where}: empty list of mirrors", _HINT)
            mirrors.append(
                Mirrors(
                    registry,
                    tuple(self.host(h, f"{where}[{i}]") for i, h in enumerate(items)),
                )
            )
        return Registries(credentials, insecure, tuple(mirrors), float(timeout), float(jitter))

    def network(self, value: Any, at: str) -> NetworkWait:
        if value is None:
            return NetworkWait()
        m = self.mapping(value, at, {"timeout", "require_default_route", "resolve"})
        timeout = m.get("timeout", DEFAULT_NETWORK_TIMEOUT)
        if type(timeout) not in (int, float) or not 0 <= timeout <= 86400:
            raise UsageError(f"{at}.timeout: expected seconds between 0 and 86400", _HINT)
        require = m.get("require_default_route", True)
        if type(require) is not bool:
            raise UsageError(f"{at}.require_default_route: expected true or false", _HINT)
        names = []
        for i, name in enumerate(self.sequence(m.get("resolve", []), f"{at}.resolve")):
            if not isinstance(name, str) or not HOST_RE.fullmatch(name) or ":" in name:
                raise UsageError(f"{at}.resolve[{i}]: expected a host name, got {name!r}", _HINT)
            names.append(name)
        return NetworkWait(float(timeout), require, tuple(names))

    def containers(self, value: Any, at: str) -> tuple[ContainerSpec, ...]:
        items = self.sequence(value, at)
        if not items:
            raise UsageError(f"{at}: at least one container is required", _HINT)
        keys = {"name", "image", "definition", "set", "after", "ready", "auto_update"}
        first: dict[str, int] = {}
        raw: list[tuple[dict[str, Any], str, str]] = []
        for i, item in enumerate(items):
            where = f"{at}[{i}]"
            m = self.mapping(item, where, keys)
            for required in ("name", "image"):
                if m.get(required) is None:
                    raise UsageError(f"{where}.{required}: required", _HINT)
            name = m["name"]
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                raise UsageError(
                    f"{where}.name: {name!r} is not a valid name",
                    "use letters, digits, '-' and '_' (first a letter or digit), at most 64",
                )
            if name in first:
                raise UsageError(
                    f"{where}.name: duplicate {name!r} (also {at}[{first[name]}].name)", _HINT
                )
            first[name] = i
            raw.append((m, where, name))
        result = []
        for i, (m, where, name) in enumerate(raw):
            image = self.reference(m["image"], f"{where}.image")
            definition = None
            if m.get("definition") is not None:
                definition = self.path(m["definition"], f"{where}.definition")
                if not definition.is_dir():
                    raise UsageError(
                        f"{where}.definition: {definition}: no such directory",
                        "a definition is a directory with manifest.json, config.json.template, "
                        "service.template",
                    )
            values = self.values(m.get("set"), f"{where}.set")
            after = []
            for j, dep in enumerate(self.sequence(m.get("after", []), f"{where}.after")):
                if not isinstance(dep, str) or dep not in first:
                    raise UsageError(f"{where}.after[{j}]: unknown container {dep!r}", _HINT)
                if dep == name:
                    raise UsageError(f"{where}.after[{j}]: a container cannot follow itself", _HINT)
                if dep not in after:
                    after.append(dep)
            socket, timeout = self.ready(m.get("ready"), f"{where}.ready")
            policy = m.get("auto_update")
            if policy is not None and policy not in deploy_api.AUTO_UPDATE_POLICIES:
                raise UsageError(
                    f"{where}.auto_update: expected one of "
                    f"{', '.join(deploy_api.AUTO_UPDATE_POLICIES)}, got {policy!r}",
                    _HINT,
                )
            result.append(
                ContainerSpec(
                    name, image, definition, values, tuple(after), i, socket, timeout, policy
                )
            )
        return tuple(result)

    def ready(self, value: Any, at: str) -> tuple[str | None, float]:
        if value is None:
            return None, DEFAULT_READY_TIMEOUT
        m = self.mapping(value, at, {"cri_socket", "timeout"})
        socket = m.get("cri_socket")
        if not isinstance(socket, str) or not socket.startswith("/") or "\0" in socket:
            raise UsageError(
                f"{at}.cri_socket: expected an absolute path, got {socket!r}",
                "e.g. /run/crio/crio.sock",
            )
        timeout = m.get("timeout", DEFAULT_READY_TIMEOUT)
        if type(timeout) not in (int, float) or not 0 < timeout <= 86400:
            raise UsageError(f"{at}.timeout: expected seconds between 1 and 86400", _HINT)
        return socket, float(timeout)

    # -- values --

    def values(self, value: Any, at: str) -> tuple[tuple[str, str], ...]:
        if value is None:
            return ()
        pairs = []
        for key, v in self.mapping(value, at, None).items():
            if not VAR_RE.fullmatch(key):
                raise UsageError(
                    f"{at}: {key!r} is not a variable name", "use [A-Za-z_][A-Za-z0-9_]*"
                )
            if isinstance(v, bool):
                text = "true" if v else "false"
            elif isinstance(v, int | float | str):
                text = str(v)
            else:
                raise UsageError(
                    f"{at}.{key}: expected a string or number, got {_kind(v)}",
                    "quote the value",
                )
            if "\n" in text or "\0" in text:
                raise UsageError(f"{at}.{key}: newlines and NUL are not allowed", _HINT)
            pairs.append((key, text))
        return tuple(pairs)

    def reference(self, value: Any, at: str) -> str:
        if not isinstance(value, str):
            raise UsageError(f"{at}: expected an image reference, got {_kind(value)}", _HINT)
        try:
            return str(Reference.parse(value))
        except UsageError as err:
            raise err.with_context(at) from err

    def host(self, value: Any, at: str) -> str:
        if not isinstance(value, str) or not HOST_RE.fullmatch(value):
            raise UsageError(f"{at}: expected a registry host[:port], got {value!r}", _HINT)
        return value

    def path(self, value: Any, at: str) -> Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise UsageError(f"{at}: expected a path, got {value!r}", _HINT)
        return Path(os.path.normpath((self.base / value).absolute()))

    def mapping(self, value: Any, at: str, known: set[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise UsageError(
                f"{at or 'the document'}: expected a mapping, got {_kind(value)}", _HINT
            )
        for key in value:
            if not isinstance(key, str):
                raise UsageError(f"{_join(at, str(key))}: keys must be strings", _HINT)
            if known is not None and key not in known:
                raise UsageError(
                    f"{_join(at, key)}: unknown key",
                    f"known keys here: {', '.join(sorted(known))}",
                )
        return value

    def sequence(self, value: Any, at: str) -> Sequence[Any]:
        if not isinstance(value, list):
            raise UsageError(f"{at}: expected a list, got {_kind(value)}", _HINT)
        return value


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "nothing"
    return names.get(type(value), type(value).__name__)


def _toml_bool(value: bool) -> str:
    return "true" if value else "false"
