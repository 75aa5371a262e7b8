"""The recorder's client (gdbklp.recorder) against a fake plugin on a
socketpair: the ARM message field by field, records decoded field by field,
variable-length reads, the special records, and what is no record."""

import socket
import struct
import threading
import time

import pytest

from gdbklp import recorder as R
from gdbklp.errors import GdbklpError
from gdbklp.recorder import Read, Record, RecordPoint, Recorder, RecorderError, Source, Stats

P3 = 0xC000000000039D48
SP = 0xC000000002C3FA60
PACA = 0xC000000003FF1000

POINTS = (
    RecordPoint(P3, 3, (
        Read(Source.register("r1"), 32),
        # 16 bytes at r1, its length up to r1 + 16 (so: 16 of at most 32)
        Read(Source.register(0), 32, end=Source.register("r1"), end_offset=16),
        # the word at r1 + 8, masked, as a pointer: 8 bytes there
        Read(Source.read(0), 8, offset=-0x10, mask=~0xF, end=Source()),
    )),
    RecordPoint(P3 + 0x40, 7, (), flush=True),
)
REGISTERS = ("r1", "r13", "pc")


def test_arm_message_field_by_field():
    data = R.encode_arm(REGISTERS, POINTS)
    assert struct.unpack_from("<IIII", data, 0) == (0x4D52414B, 2, 3, 2)
    assert data[:4] == b"KARM"
    names = [data[16 + 16 * i:32 + 16 * i] for i in range(3)]
    assert names == [b"r1".ljust(16, b"\0"), b"r13".ljust(16, b"\0"), b"pc".ljust(16, b"\0")]
    off = 16 + 48
    assert struct.unpack_from("<QIHH", data, off) == (P3, 3, 3, 0)
    off += 16
    reads = [struct.unpack_from("<BBBBIQqq", data, off + 32 * i) for i in range(3)]
    assert reads[0] == (1, 0, 0, 0, 32, (1 << 64) - 1, 0, 0)
    assert reads[1] == (1, 0, 1, 0, 32, (1 << 64) - 1, 0, 16)
    assert reads[2] == (2, 0, 0, 0, 8, ((1 << 64) - 1) & ~0xF, -0x10, 0)
    off += 96
    assert struct.unpack_from("<QIHH", data, off) == (P3 + 0x40, 7, 0, 1)  # flush
    assert len(data) == off + 16


@pytest.mark.parametrize("registers, points, why", [
    (("r1",), (RecordPoint(P3, 1, (Read(Source.register("lr"), 8),)),), "register 'lr' is not armed"),
    (("r1",), (RecordPoint(P3, 1, (Read(Source.read(0), 8),)),), "must be an earlier read"),
    (("r1",), (RecordPoint(P3, 1), RecordPoint(P3 + 4, 1)), "point ids are unique"),
    (("r1",), (RecordPoint(P3, 1), RecordPoint(P3, 2)), "another point has that address"),
    (("r1",), (RecordPoint(P3, 0xFFFFFFFE),), "point ids are unique"),
    (("a-register-name-too-long",), (), "1 to 16 bytes"),
    (("r1",), (RecordPoint(P3, 1, (Read(Source.register(0), 1 << 20),)),), "length 0 to 65536"),
])
def test_arm_refuses_what_the_plugin_would(registers, points, why):
    with pytest.raises(RecorderError) as e:
        R.encode_arm(registers, points)
    assert why in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, GdbklpError)


@pytest.mark.parametrize("read, base, end, extent", [
    (Read(Source.register(0), 32), SP, 0, (SP, 32)),
    (Read(Source.register(0), 32, offset=-8, mask=~0xF), SP + 7, 0, (SP - 8, 32)),
    (Read(Source.register(0), 32, end=Source.register(0), end_offset=16), SP, SP, (SP, 16)),    # within
    (Read(Source.register(0), 32, end=Source.register(0), end_offset=100), SP, SP, (SP, 32)),   # clamped high
    (Read(Source.register(0), 32, end=Source.register(0), end_offset=-16), SP, SP, (SP, 0)),    # clamped at 0
    (Read(Source(), 8, offset=PACA), 0, 0, (PACA, 8)),                                            # absolute
    (Read(Source.register(0), 8, offset=-(1 << 63), end=Source.register(0)), 0, 1 << 62, (1 << 63, 0)),
])
def test_read_extent_and_its_clamp(read, base, end, extent):
    assert R.read_extent(read, base, end) == extent


