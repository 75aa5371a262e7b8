"""The recorder's client: probe points armed in QEMU's recorder plugin, and
the records it streams back (pure Python, no gdb: socket I/O only).

The plugin (qemu-images/plugin/klp_record.c, its protocol also in
klp_record.h) runs in the recorder's QEMU (the lab's `--qemu record`:
trixie's qemu-system-ppc64 10.0, plugin API 4), started with
``-plugin libklprecord.so,socket=PATH``. At the guest instructions it is
armed with (probe points), for every vCPU and before the instruction
executes, it records a set of registers and memory reads, and writes one
fixed-size record per hit to its client over the UNIX stream socket PATH,
with no gdbstub stop. It serves one client at a time and is idle until armed.

Protocol (version 2; every integer little-endian, no padding anywhere):

Client -> plugin, each message starting with a u32 magic:

- ARM: ``{u32 magic 0x4d52414b "KARM", u32 version 2, u32 nregisters,
  u32 npoints}``, then nregisters x 16-byte NUL-padded register names, then
  npoints x point. Every record carries these registers, in this order.
  The names are QEMU's gdb register names for the vCPU; for ppc64 (power9)
  qemu_plugin_get_registers() gives ``r0``..``r31``, ``pc`` (the NIP),
  ``msr``, ``cr``, ``lr``, ``ctr``, ``xer``, then the FPU, Altivec, VSX
  and SPR registers (``f0``.., ``fpscr``, ``vr0``.., ``vscr``, ``vrsave``,
  ``vs0h``.., and SPRs by their lower-case names: ``srr0``, ``srr1``,
  ``dar``, ``dsisr``, ``sprg0``.., ``tb``, ``pvr``, ...; ``xer``, ``lr``
  and ``ctr`` appear twice, the first is used). A NAK for an unknown name
  lists them all. A point is
  ``{u64 vaddr, u32 point_id, u16 nreads, u16 flags}`` then nreads x read
  (flags: bit 0, FLUSH, writes the point's records at once, with everything
  queued before them, where other records wait in a batch: for what the
  client must learn of now), a read
  ``{u8 base_kind, u8 base_index, u8 end_kind, u8 end_index, u32 length,
  u64 mask, i64 offset, i64 end_offset}``. Source kinds: 0 none (value 0;
  as an end: a fixed length), 1 register (base_index: an index into the
  record's registers), 2 an earlier read of the same point (its first 8
  bytes as a u64, zero-extended if it read fewer). A read's address is
  ``(base & mask) + offset``; with an end its length is
  ``clamp(end + end_offset - address, 0, length)``, without, ``length``. A
  read whose base or end read failed is not attempted and fails too. Point
  ids are 0..0xFFFFFFEF, one point per address. A new ARM replaces the
  previous one. The plugin replies with one ACK once the new
  instrumentation is live: the translations made before are dropped first
  (qemu_plugin_reset, called from a vCPU), so a probe fires for code
  translated before the ARM; or with one NAK (nothing changed).
- DISARM: ``{u32 magic 0x5349444b "KDIS"}``: the plugin removes its
  instrumentation (again dropping the translations) and replies with a
  final STATS record; no probe record follows it.
- STATS: ``{u32 magic 0x4154534b "KSTA"}``: the plugin replies with a STATS
  record.

Plugin -> client: records, each ``{u32 magic 0x4345524b "KREC", u32
point_id, u32 vcpu_index, u32 size (bytes of the whole record), u64 seq}``
(24 bytes; seq counts every record the plugin sends, from 0) then:

- a probe record (of a fixed size for its point): ``u64 registers[nregisters]``
  (each zero-extended from the bytes QEMU gives, which are in the vCPU's
  current byte order: little-endian for a ppc64le kernel), then per read
  ``{u64 address, u32 length_read, u32 status (0 ok, 1 failed)}``, then
  each read's data area, of its maximum length (the first length_read bytes
  are the data, the rest zero);
- STATS (point_id 0xFFFFFFFF, vcpu 0xFFFFFFFF): ``{u64 records_sent, u64
  ns_waited, u64 armed_ns}``: probe records sent since the last ARM, the
  time vCPUs spent blocked writing them because the client was slow, the
  time armed since the last ARM;
- ACK (0xFFFFFFFE): the header only;
- NAK (0xFFFFFFFD): then a UTF-8 message (size - 24 bytes): why the ARM (or
  a message) was refused.

Back-pressure: a vCPU's writes block: when the client falls behind the guest
waits (no record is ever dropped), and the time is counted in ns_waited.
When the client goes away (EOF, EPIPE) the plugin disarms itself and says so
in one line on QEMU's stderr; the guest never stays blocked.
"""

