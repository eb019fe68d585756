"""A small Docker registry token server (the "realm" of ``WWW-Authenticate: Bearer``), for tests.

It answers ``GET /token?service=S&scope=repository:NAME:pull,push`` (several ``scope``
parameters allowed) and the OAuth2 form ``POST /token`` (``grant_type=password`` with
``username``/``password``, or ``grant_type=refresh_token``) with::

    {"token": JWT, "access_token": JWT, "expires_in": N, "issued_at": "..."}

The JWT is RS256-signed with the server's own key; its header carries ``x5c`` (the signing
certificate, which the registry trusts through ``auth.token.rootcertbundle``).  Its ``access``
claim grants exactly the requested scopes to a user whose basic credentials match; anonymous
requests get ``pull`` on repositories listed in ``public`` and nothing else; wrong credentials
answer 401.

Everything a test may want to assert on is recorded: ``requests`` is a list of
:class:`TokenRequest` (method, scopes, user, status, ...).  Fault injection:
``fail_next(n, status)`` makes the next ``n`` requests answer ``status``;
``delay`` (seconds) slows every answer; ``expires_in`` sets the token lifetime;
``fields`` chooses which of ``token``/``access_token`` appear in answers.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.harness.tls import serve_tls


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_signing_key(directory: Path, name: str = "token") -> tuple[rsa.RSAPrivateKey, Path]:
    """An RSA key and a self-signed certificate for it (no EKU, so any use verifies), written as
    ``DIR/NAME.key`` and ``DIR/NAME.crt``; returns the key and the certificate path."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bootstrap test token signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    crt = directory / f"{name}.crt"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, crt


@dataclass(frozen=True)
class Access:
    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, scope: str) -> list[Access]:
        """``repository:a/b:pull,push`` -> [Access("repository", "a/b", ("pull", "push"))].
        Names may contain ':' (a port), so the type is the first field and the actions the
        last. Space-separated scopes in one string are all parsed."""
        out: list[Access] = []
        for item in scope.split():
            typ, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            if typ and name:
                out.append(cls(typ, name, tuple(a for a in actions.split(",") if a)))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "name": self.name, "actions": list(self.actions)}


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str
    path: str
    service: str
    scopes: tuple[str, ...]
    user: str | None  # None: anonymous
    status: int
    granted: tuple[Access, ...]
    grant_type: str = ""  # POST only
    time: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class TokenServer:
    """A threaded HTTP(S) token server on 127.0.0.1 (a free port). ``start()``/``stop()``;
    ``url`` is the realm to put into the registry's ``auth.token.realm``."""

    def __init__(
        self,
        workdir: Path,
        *,
        service: str,
        issuer: str,
        users: dict[str, str],
        public: Iterable[str] = (),
        tls: tuple[Path, Path] | None = None,
        expires_in: int = 300,
    ) -> None:
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.users = dict(users)
        self.public = set(public)
        self.tls = tls  # (cert, key) PEM paths for HTTPS, or None for plain HTTP
        self.expires_in = expires_in
        self.delay = 0.0
        self.fields: Sequence[str] = ("token", "access_token")
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._fail: list[int] = []
        self._refresh: dict[str, str] = {}  # refresh token -> user
        self.key, self.cert_path = make_signing_key(workdir, "token-signer")
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # ---- control
    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/token"

    def start(self) -> None:
        if self._httpd is not None:
            return
        handler = type("Handler", (_Handler,), {"server_obj": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        httpd.daemon_threads = True
        if self.tls:
            serve_tls(httpd, self.tls)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._httpd = None
        self._thread = None

    def fail_next(self, n: int = 1, status: int = 500) -> None:
        """Answer the next ``n`` requests with ``status`` (and no token)."""
        with self._lock:
            self._fail.extend([status] * n)

    def reset(self) -> None:
        """Forget recorded requests and pending faults."""
        with self._lock:
            self.requests.clear()
            self._fail.clear()

    def count(self, scope: str | None = None) -> int:
        """Number of successful token requests (for ``scope`` only, if given)."""
        with self._lock:
            return sum(
                1 for r in self.requests if r.status == 200 and (scope is None or scope in r.scopes)
            )

    # ---- tokens
    def grant(self, user: str | None, scopes: Sequence[str]) -> list[Access]:
        """What ``user`` (None: anonymous) gets for ``scopes``: all of it when authenticated,
        ``pull`` on public repositories when anonymous."""
        out: list[Access] = []
        for scope in scopes:
            for acc in Access.parse(scope):
                if user is not None:
                    out.append(acc)
                elif acc.type == "repository" and acc.name in self.public:
                    actions = tuple(a for a in acc.actions if a == "pull")
                    if actions:
                        out.append(Access(acc.type, acc.name, actions))
        return out

    def make_token(self, user: str | None, access: Sequence[Access], service: str) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": [a.to_json() for a in access],
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)

    def _next_fault(self) -> int | None:
        with self._lock:
            return self._fail.pop(0) if self._fail else None

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)


class _Handler(BaseHTTPRequestHandler):
    server_obj: TokenServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="token"')
        self.end_headers()
        self.wfile.write(body)

    def _basic_user(self) -> tuple[str | None, bool]:
        """(user, ok): (None, True) when anonymous, (user, False) on bad credentials."""
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("basic "):
            return None, True
        try:
            user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
        except Exception:
            return "?", False
        return user, self.server_obj.users.get(user) == password

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        user, ok = self._basic_user()
        self._answer(
            "GET", url.path, q.get("service", [""])[0], q.get("scope", []), user, ok, "", None
        )

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode())
        grant_type = form.get("grant_type", [""])[0]
        scopes = form.get("scope", [])
        service = form.get("service", [""])[0]
        srv = self.server_obj
        user: str | None
        refresh: str | None = None
        if grant_type == "password":
            user = form.get("username", [""])[0]
            ok = srv.users.get(user) == form.get("password", [""])[0]
            refresh = uuid.uuid4().hex if ok else None
        elif grant_type == "refresh_token":
            token = form.get("refresh_token", [""])[0]
            user = srv._refresh.get(token)
            ok = user is not None
            refresh = token if ok else None
        else:
            user, ok = None, False
        self._answer("POST", url.path, service, scopes, user, ok, grant_type, refresh)

    def _answer(
        self,
        method: str,
        path: str,
        service: str,
        scopes: list[str],
        user: str | None,
        ok: bool,
        grant_type: str,
        refresh: str | None,
    ) -> None:
        srv = self.server_obj
        if srv.delay:
            time.sleep(srv.delay)
        headers = {k: v for k, v in self.headers.items()}
        fault = srv._next_fault()
        granted: list[Access] = []
        doc: dict[str, Any]
        if fault is not None:
            status, doc = fault, {"errors": [{"code": "INJECTED", "message": "injected fault"}]}
        elif path.rstrip("/") != "/token":
            status, doc = 404, {"errors": [{"code": "NOT_FOUND", "message": path}]}
        elif not ok:
            status, doc = 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        else:
            granted = srv.grant(user, scopes)
            token = srv.make_token(user, granted, service or srv.service)
            status = 200
            doc = {f: token for f in srv.fields}
            doc["expires_in"] = srv.expires_in
            doc["issued_at"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if refresh is not None:
                srv._refresh[refresh] = user or ""
                doc["refresh_token"] = refresh
        srv._record(
            TokenRequest(
                method=method,
                path=path,
                service=service,
                scopes=tuple(scopes),
                user=user,
                status=status,
                granted=tuple(granted),
                grant_type=grant_type,
                time=time.time(),
                headers=headers,
            )
        )
        self._reply(status, doc)
