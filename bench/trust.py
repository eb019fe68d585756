"""Signature verification cost per pull.

The small benchmark image is pushed to a local registry twice: signed by skopeo (GPG simple
signing, ``--sign-by``, lookaside staged to a directory served over http on 127.0.0.1) and with
a cosign-layout sigstore attachment (ECDSA P-256 made with ``cryptography``). Measured:

- ``verify``: :meth:`Verifier.check_pull` alone, in process, per requirement type (policy
  lookup, signature fetch over http / from the registry, gpgv or ECDSA, payload checks);
- ``pull``: ``bootstrap pull`` of the GPG-signed image into a fresh store under a ``signedBy``
  policy against the same pull with ``--insecure-policy``, and ``skopeo copy`` with the same
  policy against ``insecureAcceptAnything`` (the reference's own verification overhead).

Usage: ``.venv/bin/python bench/trust.py [--rounds N]``
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import http.server
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_TAG,
    BOOTSTRAP,
    check,
    insecure_registries_conf,
    log,
    machine_note,
    median,
    plain_registry,
    scratch,
    small_image,
    timed,
)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def _gpg_key(home: Path) -> tuple[str, Path]:
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Bench <bench@example.test>",
         "ed25519", "sign", "never"], env=env, check=True, capture_output=True,
    )  # fmt: skip
    out = subprocess.run(
        ["gpg", "--list-keys", "--with-colons"], env=env, check=True, capture_output=True, text=True
    ).stdout
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr"))
    key = home / "key.gpg"
    key.write_bytes(subprocess.run(["gpg", "--export", fpr], env=env, capture_output=True).stdout)
    return fpr, key


def _cosign_attach(reg: Any, repo: str, digest: str, identity: str, work: Path) -> Path:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    payload = json.dumps({
        "critical": {"identity": {"docker-reference": identity},
                     "image": {"docker-manifest-digest": digest},
                     "type": "cosign container image signature"},
        "optional": None}).encode()  # fmt: skip
    sig = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    blobs = {}
    for blob in (payload, b"{}"):
        d = "sha256:" + hashlib.sha256(blob).hexdigest()
        _, headers, _ = reg.request("POST", f"/v2/{repo}/blobs/uploads/")
        loc = headers["Location"]
        reg.request("PUT", f"{loc}{'&' if '?' in loc else '?'}digest={d}", body=blob,
                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        blobs[blob] = d
    manifest = {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                   "digest": blobs[b"{}"]},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                    "size": len(payload), "digest": blobs[payload],
                    "annotations": {"dev.cosignproject.cosign/signature": sig}}]}  # fmt: skip
    reg.request("PUT", f"/v2/{repo}/manifests/sha256-{digest.split(':')[1]}.sig",
                body=json.dumps(manifest).encode(),
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})  # fmt: skip
    pub = work / "cosign.pub"
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return pub


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    rounds = ap.parse_args().rounds
    layout = small_image()
    with plain_registry() as reg, scratch("bench-trust-") as work:
        home = work / "gnupg"
        home.mkdir(mode=0o700)
        fpr, key = _gpg_key(home)
        stage = work / "sigstore"
        stage.mkdir()
        sign_d = work / "sign.d"
        sign_d.mkdir()
        (sign_d / "s.yaml").write_text(f"default-docker:\n  lookaside-staging: file://{stage}\n")
        ref = f"{reg.host}/bench/signed:1"
        subprocess.run(
            ["skopeo", "--registries.d", str(sign_d), "copy", "--quiet", "--sign-by", fpr,
             "--dest-tls-verify=false", f"oci:{layout}:{BENCH_TAG}", f"docker://{ref}"],
            env={**os.environ, "GNUPGHOME": str(home)}, check=True, capture_output=True,
        )  # fmt: skip
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(stage))
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        regd = work / "registries.d"
        regd.mkdir()
        (regd / "a.yaml").write_text(
            f"default-docker:\n  lookaside: http://127.0.0.1:{server.server_address[1]}\n"
            "  use-sigstore-attachments: true\n"
        )
        conf = insecure_registries_conf(work, reg.host)
        env = {"REGISTRIES_CONFIG_PATH": str(conf)}
        os.environ.update(env)
        from bootstrap.image.reference import Reference
        from bootstrap.image.registry import RegistryClient
        from bootstrap.trust.policy import parse_policy
        from bootstrap.trust.registries_d import load_registries_d
        from bootstrap.trust.verify import Verifier

        reference = Reference.parse(ref)
        with RegistryClient.from_environment() as client:
            fetched = client.get_manifest(reference)
            pub = _cosign_attach(reg, "bench/signed", fetched.digest, ref, work)
            policies = {
                "insecureAcceptAnything": {"default": [{"type": "insecureAcceptAnything"}]},
                "signedBy (gpgv, http lookaside)": {"default": [
                    {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}]},
                "sigstoreSigned (ECDSA, attachment)": {"default": [
                    {"type": "sigstoreSigned", "keyPath": str(pub)}]},
            }  # fmt: skip
            verify_ms: dict[str, float] = {}
            for label, doc in policies.items():
                policy = parse_policy(json.dumps(doc).encode(), work / "p.json")
                verifier = Verifier(policy, load_registries_d(regd))
                times = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    verifier.check_pull(reference, fetched.data, fetched.digest, client)
                    times.append((time.perf_counter() - t) * 1e3)
                verify_ms[label] = median(times)
                log(f"verify {label}: " + " ".join(f"{x:.1f}" for x in times) + " ms")

        signed = work / "signed.json"
        signed.write_text(json.dumps(policies["signedBy (gpgv, http lookaside)"]))
        anything = work / "any.json"
        anything.write_text(json.dumps(policies["insecureAcceptAnything"]))
        ours: dict[str, list[float]] = {"signed": [], "insecure": []}
        theirs: dict[str, list[float]] = {"signed": [], "insecure": []}
        for i in range(rounds):
            for mode in ("signed", "insecure") if i % 2 == 0 else ("insecure", "signed"):
                with scratch("bench-trust-store-") as store:
                    opts = (["--signature-policy", str(signed), "--registries.d", str(regd)]
                            if mode == "signed" else ["--insecure-policy"])  # fmt: skip
                    run = check(timed([BOOTSTRAP, "-q", "--store", store, *opts, "pull", ref],
                                      env), f"bootstrap pull ({mode})")  # fmt: skip
                    ours[mode].append(run.seconds)
                with scratch("bench-trust-skopeo-") as dest:
                    pol = signed if mode == "signed" else anything
                    run = check(timed(["skopeo", "--policy", pol, "--registries.d", regd, "copy",
                                       "--quiet", "--remove-signatures",
                                       "--src-tls-verify=false", f"docker://{ref}",
                                       f"oci:{dest}:t"]), f"skopeo copy ({mode})")  # fmt: skip
                    theirs[mode].append(run.seconds)
        server.shutdown()
        server.server_close()
    print(machine_note())
    print(f"verify per pull (median of {rounds}, in process, warm):")
    for label, ms in verify_ms.items():
        print(f"  {label:<36} {ms:7.1f} ms")
    for who, data in (("bootstrap pull", ours), ("skopeo copy", theirs)):
        s, n = median(data["signed"]), median(data["insecure"])
        print(
            f"{who:<15} signed {s:.3f}s  unverified {n:.3f}s  verify cost {(s - n) * 1e3:+.0f} ms"
        )


if __name__ == "__main__":
    main()