import functools
import select
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from gdbklp.errors import GdbklpError

ARM_MAGIC = 0x4D52414B      # "KARM"
DISARM_MAGIC = 0x5349444B   # "KDIS"
STATS_MAGIC = 0x4154534B    # "KSTA"
RECORD_MAGIC = 0x4345524B   # "KREC"
VERSION = 2

POINT_STATS = 0xFFFFFFFF
POINT_ACK = 0xFFFFFFFE
POINT_NAK = 0xFFFFFFFD
POINT_ID_MAX = 0xFFFFFFEF
POINT_FLUSH = 0x0001  # a point's flag: its records are written at once

NONE, REGISTER, READ = 0, 1, 2  # source kinds
READ_OK, READ_FAILED = 0, 1
REGISTER_NAME_LEN = 16
MAX_REGISTERS, MAX_POINTS, MAX_READS, MAX_READ_LENGTH = 64, 4096, 64, 65536
ALL_BITS = (1 << 64) - 1

ARM_HEADER = struct.Struct("<IIII")
POINT = struct.Struct("<QIHH")
READ_SPEC = struct.Struct("<BBBBIQqq")
HEADER = struct.Struct("<IIIIQ")
READ_RESULT = struct.Struct("<QII")
STATS = struct.Struct("<QQQ")
RUN_CHECK = struct.Struct("<IIII")  # a header's magic, point_id, vcpu, size


class RecorderError(GdbklpError):
    """The recorder failed or refused (one line)."""


class RecorderTimeout(RecorderError):
    """The plugin did not answer in time."""


@dataclass(frozen=True)
class Source:
    """Where a read's base address or end comes from: nothing (0), one of
    the armed registers (index, or its name), or an earlier read of the same
    point (index: its first 8 bytes as a little-endian u64)."""

    kind: int = NONE
    index: int | str = 0

    @classmethod
    def register(cls, which: int | str) -> "Source":
        return cls(REGISTER, which)

    @classmethod
    def read(cls, index: int) -> "Source":
        return cls(READ, index)


@dataclass(frozen=True)
class Read:
    """Up to length bytes at (base & mask) + offset; with an end, only up to
    end + end_offset (clamped to 0..length)."""

    base: Source
    length: int
    offset: int = 0
    mask: int = ALL_BITS
    end: Source = Source()
    end_offset: int = 0


@dataclass(frozen=True)
class RecordPoint:
    """A probe point: the guest instruction at vaddr, before it executes;
    flush: its records reach the client at once, not in the next batch."""

    vaddr: int
    point_id: int
    reads: tuple[Read, ...] = ()
    flush: bool = False


@dataclass(slots=True)
class Record:
    """One hit of a probe point on one vCPU (not frozen: made 300,000 times
    a second, and a frozen dataclass is slower to make)."""

    point: int   # its point_id
    vcpu: int
    seq: int
    registers: dict[str, int]
    # per read: (address, the bytes read, or None if the read failed)
    reads: tuple[tuple[int, bytes | None], ...]
    raw: bytes | None = None  # as it came, for a point with a sieve (Recorder.sieves)


@dataclass(slots=True)
class Repeat:
    """count records in a row of one point that its sieve knew (Recorder.sieves),
    each as known: what the sieve gave for it. They are not decoded further."""

    point: int
    known: object
    count: int


@dataclass(frozen=True)
class Stats:
    records_sent: int  # probe records since the last ARM
    ns_waited: int     # vCPU time blocked on a slow client
    armed_ns: int      # time armed since the last ARM

    @property
    def records_per_second(self) -> float:
        return self.records_sent / (self.armed_ns / 1e9) if self.armed_ns else 0.0


def read_extent(read: Read, base: int, end: int = 0) -> tuple[int, int]:
    """(address, length) of a read whose base source has the value base and
    whose end source (if any) end, as the plugin computes them."""
    address = ((base & read.mask) + read.offset) & ALL_BITS
    if read.end.kind == NONE:
        return address, read.length
    span = ((end + read.end_offset - address + (1 << 63)) & ALL_BITS) - (1 << 63)  # signed 64-bit
    return address, max(0, min(span, read.length))


def _source_index(source: Source, registers: tuple[str, ...], where: str) -> tuple[int, int]:
    index = source.index
    if source.kind == REGISTER and isinstance(index, str):
        if index not in registers:
            raise RecorderError(f"{where}: register {index!r} is not armed (armed: {', '.join(registers)})")
        index = registers.index(index)
    if source.kind not in (NONE, REGISTER, READ) or not isinstance(index, int) or not 0 <= index < 256:
        raise RecorderError(f"{where}: bad source {source}")
    return source.kind, index


