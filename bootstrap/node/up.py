"""``bootstrap up MANIFEST``: provision a node at first boot from its node manifest.

Steps, each logged as one plain line (journald keeps them; no progress bars off a TTY):

1. read and validate the manifest and its plan (exit 2 on any error, nothing changed);
2. if ``$STATE/.provisioned`` records this manifest's digest: nothing to do;
3. wait for the network (:mod:`bootstrap.net.readiness`; exit 3 at the deadline);
4. write what the manifest puts on the host (:mod:`bootstrap.node.hostconf`: the registries
   drop-in and credentials later commands read too, the CNI config);
5. pull every image that is not stored yet (the containers' and ``pods.images``), in
   parallel; a registry that cannot be reached (or answers 5xx) is retried with capped,
   jittered backoff until the manifest's ``registries.timeout`` (default 10 minutes), each
   wait logged with what it waits for (exit 3/4/7 after that; nothing installed yet);
6. in plan order, install each container (an identical installation is left as it is), start
   its unit unless it is already active, wait until it is active (``Type=notify``: ready), and
   when the manifest says ``ready: {cri_socket: ...}``, until that socket answers CRI ``Version``
   (exit 5); for the CRI daemon of ``pods:``, hand it the pod images it does not hold yet and
   wait until CRI ``Status`` reports RuntimeReady (and NetworkReady when asked) before the
   containers after it start (:mod:`bootstrap.node.pods`);
7. write ``$STATE/.provisioned`` (JSON; temp + fsync + rename), with the boot chain: each
   step (network ready, each pull, each install, each unit active, each CRI answering) with
   when it ended and how long it took, seconds from the start of ``up``; ``up`` prints it at
   the end and ``bootstrap status --node`` shows it again.

A node update (``update --node``, ``auto-update``) a killed run left is finished (committed
or rolled back) first, even when the node is provisioned already.

A run killed anywhere is finished by the next one: stored images are not fetched again,
installed containers are kept (the deploy stage recovers an interrupted install under its lock)
and started if they are not running; only the marker says "done". Concurrent runs serialize on
``$STATE/locks/up.lock``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootstrap.errors import BootstrapError, SystemdError, UsageError
from bootstrap.fsutil import make_dirs, write_atomic
from bootstrap.locks import flocked
from bootstrap.node.manifest import ContainerSpec, NodeManifest, Pods, Registries
from bootstrap.node.manifest import load as load_manifest
from bootstrap.node.plan import plan
from bootstrap.settings import Settings

if TYPE_CHECKING:
    from bootstrap.deploy.api import Deployer, Deployment, NodeUpdates
    from bootstrap.image.api import Store
    from bootstrap.trust.verify import Verifier

log = logging.getLogger(__name__)

MARKER = ".provisioned"
PULL_WORKERS = 4
LOCK_TIMEOUT = 3600.0
AUTO_UPDATE_TIMER = "bootstrap-auto-update.timer"


@dataclass(frozen=True)
class BootStep:
    """One link of the boot chain: ``what`` ended ``at`` seconds after ``up`` started and took
    ``took`` seconds (its own duration; pulls overlap)."""

    what: str
    at: float
    took: float

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "at": round(self.at, 3), "took": round(self.took, 3)}

    @classmethod
    def from_json(cls, doc: Any) -> BootStep:
        """A step as :meth:`to_json` wrote it; ValueError/TypeError/KeyError when malformed."""
        return cls(str(doc["what"]), float(doc["at"]), float(doc["took"]))


class _Chain:
    """Collects :class:`BootStep` entries from several threads, relative to ``started``."""

    def __init__(self, started: float) -> None:
        self.started = started
        self._steps: list[BootStep] = []
        self._lock = threading.Lock()

    def add(self, what: str, since: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._steps.append(BootStep(what, now - self.started, now - since))

    def steps(self) -> tuple[BootStep, ...]:
        with self._lock:
            return tuple(sorted(self._steps, key=lambda s: s.at))


def chain_text(steps: tuple[BootStep, ...]) -> list[str]:
    """The boot chain as aligned lines (``  +1.234s  what (took 0.5s)``)."""
    return [f"  +{s.at:6.3f}s  {s.what} (took {s.took:.3f}s)" for s in steps]


@dataclass(frozen=True)
class ContainerOutcome:
    """What ``up`` did for one container: ``action`` is ``installed``, ``started`` (installed
    before, was not running) or ``unchanged``."""

    name: str
    image: str
    digest: str
    action: str
    active_state: str
    cri_version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "digest": self.digest,
            "action": self.action,
            "active_state": self.active_state,
            "cri_version": self.cri_version,
        }


@dataclass(frozen=True)
class UpResult:
    """The outcome of ``bootstrap up``. ``changed`` is False when the node was already
    provisioned from this manifest, or when every step found its work done."""

    manifest: str
    digest: str
    changed: bool
    message: str
    marker: str
    order: tuple[str, ...] = ()
    pulled: tuple[str, ...] = ()
    containers: tuple[ContainerOutcome, ...] = ()
    network: dict[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    chain: tuple[BootStep, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "digest": self.digest,
            "changed": self.changed,
            "message": self.message,
            "marker": self.marker,
            "order": list(self.order),
            "pulled": list(self.pulled),
            "containers": [c.to_json() for c in self.containers],
            "network": self.network,
            "elapsed": round(self.elapsed, 3),
            "chain": [s.to_json() for s in self.chain],
        }

    def to_text(self) -> str:
        lines = [self.message]
        for c in self.containers:
            extra = f", CRI {c.cri_version}" if c.cri_version else ""
            lines.append(f"  {c.name}: {c.action}, {c.active_state} ({c.image}{extra})")
        if self.chain:
            lines.append("boot chain (seconds from the start of 'bootstrap up'):")
            lines += chain_text(self.chain)
        return "\n".join(lines)


@dataclass(frozen=True)
class NodeStatus:
    """``bootstrap status --node``: the last completed first boot as its marker records it,
    and what is pending or remembered of node updates since (``updates``)."""

    marker: str
    manifest: str
    digest: str
    time: str
    elapsed: float | None
    containers: tuple[dict[str, Any], ...]
    chain: tuple[BootStep, ...]
    updates: NodeUpdates

    def to_json(self) -> dict[str, Any]:
        return {
            "marker": self.marker,
            "manifest": self.manifest,
            "digest": self.digest,
            "time": self.time,
            "elapsed": self.elapsed,
            "containers": list(self.containers),
            "chain": [s.to_json() for s in self.chain],
            **self.updates.to_json(),
        }

    def to_text(self) -> str:
        took = f" in {self.elapsed:.1f}s" if self.elapsed is not None else ""
        lines = [f"provisioned from {self.manifest} ({self.digest[:19]}) at {self.time}{took}"]
        for c in self.containers:
            lines.append(f"  {c.get('name')}: {c.get('action')}, {c.get('active_state')}")
        if self.chain:
            lines.append("boot chain (seconds from the start of 'bootstrap up'):")
            lines += chain_text(self.chain)
        else:
            lines.append("no boot chain recorded (provisioned by an older bootstrap)")
        lines += self.updates.lines()
        return "\n".join(lines)


def node_status(settings: Settings) -> NodeStatus:
    """The last first boot of this node from ``$STATE/.provisioned``, with the node-update
    state (an interrupted transaction, remembered failures) read but not acted on. Raises
    :class:`UsageError` when the node was never provisioned or the marker is unreadable."""
    from bootstrap.deploy import api

    marker = settings.state / MARKER
    updates = api.node_updates(settings)
    try:
        doc = json.loads(marker.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        chain = tuple(BootStep.from_json(s) for s in doc.get("chain") or ())
        containers = tuple(c for c in doc.get("containers") or () if isinstance(c, dict))
        elapsed = doc.get("elapsed")
        return NodeStatus(
            marker=str(marker),
            manifest=str(doc.get("manifest", "?")),
            digest=str(doc.get("digest", "")),
            time=str(doc.get("time", "?")),
            elapsed=float(elapsed) if isinstance(elapsed, (int, float)) else None,
            containers=containers,
            chain=chain,
            updates=updates,
        )
    except FileNotFoundError as exc:
        raise UsageError(
            f"{marker}: this node has not been provisioned",
            "run 'bootstrap up MANIFEST' first (or pass --state DIR)",
        ) from exc
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise UsageError(
            f"{marker}: unreadable provisioning marker: {exc}",
            f"remove {marker} to provision again",
        ) from exc


def up(settings: Settings, manifest_path: str | Path) -> UpResult:
    """Provision this node from the manifest at ``manifest_path`` (see the module doc).

    Raises :class:`UsageError` (2) for a bad manifest or a node provisioned from another
    manifest, :class:`~bootstrap.errors.RegistryError` (3) when the network is not ready or a
    pull fails, :class:`~bootstrap.errors.IntegrityError` (4), :class:`SystemdError` (5) when a
    unit does not become active or a CRI socket does not answer, :class:`BusyError` (6)."""
    started = time.monotonic()
    manifest = load_manifest(manifest_path)
    order = plan(manifest).order
    marker = settings.state / MARKER
    log.info(
        "up: %s (%s): %d containers, order %s",
        manifest.path,
        manifest.digest[:19],
        len(order),
        " -> ".join(c.name for c in order),
    )
    _finish_node_update(settings)
    done = _already_done(marker, manifest)
    if done is not None:
        return done
    with flocked(settings.state / "locks" / "up.lock", timeout=LOCK_TIMEOUT, what="bootstrap up"):
        done = _already_done(marker, manifest)  # another run may have finished meanwhile
        if done is not None:
            return done
        return _provision(settings, manifest, order, marker, started)


def _finish_node_update(settings: Settings) -> None:
    """Commit or roll back a node update (``update --node``, ``auto-update``) a killed run
    left, before anything else: the node must run what its links say."""
    from bootstrap.deploy import api

    outcome = api.finish_node_update(settings)
    if outcome is not None:
        log.info("up: an interrupted node update was finished: %s", outcome.verdict)


def _already_done(marker: Path, manifest: NodeManifest) -> UpResult | None:
    """The "nothing to do" result when ``marker`` records this manifest; None without a
    marker; UsageError when it records another manifest."""
    try:
        doc = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{marker}: unreadable provisioning marker: {exc}",
            f"remove {marker} to provision again",
        ) from exc
    recorded = doc.get("digest") if isinstance(doc, dict) else None
    if recorded != manifest.digest:
        raise UsageError(
            f"this node was provisioned from another manifest ({doc.get('manifest')}, "
            f"{str(recorded)[:19]}), not {manifest.path} ({manifest.digest[:19]})",
            "change system containers with 'bootstrap update NAME'; to provision again, "
            f"remove {marker}",
        )
    message = (
        f"nothing to do: this node was provisioned from {manifest.path} "
        f"({manifest.digest[:19]}) at {doc.get('time', '?')}"
    )
    return UpResult(  # its text (the message) is printed once, as the result
        manifest=str(manifest.path),
        digest=manifest.digest,
        changed=False,
        message=message,
        marker=str(marker),
        order=tuple(doc.get("order", ())),
    )


def _provision(
    settings: Settings,
    manifest: NodeManifest,
    order: tuple[ContainerSpec, ...],
    marker: Path,
    started: float,
) -> UpResult:
    from bootstrap.net.readiness import wait_for_network

    wait = manifest.network
    log.info(
        "up: waiting up to %gs for the network (default route %s%s)",
        wait.timeout,
        "required" if wait.require_default_route else "not required",
        f", resolving {', '.join(wait.resolve)}" if wait.resolve else "",
    )
    chain = _Chain(started)
    since = time.monotonic()
    net = wait_for_network(
        wait.timeout, require_default_route=wait.require_default_route, resolve=wait.resolve
    )
    chain.add("network ready", since)
    settings = _apply_trust(settings, manifest)
    _write_host_config(settings, manifest, chain)
    pulled = _pull_all(settings, manifest, chain)
    deployer = _deployer(settings)
    outcomes = []
    for spec in order:
        outcome, deployment = _bring_up(deployer, spec, chain)
        outcomes.append(outcome)
        if manifest.pods is not None and spec.name == manifest.pods.cri:
            _pods_ready(deployer, manifest.pods, spec, deployment, chain)
    if manifest.auto_update_timer:
        _enable_timer(deployer)
    changed = bool(pulled) or any(o.action != "unchanged" for o in outcomes)
    elapsed = time.monotonic() - started
    doc = {
        "manifest": str(manifest.path),
        "digest": manifest.digest,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "order": [c.name for c in order],
        "containers": [o.to_json() for o in outcomes],
        "elapsed": round(elapsed, 3),
        "chain": [s.to_json() for s in chain.steps()],
    }
    make_dirs(settings.state)
    write_atomic(marker, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    message = (
        f"provisioned from {manifest.path} in {elapsed:.1f}s: "
        + ", ".join(f"{o.name} {o.action}" for o in outcomes)
        if changed
        else f"nothing to do: everything in {manifest.path} was already in place; marker written"
    )
    return UpResult(  # its text (the message) is printed once, as the result
        manifest=str(manifest.path),
        digest=manifest.digest,
        changed=changed,
        message=message,
        marker=str(marker),
        order=tuple(c.name for c in order),
        pulled=tuple(pulled),
        containers=tuple(outcomes),
        network=net.to_json(),
        elapsed=elapsed,
        chain=chain.steps(),
    )


def _apply_trust(settings: Settings, manifest: NodeManifest) -> Settings:
    """Settings for the pulls: unchanged without a ``trust:`` section; with one, its policy,
    keys and registries.d files are written first (see :mod:`bootstrap.node.trust`)."""
    if manifest.trust is None:
        return settings
    from bootstrap.node.trust import write_trust

    return write_trust(settings, manifest.trust)


def _write_host_config(settings: Settings, manifest: NodeManifest, chain: _Chain) -> None:
    """Write the registries drop-in, the credentials and the CNI config the manifest asks for
    (see :mod:`bootstrap.node.hostconf`)."""
    from bootstrap.node import hostconf

    files = hostconf.wanted_files(manifest)
    if not files:
        return
    since = time.monotonic()
    make_dirs(settings.state)
    done = list(hostconf.apply(settings.state, files))
    chain.add(
        "host config: " + ", ".join(f"{w.what} {w.action}" for w in done),
        since,
    )


# ---- pulls -------------------------------------------------------------------------------------


def _pull_all(settings: Settings, manifest: NodeManifest, chain: _Chain) -> list[str]:
    """Pull every image of the manifest that is not stored, in parallel; return the names
    pulled. All pulls are waited for; the first failure (in manifest order) is raised."""
    from bootstrap.image import api

    store = api.open_store(settings)
    store.init()
    missing: list[str] = []
    wanted = [c.image for c in manifest.containers]
    if manifest.pods is not None:
        wanted += list(manifest.pods.images)
    for name in wanted:
        if name not in missing and not api.is_stored(store, name):
            missing.append(name)
    if not missing:
        log.info("up: all %d images are stored already", len(set(wanted)))
        return []
    from bootstrap.trust.verify import Verifier

    verifier = Verifier.from_settings(settings)
    if manifest.registries.jitter:
        waited = time.monotonic()
        delay = random.uniform(0, manifest.registries.jitter)
        log.info("up: waiting %.1fs (registries.jitter) before pulling", delay)
        time.sleep(delay)
        chain.add(f"waited {delay:.1f}s (registries.jitter)", waited)
    log.info("up: pulling %s", ", ".join(missing))
    deadline = time.monotonic() + manifest.registries.timeout
    todo = list(missing)
    attempt = 0
    with _registry_env(settings, manifest.registries):
        while True:
            with ThreadPoolExecutor(max_workers=min(PULL_WORKERS, len(todo))) as pool:
                futures = [pool.submit(_pull_one, store, name, verifier, chain) for name in todo]
            failed = [(n, f.exception()) for n, f in zip(todo, futures, strict=True)]
            failed = [(n, e) for n, e in failed if e is not None]
            if not failed:
                return missing
            for _, err in failed:
                if not _worth_waiting(err):
                    raise err  # type: ignore[misc]  # not None: filtered above
            attempt += 1
            left = deadline - time.monotonic()
            delay = retry_delay(attempt)
            err = failed[0][1]
            if left <= delay:
                assert isinstance(err, BootstrapError)
                raise type(err)(
                    f"{err.message} (still failing after {manifest.registries.timeout:g}s of "
                    "retries)",
                    err.hint + "; registries.timeout in the node manifest sets how long up waits",
                ) from err
            todo = [n for n, _ in failed]
            log.info(
                "up: waiting for the registry of %s: %s; retry %d in %.0fs (giving up in %.0fs)",
                ", ".join(todo),
                err,
                attempt,
                delay,
                left,
            )
            time.sleep(delay)


RETRY_BASE = 2.0
RETRY_CAP = 30.0


def retry_delay(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): exponential from
    :data:`RETRY_BASE`, capped at :data:`RETRY_CAP`, with full jitter over its upper half so
    that nodes booted together do not hit a registry in step."""
    ceiling = min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def _worth_waiting(err: BaseException | None) -> bool:
    """A registry that cannot be reached or answers 5xx/429 may come up later; anything else
    (not found, unauthorized, a digest mismatch, a refused signature) will not."""
    from bootstrap.image import api

    return err is not None and api.is_transient(err)


