"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on a free
127.0.0.1 port, its YAML config and storage in a private directory, run as a subprocess.

Modes:

- ``"plain"``: HTTP, no auth.
- ``"tls"``: HTTPS with a server certificate (subjectAltName IP:127.0.0.1, DNS:localhost)
  signed by a fresh test CA (``ca_cert``; also ``certs_d/127.0.0.1:PORT/ca.crt``).
- ``"basic"``: ``"tls"`` + htpasswd (bcrypt) basic auth; ``username``/``password``/``auth_file``.
- ``"token"``: ``"tls"`` + bearer-token auth against a :class:`TokenServer` (HTTPS, same CA;
  ``certs_d`` also holds ``127.0.0.1:TOKENPORT/ca.crt``) started alongside, which knows the
  same user and password.

Registry quirks worth knowing (distribution 2.8): a manifest GET whose ``Accept`` lists no OCI
type answers 404 for OCI manifests, and converts Docker v2s2 manifests to signed schema 1;
blob GETs honour ``Range`` (206).

``Registry.start()`` waits until ``/v2/`` answers (200 or 401) and raises ``RuntimeError``
with the registry's log otherwise; ``stop()`` terminates it (SIGTERM, then SIGKILL) and leaves
storage in place, so ``start()`` again brings back the same content on the same port.  The
child gets ``PR_SET_PDEATHSIG`` (when started from the main thread) so it dies with the test
process even when teardown never runs; :func:`stop_all` (registered with ``atexit``) stops
whatever is still running.

Besides skopeo-based ``push``/``inspect``, ``Registry.request``/``upload_blob``/``put_manifest``/
``push_layout`` speak the registry API directly (any media type, bytes verbatim). For faults
(statuses, resets, truncated or corrupted bodies) put ``tests.harness.faultproxy.FaultProxy
.for_registry(reg)`` in front of a registry (it relies on ``host``, ``ca_cert``,
``server_cert``).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import datetime as dt
import hashlib
import ipaddress
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bootstrap.image.model import REF_NAME_ANNOTATION
from tests.harness.tokenserver import TokenServer