def encode_arm(registers, points) -> bytes:
    """The ARM message for these register names and RecordPoints."""
    registers = tuple(registers)
    points = tuple(points)
    if len(registers) > MAX_REGISTERS or len(points) > MAX_POINTS:
        raise RecorderError(f"at most {MAX_REGISTERS} registers and {MAX_POINTS} points can be armed")
    out = [ARM_HEADER.pack(ARM_MAGIC, VERSION, len(registers), len(points))]
    for name in registers:
        raw = name.encode()
        if not raw or len(raw) > REGISTER_NAME_LEN:
            raise RecorderError(f"register name {name!r}: 1 to {REGISTER_NAME_LEN} bytes")
        out.append(raw.ljust(REGISTER_NAME_LEN, b"\0"))
    ids, vaddrs = set(), set()
    for point in points:
        where = f"point {point.point_id} at {point.vaddr:#x}"
        if not 0 <= point.point_id <= POINT_ID_MAX or point.point_id in ids:
            raise RecorderError(f"{where}: point ids are unique, 0 to {POINT_ID_MAX:#x}")
        if point.vaddr in vaddrs:
            raise RecorderError(f"{where}: another point has that address")
        if len(point.reads) > MAX_READS:
            raise RecorderError(f"{where}: at most {MAX_READS} reads")
        ids.add(point.point_id)
        vaddrs.add(point.vaddr)
        out.append(POINT.pack(point.vaddr, point.point_id, len(point.reads), POINT_FLUSH if point.flush else 0))
        for i, read in enumerate(point.reads):
            base = _source_index(read.base, registers, f"{where}, read {i}")
            end = _source_index(read.end, registers, f"{where}, read {i}")
            for kind, index in (base, end):
                if kind == READ and index >= i:
                    raise RecorderError(f"{where}, read {i}: a read source must be an earlier read")
            if not 0 <= read.length <= MAX_READ_LENGTH:
                raise RecorderError(f"{where}, read {i}: length 0 to {MAX_READ_LENGTH}")
            out.append(READ_SPEC.pack(*base, *end, read.length, read.mask & ALL_BITS, read.offset,
                                      read.end_offset))
    return b"".join(out)


@dataclass
class _Layout:
    """How to decode one point's records."""

    point: RecordPoint
    size: int
    record: struct.Struct  # the whole record, header included
    nregisters: int
    names: tuple[str, ...]

    make: object = None  # values -> Record, made for this layout by layout_of

    def register_bytes(self, name: str) -> tuple[int, int]:
        """(start, end) of a register's value in a raw record."""
        start = HEADER.size + 8 * self.names.index(name)
        return start, start + 8

    def results_bytes(self) -> tuple[int, int]:
        """(start, end) of every read's result (address, length, status) in a raw record."""
        start = HEADER.size + 8 * self.nregisters
        return start, start + READ_RESULT.size * len(self.point.reads)

    def data_start(self, index: int) -> int:
        """Where read index's bytes start in a raw record."""
        return self.results_bytes()[1] + sum(read.length for read in self.point.reads[:index])


def _maker(names: tuple[str, ...], nreads: int):
    """A function from one record's unpacked values (header included) to
    its Record, written out for this layout: the general loop costs three
    times as much per record, and records come 300,000 times a second."""
    n = len(names)
    registers = ", ".join(f"{name!r}: v[{5 + i}]" for i, name in enumerate(names))
    reads = "".join(
        f"(v[{5 + n + 3 * i}], v[{5 + n + 3 * nreads + i}][:v[{6 + n + 3 * i}]] if v[{7 + n + 3 * i}] == 0 "
        "else None), " for i in range(nreads))
    namespace = {"Record": Record}
    exec(f"def make(v):\n    return Record(v[1], v[2], v[4], {{{registers}}}, ({reads}))\n", namespace)
    return namespace["make"]


def layout_of(point: RecordPoint, registers: tuple[str, ...]) -> _Layout:
    n, reads = len(registers), point.reads
    record = struct.Struct("<IIIIQ" + "Q" * n + "QII" * len(reads) + "".join(f"{r.length}s" for r in reads))
    return _Layout(point, record.size, record, n, tuple(registers), _maker(tuple(registers), len(reads)))


