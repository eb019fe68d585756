"""The store's per-layer and per-tree build locks: each holds the store shared (gc waits) plus
its own flock under ``locks/layers/`` or ``locks/trees/``, and names what it waits for when it
gives up."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from bootstrap.errors import BusyError, IntegrityError
from bootstrap.image import store as store_mod
from bootstrap.image.store import Store
from bootstrap.locks import flocked

DIGEST = "sha256:" + "ab" * 32

Lock = Callable[[Store, str], AbstractContextManager[None]]
CASES = [
    pytest.param(lambda s, d: s.layer_lock(d), "layers", f"layer {DIGEST}", id="layer"),
    pytest.param(lambda s, d: s.tree_lock(d), "trees", f"image tree {DIGEST}", id="tree"),
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    s.init()
    yield s


def _in_thread(fn: Callable[[], None]) -> BaseException | None:
    """Run ``fn`` in another thread (the store's shared hold is per thread); its exception."""
    caught: list[BaseException] = []

    def body() -> None:
        try:
            fn()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return caught[0] if caught else None


@pytest.mark.parametrize(("lock", "kind", "what"), CASES)
def test_named_lock_is_exclusive_and_names_what_it_waits_for(
    store: Store, monkeypatch: pytest.MonkeyPatch, lock: Lock, kind: str, what: str
) -> None:
    monkeypatch.setattr(store_mod, "LAYER_LOCK_WAIT", 0.2)
    path = store.locks / kind / f"sha256-{'ab' * 32}.lock"
    with flocked(path, timeout=0):  # another builder holds it
        err = _in_thread(lambda: lock(store, DIGEST).__enter__())
    assert isinstance(err, BusyError)
    assert err.message == f"{what} is locked by another process"
    # free again: taken at once, on that very file
    with lock(store, DIGEST), pytest.raises(BusyError), flocked(path, timeout=0):
        pass


@pytest.mark.parametrize(("lock", "kind", "what"), CASES)
def test_named_lock_holds_the_store_shared(store: Store, lock: Lock, kind: str, what: str) -> None:
    with lock(store, DIGEST):
        err = _in_thread(lambda: store.exclusive(timeout=0).__enter__())
        assert isinstance(err, BusyError)  # gc cannot run while a layer or tree is built
    assert _in_thread(lambda: store.exclusive(timeout=0).__enter__()) is None


@pytest.mark.parametrize(("lock", "kind", "what"), CASES)
def test_named_lock_refuses_a_malformed_digest(
    store: Store, lock: Lock, kind: str, what: str
) -> None:
    with pytest.raises(IntegrityError), lock(store, "sha256:../../etc"):
        pass
    assert not (store.locks / kind).exists() or not any((store.locks / kind).iterdir())
