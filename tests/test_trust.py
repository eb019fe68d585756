# ruff: noqa: E501  (the case table reads best one case per line)
"""Signature verification end to end: GPG simple signing made by skopeo 1.9.3 (the reference
verdict for every case is ``skopeo --policy P --registries.d D copy``), lookaside over file://
and http on 127.0.0.1, sigstore attachments laid out as cosign stores them (signed here with
``cryptography``), the global options, exit 7 and a clean store after a refusal."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bootstrap.image import maintenance
from bootstrap.image.store import Store
from tests.harness.cli import bootstrap
from tests.harness.registry import Registry, client_env

pytestmark = pytest.mark.slow


@dataclass
class Key:
    fpr: str
    path: Path  # binary export (what keyPath names)

    @property
    def data(self) -> str:
        return base64.b64encode(self.path.read_bytes()).decode()


@dataclass
class World:
    tmp: Path
    reg: Registry
    gnupg: Path
    good: Key
    other: Key
    stage: Path  # lookaside-staging directory, also served over http
    http_base: str
    regd: Path  # registries.d pointing lookaside at http_base
    env: dict[str, str]
    pushed: dict[str, str]  # name:tag -> manifest digest

    def policy(self, doc: dict[str, Any], name: str = "policy.json") -> Path:
        path = self.tmp / name
        path.write_text(json.dumps(doc))
        return path

    def bootstrap_pull(self, policy: Path, ref: str, store: Path, regd: Path | None = None) -> Any:
        return bootstrap(
            "--signature-policy",
            policy,
            "--registries.d",
            regd or self.regd,
            "pull",
            ref,
            store=store,
            env=self.env,
        )

    def skopeo_accepts(self, policy: Path, ref: str, regd: Path | None = None) -> bool:
        dest = self.tmp / "skopeo-out"
        out = subprocess.run(
            ["skopeo", "--policy", str(policy), "--registries.d", str(regd or self.regd), "copy",
             "--quiet", "--remove-signatures", *self.reg.skopeo_src_args(),
             f"docker://{ref}", f"oci:{dest}:x"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        return out.returncode == 0


def _gen_key(gnupg: Path, uid: str, out: Path) -> Key:
    env = {**os.environ, "GNUPGHOME": str(gnupg)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    listing = subprocess.run(
        ["gpg", "--list-keys", "--with-colons", uid], env=env, check=True, capture_output=True,
        text=True,
    ).stdout  # fmt: skip
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))
    exported = subprocess.run(["gpg", "--export", fpr], env=env, check=True, capture_output=True)
    out.write_bytes(exported.stdout)
    return Key(fpr, out)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def world(
    _registry_plain: Registry, busybox_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    reg = _registry_plain
    if not reg.running:
        reg.start()
    tmp = tmp_path_factory.mktemp("trust")
    gnupg = tmp / "gnupg"
    gnupg.mkdir(mode=0o700)
    good = _gen_key(gnupg, "Good Signer <good@example.test>", tmp / "good.gpg")
    other = _gen_key(gnupg, "Other Signer <other@example.test>", tmp / "other.gpg")
    stage = tmp / "sigstore"
    stage.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(stage))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    http_base = f"http://127.0.0.1:{server.server_address[1]}"
    sign_d = tmp / "sign.d"
    sign_d.mkdir()
    (sign_d / "stage.yaml").write_text(f"default-docker:\n  lookaside-staging: file://{stage}\n")
    regd = tmp / "registries.d"
    regd.mkdir()
    (regd / "default.yaml").write_text(f"default-docker:\n  lookaside: {http_base}\n")
    pushed: dict[str, str] = {}

    def push(dest: str, key: Key | None) -> None:
        argv = ["skopeo", "--registries.d", str(sign_d), "copy", "--quiet",
                *reg.skopeo_dest_args()]  # fmt: skip
        if key is not None:
            argv += ["--sign-by", key.fpr]
        argv += [busybox_image.ref, f"docker://{reg.host}/{dest}"]
        env = {**os.environ, "GNUPGHOME": str(gnupg)}
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=300)
        pushed[dest] = busybox_image.image.digest  # type: ignore[attr-defined]

    push("trust/signed:1", good)
    push("trust/other:1", other)
    push("trust/unsigned:1", None)
    push("trust/ns/deep:1", good)
    # two signatures, the first by the other key: every one is tried
    push("trust/both:1", good)
    digest = pushed["trust/both:1"]
    sigdir = stage / f"trust/both@sha256={digest.split(':')[1]}"
    by_good = (sigdir / "signature-1").read_bytes()
    push("trust/both:1", other)
    (sigdir / "signature-2").write_bytes(by_good)
    env = client_env(reg, tmp)
    yield World(tmp, reg, gnupg, good, other, stage, http_base, regd, env, pushed)
    server.shutdown()
    server.server_close()
    # leave no gpg-agent of the throwaway home running (gpg and skopeo --sign-by start one)
    subprocess.run(
        ["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": str(gnupg)},
        check=False, capture_output=True,
    )  # fmt: skip


def signed_by(
    key: Key, identity: dict[str, str] | None = None, inline: bool = False
) -> dict[str, Any]:
    req: dict[str, Any] = {"type": "signedBy", "keyType": "GPGKeys"}
    if inline:
        req["keyData"] = key.data
    else:
        req["keyPath"] = str(key.path)
    if identity is not None:
        req["signedIdentity"] = identity
    return req


def only(host: str, scope: str, reqs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"default": [{"type": "reject"}], "transports": {"docker": {scope: reqs}}}


# (case id, image name:tag, policy builder(world) -> policy doc, accepted?)
Case = tuple[str, str, Callable[[World], dict[str, Any]], bool]


def _cases() -> list[Case]:
    def dflt(req: Callable[[World], dict[str, Any]]) -> Callable[[World], dict[str, Any]]:
        return lambda w: {"default": [req(w)]}

    return [
        ("right-key", "trust/signed:1", dflt(lambda w: signed_by(w.good)), True),
        ("right-key-keydata", "trust/signed:1", dflt(lambda w: signed_by(w.good, inline=True)), True),
        ("wrong-key", "trust/other:1", dflt(lambda w: signed_by(w.good)), False),
        ("unsigned", "trust/unsigned:1", dflt(lambda w: signed_by(w.good)), False),
        ("second-signature-tried", "trust/both:1", dflt(lambda w: signed_by(w.good)), True),
        ("insecure-accept", "trust/unsigned:1", lambda w: {"default": [{"type": "insecureAcceptAnything"}]}, True),
        ("reject", "trust/signed:1", lambda w: {"default": [{"type": "reject"}]}, False),
        ("match-exact", "trust/signed:1",
         dflt(lambda w: signed_by(w.good, {"type": "matchExact"})), True),
        ("match-repository", "trust/signed:1",
         dflt(lambda w: signed_by(w.good, {"type": "matchRepository"})), True),
        ("exact-reference-ok", "trust/signed:1", dflt(lambda w: signed_by(
            w.good, {"type": "exactReference", "dockerReference": f"{w.reg.host}/trust/signed:1"})), True),
        ("exact-reference-other", "trust/signed:1", dflt(lambda w: signed_by(
            w.good, {"type": "exactReference", "dockerReference": f"{w.reg.host}/trust/x:1"})), False),
        ("exact-repository-ok", "trust/signed:1", dflt(lambda w: signed_by(
            w.good, {"type": "exactRepository", "dockerRepository": f"{w.reg.host}/trust/signed"})), True),
        ("exact-repository-other", "trust/signed:1", dflt(lambda w: signed_by(
            w.good, {"type": "exactRepository", "dockerRepository": f"{w.reg.host}/trust/x"})), False),
        ("remap-identity", "trust/signed:1", dflt(lambda w: signed_by(
            w.good, {"type": "remapIdentity", "prefix": f"{w.reg.host}/trust",
                     "signedPrefix": f"{w.reg.host}/trust"})), True),
        ("remap-identity-other", "trust/signed:1", dflt(lambda w: signed_by(
            w.good, {"type": "remapIdentity", "prefix": f"{w.reg.host}/trust",
                     "signedPrefix": "example.com/elsewhere"})), False),
        ("reject-default-scope-accepts", "trust/signed:1",
         lambda w: only(w.reg.host, f"{w.reg.host}/trust/signed", [signed_by(w.good)]), True),
        ("reject-default-other-repo", "trust/unsigned:1",
         lambda w: only(w.reg.host, f"{w.reg.host}/trust/signed", [{"type": "insecureAcceptAnything"}]), False),
        ("namespace-scope", "trust/ns/deep:1",
         lambda w: only(w.reg.host, f"{w.reg.host}/trust/ns", [signed_by(w.good)]), True),
        ("host-scope", "trust/signed:1",
         lambda w: only(w.reg.host, w.reg.host, [signed_by(w.good)]), True),
        ("most-specific-wins", "trust/signed:1", lambda w: {
            "default": [{"type": "insecureAcceptAnything"}],
            "transports": {"docker": {
                w.reg.host: [{"type": "insecureAcceptAnything"}],
                f"{w.reg.host}/trust/signed": [{"type": "reject"}]}}}, False),
        ("wildcard-scope", "trust/signed:1",
         lambda w: only(w.reg.host, "*.0.0.1", [signed_by(w.good)]), True),
        ("wildcard-with-port-never-matches", "trust/signed:1",
         lambda w: only(w.reg.host, "*.0.0.1:" + w.reg.host.split(":")[1], [signed_by(w.good)]), False),
        ("wildcard-scope-reject", "trust/signed:1", lambda w: {
            "default": [{"type": "insecureAcceptAnything"}],
            "transports": {"docker": {"*.0.1": [{"type": "reject"}]}}}, False),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_gpg_verdict_matches_skopeo(world: World, tmp_path: Path, case: Case) -> None:
    cid, name, make, accepted = case
    policy = world.policy(make(world), f"{cid}.json")
    ref = f"{world.reg.host}/{name}"
    assert world.skopeo_accepts(policy, ref) is accepted, f"skopeo disagrees with the case {cid}"
    store = tmp_path / "store"
    ran = world.bootstrap_pull(policy, ref, store)
    if accepted:
        assert ran.rc == 0, ran.stderr
        stored = Store(store).images()
        assert [r.name for r in stored] == [ref]
        assert stored[0].admitted
    else:
        assert ran.rc == 7, ran.stderr
        lines = [line for line in ran.stderr.splitlines() if line.startswith("bootstrap: error")]
        assert len(lines) == 1 and ref in lines[0]
        assert "bootstrap: hint: " in ran.stderr and "scope" in ran.stderr
        s = Store(store)
        assert s.images() == []
        assert maintenance.fsck(s).ok
        layers = world.reg.inspect(name)["Layers"]
        assert all(not s.has_blob(str(d)) for d in layers)  # type: ignore[attr-defined]


def test_refusal_reasons(world: World, tmp_path: Path) -> None:
    host = world.reg.host
    policy = world.policy({"default": [signed_by(world.good)]}, "reasons.json")
    ran = world.bootstrap_pull(policy, f"{host}/trust/unsigned:1", tmp_path / "s1")
    assert ran.rc == 7 and "no signature" in ran.stderr
    ran = world.bootstrap_pull(policy, f"{host}/trust/other:1", tmp_path / "s2")
    assert ran.rc == 7 and "unknown key" in ran.stderr
    policy = world.policy({"default": [signed_by(world.good, {"type": "exactRepository",
        "dockerRepository": f"{host}/x"})]}, "ident.json")  # fmt: skip
    ran = world.bootstrap_pull(policy, f"{host}/trust/signed:1", tmp_path / "s3")
    assert ran.rc == 7 and "another identity" in ran.stderr


def _copy_sigs(world: World, src: str, dest_dir: Path) -> Path:
    """A file:// lookaside holding a copy of ``src``'s signatures; returns its registries.d."""
    digest = world.pushed[src].split(":")[1]
    repo = src.split(":")[0]
    from_dir = world.stage / f"{repo}@sha256={digest}"
    to_dir = dest_dir / "look" / f"{repo}@sha256={digest}"
    to_dir.mkdir(parents=True)
    for f in from_dir.iterdir():
        (to_dir / f.name).write_bytes(f.read_bytes())
    regd = dest_dir / "regd"
    regd.mkdir()
    (regd / "a.yaml").write_text(f"default-docker:\n  lookaside: file://{dest_dir / 'look'}\n")
    return regd