def _pull_one(store: Store, name: str, verifier: Verifier, chain: _Chain) -> None:
    from bootstrap.image import api

    started = time.monotonic()
    # pulled as install would pull it (_pull_all found it missing); layers are inflated into
    # the layer cache while they download (one pass)
    result = api.obtain(store, name, policy="always", verifier=lambda: verifier).pulled
    assert result is not None  # policy "always" pulls
    chain.add(f"pulled {name} ({result.downloaded} bytes)", started)
    log.info(
        "up: pulled %s (%s): %d bytes in %.1fs, admitted by %s",
        name,
        result.digest[:19],
        result.downloaded,
        time.monotonic() - started,
        result.admitted,
    )


@contextlib.contextmanager
def _registry_env(settings: Settings, registries: Registries) -> Iterator[None]:
    """Point the registry client at the manifest's credentials file (``$REGISTRY_AUTH_FILE``)
    while pulling; its insecure registries and mirrors are in the registries.conf.d drop-in
    written before (:mod:`bootstrap.node.hostconf`). The environment is restored after."""
    env: dict[str, str] = {}
    if registries.credentials is not None:
        env["REGISTRY_AUTH_FILE"] = str(registries.credentials)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- containers --------------------------------------------------------------------------------


def _deployer(settings: Settings) -> Deployer:
    """One deployer for every container of the run: its systemd Manager (created on first use)
    is shared by the installs, state reads and starts instead of one per container."""
    from bootstrap.deploy import api

    return api.open_deployer(settings)


