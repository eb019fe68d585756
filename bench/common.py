"""Shared benchmark helpers: the ~250 MB 5-layer benchmark image (built once with the test
image builder and cached under ``REPO/.cache/bench``), a local plain registry, scratch dirs on
tmpfs, and timing of child processes side by side with their peak RSS.

Peak RSS is that of the measured command alone, taken by GNU time (``/usr/bin/time -f %M``):
``wait4``'s ``ru_maxrss`` of a child forked from this Python process starts at the parent's RSS
(Linux keeps the high-water mark across exec), so it could never show a command smaller than the
benchmark itself. Without GNU time the ``wait4`` figure is used, an upper bound.
All timings are warm-cache (the page cache cannot be dropped here) and the machine is shared:
compare medians of alternating runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.harness.imagebuilder import (  # noqa: E402 - after the sys.path fix above
    ImageSpec,
    busybox_layer,
    synthetic_layer,
)
from tests.harness.registry import Registry  # noqa: E402

CACHE = REPO / ".cache" / "bench"


def _compile_package() -> None:
    """Write the bytecode of ``bootstrap/`` once, as an installed package has it: with
    ``PYTHONDONTWRITEBYTECODE`` set (as in some shells here) every measured ``bootstrap`` run
    would otherwise recompile every module it imports (~2-3x its start-up)."""
    import compileall

    compileall.compile_dir(str(REPO / "bootstrap"), quiet=1)


_compile_package()
BOOTSTRAP = Path(sys.executable).parent / "bootstrap"
SCRATCH_ROOT = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())

# Bump when the spec changes: the cached layout is rebuilt.
BENCH_IMAGE_VERSION = 2
BENCH_TAG = "bench"
RSS_TARGET = 100 * 1000 * 1000
"""Peak RSS target of every ``bootstrap`` command measured (bytes)."""


def bench_spec(zstd: bool = False) -> ImageSpec:
    """5 gzip layers, ~250 MB compressed: a busybox base and 4 synthetic layers, each with 5000
    small compressible files (2 KiB hex text) and 3 large incompressible ones (18 MiB); zstd
    layers (the same files) if asked."""
    comp = "zstd" if zstd else "gzip"
    layers = [busybox_layer(compression=comp)]
    layers += [
        synthetic_layer(seed, 5000, 2048, 3, 18 * 1024 * 1024, compression=comp)
        for seed in range(1, 5)
    ]
    return ImageSpec(layers=layers, cmd=("sh",))


def bench_image(zstd: bool = False) -> Path:
    """The OCI layout holding the benchmark image tagged ``bench`` (built on first use), its
    layers zstd-compressed if asked."""
    from tests.harness.imagebuilder import build_image

    layout = CACHE / (f"image-v{BENCH_IMAGE_VERSION}" + ("-zstd" if zstd else ""))
    stamp = layout / ".complete"
    if stamp.exists():
        return layout
    if layout.exists():
        shutil.rmtree(layout)
    started = time.monotonic()
    log(f"building the benchmark image in {layout} (once) ...")
    build_image(layout, BENCH_TAG, bench_spec(zstd))
    stamp.write_text(json.dumps({"built_in_s": round(time.monotonic() - started, 1)}))
    log(f"built in {time.monotonic() - started:.1f}s: {human(layout_size(layout))} of blobs")
    return layout


SMALL_IMAGE_VERSION = 1


def small_spec(zstd: bool = False) -> ImageSpec:
    """6 layers, ~52 MB compressed: a busybox base and 5 synthetic layers of 400 small files
    (2 KiB hex text) and one incompressible 9.5 MiB file each (zstd instead of gzip if asked)."""
    comp = "zstd" if zstd else "gzip"
    layers = [busybox_layer(compression=comp)]
    layers += [
        synthetic_layer(seed, 400, 2048, 1, 19 * 512 * 1024, compression=comp)
        for seed in range(1, 6)
    ]
    return ImageSpec(layers=layers, cmd=("sh",))


def small_image(zstd: bool = False) -> Path:
    """The OCI layout holding the small benchmark image tagged ``bench`` (built on first use)."""
    from tests.harness.imagebuilder import build_image

    name = f"small-{'zstd' if zstd else 'gzip'}-v{SMALL_IMAGE_VERSION}"
    layout = CACHE / name
    stamp = layout / ".complete"
    if stamp.exists():
        return layout
    if layout.exists():
        shutil.rmtree(layout)
    log(f"building the small benchmark image in {layout} (once) ...")
    build_image(layout, BENCH_TAG, small_spec(zstd))
    stamp.write_text("{}")
    return layout


def layout_size(layout: Path) -> int:
    return sum(p.stat().st_size for p in (layout / "blobs").rglob("*") if p.is_file())


@contextlib.contextmanager
def plain_registry() -> Iterator[Registry]:
    """A plain-HTTP docker-registry on 127.0.0.1 with its storage on tmpfs, closed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=SCRATCH_ROOT))
    reg = Registry.create("plain", root)
    try:
        yield reg
    finally:
        reg.close()
        shutil.rmtree(root, ignore_errors=True)


