"""Process-unique ids: format, order, prefix per process."""

from __future__ import annotations

import os
import re

import pytest

from payi_guard._ids import _Ids, new_id


def test_ids_are_32_hex_digits_a_process_prefix_and_a_count() -> None:
    ids = _Ids()
    first, second = ids(), ids()
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first[:16] == second[:16] == ids.prefix
    assert first[16:] == f"{1:016x}"
    assert second[16:] == f"{2:016x}"


def test_new_id_never_repeats() -> None:
    made = [new_id() for _ in range(1000)]
    assert len(set(made)) == len(made)
    assert len({m[:16] for m in made}) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_draws_its_own_prefix() -> None:
    parent = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child[:16] != parent[:16]
    assert child[16:] == f"{1:016x}"
