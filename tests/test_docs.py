"""The documentation's commands, run as written: each page's ```sh blocks are executed unchanged
in a sandbox (tests/harness/docrun.py: overlays over /etc, /root, /srv, /var/lib and /tmp, a
loopback network of its own where the page's host names resolve), with only what the page
says the reader already has provided by the test (an image archive, a registry to copy
from). A page whose commands stop working fails here."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.harness.cli import REPO
from tests.harness.docrun import run_sandboxed, sh_blocks
from tests.harness.imagebuilder import busybox_spec, save_docker_archive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root (namespaces, mounts)"),
]

DOCS = REPO / "docs"


def test_registries_md_seeding_a_site_registry(tmp_path: Path) -> None:
    blocks = sh_blocks(DOCS / "registries.md", "Seeding a site registry: `bootstrap push`")
    assert len(blocks) == 2, blocks
    save_docker_archive(busybox_spec(), tmp_path / "ocid.tar", None)
    ran = run_sandboxed(
        "\n".join(blocks), hosts={"registry.site.example": "127.0.0.1"}, cwd=tmp_path
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    imported, pushed = (line.split()[-1] for line in ran.stdout.splitlines()[:2])
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", pushed) and imported == pushed
    inspected = ran.stdout[ran.stdout.index("{") :]
    assert f'"Digest": "{pushed}"' in inspected
    assert '"Name": "registry.site.example:5000/k8s/ocid"' in inspected


SIGSERVER = """
import functools, http.server, ssl, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory="/srv/sigstore")
handler.func.log_message = lambda *a: None
httpd = http.server.ThreadingHTTPServer(("127.0.0.2", 443), handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
"""


def test_trust_md_signing_with_skopeo(tmp_path: Path) -> None:
    """docs/trust.md's signing workflow end to end: a key, registries.d, skopeo copy --sign-by,
    the node's key and policy, then skopeo's and bootstrap's verdicts on the signed copy
    (both accept) and on the unsigned original (both refuse)."""
    from tests.harness.imagebuilder import build_image
    from tests.harness.registry import make_ca, make_server_cert

    blocks = sh_blocks(DOCS / "trust.md", "Signing with skopeo")
    assert len(blocks) == 3, blocks
    names = ("registry.example.com", "build.example.com", "sigstore.example.com")
    ca = make_ca(tmp_path / "pki")
    cert, key = make_server_cert(tmp_path / "pki", ca, ips=("127.0.0.1", "127.0.0.2"), dns=names)
    (tmp_path / "registry.yml").write_text(
        "version: 0.1\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'storage'}}}}}\n"
        f"http: {{addr: '127.0.0.1:443', tls: {{certificate: {cert}, key: {key}}}}}\n"
    )
    (tmp_path / "sigserver.py").write_text(SIGSERVER)
    build_image(tmp_path / "layout", "ocid", busybox_spec(cmd=("sleep", "3600")))
    # what the page assumes: the three names served (the CA trusted as a public one would be),
    # an image at build.example.com; then the page's commands, unchanged
    setup = f"""
cat {ca[0]} >> /etc/ssl/certs/ca-certificates.crt
cp {ca[0]} /etc/ssl/certs/bootstrap-doc-ca.pem && openssl rehash /etc/ssl/certs >/dev/null
docker-registry serve {tmp_path / "registry.yml"} >{tmp_path / "registry.log"} 2>&1 &
python3 {tmp_path / "sigserver.py"} {cert} {key} &
for i in $(seq 100); do
  skopeo inspect --raw docker://registry.example.com/none:x 2>&1 | grep -q 'manifest unknown' \\
    && break
  sleep 0.1
done
skopeo copy --quiet oci:{tmp_path / "layout"}:ocid docker://build.example.com/ocid:1
"""
    ran = run_sandboxed(
        "\n".join(blocks),
        setup=setup,
        hosts={names[0]: "127.0.0.1", names[1]: "127.0.0.1", names[2]: "127.0.0.2"},
        cwd=tmp_path,
    )
    out = ran.stdout + ran.stderr
    assert ran.returncode == 0, out  # skopeo accepted the signed copy: its copy exited 0
    pulled = [line for line in ran.stdout.splitlines() if re.fullmatch(r"sha256:\S{64}", line)]
    assert len(pulled) == 1, out  # bootstrap accepted it: the digest it printed
    assert f"pulled registry.example.com/k8s/ocid:1 ({pulled[0]})" in ran.stderr, out
    assert "Source image rejected: Running image docker://build.example.com/ocid:1 is rejected" in (
        ran.stderr
    ), out
    assert "skopeo refused it: exit 1" in ran.stdout, out
    assert "bootstrap: error: build.example.com/ocid:1: rejected by policy" in ran.stderr, out
    assert "bootstrap refused it: exit 7" in ran.stdout, out
