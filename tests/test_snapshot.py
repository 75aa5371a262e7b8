"""A recorded moment of the guest (gdbklp.snapshot): reads inside what was
recorded are served, reads outside it fail loudly."""

import pytest

from gdbklp.snapshot import NotRecorded, Snapshot, TracingSnapshot, VerdictMemo

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


# ---- the verdict memo: a check that reads depending on what it read -----------

def branching_check(state: int, snapshot) -> str:
    """Reads r1, then memory at r1 or r2 depending on the state and r1."""
    sp = snapshot.register("r1")
    if state == 1 and sp & 0xF:
        return "misaligned"
    word = snapshot.read(sp, 8) if state == 1 else snapshot.read(snapshot.register("r2"), 4)
    return f"{state}:{word.hex()}"


def traced(check, state, snapshot):
    tracing = TracingSnapshot(snapshot)
    return check(state, tracing), tracing.trace


def snapshot_variants():
    memory = [(0x1000, bytes(range(64))), (0x2000, bytes(range(64, 128)))]
    for r1 in (0x1000, 0x1008, 0x1003, 0x2000):
        for r2 in (0x1010, 0x2010):
            yield Snapshot({"r1": r1, "r2": r2}, memory)


def test_the_memo_gives_what_the_check_would_for_every_snapshot():
    memo = VerdictMemo()
    for round_ in range(2):
        hits_before = memo.hits
        for state in (1, 2):
            for snapshot in snapshot_variants():
                expected = branching_check(state, snapshot)
                remembered = memo.verdict(state, snapshot)
                if round_ == 1:
                    assert remembered == expected, (state, snapshot.registers)
                if remembered is None:
                    verdict, trace = traced(branching_check, state, snapshot)
                    memo.store(state, trace, verdict)
    # the first round: the snapshots that differ only where the check does not read
    assert hits_before == 4 and memo.hits - hits_before == 16


def test_a_value_not_seen_is_a_miss_not_a_wrong_verdict():
    memo = VerdictMemo()
    seen = Snapshot({"r1": 0x1000, "r2": 0}, [(0x1000, b"\1" * 8)])
    verdict, trace = traced(branching_check, 1, seen)
    memo.store(1, trace, verdict)
    assert memo.verdict(1, seen) == verdict
    assert memo.verdict(1, Snapshot({"r1": 0x1000, "r2": 0}, [(0x1000, b"\2" * 8)])) is None
    assert memo.verdict(1, Snapshot({"r1": 0x1000}, [])) is None  # the read is not recorded: a miss
    assert memo.verdict(2, seen) is None


def test_the_memo_keeps_at_most_its_limit_of_states():
    memo = VerdictMemo(limit=2)
    assert [memo.store(state, [], f"v{state}") for state in range(5)] == [True, True, False, False, False]
    assert [memo.verdict(s, Snapshot({}, [])) for s in range(5)] == ["v0", "v1", None, None, None]


def test_a_check_that_read_differently_on_the_same_path_is_not_kept():
    memo = VerdictMemo()
    assert memo.store(1, [(("r", "r1"), 5), (("r", "r2"), 6)], "first")
    assert not memo.store(1, [(("r", "r1"), 5), (("r", "r3"), 6)], "second")
    assert memo.store(1, [(("r", "r1"), 7), (("r", "r2"), 6)], "third")  # another branch


def test_blocks_that_start_together_are_taken_by_their_place_not_their_bytes():
    """The reading thread's sieve compares where the blocks are, not all of
    their bytes: which block a read takes must follow from the places alone."""
    for first, second in ((b"\1" * 32, b"\2" * 64), (b"\2" * 32, b"\1" * 64)):
        snapshot = Snapshot({}, [(0x1000, first), (0x1000, second)])
        assert snapshot.recorded(0x1008, 8) == second[8:16]  # the later read, whatever its bytes
