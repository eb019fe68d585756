"""Manifest/index/config parsing and platform selection (no network)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from bootstrap.errors import ExitCode, IntegrityError, RegistryError, UsageError
from bootstrap.image.manifest import parse_config, parse_manifest, select_platform
from bootstrap.image.model import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_V1_SIGNED,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
)

D = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
D3 = "sha256:" + "c" * 64


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _oci_manifest(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": D, "size": 10},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": D2, "size": 100},
            {"mediaType": OCI_LAYER_GZIP, "digest": D3, "size": 200, "annotations": {"a": "b"}},
        ],
        "annotations": {"org.example": "x"},
    }
    doc.update(extra)
    return doc


def _docker_manifest() -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": D, "size": 10},
        "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": D2, "size": 100}],
    }


def _entry(
    os_: str, arch: str, variant: str = "", digest: str = D, mt: str = OCI_MANIFEST
) -> dict[str, Any]:
    plat = {"os": os_, "architecture": arch}
    if variant:
        plat["variant"] = variant
    return {"mediaType": mt, "digest": digest, "size": 500, "platform": plat}


def _index(entries: list[dict[str, Any]], mt: str = OCI_INDEX) -> Index:
    data = json.dumps({"schemaVersion": 2, "mediaType": mt, "manifests": entries}).encode()
    doc = parse_manifest(data, mt, _digest(data))
    assert isinstance(doc, Index)
    return doc


def test_oci_manifest() -> None:
    data = json.dumps(_oci_manifest()).encode()
    m = parse_manifest(data, OCI_MANIFEST + "; charset=utf-8", _digest(data))
    assert isinstance(m, Manifest)
    assert m.media_type == OCI_MANIFEST
    assert m.digest == _digest(data)
    assert m.config.digest == D and m.config.size == 10
    assert [layer.digest for layer in m.layers] == [D2, D3]
    assert m.layers[1].annotations == {"a": "b"}
    assert m.annotations == {"org.example": "x"}


def test_docker_manifest_and_sniffing() -> None:
    data = json.dumps(_docker_manifest()).encode()
    for ctype in (DOCKER_MANIFEST, "", "application/json", "text/plain"):
        m = parse_manifest(data, ctype, _digest(data))
        assert isinstance(m, Manifest) and m.media_type == DOCKER_MANIFEST
    # an OCI manifest without mediaType, served as application/octet-stream: sniffed
    doc = _oci_manifest()
    del doc["mediaType"]
    data = json.dumps(doc).encode()
    assert (
        parse_manifest(data, "application/octet-stream", _digest(data)).media_type == OCI_MANIFEST
    )
    # an OCI index without mediaType
    data = json.dumps({"schemaVersion": 2, "manifests": [_entry("linux", "amd64")]}).encode()
    assert isinstance(parse_manifest(data, "", _digest(data)), Index)


def test_docker_list() -> None:
    idx = _index([_entry("linux", "amd64", mt=DOCKER_MANIFEST)], DOCKER_LIST)
    assert idx.media_type == DOCKER_LIST
    assert idx.manifests[0].platform == Platform("linux", "amd64")


@pytest.mark.parametrize(
    ("doc", "ctype", "word"),
    [
        (_oci_manifest(schemaVersion=1), OCI_MANIFEST, "schemaVersion"),
        (_oci_manifest(mediaType=OCI_INDEX), OCI_MANIFEST, "contradicts"),
        (_oci_manifest(manifests=[]), OCI_MANIFEST, "must not have manifests"),
        (_oci_manifest(layers="x"), OCI_MANIFEST, "layers"),
        (_oci_manifest(config={"digest": "sha256:12", "size": 1}), OCI_MANIFEST, "config.digest"),
        (
            _oci_manifest(layers=[{"mediaType": OCI_LAYER_GZIP, "digest": D, "size": -1}]),
            OCI_MANIFEST,
            "size",
        ),
        (_oci_manifest(annotations={"a": 1}), OCI_MANIFEST, "annotations"),
        ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": {}}, OCI_INDEX, "manifests"),
        (
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "layers": []},
            OCI_INDEX,
            "must not have config or layers",
        ),
        ({"hello": 1}, "", "unsupported manifest media type"),
        (_oci_manifest(), "application/vnd.example+json", "unsupported"),
        ({**_docker_manifest(), "mediaType": None}, DOCKER_MANIFEST, "declare"),
    ],
)
def test_malformed(doc: Any, ctype: str, word: str) -> None:
    data = json.dumps(doc).encode()
    with pytest.raises(IntegrityError) as info:
        parse_manifest(data, ctype, _digest(data))
    assert info.value.exit_code == ExitCode.INTEGRITY
    assert word in info.value.message
    assert info.value.hint


@pytest.mark.parametrize("data", [b"not json", b"[1,2]", b"\xff\xfe"])
def test_not_json(data: bytes) -> None:
    with pytest.raises(IntegrityError):
        parse_manifest(data, OCI_MANIFEST, _digest(data))


def test_schema1_refused_with_hint() -> None:
    doc = {"schemaVersion": 1, "name": "x", "tag": "t", "fsLayers": [], "signatures": []}
    data = json.dumps(doc).encode()
    for ctype in (DOCKER_V1_SIGNED, "application/json", ""):
        with pytest.raises(RegistryError) as info:
            parse_manifest(data, ctype, _digest(data))
        assert info.value.exit_code == ExitCode.REGISTRY
        assert "schema 1" in info.value.message
        assert "re-push" in info.value.hint


# --- platforms -----------------------------------------------------------------------------


def test_select_exact_and_first() -> None:
    idx = _index(
        [
            _entry("linux", "arm64", "v8", D),
            _entry("linux", "amd64", "", D2),
            _entry("linux", "amd64", "", D3),
            _entry("windows", "amd64", "", D),
        ]
    )
    assert select_platform(idx, Platform("linux", "amd64")).digest == D2
    assert select_platform(idx, Platform("linux", "arm64", "v8")).digest == D
    assert select_platform(idx, Platform("linux", "arm64")).digest == D  # "" == v8
    assert select_platform(idx, Platform("windows", "amd64")).digest == D


def test_select_arm64_without_variant_entry() -> None:
    idx = _index([_entry("linux", "arm64", "", D2)])
    assert select_platform(idx, Platform("linux", "arm64", "v8")).digest == D2


def test_select_arm_variant_fallback() -> None:
    idx = _index([_entry("linux", "arm", "v6", D), _entry("linux", "arm", "v7", D2)])
    assert select_platform(idx, Platform("linux", "arm", "v7")).digest == D2
    assert select_platform(idx, Platform("linux", "arm", "v6")).digest == D
    idx5 = _index([_entry("linux", "arm", "v5", D3)])
    assert select_platform(idx5, Platform("linux", "arm", "v7")).digest == D3
    idx8 = _index([_entry("linux", "arm", "v8", D3)])
    with pytest.raises(UsageError):
        select_platform(idx8, Platform("linux", "arm", "v7"))


def test_select_skips_attestations_and_unknown_types() -> None:
    idx = _index(
        [
            _entry("unknown", "unknown", "", D),
            {
                "mediaType": "application/vnd.example",
                "digest": D3,
                "size": 1,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {"mediaType": OCI_MANIFEST, "digest": D3, "size": 1},  # no platform
            _entry("linux", "amd64", "", D2),
        ]
    )
    assert select_platform(idx, Platform("linux", "amd64")).digest == D2


def test_select_no_match_lists_platforms() -> None:
    idx = _index(
        [_entry("linux", "arm64", "v8"), _entry("linux", "s390x"), _entry("linux", "arm64", "v8")]
    )
    with pytest.raises(UsageError) as info:
        select_platform(idx, Platform("linux", "riscv64"))
    assert info.value.exit_code == ExitCode.USAGE
    assert "linux/riscv64" in info.value.message
    assert "linux/arm64/v8, linux/s390x" in info.value.hint


# --- config --------------------------------------------------------------------------------


def _config(**cfg: Any) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [D, D2]},
        "config": cfg,
    }
    return json.dumps(doc).encode()


def test_parse_config() -> None:
    data = _config(
        Entrypoint=["/bin/sh", "-c"],
        Cmd=["echo hi"],
        Env=["PATH=/bin", "A=b"],
        WorkingDir="/work",
        User="1000:1000",
        Labels={"k": "v"},
        StopSignal="SIGINT",
        ExposedPorts={"80/tcp": {}, "53/udp": {}},
        Volumes={"/data": {}},
    )
    cfg = parse_config(data, _digest(data))
    assert cfg.digest == _digest(data)
    assert (cfg.os, cfg.architecture) == ("linux", "amd64")
    assert cfg.diff_ids == (D, D2)
    assert cfg.entrypoint == ("/bin/sh", "-c")
    assert cfg.cmd == ("echo hi",)
    assert cfg.env == ("PATH=/bin", "A=b")
    assert cfg.working_dir == "/work"
    assert cfg.user == "1000:1000"
    assert cfg.labels == {"k": "v"}
    assert cfg.stop_signal == "SIGINT"
    assert cfg.exposed_ports == ("53/udp", "80/tcp")
    assert cfg.volumes == ("/data",)


def test_parse_config_nulls_and_minimal() -> None:
    data = _config(Entrypoint=None, Cmd=None, Env=None, Labels=None)
    cfg = parse_config(data, _digest(data))
    assert (cfg.entrypoint, cfg.cmd, cfg.env, cfg.labels) == ((), (), (), {})
    data = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cfg = parse_config(data, _digest(data))
    assert cfg.diff_ids == () and cfg.os == ""


@pytest.mark.parametrize(
    ("doc", "word"),
    [
        ({"rootfs": {"type": "layers", "diff_ids": ["nope"]}}, "diff_ids[0]"),
        ({"rootfs": {"type": "other", "diff_ids": []}}, "rootfs.type"),
        ({}, "rootfs"),
        ({"rootfs": {"type": "layers", "diff_ids": []}, "config": {"Cmd": [1]}}, "config.Cmd"),
        (
            {"rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": "x=y", "User": 5}},
            "config.User",
        ),
        (
            {"rootfs": {"type": "layers", "diff_ids": []}, "config": {"Labels": {"a": 1}}},
            "config.Labels",
        ),
        ({"rootfs": {"type": "layers", "diff_ids": []}, "config": []}, "config"),
    ],
)
def test_parse_config_malformed(doc: Any, word: str) -> None:
    data = json.dumps(doc).encode()
    with pytest.raises(IntegrityError) as info:
        parse_config(data, _digest(data))
    assert word in info.value.message