def insecure_registries_conf(directory: Path, host: str) -> Path:
    """A registries.conf marking ``host`` insecure (plain HTTP allowed) for bootstrap."""
    path = directory / "registries.conf"
    path.write_text(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n')
    return path


@contextlib.contextmanager
def served_bench_image(layout: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """The image tagged ``bench`` in ``layout`` pushed to a fresh :func:`plain_registry`; yields
    (its reference, the environment for ``bootstrap`` to pull it over plain HTTP)."""
    with plain_registry() as reg, scratch("bench-conf-") as work:
        reg.push(layout, BENCH_TAG, "bench/image:latest")
        conf = insecure_registries_conf(work, reg.host)
        yield f"{reg.host}/bench/image:latest", {"REGISTRIES_CONFIG_PATH": str(conf)}


def skopeo_copy_argv(ref: str, layout: Path) -> list[str]:
    """``skopeo copy`` of ``docker://REF`` (plain HTTP) into the OCI layout ``layout`` as ``t``."""
    return [
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        f"docker://{ref}",
        f"oci:{layout}:t",
    ]


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A fresh directory on tmpfs, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=SCRATCH_ROOT))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Run:
    """One timed child process: wall seconds, peak RSS in bytes, exit status, and its CPU
    seconds (user + sys of it and its reaped children, from ``wait4``)."""

    seconds: float
    max_rss: int
    returncode: int
    stderr: str
    cpu: float = 0.0


GNU_TIME = Path("/usr/bin/time")  # Debian package "time"


def timed(argv: Sequence[str | Path], env: Mapping[str, str] | None = None) -> Run:
    """Run ``argv`` to completion; return its wall time and its own peak RSS (see the module
    docstring: GNU time when present, else ``wait4``, an upper bound)."""
    if GNU_TIME.exists():
        run = _wait(["/usr/bin/time", "-f", "maxrss_kb=%M", *argv], env)
        lines = run.stderr.rstrip().splitlines()
        if lines and lines[-1].startswith("maxrss_kb="):
            rss = int(lines[-1].split("=", 1)[1]) * 1024
            return Run(run.seconds, rss, run.returncode, "\n".join(lines[:-1]), run.cpu)
        return run
    return _wait(argv, env)


def _wait(argv: Sequence[str | Path], env: Mapping[str, str] | None) -> Run:
    full_env = dict(os.environ)
    full_env.update(env or {})
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=err, env=full_env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    return Run(elapsed, usage.ru_maxrss * 1024, proc.returncode, stderr, cpu)


def check(run: Run, what: str) -> Run:
    if run.returncode != 0:
        raise SystemExit(f"{what} failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    return run


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def machine_note() -> str:
    """One line about the machine: cores and 1-minute load (the noise to expect)."""
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores, load average {load:.2f} at start (shared machine)"