def test_tampered_signature_and_manifest(world: World, tmp_path: Path) -> None:
    host = world.reg.host
    policy = world.policy({"default": [signed_by(world.good)]}, "tamper.json")
    ref = f"{host}/trust/signed:1"
    # tampered signature bytes (file:// lookaside)
    regd = _copy_sigs(world, "trust/signed:1", tmp_path / "a")
    sig = next((tmp_path / "a" / "look").rglob("signature-1"))
    data = bytearray(sig.read_bytes())
    data[len(data) // 2] ^= 0x55
    sig.write_bytes(bytes(data))
    assert not world.skopeo_accepts(policy, ref, regd)
    ran = world.bootstrap_pull(policy, ref, tmp_path / "s1", regd)
    assert ran.rc == 7, ran.stderr
    # a valid signature for another manifest: the registry serves something else under the tag
    regd2 = tmp_path / "b" / "regd"
    regd2.mkdir(parents=True)
    look = tmp_path / "b" / "look"
    (regd2 / "a.yaml").write_text(f"default-docker:\n  lookaside: file://{look}\n")
    manifest = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--raw", *world.reg.skopeo_args(), f"docker://{ref}"],
            capture_output=True, check=True, text=True,
        ).stdout
    )  # fmt: skip
    manifest["annotations"] = {"tampered": "yes"}
    raw = json.dumps(manifest).encode()
    status, _, body = world.reg.request(
        "PUT",
        "/v2/trust/signed/manifests/tampered",
        body=raw,
        headers={"Content-Type": str(manifest.get("mediaType"))},
    )
    assert status == 201, body
    new_digest = hashlib.sha256(raw).hexdigest()
    old_digest = world.pushed["trust/signed:1"].split(":")[1]
    target = look / f"trust/signed@sha256={new_digest}"
    target.mkdir(parents=True)
    src_sig = world.stage / f"trust/signed@sha256={old_digest}" / "signature-1"
    (target / "signature-1").write_bytes(src_sig.read_bytes())
    tref = f"{host}/trust/signed:tampered"
    ident = {"type": "matchRepository"}
    pol2 = world.policy({"default": [signed_by(world.good, ident)]}, "tamper2.json")
    assert not world.skopeo_accepts(pol2, tref, regd2)
    ran = world.bootstrap_pull(pol2, tref, tmp_path / "s2", regd2)
    assert ran.rc == 7 and "digest mismatch" in ran.stderr, ran.stderr


