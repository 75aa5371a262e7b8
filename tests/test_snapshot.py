"""A recorded moment of the guest (gdbklp.snapshot): reads inside what was
recorded are served, reads outside it fail loudly."""

import pytest

from gdbklp.snapshot import NotRecorded, Snapshot

STACK_BASE = 0xc000000003820000  # a kernel stack of the 6.1 lab (THREAD_SIZE 16 KiB)


def snapshot() -> Snapshot:
    return Snapshot({"r1": STACK_BASE + 0x3d50, "r13": 0xc000000003ff0000},
                    [(STACK_BASE + 0x3d50, bytes(range(32))), (STACK_BASE, b"\xaa" * 48),
                     (STACK_BASE + 16, b"\xbb" * 8)])


def test_a_read_inside_a_recorded_block_is_served():
    s = snapshot()
    assert s.read(STACK_BASE + 0x3d58, 8) == bytes(range(8, 16))
    assert s.read(STACK_BASE, 48) == b"\xaa" * 48
    # overlapping blocks: the one that holds the whole read answers
    assert s.read(STACK_BASE + 16, 8) == b"\xbb" * 8 and s.read(STACK_BASE + 16, 16) == b"\xaa" * 16
    assert s.register("r1") == STACK_BASE + 0x3d50


@pytest.mark.parametrize("address, length", [
    (STACK_BASE + 0x3d50 + 28, 8),   # runs past the end of a block
    (STACK_BASE - 8, 8),             # before every block
    (STACK_BASE + 48, 1),            # between blocks
])
def test_a_read_outside_the_recording_fails_naming_it(address, length):
    with pytest.raises(NotRecorded, match=f"{length} bytes at {address:#x} were not recorded"):
        snapshot().read(address, length)


def test_a_register_not_recorded_fails_naming_it():
    with pytest.raises(NotRecorded, match="register ctr was not recorded"):
        snapshot().register("ctr")
