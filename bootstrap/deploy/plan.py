"""A deployment planned before anything is written: a definition, an image and values rendered
into the unit, the runtime config, the tmpfiles lines and the deployment's record, and how long
the unit's jobs may take.

:func:`plan` resolves the variables (the definition's defaults, then the built-ins, then
``--set``) and renders every file; nothing is written and nothing is asked of systemd or runc
(the runtime's path and the init come from the host's files). Bad input is a
:class:`~bootstrap.errors.UsageError` (exit 2) naming the file and line or the ``--set`` name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootstrap.deploy import definition as defn
from bootstrap.deploy.definition import Definition, TemplateFile
from bootstrap.deploy.records import Deployment, Options, Paths
from bootstrap.errors import UsageError
from bootstrap.image.api import Image
from bootstrap.runtime import config as rtconfig
from bootstrap.runtime import init as rtinit
from bootstrap.runtime import runc
from bootstrap.systemd import units

log = logging.getLogger(__name__)

#: The shortest wait for a start/restart job (see :func:`start_job_timeout`).
DEFAULT_JOB_TIMEOUT = 120.0
#: Built-in variables that hold unit syntax already (quoted by bootstrap).
EXEC_VARIABLES = frozenset({"EXEC_START", "EXEC_STOP", "EXEC_START_PRE", "EXEC_STOP_POST"})
#: Built-ins that ``--set`` may not override: they tie the unit to this deployment.
FORCED_VARIABLES = frozenset({"NAME", "DESTDIR"})


@dataclass(frozen=True)
class Plan:
    """Everything about a deployment computed before touching disk."""

    name: str
    image: Image
    definition: Definition
    values: Mapping[str, str]
    set_values: Mapping[str, str]
    service: str
    tmpfiles: str | None
    config: rtconfig.PreparedConfig
    unit_dir: Path
    #: The definition's ``imageImport`` argv rendered with ``values`` (empty: none).
    image_import: tuple[str, ...] = ()

    def record(
        self,
        path: Path,
        *,
        installed: str,
        source_digest: str,
        options: Options,
        admitted: str,
    ) -> Deployment:
        """The record of this plan deployed in ``path`` (its info.json is
        :meth:`~bootstrap.deploy.records.Deployment.info`): installed at ``installed``, from
        an image the registry served as ``source_digest`` and the signature policy admitted by
        ``admitted``, with ``options`` (the auto-update policy resolved against the
        definition's default)."""
        d = self.definition
        policy, origin = options.policy(d.auto_update)
        return Deployment(
            name=self.name,
            path=path,
            image=self.image.name,
            digest=self.image.manifest.digest,
            image_id=self.image.config.digest,
            values=dict(self.values),
            set_values=dict(self.set_values),
            definition_source=d.source,
            definition_origin=d.origin,
            definition_digest=d.digest,
            installed=installed,
            unit_dir=str(self.unit_dir),
            source_digest=source_digest,
            auto_update=policy,
            auto_update_from=origin,
            after=tuple(options.after),
            cri_socket=options.cri_socket,
            ready_timeout=options.ready_timeout,
            admitted=admitted,
            image_import=self.image_import,
            image_import_timeout=(
                d.image_import.timeout if self.image_import and d.image_import is not None else 0.0
            ),
            health=d.health,
        )


def plan(
    paths: Paths,
    image: Image,
    definition: Definition,
    set_values: Mapping[str, str],
    unit_dir: Path,
    *,
    uuid_value: str | None = None,
    check_only: bool = False,
) -> Plan:
    """Resolve variables and render every file of the deployment (nothing is written).
    ``check_only``: a validation before the deployment is staged (which plans again): the
    ``--set`` names the definition does not use are said by that later plan only, once.

    Raises :class:`UsageError` (exit 2) for bad ``--set`` names or values, unknown variables
    (naming file and line), bad JSON in the rendered config template, a config without a
    command."""
    for key in set_values:
        defn.check_variable_name(key, "--set")
        if key in FORCED_VARIABLES:
            raise UsageError(
                f"--set {key}: ${key} is set by bootstrap and cannot be overridden",
                "choose another variable name",
            )
    runtime = runc.runtime_path()
    name = paths.name
    bundle = str(paths.link)
    stop_timeout = definition.stop_timeout
    builtins = {
        "INIT": definition.init,
        "NAME": name,
        "DESTDIR": bundle,
        "IMAGE_NAME": image.name,
        "IMAGE_ID": image.config.digest,
        "RUN_DIRECTORY": "/run",
        "STATE_DIRECTORY": "/var/lib",
        "CONF_DIRECTORY": "/etc",
        "HOST_UID": str(os.getuid()),
        "HOST_GID": str(os.getgid()),
        "RUNTIME": runtime,
        "EXEC_START_PRE": units.exec_command(units.start_pre_script(runtime, name, bundle)),
        "EXEC_START": units.exec_command([runtime, "run", "--bundle", bundle, name]),
        "EXEC_STOP": units.exec_command(units.stop_script(runtime, name, stop_timeout)),
        "EXEC_STOP_POST": units.exec_command(units.stop_post_script(runtime, name, bundle)),
        "PIDFILE": f"/run/container-{name}.pid",
        "UUID": uuid_value or str(uuid.uuid4()),
        "TIMEOUT_STOP_SEC": str(stop_timeout + 30),
        "TIMEOUT_START_SEC": str(definition.start_timeout),
    }
    values = {**definition.default_values, **builtins, **set_values}

    template_doc: dict[str, Any] | None = None
    where_cfg = "config.json.template"
    if definition.config_template is not None:
        where_cfg = definition.config_template.where
        text = definition.config_template.render(values, defn.escape_json)
        doc = defn.parse_json(text, where_cfg)
        if not isinstance(doc, dict):
            raise UsageError(f"{where_cfg}: must be a JSON object", "an OCI runtime config")
        template_doc = doc
    prepared = rtconfig.prepare(image.config, hostname=name, template=template_doc, where=where_cfg)
    init_mode = defn.check_init_mode(
        values["INIT"],
        "--set INIT" if "INIT" in set_values else f"{definition.origin}/manifest.json",
    )
    if rtinit.wanted(
        init_mode,
        prepared.document["process"]["args"],
        host_pid=prepared.host_pid,
        extra=definition.init_names,
    ):
        doc_init = rtinit.apply(prepared.document, rtinit.find_init())
        prepared = dataclasses.replace(prepared, document=doc_init)

    service_t = definition.service_template or TemplateFile(
        "builtin:service.template",
        units.default_service_template(
            host_network=prepared.host_network,
            notify=definition.readiness == "notify",
            oneshot=definition.unit_type == "oneshot",
        ),
    )
    raw = frozenset(EXEC_VARIABLES - set(set_values))
    service = service_t.render(values, defn.unit_escaper(service_t.where, raw, commands=True))
    tmpfiles: str | None = None
    if definition.tmpfiles_template is not None:
        t = definition.tmpfiles_template
        tmpfiles = t.render(values, defn.unit_escaper(t.where))
    image_import: tuple[str, ...] = ()
    if definition.image_import is not None:
        image_import = definition.image_import.render(values)
    used = definition.variables() | {n for n, _ in service_t.placeholders()} | {"INIT"}
    unused = sorted(set(set_values) - used)
    if unused and not check_only:
        log.warning("--set %s: not used by the definition", ", ".join(unused))
    return Plan(
        name=name,
        image=image,
        definition=definition,
        values=values,
        set_values=dict(set_values),
        service=service,
        tmpfiles=tmpfiles,
        config=prepared,
        unit_dir=unit_dir,
        image_import=image_import,
    )


# ---- how long its unit's jobs may take ---------------------------------------------------------


def install_settle(the_plan: Plan, settle: float | None) -> float | None:
    """The settle of an install's first start: ``settle`` when given; else 0 for a
    ``readiness: "notify"`` definition (its start job ends only once the container sent
    READY=1, a stronger proof than staying active a while) and None (the manager's default) for
    others; 0 for a ``oneshot`` too (its start job ends when its command exited, with success
    only if it exited 0: the unit is then active (exited)). Updates and rollbacks keep the
    settle (:func:`restart_settle`): a new version must also prove it stays up."""
    if settle is not None:
        return settle
    return 0.0 if the_plan.definition.readiness == "notify" or _oneshot(the_plan) else None


def restart_settle(the_plan: Plan) -> float | None:
    """The settle of an update's restart: None (the manager's default) but 0 for a
    ``oneshot``, which stays nothing but active (exited) after its command succeeded."""
    return 0.0 if _oneshot(the_plan) else None


def _oneshot(the_plan: Plan) -> bool:
    return the_plan.definition.unit_type == "oneshot"


def start_job_timeout(the_plan: Plan) -> float:
    """How long bootstrap waits for a start or restart job of ``the_plan``'s unit: longer than
    systemd's own stop and start timeouts, so systemd's verdict (and message) comes first."""
    d = the_plan.definition
    return float(max(DEFAULT_JOB_TIMEOUT, d.start_timeout + d.stop_timeout + 60))


def health_job_timeout(the_plan: Plan) -> float:
    """How long bootstrap waits for a start or restart job of ``the_plan``'s unit when its
    health is judged next: :func:`start_job_timeout`, but a ``notify`` unit whose health check
    has a start period must send READY=1 within that period."""
    health = the_plan.definition.health
    if health and health.start_period > 0 and the_plan.definition.readiness == "notify":
        return health.start_period
    return start_job_timeout(the_plan)