def test_registries_d_most_specific_entry_wins(world: World, tmp_path: Path) -> None:
    host = world.reg.host
    regd = _copy_sigs(world, "trust/signed:1", tmp_path / "a")
    (regd / "a.yaml").unlink()
    look = tmp_path / "a" / "look"
    # default-docker points nowhere; a host entry without lookaside; the repo entry has it
    (regd / "0-default.yaml").write_text(f"default-docker:\n  lookaside: file://{tmp_path}/none\n")
    (regd / "1-host.yaml").write_text(
        f"docker:\n  {host}:\n    use-sigstore-attachments: false\n"
        f"  {host}/trust/signed:\n    lookaside: file://{look}\n"
    )
    policy = world.policy({"default": [signed_by(world.good)]}, "regd.json")
    ref = f"{host}/trust/signed:1"
    assert world.skopeo_accepts(policy, ref, regd)
    ran = world.bootstrap_pull(policy, ref, tmp_path / "s", regd)
    assert ran.rc == 0, ran.stderr
    # only default-docker when no entry has it
    (regd / "1-host.yaml").write_text(f"docker:\n  {host}:\n    use-sigstore-attachments: false\n")
    assert not world.skopeo_accepts(policy, ref, regd)
    assert world.bootstrap_pull(policy, ref, tmp_path / "s2", regd).rc == 7