class FakePlugin:
    """The plugin's side of a socketpair: takes the ARM, sends records as
    the C plugin lays them out (built here with plain struct packing)."""

    def __init__(self):
        self.ours, theirs = socket.socketpair()
        self.recorder = Recorder("fake", sock=theirs)
        self.seq = 0

    def take(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.ours.recv(n - len(data))
        return data

    def take_arm(self) -> tuple[tuple[str, ...], list]:
        magic, version, nregs, npoints = struct.unpack("<IIII", self.take(16))
        assert (magic, version) == (R.ARM_MAGIC, 2)
        names = tuple(self.take(16).rstrip(b"\0").decode() for _ in range(nregs))
        points = []
        for _ in range(npoints):
            vaddr, point_id, nreads, flags = struct.unpack("<QIHH", self.take(16))
            points.append((vaddr, point_id, flags, [struct.unpack("<BBBBIQqq", self.take(32))
                                                    for _ in range(nreads)]))
        return names, points

    def special(self, point_id: int, body: bytes = b"") -> bytes:
        self.seq += 1
        return struct.pack("<IIIIQ", R.RECORD_MAGIC, point_id, 0xFFFFFFFF, 24 + len(body), self.seq - 1) + body

    def record(self, point: RecordPoint, vcpu: int, registers: tuple[int, ...], memory: dict[int, bytes]) -> bytes:
        """A record as the plugin computes it, reading memory from a dict of
        address -> bytes (a missing address: the read fails)."""
        results, areas, values, oks = b"", b"", [], []

        def value(source):  # (value, whether it is known)
            index = REGISTERS.index(source.index) if isinstance(source.index, str) else source.index
            return (registers[index], True) if source.kind == R.REGISTER else \
                (values[index], oks[index]) if source.kind == R.READ else (0, True)

        for read in point.reads:
            (base, base_ok), (end, end_ok) = value(read.base), value(read.end)
            address, length = R.read_extent(read, base, end)
            data = memory.get(address)
            ok = data is not None and base_ok and end_ok
            data = data[:length] if ok else b""
            oks.append(ok)
            results += struct.pack("<QII", address, len(data), 0 if ok else 1)
            areas += data.ljust(read.length, b"\0")
            values.append(int.from_bytes(data[:8], "little"))
        body = struct.pack(f"<{len(registers)}Q", *registers) + results + areas
        self.seq += 1
        return struct.pack("<IIIIQ", R.RECORD_MAGIC, point.point_id, vcpu, 24 + len(body), self.seq - 1) + body

    def close(self):
        self.ours.close()
        self.recorder.close()


@pytest.fixture
def plugin():
    fake = FakePlugin()
    yield fake
    fake.close()


def arm(plugin: FakePlugin, registers=REGISTERS, points=POINTS) -> tuple:
    """Arm through the recorder while the fake plugin takes the ARM and acknowledges."""
    taken = {}

    def serve():
        taken["arm"] = plugin.take_arm()
        plugin.ours.sendall(plugin.special(R.POINT_ACK))

    thread = threading.Thread(target=serve)
    thread.start()
    plugin.recorder.arm(registers, points, timeout=5)
    thread.join()
    return taken["arm"]


def test_arm_waits_for_the_ack_and_the_plugin_gets_every_field(plugin):
    names, points = arm(plugin)
    assert names == REGISTERS
    assert [(v, i, f, len(r)) for v, i, f, r in points] == [(P3, 3, 0, 3), (P3 + 0x40, 7, R.POINT_FLUSH, 0)]
    assert points[0][3][1] == (1, 0, 1, 0, 32, (1 << 64) - 1, 0, 16)


def test_records_decoded_field_by_field(plugin):
    arm(plugin)
    stack = bytes(range(64))
    pointer = int.from_bytes(stack[:8], "little") & ~0xF
    memory = {SP: stack, pointer - 0x10: b"\x11" * 8}
    plugin.ours.sendall(plugin.record(POINTS[0], 1, (SP, PACA, P3), memory)
                        + plugin.record(POINTS[1], 0, (SP + 0x100, PACA + 0x400, P3 + 0x40), {}))
    first = plugin.recorder.next_record(timeout=5)
    assert first == Record(point=3, vcpu=1, seq=1, registers={"r1": SP, "r13": PACA, "pc": P3},
                           reads=((SP, stack[:32]), (SP, stack[:16]), (pointer - 0x10, b"\x11" * 8)))
    second = plugin.recorder.next_record(timeout=5)
    assert second == Record(7, 0, 2, {"r1": SP + 0x100, "r13": PACA + 0x400, "pc": P3 + 0x40}, ())
    assert plugin.recorder.next_record(timeout=0.05) is None


def test_a_failed_read_is_none_and_so_is_a_read_based_on_it(plugin):
    arm(plugin)
    plugin.ours.sendall(plugin.record(POINTS[0], 0, (SP, PACA, P3), {}))
    record = plugin.recorder.next_record(timeout=5)
    assert [data for _, data in record.reads] == [None, None, None]
    assert record.reads[0][0] == SP


def test_many_records_in_one_go(plugin):
    arm(plugin)
    memory = {SP + 16 * i: bytes([i % 256]) * 64 for i in range(2000)}
    data = b"".join(plugin.record(POINTS[0], i % 2, (SP + 16 * i, PACA, P3), memory) for i in range(2000))
    sender = threading.Thread(target=plugin.ours.sendall, args=(data,))
    sender.start()
    got = []
    while len(got) < 2000:
        batch = plugin.recorder.records(timeout=5)
        assert batch
        got += batch
    sender.join()
    assert [r.seq for r in got] == list(range(1, 2001))
    assert [r.registers["r1"] for r in got] == [SP + 16 * i for i in range(2000)]
    assert all(r.reads[0][1] == bytes([i % 256]) * 32 for i, r in enumerate(got))


def test_stats_and_disarm(plugin):
    arm(plugin)
    stats = struct.pack("<QQQ", 12, 3_000, 2_000_000_000)

    def serve(expected):
        assert plugin.take(4) == struct.pack("<I", expected)
        plugin.ours.sendall(plugin.record(POINTS[1], 0, (1, 2, 3), {}) + plugin.special(R.POINT_STATS, stats))

    for magic, call in ((R.STATS_MAGIC, plugin.recorder.stats), (R.DISARM_MAGIC, plugin.recorder.disarm)):
        thread = threading.Thread(target=serve, args=(magic,))
        thread.start()
        assert call(timeout=5) == Stats(12, 3_000, 2_000_000_000)
        thread.join()
    assert Stats(12, 3_000, 2_000_000_000).records_per_second == 6.0
    # the records sent before each answer stay queued
    assert [r.point for r in plugin.recorder.records(timeout=1)] == [7, 7]


def test_a_second_thread_gets_an_error_at_once_not_a_wait(plugin):
    """Two threads reading one connection race for its bytes: one of them
    would wait out its timeout for an answer the other took."""
    arm(plugin)
    reader = threading.Thread(target=lambda: plugin.recorder.records(timeout=5))
    reader.start()
    deadline = time.monotonic() + 5
    while plugin.recorder._owner is None:
        assert time.monotonic() < deadline, "the reading thread never got in"
        time.sleep(0.01)
    with pytest.raises(RecorderError, match=r"^stats: the recorder connection is in use by another thread"):
        plugin.recorder.stats(timeout=5)
    plugin.ours.sendall(plugin.record(POINTS[1], 0, (1, 2, 3), {}))
    reader.join()
    assert plugin.recorder._owner is None  # and the connection is free again


def test_a_nak_is_a_one_line_error(plugin):
    def serve():
        plugin.take_arm()
        plugin.ours.sendall(plugin.special(R.POINT_NAK, b"the vCPU has no register 'r99' (it has: r0 r1)"))

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(RecorderError) as e:
        plugin.recorder.arm(("r99",), (), timeout=5)
    thread.join()
    assert str(e.value) == "the recorder refused: the vCPU has no register 'r99' (it has: r0 r1)"


def test_no_ack_in_time_is_a_one_line_error(plugin):
    with pytest.raises(R.RecorderTimeout) as e:
        plugin.recorder.arm(REGISTERS, POINTS, timeout=0.1)
    assert "did not confirm the arming within 0.1 s" in str(e.value) and "\n" not in str(e.value)


def test_a_truncated_record_raises(plugin):
    arm(plugin)
    whole = plugin.record(POINTS[0], 0, (SP, PACA, P3), {SP: bytes(64)})
    plugin.ours.sendall(whole[:-5])
    assert plugin.recorder.next_record(timeout=0.1) is None  # not complete yet
    plugin.ours.close()
    with pytest.raises(RecorderError) as e:
        plugin.recorder.next_record(timeout=5)
    assert "closed the connection" in str(e.value)


@pytest.mark.parametrize("bad, why", [
    (struct.pack("<IIIIQ", 0x12345678, 3, 0, 24, 0), "sent no record"),
    (struct.pack("<IIIIQ", R.RECORD_MAGIC, 99, 0, 24, 0), "point 99, which is not armed"),
    (struct.pack("<IIIIQ", R.RECORD_MAGIC, 3, 0, 40, 0) + bytes(16), "has 40 bytes, not"),
])
def test_what_is_no_record_raises(plugin, bad, why):
    arm(plugin)
    plugin.ours.sendall(bad)
    with pytest.raises(RecorderError) as e:
        plugin.recorder.next_record(timeout=5)
    assert why in str(e.value)


def test_records_of_the_earlier_arming_before_the_new_ack(plugin):
    arm(plugin)
    before = plugin.record(POINTS[1], 0, (1, 2, 3), {})
    new_points = (RecordPoint(P3, 9, ()),)

    def serve():
        plugin.take_arm()
        plugin.ours.sendall(before + plugin.special(R.POINT_ACK) + plugin.record(new_points[0], 1, (4,), {}))

    thread = threading.Thread(target=serve)
    thread.start()
    plugin.recorder.arm(("r13",), new_points, timeout=5)
    thread.join()
    assert [(r.point, r.registers) for r in plugin.recorder.records(timeout=1)] == \
        [(7, {"r1": 1, "r13": 2, "pc": 3}), (9, {"r13": 4})]


def test_no_plugin_listening_is_one_line(tmp_path):
    with pytest.raises(RecorderError) as e:
        Recorder(tmp_path / "none.sock", connect_timeout=0.1)
    assert str(e.value).startswith(f"no recorder listens on {tmp_path / 'none.sock'}")
