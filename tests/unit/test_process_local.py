"""Per-process objects: built once per key, and never inherited by a forked child (its
sockets and threads would be the parent's)."""

import os

from worker.process_local import ProcessLocal


def test_built_once_per_key_and_closed_on_clear():
    closed: list[object] = []
    cache: ProcessLocal[str, object] = ProcessLocal(close=closed.append)
    first = cache.get("a", object)
    assert cache.get("a", object) is first and cache.get("b", object) is not first
    cache.clear()
    assert first in closed and len(closed) == 2
    assert cache.get("a", object) is not first


def test_a_forked_child_builds_its_own():
    cache: ProcessLocal[str, tuple[int, object]] = ProcessLocal()
    parent = cache.get("client", lambda: (os.getpid(), object()))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whose object it got, then leave without pytest's cleanup
        child = cache.get("client", lambda: (os.getpid(), object()))
        os.write(write, b"own" if child[0] == os.getpid() and child is not parent else b"inherited")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.waitpid(pid, 0)
    assert answer == b"own"
    assert cache.get("client", lambda: (os.getpid(), object())) is parent  # the parent keeps its own