def test_missing_and_malformed_policy(world: World, tmp_path: Path) -> None:
    ref = f"{world.reg.host}/trust/signed:1"
    missing = tmp_path / "nope.json"
    assert not world.skopeo_accepts(missing, ref)
    ran = world.bootstrap_pull(missing, ref, tmp_path / "s")
    assert ran.rc == 2 and str(missing) in ran.stderr and "hint" in ran.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": [{"type": "signedBy"}]}')
    ran = world.bootstrap_pull(bad, ref, tmp_path / "s")
    assert ran.rc == 2 and str(bad) in ran.stderr
    ran = bootstrap("--signature-policy", missing, "--insecure-policy", "pull", ref,
                    store=tmp_path / "s", env=world.env)  # fmt: skip
    assert ran.rc == 0 and "insecure-policy" in ran.stderr
    assert not (tmp_path / "s" / "oci" / "blobs" / "sha256" / "tmp").exists()


def test_global_options_with_every_command(world: World, tmp_path: Path) -> None:
    policy = world.policy({"default": [signed_by(world.good)]}, "every.json")
    store = tmp_path / "s"
    ref = f"{world.reg.host}/trust/signed:1"
    assert world.bootstrap_pull(policy, ref, store).rc == 0
    opts = ["--signature-policy", str(policy), "--registries.d", str(world.regd)]
    ran = bootstrap(*opts, "--json", "images", store=store, env=world.env, check=True)
    assert "signedBy" in ran.json()[0]["admitted"]
    bootstrap(*opts, "fsck", store=store, env=world.env, check=True)
    bootstrap("--insecure-policy", "images", store=store, env=world.env, check=True)
    # after the command too, and with commands that never consult the policy
    ran = bootstrap("images", *opts, store=store, env=world.env, check=True)
    assert "signedBy" in ran.stdout
    missing = ["--signature-policy", str(tmp_path / "none.json")]
    for cmd in (["list"], ["fsck"], ["gc"], ["images"]):
        bootstrap(*cmd, *missing, store=store, state=tmp_path / "st", env=world.env, check=True)
    ran = bootstrap(
        "status", "nothing", *missing, store=store, state=tmp_path / "st", env=world.env
    )
    assert ran.rc == 2 and "not installed" in ran.stderr
    ran = bootstrap("pull", ref, *missing, store=store, env=world.env)
    assert ran.rc == 2 and "none.json" in ran.stderr