def decode_record(data, offset: int, layouts: dict[int, "_Layout"]):
    """The record at data[offset:]: (record or special, its size), or None if
    data does not hold all of it yet. A special record comes back as
    (point_id, seq, payload bytes). RecorderError for what is no record."""
    if len(data) - offset < HEADER.size:
        return None
    magic, point_id, vcpu, size, seq = HEADER.unpack_from(data, offset)
    if magic != RECORD_MAGIC or size < HEADER.size:
        raise RecorderError(f"the recorder sent no record at byte {offset} (magic {magic:#x}, size {size})")
    if len(data) - offset < size:
        return None
    if point_id > POINT_ID_MAX:
        return (point_id, seq, bytes(data[offset + HEADER.size:offset + size])), size
    layout = layouts.get(point_id)
    if layout is None:
        raise RecorderError(f"the recorder sent a record of point {point_id}, which is not armed")
    if size != layout.size:
        raise RecorderError(f"a record of point {point_id} has {size} bytes, not {layout.size}")
    return layout.make(layout.record.unpack_from(data, offset)), size


def decode_run(data, offset: int, layouts: dict[int, "_Layout"], out: list, sieves=None) -> int:
    """Decode the records of one point that follow each other from
    data[offset:] into out, as long as they are complete and of that point;
    the offset after them (offset itself when the first is not such a record).
    Through the point's sieve, if sieves has one (see _sieve_run)."""
    if len(data) - offset < HEADER.size:
        return offset
    magic, point_id, _, size, _ = HEADER.unpack_from(data, offset)
    layout = layouts.get(point_id)
    if magic != RECORD_MAGIC or layout is None or size != layout.size:
        return offset
    count = (len(data) - offset) // size
    sieve = sieves.get(point_id) if sieves else None
    if sieve is not None:
        return _sieve_run(data, offset, count, layout, sieve, out)
    make = layout.make
    with memoryview(data) as view:
        for values in layout.record.iter_unpack(view[offset:offset + count * size]):
            if values[0] != RECORD_MAGIC or values[1] != point_id or values[3] != size:
                break
            out.append(make(values))
            offset += size
    return offset


def _one_thread_at_a_time(method):
    """A Recorder's buffer and queues belong to one thread at a time: a second
    thread meets this error at once, where it would otherwise wait out its
    timeout for bytes that the first one already took off the socket."""
    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        me = threading.get_ident()
        with self._owner_lock:
            if self._owner not in (None, me):
                raise RecorderError(f"{method.__name__}: the recorder connection is in use by another thread "
                                    "(use it from one thread at a time)")
            outermost = self._owner is None
            self._owner = me
        try:
            return method(self, *args, **kwargs)
        finally:
            if outermost:
                self._owner = None
    return guarded


def _sieve_run(data, offset: int, count: int, layout: "_Layout", sieve, out: list) -> int:
    """decode_run for a point with a sieve: a function of a record's raw bytes
    that gives what is already known of it, or None. Known records in a row
    become one Repeat; the others are decoded, their raw bytes kept."""
    point_id, size = layout.point.point_id, layout.size
    unpack, make = layout.record.unpack, layout.make
    with memoryview(data) as view:
        for _ in range(count):
            raw = bytes(view[offset:offset + size])
            magic, point, _, length = RUN_CHECK.unpack_from(raw)
            if magic != RECORD_MAGIC or point != point_id or length != size:
                break
            offset += size
            known = sieve(raw)
            if known is None:
                record = make(unpack(raw))
                record.raw = raw
                out.append(record)
                continue
            last = out[-1] if out else None
            if type(last) is Repeat and last.known is known and last.point == point_id:
                last.count += 1
            else:
                out.append(Repeat(point_id, known, 1))
    return offset