REGISTRY_BIN = "/usr/bin/docker-registry"
MODES = ("plain", "tls", "basic", "token")
SERVICE = "bootstrap-test-registry"
ISSUER = "bootstrap-test-issuer"
DEFAULT_USER = "tester"
DEFAULT_PASSWORD = "s3cret-pass"
_RUNNING: set[Registry] = set()
_MAIN = threading.main_thread()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bind 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# certificates


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_ca(directory: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA (EC P-256) written as ``DIR/NAME.crt`` and ``DIR/NAME.key``."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bootstrap test CA {name}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    crt, keyfile = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(keyfile, key)
    return crt, keyfile


def make_server_cert(
    directory: Path,
    ca: tuple[Path, Path],
    name: str = "server",
    ips: tuple[str, ...] = ("127.0.0.1",),
    dns: tuple[str, ...] = ("localhost",),
) -> tuple[Path, Path]:
    """A server certificate for ``ips``/``dns`` signed by ``ca`` (cert, key paths); written as
    ``DIR/NAME.crt`` (leaf only) and ``DIR/NAME.key``."""
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ips[0] if ips else name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    crt, keyfile = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(keyfile, key)
    return crt, keyfile


def _pdeathsig() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(eq=False)
class Registry:
    """A docker-registry process and everything a client needs to reach it. See the module
    docstring for the modes. ``root`` holds config.yml, registry.log, certs and ``storage``."""

    mode: str
    root: Path
    port: int = 0
    host: str = ""
    url: str = ""
    ca_cert: Path | None = None
    certs_d: Path | None = None
    username: str | None = None
    password: str | None = None
    auth_file: Path | None = None
    token_server: TokenServer | None = None
    storage: Path = field(default_factory=Path)
    config_path: Path = field(default_factory=Path)
    log_path: Path = field(default_factory=Path)
    server_cert: tuple[Path, Path] | None = None
    public: tuple[str, ...] = ()  # token mode: repositories anonymous users may pull
    proc: subprocess.Popen[bytes] | None = None

    # ---- setup
    @classmethod
    def create(
        cls,
        mode: str,
        root: Path,
        *,
        username: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        public: tuple[str, ...] = (),
        start: bool = True,
    ) -> Registry:
        """Prepare a registry of ``mode`` under ``root`` (config, certs, htpasswd, token server)
        and start it unless ``start`` is false."""
        if mode not in MODES:
            raise ValueError(f"registry mode {mode!r}: expected one of {MODES}")
        root.mkdir(parents=True, exist_ok=True)
        reg = cls(mode=mode, root=root, public=public)
        reg.storage = root / "storage"
        reg.storage.mkdir(exist_ok=True)
        reg.config_path = root / "config.yml"
        reg.log_path = root / "registry.log"
        reg._set_port(free_port())
        if mode != "plain":
            ca = make_ca(root / "pki")
            reg.ca_cert = ca[0]
            reg.server_cert = make_server_cert(root / "pki", ca)
        if mode in ("basic", "token"):
            reg.username, reg.password = username, password
        if mode == "token":
            assert reg.server_cert is not None
            reg.token_server = TokenServer(
                root / "token",
                service=SERVICE,
                issuer=ISSUER,
                users={username: password},
                public=public,
                tls=reg.server_cert,
            )
        reg._write_client_files()
        if start:
            reg.start()
        return reg

    def _set_port(self, port: int) -> None:
        if self.certs_d is not None and self.host:  # forget the old host's entry
            old = self.certs_d / self.host
            (old / "ca.crt").unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                old.rmdir()
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = ("http" if self.mode == "plain" else "https") + f"://{self.host}"
        self._write_client_files()

    def _write_client_files(self) -> None:
        if self.ca_cert is not None:
            self.certs_d = self.root / "certs.d"
            d = self.certs_d / self.host
            d.mkdir(parents=True, exist_ok=True)
            (d / "ca.crt").write_bytes(self.ca_cert.read_bytes())
        if self.username is not None:
            self.auth_file = self.root / "auth.json"
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            self.auth_file.write_text(json.dumps({"auths": {self.host: {"auth": token}}}))

    def _config(self) -> dict[str, object]:
        http: dict[str, object] = {
            "addr": self.host,
            "secret": "bootstrap-test-secret",
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        }
        if self.server_cert is not None:
            http["tls"] = {
                "certificate": str(self.server_cert[0]),
                "key": str(self.server_cert[1]),
            }
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": http,
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.mode == "basic":
            htpasswd = self.root / "htpasswd"
            out = subprocess.run(
                ["htpasswd", "-Bbn", str(self.username), str(self.password)],
                capture_output=True,
                text=True,
                check=True,
            )
            htpasswd.write_text(out.stdout.strip() + "\n")
            config["auth"] = {"htpasswd": {"realm": "bootstrap-test", "path": str(htpasswd)}}
        elif self.mode == "token":
            assert self.token_server is not None
            config["auth"] = {
                "token": {
                    "realm": self.token_server.url,
                    "service": SERVICE,
                    "issuer": ISSUER,
                    "rootcertbundle": str(self.token_server.cert_path),
                }
            }
        return config

    # ---- lifecycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        """Start the registry (and token server) and wait until ``/v2/`` answers; raises
        ``RuntimeError`` with the log's tail otherwise. If someone else took the port in the
        meantime, another free one is used (``port``/``host``/``url``/``certs_d``/``auth_file``
        follow)."""
        if self.running:
            return
        if self.token_server is not None:
            self.token_server.start()
            if self.certs_d is not None and self.ca_cert is not None:
                # the realm is another host:port: trust the CA there too, for clients that
                # look certs.d up by the realm's host rather than the registry's
                d = self.certs_d / f"127.0.0.1:{self.token_server.port}"
                d.mkdir(parents=True, exist_ok=True)
                (d / "ca.crt").write_bytes(self.ca_cert.read_bytes())
        for attempt in range(3):
            self.config_path.write_text(yaml.safe_dump(self._config(), sort_keys=False))
            log = self.log_path.open("ab")
            try:
                self.proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env={"PATH": "/usr/bin:/bin", "HOME": str(self.root)},
                    # the death signal follows the forking *thread*: main thread only
                    preexec_fn=_pdeathsig if threading.current_thread() is _MAIN else None,
                    start_new_session=True,
                )
            finally:
                log.close()
            _RUNNING.add(self)
            if self._wait_ready(timeout):
                return
            self.stop()
            text = self.log_path.read_text(errors="replace")
            if "address already in use" in text[-2000:] and attempt < 2:
                self._set_port(free_port())
                continue
            raise RuntimeError(
                f"docker-registry ({self.mode}) did not answer on {self.url}/v2/ within "
                f"{timeout}s; log {self.log_path}:\n{text[-3000:]}"
            )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_cert is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        ctx = self._ssl_context()
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=ctx) as r:
                    if r.status == 200:
                        return True
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return True
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        """Stop the registry process (the token server keeps running; see :meth:`close`)."""
        proc, self.proc = self.proc, None
        _RUNNING.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)

    def close(self) -> None:
        """Stop the registry and its token server."""
        self.stop()
        if self.token_server is not None:
            self.token_server.stop()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- client helpers
    @property
    def creds(self) -> str | None:
        """``user:password`` or None."""
        return f"{self.username}:{self.password}" if self.username is not None else None

    @property
    def cert_dir(self) -> Path | None:
        """The per-host directory holding ``ca.crt`` (skopeo's ``--cert-dir``)."""
        return self.certs_d / self.host if self.certs_d is not None else None

    def ref(self, name: str, tag: str = "latest") -> str:
        """``127.0.0.1:PORT/NAME:TAG`` (or ``@DIGEST`` when ``tag`` starts with sha256:)."""
        sep = "@" if tag.startswith("sha256:") else ":"
        return f"{self.host}/{name}{sep}{tag}"

    def _skopeo_args(self, prefix: str) -> list[str]:
        args: list[str] = []
        if self.mode == "plain":
            args.append(f"--{prefix}tls-verify=false")
        else:
            args += [f"--{prefix}cert-dir", str(self.cert_dir)]
        if self.creds is not None:
            args += [f"--{prefix}creds", self.creds]
        return args

    def skopeo_src_args(self) -> list[str]:
        """Flags for ``skopeo copy`` reading from this registry (``--src-...``)."""
        return self._skopeo_args("src-")

    def skopeo_dest_args(self) -> list[str]:
        """Flags for ``skopeo copy`` writing to this registry (``--dest-...``)."""
        return self._skopeo_args("dest-")

    def skopeo_args(self) -> list[str]:
        """Flags for ``skopeo inspect``/``delete``/``list-tags`` against this registry."""
        return self._skopeo_args("")

    def push(self, layout: Path, tag: str, dest: str, *, all: bool = False) -> None:
        """``skopeo copy oci:LAYOUT:TAG docker://HOST/DEST`` (``DEST`` is ``name:tag``; with
        ``all``, an index and every manifest in it). Digests are preserved (no recompression,
        and ``--preserve-digests``: skopeo's blob-info cache, shared by every test of the
        machine, must not swap a layer for another compression of it that this registry holds
        from an earlier test). Raises ``RuntimeError`` with skopeo's stderr on failure."""
        argv = ["skopeo", "copy", "--quiet", "--preserve-digests", *self.skopeo_dest_args()]
        if all:
            argv.append("--all")
        argv += [f"oci:{layout}:{tag}", f"docker://{self.host}/{dest}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"push to {self.host}/{dest} failed: {out.stderr.strip()}")

    def inspect(self, name_tag: str, *, raw: bool = False) -> dict[str, object]:
        """``skopeo inspect [--raw] docker://HOST/NAME:TAG`` with the right flags, as JSON."""
        argv = ["skopeo", "inspect", *self.skopeo_args()]
        if raw:
            argv.append("--raw")
        argv.append(f"docker://{self.host}/{name_tag}")
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"inspect {self.host}/{name_tag} failed: {out.stderr.strip()}")
        doc: dict[str, object] = json.loads(out.stdout)
        return doc

    def log(self) -> str:
        """The registry's log so far (access log included)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- direct HTTP (no skopeo): any media type, verbatim bytes
    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
        scope: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to the registry (``path`` absolute, e.g. ``/v2/``, or a full URL),
        authenticated as the fixture's user: basic credentials, or a bearer token for ``scope``
        fetched from the token server. Returns (status, headers, body); never raises on HTTP
        status."""
        url = path if "://" in path else self.url + path
        hdrs = dict(headers or {})
        if self.mode == "basic":
            hdrs["Authorization"] = "Basic " + base64.b64encode(str(self.creds).encode()).decode()
        elif self.mode == "token" and scope is not None:
            hdrs["Authorization"] = "Bearer " + self.token(scope)
        req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120, context=self._ssl_context()) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def token(self, scope: str) -> str:
        """A bearer token for ``scope`` from this registry's token server (token mode)."""
        assert self.token_server is not None, "token() needs a token-mode registry"
        query = urllib.parse.urlencode({"service": SERVICE, "scope": scope})
        auth = base64.b64encode(str(self.creds).encode()).decode()
        req = urllib.request.Request(
            f"{self.token_server.url}?{query}", headers={"Authorization": "Basic " + auth}
        )
        with urllib.request.urlopen(req, timeout=30, context=self._ssl_context()) as r:
            token: str = json.loads(r.read())["token"]
        return token

    def upload_blob(self, repo: str, source: bytes | Path, digest: str | None = None) -> str:
        """Upload a blob (bytes, or a file streamed from disk) with a monolithic
        POST + PUT; ``digest`` defaults to the sha256 of the content. Returns the digest."""
        scope = f"repository:{repo}:pull,push"
        if digest is None:
            h = hashlib.sha256()
            if isinstance(source, Path):
                with source.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(source)
            digest = "sha256:" + h.hexdigest()
        status, _, _ = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope)
        if status == 200:
            return digest
        status, headers, body = self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", body=b"", scope=scope
        )
        if status != 202:
            raise RuntimeError(f"blob upload to {repo}: POST answered {status}: {body[:300]!r}")
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}digest={urllib.parse.quote(digest)}"
        if not url.startswith("http"):
            url = self.url + url
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        put_headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(source, Path):
            with source.open("rb") as f:
                status, _, body = self.request("PUT", url, body=f, headers=put_headers, scope=scope)
        else:
            status, _, body = self.request(
                "PUT", url, body=source, headers=put_headers, scope=scope
            )
        if status != 201:
            raise RuntimeError(f"blob upload to {repo}: PUT answered {status}: {body[:300]!r}")
        return digest

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT ``body`` verbatim as manifest ``repo:reference`` with Content-Type
        ``media_type``; returns the digest the registry reports."""
        status, headers, answer = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            body=body,
            headers={"Content-Type": media_type},
            scope=f"repository:{repo}:pull,push",
        )
        if status != 201:
            raise RuntimeError(f"manifest PUT {repo}:{reference}: {status}: {answer[:300]!r}")
        return headers.get("Docker-Content-Digest", "")

    def push_layout(self, layout: Path, tag: str, dest: str) -> str:
        """Push ``layout``'s image tagged ``tag`` to ``dest`` (``repo:tag``) without skopeo,
        bytes unchanged, whatever the media types (OCI or Docker v2s2 manifests, OCI indexes,
        Docker manifest lists: children are pushed by digest first). Use it for layouts
        :func:`~tests.harness.imagebuilder.build_image` wrote with ``docker=True``, which skopeo
        cannot read. Returns the manifest digest."""
        repo, _, ref = dest.rpartition(":")
        if not repo or "/" in ref:
            repo, ref = dest, "latest"
        index = json.loads((layout / "index.json").read_bytes())
        for desc in index.get("manifests", []):
            if (desc.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag:
                break
        else:
            raise RuntimeError(f"{layout}: no image tagged {tag!r}")
        return self._push_manifest(layout, repo, ref, desc)

    def _push_manifest(self, layout: Path, repo: str, ref: str, desc: dict[str, Any]) -> str:
        blob = layout / "blobs" / desc["digest"].replace(":", "/")
        doc = json.loads(blob.read_bytes())
        media_type = desc.get("mediaType") or doc.get("mediaType", "")
        if "manifests" in doc:
            for child in doc["manifests"]:
                self._push_manifest(layout, repo, child["digest"], child)
        else:
            for item in [doc["config"], *doc.get("layers", [])]:
                path = layout / "blobs" / item["digest"].replace(":", "/")
                self.upload_blob(repo, path, item["digest"])
        return self.put_manifest(repo, ref, blob.read_bytes(), media_type)


def client_env(reg: Registry, tmp: Path) -> dict[str, str]:
    """Environment for ``bootstrap`` to reach ``reg``: plain HTTP marked insecure in a private
    registries.conf, its CA through certs.d, its credentials through an auth file."""
    conf = tmp / f"registries-{reg.port}.conf"
    if reg.mode == "plain":
        conf.write_text(f'[[registry]]\nlocation = "{reg.host}"\ninsecure = true\n')
    else:
        conf.write_text("")
    env = {"REGISTRIES_CONFIG_PATH": str(conf)}
    if reg.certs_d is not None:
        env["BOOTSTRAP_CERTS_D"] = str(reg.certs_d)
    env["REGISTRY_AUTH_FILE"] = str(reg.auth_file or tmp / "no-auth.json")
    return env


@atexit.register
def stop_all() -> None:
    """Stop every registry this process started and did not stop yet."""
    for reg in list(_RUNNING):
        with contextlib.suppress(Exception):
            reg.close()
