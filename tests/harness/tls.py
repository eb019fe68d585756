"""TLS for the harness's little HTTP servers (token server, fault proxy, test servers): one
place that wraps a listening socket, optionally requiring client certificates."""

from __future__ import annotations

import ssl
from http.server import HTTPServer
from pathlib import Path


def serve_tls(
    httpd: HTTPServer, cert: tuple[str | Path, str | Path], client_ca: str | Path | None = None
) -> None:
    """Make ``httpd`` speak HTTPS with ``cert`` (certificate file, key file). ``client_ca``:
    require a client certificate signed by that CA (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(str(client_ca))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
