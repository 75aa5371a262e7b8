"""The reading thread's sieve (gdbklp.sieve) on records laid out as the
plugin lays them out (tests/test_recorder.py's FakePlugin, whose layout the
lab tests hold against the real plugin): a record is known only when every
byte the memo would compare is the same, and never from before a change."""

import pytest

from gdbklp import recorder as R
from gdbklp.recorder import Repeat
from gdbklp.sieve import MemoKey, RecordSieve
from test_recorder import P3, PACA, POINTS, REGISTERS, SP, FakePlugin, arm

STACK = bytes(range(64))
POINTER = int.from_bytes(STACK[:8], "little") & ~0xF
MEMORY = {SP: STACK, POINTER - 0x10: b"\x11" * 8}
KEY = MemoKey(("r1",), ((0, 8),))  # the vCPU, r1 and the first 8 bytes at r1
# what a check read through the snapshot: 8 bytes at r1 + 16 (read 0 alone
# holds them), r13, and pc (which the decoder sets: the point's address)
TRACE = [(("m", SP + 16, 8), STACK[16:24]), (("r", "r13"), PACA), (("r", "pc"), P3)]
LAYOUT = R.layout_of(POINTS[0], REGISTERS)


@pytest.fixture
def plugin():
    fake = FakePlugin()
    yield fake
    fake.close()


def decoded(raw: bytes) -> R.Record:
    record = LAYOUT.make(LAYOUT.record.unpack(raw))
    record.raw = raw
    return record


def taught(plugin) -> RecordSieve:
    sieve = RecordSieve(LAYOUT, KEY, constant=("pc",))
    assert sieve.learn(decoded(plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY)), TRACE, "clean")
    return sieve


def changed(at: int, value: int = 0xEE) -> dict:
    stack = bytearray(STACK)
    stack[at] = value
    return {**MEMORY, SP: bytes(stack)}


def test_the_key_of_a_record_and_a_failed_read_in_it():
    record = decoded(FakePlugin().record(POINTS[0], 2, (SP, PACA, P3), {}))
    assert KEY.of(record) == (2, SP, (SP, None))
    assert KEY.of(decoded(FakePlugin().record(POINTS[0], 2, (SP, PACA, P3), MEMORY))) == (2, SP, (SP, STACK[:8]))


@pytest.mark.parametrize("vcpu, registers, memory, known", [
    (1, (SP, PACA, P3), MEMORY, True),                 # the same but its seq
    (1, (SP, PACA, P3), changed(30), True),            # a byte no check read
    (1, (SP, PACA, P3 + 4), MEMORY, True),             # pc: the point's, whatever was recorded
    (1, (SP, PACA, P3), changed(20), False),           # a byte the check read (traced)
    (1, (SP, PACA, P3), changed(5, 0x30), False),      # in the key (and the pointer read 2 follows)
    (1, (SP, PACA + 8, P3), MEMORY, False),            # a register the check read
    (2, (SP, PACA, P3), MEMORY, False),                # another vCPU
    (1, (SP + 0x40, PACA, P3), {SP + 0x40: STACK, POINTER - 0x10: b"\x11" * 8}, False),  # other addresses
    (1, (SP, PACA, P3), {SP: STACK}, False),           # a read that failed
])
def test_a_record_is_known_only_if_every_byte_that_decided_is_the_same(plugin, vcpu, registers, memory, known):
    sieve = taught(plugin)
    assert sieve(plugin.record(POINTS[0], vcpu, registers, memory)) == ("clean" if known else None)


def test_nothing_is_learnt_from_a_failed_key_read_or_an_unrecorded_access(plugin):
    sieve = RecordSieve(LAYOUT, KEY, constant=("pc",))
    assert not sieve.learn(decoded(plugin.record(POINTS[0], 1, (SP, PACA, P3), {})), [], "clean")
    record = decoded(plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY))
    assert not sieve.learn(record, [(("m", SP + 60, 8), b"\0" * 8)], "clean")  # past every block
    assert not sieve.learn(record, [(("r", "lr"), 0)], "clean")  # a register not recorded
    assert sieve(record.raw) is None


def test_a_change_forgets_and_nothing_older_is_learnt_after_it(plugin):
    sieve = taught(plugin)
    older = decoded(plugin.record(POINTS[0], 1, (SP, PACA, P3), changed(40)))
    sieve.forget_at(plugin.record(POINTS[1], 0, (SP, PACA, P3), {}))
    assert sieve(older.raw) is None
    # gdb's thread, behind the reading thread, checks a record from before the change
    assert not sieve.learn(older, TRACE, "clean")
    assert sieve(plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY)) is None
    newer = decoded(plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY))
    assert sieve.learn(newer, TRACE, "clean after")
    assert sieve(plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY)) == "clean after"


def test_it_keeps_at_most_its_limit(plugin):
    sieve = RecordSieve(LAYOUT, KEY, constant=("pc",), limit=2)
    learnt = [sieve.learn(decoded(plugin.record(POINTS[0], vcpu, (SP, PACA, P3), MEMORY)), TRACE, vcpu)
              for vcpu in range(4)]
    assert learnt == [True, True, False, False]
    assert [sieve(plugin.record(POINTS[0], vcpu, (SP, PACA, P3), MEMORY)) for vcpu in range(4)] == [0, 1, None, None]


def test_the_reading_thread_passes_known_records_in_a_row_as_one_repeat(plugin):
    arm(plugin)
    sieve = taught(plugin)
    plugin.recorder.sieves = {3: sieve, 7: sieve.forget_at}
    known = plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY)
    other = plugin.record(POINTS[0], 1, (SP, PACA, P3), changed(20))
    change = plugin.record(POINTS[1], 0, (SP, PACA, P3 + 0x40), {})
    after = plugin.record(POINTS[0], 1, (SP, PACA, P3), MEMORY)  # the same bytes as known but its seq
    plugin.ours.sendall(known + known + known + other + known + change + after)
    got = []
    while sum(item.count if type(item) is Repeat else 1 for item in got) < 7:
        batch = plugin.recorder.records(timeout=5)
        assert batch
        got += batch
    assert [(type(item).__name__, item.point, getattr(item, "count", None)) for item in got] == [
        ("Repeat", 3, 3), ("Record", 3, None), ("Repeat", 3, 1), ("Record", 7, None), ("Record", 3, None)]
    assert got[0].known == "clean"
    assert got[1].raw is not None and got[1].reads[0] == (SP, changed(20)[SP][:32])
    assert got[-1].raw == after  # after the change, known no more: decoded