def _enable_timer(deployer: Deployer) -> None:
    """Enable and start ``bootstrap-auto-update.timer`` (installed by install.sh)."""
    manager = deployer.manager
    if manager.state(AUTO_UPDATE_TIMER).load_state == "not-found":
        raise SystemdError(
            f"auto_update.timer: {AUTO_UPDATE_TIMER} is not installed",
            "install bootstrap's units (install.sh copies units/ to /etc/systemd/system)",
        )
    log.info("up: enabling %s", AUTO_UPDATE_TIMER)
    manager.enable([AUTO_UPDATE_TIMER])
    manager.reload()
    manager.start(AUTO_UPDATE_TIMER, settle=0.0)


def _bring_up(
    deployer: Deployer, spec: ContainerSpec, chain: _Chain
) -> tuple[ContainerOutcome, Deployment | None]:
    """Install ``spec`` (kept when identical), start it unless active, wait until ready; each
    step ends up in ``chain``. Returns the outcome and the active deployment."""
    from bootstrap.deploy.api import Options

    since = time.monotonic()
    log.info("up: %s: installing %s", spec.name, spec.image)
    try:
        result = deployer.install(
            spec.name,
            spec.image,
            set_values=spec.values_dict,
            definition_dir=str(spec.definition) if spec.definition else None,
            start=True,
            unit_dir=None,
            options=Options(
                auto_update=spec.auto_update,
                after=spec.after,
                cri_socket=spec.ready_cri_socket or "",
                ready_timeout=spec.ready_timeout,
            ),
            # a CRI socket is asked below: a stronger proof than staying active for a while
            settle=0.0 if spec.ready_cri_socket else None,
        )
    except BootstrapError as err:
        raise err.with_context(f"containers[{spec.index}] ({spec.name})") from err
    unit = f"{spec.name}.service"
    manager = deployer.manager
    action = "installed" if result.changed else "unchanged"
    state = result.unit if result.unit is not None else manager.state(unit)
    chain.add(f"{spec.name}: {action} (checkout, unit, start): {state.active_state}", since)
    if state.active_state != "active":
        log.info("up: %s: %s is %s; starting it", spec.name, unit, state.active_state)
        started = time.monotonic()
        # a notify unit's start job ends at READY=1; a CRI socket is asked below
        ready_by_event = bool(spec.ready_cri_socket) or state.notify
        state = manager.start(unit, settle=0.0 if ready_by_event else None)
        chain.add(f"{unit} {state.active_state}", started)
        if action == "unchanged":
            action = "started"
    log.info("up: %s: %s is %s (%s)", spec.name, unit, state.active_state, action)
    cri = None
    if spec.ready_cri_socket:
        from bootstrap.cri.client import wait_for_cri

        log.info("up: %s: waiting for CRI Version on %s", spec.name, spec.ready_cri_socket)
        asked = time.monotonic()
        answer = wait_for_cri(
            spec.ready_cri_socket,
            timeout=spec.ready_timeout,
            network=False,
            what=f"{spec.name} ({unit})",
        )
        chain.add(f"{spec.name}: CRI answering on {spec.ready_cri_socket}", asked)
        cri = str(answer)
        log.info("up: %s: CRI %s answers on %s", spec.name, cri, spec.ready_cri_socket)
    digest = result.deployment.digest if result.deployment is not None else ""
    outcome = ContainerOutcome(spec.name, spec.image, digest, action, state.active_state, cri)
    return outcome, result.deployment