# ---- sigstore ----------------------------------------------------------------------------------


def _cosign_sign(world: World, name: str, key: ec.EllipticCurvePrivateKey, identity: str) -> None:
    """Attach a cosign-style signature to ``name``: payload blob + ``sha256-<hex>.sig`` tag."""
    digest = world.pushed[name]
    repo = name.split(":")[0]
    payload = json.dumps({
        "critical": {"identity": {"docker-reference": identity},
                     "image": {"docker-manifest-digest": digest},
                     "type": "cosign container image signature"},
        "optional": None,
    }).encode()  # fmt: skip
    sig = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    pdigest = "sha256:" + hashlib.sha256(payload).hexdigest()
    config = b"{}"
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    for blob, d in ((payload, pdigest), (config, cdigest)):
        status, headers, _ = world.reg.request("POST", f"/v2/{repo}/blobs/uploads/")
        assert status == 202
        location = headers["Location"]
        sep = "&" if "?" in location else "?"
        status, _, body = world.reg.request(
            "PUT",
            f"{location}{sep}digest={d}",
            body=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert status == 201, body
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config),
                   "digest": cdigest},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                    "size": len(payload), "digest": pdigest,
                    "annotations": {"dev.cosignproject.cosign/signature": sig}}],
    }  # fmt: skip
    status, _, body = world.reg.request(
        "PUT",
        f"/v2/{repo}/manifests/sha256-{digest.split(':')[1]}.sig",
        body=json.dumps(manifest).encode(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert status == 201, body


def test_sigstore_attachments(world: World, tmp_path: Path) -> None:
    host = world.reg.host
    key = ec.generate_private_key(ec.SECP256R1())
    wrong = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    _cosign_sign(world, "trust/unsigned:1", key, f"{host}/trust/unsigned:1")
    regd = tmp_path / "regd"
    regd.mkdir()
    (regd / "a.yaml").write_text("default-docker:\n  use-sigstore-attachments: true\n")
    policy = world.policy({"default": [{"type": "sigstoreSigned", "keyPath": str(pub)}]}, "ss.json")
    ref = f"{host}/trust/unsigned:1"
    ran = world.bootstrap_pull(policy, ref, tmp_path / "s1", regd)
    assert ran.rc == 0, ran.stderr
    assert "sigstoreSigned" in Store(tmp_path / "s1").images()[0].admitted
    # keyData form
    data = base64.b64encode(pub.read_bytes()).decode()
    pol = world.policy({"default": [{"type": "sigstoreSigned", "keyData": data}]}, "ss2.json")
    assert world.bootstrap_pull(pol, ref, tmp_path / "s2", regd).rc == 0
    # no attachment on another image; attachments disabled; wrong key; keyless refused
    ran = world.bootstrap_pull(policy, f"{host}/trust/other:1", tmp_path / "s3", regd)
    assert ran.rc == 7 and "no signature" in ran.stderr
    ran = world.bootstrap_pull(policy, ref, tmp_path / "s4", world.regd)
    assert ran.rc == 7 and "use-sigstore-attachments" in ran.stderr
    wpub = tmp_path / "wrong.pub"
    wpub.write_bytes(
        wrong.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pol = world.policy({"default": [{"type": "sigstoreSigned", "keyPath": str(wpub)}]}, "ss3.json")
    ran = world.bootstrap_pull(pol, ref, tmp_path / "s5", regd)
    assert ran.rc == 7 and "trusted key" in ran.stderr
    pol = world.policy({"default": [{"type": "sigstoreSigned", "fulcio": {}}]}, "ss4.json")
    ran = world.bootstrap_pull(pol, ref, tmp_path / "s6", regd)
    assert ran.rc == 7 and "not supported" in ran.stderr
    # identity checked: signed for another repository
    _cosign_sign(world, "trust/ns/deep:1", key, f"{host}/trust/elsewhere:1")
    ran = world.bootstrap_pull(policy, f"{host}/trust/ns/deep:1", tmp_path / "s7", regd)
    assert ran.rc == 7 and "another identity" in ran.stderr
    assert re.search(r"hint: .*default", ran.stderr)


def test_import_refused_unless_the_policy_accepts_archives(
    world: World, busybox_image: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "img.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", busybox_image.ref,  # type: ignore[attr-defined]
         f"docker-archive:{archive}:example.com/app:1"],
        check=True, capture_output=True,
    )  # fmt: skip
    store = tmp_path / "s"
    strict = world.policy({"default": [signed_by(world.good)]}, "imp.json")
    ran = bootstrap("--signature-policy", strict, "import", archive, store=store, env=world.env)
    assert ran.rc == 7, ran.stderr
    assert "carries no signatures" in ran.stderr and "hint" in ran.stderr
    assert Store(store).images() == [] and maintenance.fsck(Store(store)).ok
    rejected = world.policy({"default": [{"type": "reject"}]}, "imp-rej.json")
    ran = bootstrap("--signature-policy", rejected, "import", archive, store=store, env=world.env)
    assert ran.rc == 7 and "rejected" in ran.stderr
    # the hint names the transport's scope to add, with an example that works as given
    hint = ran.stderr.splitlines()[-1]
    assert f"add its scope to {rejected}" in hint and '"docker-archive"' in hint, hint
    example = json.loads(hint[hint.index("e.g. ") + 5 : hint.rindex(" (")])
    assert example == {
        "transports": {"docker-archive": {str(tmp_path): [{"type": "insecureAcceptAnything"}]}}
    }
    amended = world.policy({"default": [{"type": "reject"}], **example}, "imp-amended.json")
    ran = bootstrap("--signature-policy", amended, "import", archive, store=tmp_path / "s-am")
    assert ran.rc == 0, ran.stderr
    open_archives = world.policy(
        {
            "default": [signed_by(world.good)],
            "transports": {"docker-archive": {"": [{"type": "insecureAcceptAnything"}]}},
        },
        "imp-ok.json",
    )
    ran = bootstrap(
        "--signature-policy", open_archives, "import", archive, store=store, env=world.env
    )
    assert ran.rc == 0, ran.stderr
    [stored] = Store(store).images()
    assert stored.name == "example.com/app:1"
    assert stored.admitted == 'insecureAcceptAnything [transports.docker-archive[""]]'
    # an oci-archive looks up its own transport: the docker-archive scope does not admit it
    oci = tmp_path / "img-oci.tar"
    subprocess.run(
        ["skopeo", "copy", "--quiet", busybox_image.ref, f"oci-archive:{oci}:x"],  # type: ignore[attr-defined]
        check=True, capture_output=True,
    )  # fmt: skip
    ran = bootstrap("--signature-policy", open_archives, "import", oci, "--name", "example.com/o:1",
                    store=store, env=world.env)  # fmt: skip
    assert ran.rc == 7 and "oci-archive" in ran.stderr, ran.stderr