class Recorder:
    """A connection to the recorder plugin's socket (one client at a time,
    used from one thread at a time)."""

    CHUNK = 1 << 20

    def __init__(self, socket_path: Path | str, connect_timeout: float = 10.0, *,
                 sock: socket.socket | None = None):
        """Connect to the plugin's socket (retrying while QEMU starts); with
        sock, use that connected socket instead (a test's socketpair)."""
        self.path = str(socket_path)
        self.sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while sock is None:
            try:
                self.sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise RecorderError(f"no recorder listens on {self.path}: {e.strerror}") from None
                time.sleep(0.05)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._buf = bytearray()
        self._pos = 0
        self._records: deque[Record] = deque()
        self._specials: deque[tuple[int, int, bytes]] = deque()
        self._layouts: dict[int, _Layout] = {}
        self._pending_layouts: dict[int, _Layout] | None = None
        self.registers: tuple[str, ...] = ()
        # point_id -> a function of a record's raw bytes: what the client knows
        # of it already (it comes as a Repeat), or None (decoded as a Record)
        self.sieves: dict[int, object] = {}
        self.closed = False
        self._owner_lock = threading.Lock()
        self._owner: int | None = None  # the thread inside a public method

    # ---- I/O ----------------------------------------------------------------------

    def _fill(self, timeout: float | None) -> bool:
        """Read what the socket has (waiting up to timeout; None: forever);
        False on timeout."""
        if self.closed:
            raise RecorderError("the recorder connection is closed")
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return False
        chunk = self.sock.recv(self.CHUNK)
        if not chunk:
            raise RecorderError(f"the recorder on {self.path} closed the connection")
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += chunk
        return True

    def _parse(self) -> None:
        """Move every complete record from the buffer to the queues."""
        buf, pos, layouts = self._buf, self._pos, self._layouts
        records = self._records
        while True:
            after = decode_run(buf, pos, layouts, records, self.sieves)
            if after != pos:
                pos = after
                continue
            decoded = decode_record(buf, pos, layouts)
            if decoded is None:
                break
            item, size = decoded
            pos += size
            if isinstance(item, Record):
                records.append(item)
            else:
                self._specials.append(item)
                if item[0] == POINT_ACK and self._pending_layouts is not None:
                    # the records after the ACK are the new arming's
                    self._layouts = layouts = self._pending_layouts
                    self._pending_layouts = None
                elif item[0] == POINT_NAK:
                    self._pending_layouts = None
        self._pos = pos

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise RecorderError(f"cannot write to the recorder on {self.path}: {e.strerror or e}") from None

    def _special(self, wanted: tuple[int, ...], timeout: float, what: str) -> tuple[int, int, bytes]:
        """The next special record of a kind in wanted (records before it stay queued)."""
        deadline = time.monotonic() + timeout
        while True:
            self._parse()
            while self._specials:
                item = self._specials.popleft()
                if item[0] == POINT_NAK:
                    raise RecorderError(f"the recorder refused: {item[2].decode(errors='replace')}")
                if item[0] in wanted:
                    return item
            left = deadline - time.monotonic()
            if left <= 0 or not self._fill(left):
                raise RecorderTimeout(f"the recorder did not {what} within {timeout:g} s "
                                      "(is the guest running? a change needs a vCPU to run)")

    # ---- the API ------------------------------------------------------------------

    @_one_thread_at_a_time
    def arm(self, registers, points, timeout: float = 10.0, wait: bool = True) -> None:
        """Arm these points, each record carrying these registers (QEMU's
        names) in this order; with wait, until the plugin's ACK says they are
        live (else call wait_armed())."""
        registers = tuple(registers)
        points = tuple(points)
        message = encode_arm(registers, points)
        self._pending_layouts = {p.point_id: layout_of(p, registers) for p in points}
        self.registers = registers
        self._send(message)
        if wait:
            self.wait_armed(timeout)

    @_one_thread_at_a_time
    def wait_armed(self, timeout: float = 10.0) -> None:
        self._special((POINT_ACK,), timeout, "confirm the arming")

    @_one_thread_at_a_time
    def next_record(self, timeout: float | None = 0.0) -> Record | None:
        """The next probe record (a Record, or a Repeat of a point with a
        sieve), waiting up to timeout seconds (None: forever); None when none
        came."""
        if self._records:
            return self._records.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._parse()
            if self._records:
                return self._records.popleft()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._fill(left):
                return None

    @_one_thread_at_a_time
    def records(self, timeout: float | None = 0.0) -> list[Record]:
        """Every probe record available now, as next_record() gives them
        (after waiting up to timeout for the first): the fast way to keep up
        with the plugin."""
        first = self.next_record(timeout)
        if first is None:
            return []
        out = [first]
        while True:
            out.extend(self._records)
            self._records.clear()
            if not self._fill(0.0):
                return out
            self._parse()

    @_one_thread_at_a_time
    def stats(self, timeout: float = 10.0) -> Stats:
        """The plugin's counts now (the records before its answer stay queued)."""
        self._send(struct.pack("<I", STATS_MAGIC))
        return Stats(*STATS.unpack(self._special((POINT_STATS,), timeout, "send its counts")[2][:STATS.size]))

    @_one_thread_at_a_time
    def disarm(self, timeout: float = 10.0) -> Stats:
        """Remove the probes; the final counts. Every record sent before
        stays queued for next_record()."""
        self._send(struct.pack("<I", DISARM_MAGIC))
        return Stats(*STATS.unpack(self._special((POINT_STATS,), timeout, "disarm")[2][:STATS.size]))

    def close(self) -> None:
        """Leave: the plugin disarms itself."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