def _pods_ready(
    deployer: Deployer,
    pods: Pods,
    spec: ContainerSpec,
    deployment: Deployment | None,
    chain: _Chain,
) -> None:
    """Hand the CRI daemon ``spec`` the pod images it lacks, then wait until CRI ``Status``
    says RuntimeReady (and NetworkReady when ``pods.network_ready``); see
    :mod:`bootstrap.node.pods`."""
    from bootstrap.cri.client import CriClient, wait_for_cri
    from bootstrap.node.pods import preload

    if deployment is None:
        raise SystemdError(
            f"pods.cri: {spec.name} has no active deployment", f"bootstrap status {spec.name}"
        )
    if pods.images:
        with CriClient(pods.socket) as client:
            preload(deployer.store, deployment, pods.images, client, on_step=chain.add)
    asked = time.monotonic()
    what = "RuntimeReady and NetworkReady" if pods.network_ready else "RuntimeReady"
    log.info("up: %s: waiting for CRI Status %s on %s", spec.name, what, pods.socket)
    ready = wait_for_cri(
        pods.socket,
        timeout=spec.ready_timeout,
        what=f"{spec.name} ({spec.name}.service)",
        network=pods.network_ready,
    )
    chain.add(f"{spec.name}: CRI {what}", asked)
    if not ready.status.network_ready:
        log.warning(
            "up: %s: %s: pods with their own network cannot start until a CNI config is in "
            "/etc/cni/net.d (pods.network in the node manifest)",
            spec.name,
            ready.status.not_ready(network=True),
        )
