"""Verdicts known from a record's raw bytes (pure Python, no gdb).

Record mode's VerdictMemo (gdbklp.snapshot) spares a repeated redirection
its check, but the record still has to be decoded, handed to gdb's thread
and walked through the memo: at a hot function's 100,000 calls a second
that is most of the watch's work. A RecordSieve lets the recorder's reading
thread recognise such a record before it decodes it.

What it compares is exactly what the memo compares, taken from the raw
record: the vCPU, the key (MemoKey) and every value the check read through
the snapshot (the memo's trace), plus every read's result (address,
length, status), so that the same bytes sit at the same offsets and each
traced access finds the same recorded block. Two records equal on those
bytes get the same verdict from the check, for the reason the memo's do.
"""

import operator
import struct
import threading
from dataclasses import dataclass

SEQ = struct.Struct("<Q")
SEQ_OFFSET = 16  # in a record's header: u32 magic, point_id, vcpu, size, then u64 seq
VCPU_BYTES = (8, 12)


@dataclass(frozen=True)
class MemoKey:
    """The values of a record that make all of a point's state but what the
    checks read through the snapshot (the memo traces that): its vCPU, these
    registers, and these reads (index, and how many of its bytes: None for
    all of them)."""

    registers: tuple[str, ...]
    reads: tuple[tuple[int, int | None], ...]

    def of(self, record) -> tuple:
        """The key of record (a failed read stays None in it)."""
        registers, reads = record.registers, record.reads
        key = [record.vcpu]
        key += [registers[name] for name in self.registers]
        for index, prefix in self.reads:
            address, data = reads[index]
            key.append((address, data if prefix is None or data is None else data[:prefix]))
        return tuple(key)


class RecordSieve:
    """For one probe point: the verdicts learnt from checked records, by the
    bytes of their raw records that decided them. Called by the reading
    thread (sieve(raw): the verdict, or None); taught and cleared by gdb's.

    Valid as long as the VerdictMemo it follows: forget() with it, and
    forget_at() as a sieve of the points where what the checks consult
    changes (a module-list change), so that the reading thread stops
    recognising records from the one after such a change on, before gdb's
    thread has caught up with it."""

    def __init__(self, layout, key: MemoKey, constant: tuple[str, ...] = (), limit: int = 4096,
                 shapes_limit: int = 8):
        self.layout = layout  # gdbklp.recorder's, of the point's records
        self.key = key
        self.constant = constant  # registers the decoder sets, the same in every record (pc: the point)
        self.limit = limit  # verdicts kept
        self.shapes_limit = shapes_limit  # sets of offsets tried per record
        # ((offsets, getter, {bytes: verdict}), ...): the reading thread iterates it, so
        # a new shape replaces the tuple (a new verdict goes into its dict in place)
        self.shapes: tuple = ()
        self.size = 0
        self.forgotten_before = 0  # learn nothing from a record older than this seq
        self.lock = threading.Lock()

    def __call__(self, raw: bytes):
        for _, getter, verdicts in self.shapes:
            verdict = verdicts.get(getter(raw))
            if verdict is not None:
                return verdict
        return None

    def learn(self, record, trace: list[tuple[tuple, object]], verdict) -> bool:
        """Keep verdict for records that agree with record (decoded with its
        raw bytes) on its key and on the values of trace, the reads its check
        made of the recording; whether it was kept."""
        offsets = self.offsets(record, trace)
        if offsets is None:
            return False
        with self.lock:
            if record.seq < self.forgotten_before or self.size >= self.limit:
                return False
            shape = next((s for s in self.shapes if s[0] == offsets), None)
            if shape is None:
                if len(self.shapes) >= self.shapes_limit:
                    return False
                shape = (offsets, operator.itemgetter(*(slice(a, b) for a, b in offsets)), {})
                self.shapes += (shape,)
            shape[2][shape[1](record.raw)] = verdict
            self.size += 1
        return True

    def forget(self, before_seq: int = 0) -> None:
        """Drop every verdict, and learn none from a record older than before_seq."""
        with self.lock:
            self.shapes = ()
            self.size = 0
            self.forgotten_before = max(self.forgotten_before, before_seq)

    def forget_at(self, raw: bytes) -> None:
        """The sieve of a point where what the checks consult changes: forget
        from that record on; it is decoded as usual."""
        self.forget(SEQ.unpack_from(raw, SEQ_OFFSET)[0])

    def offsets(self, record, trace) -> tuple[tuple[int, int], ...] | None:
        """The (start, end) byte ranges of a raw record that decide its verdict,
        in record's layout; None if a key read failed, or a traced access
        reads what no recorded block holds."""
        layout, reads = self.layout, record.reads
        ranges = [VCPU_BYTES, layout.results_bytes()]
        ranges += [layout.register_bytes(name) for name in self.key.registers]
        for index, prefix in self.key.reads:
            data = reads[index][1]
            if data is None:
                return None
            start = layout.data_start(index)
            ranges.append((start, start + (len(data) if prefix is None else min(prefix, len(data)))))
        for access, _ in trace:
            if access[0] == "r":
                if access[1] not in self.constant:
                    if access[1] not in layout.names:
                        return None
                    ranges.append(layout.register_bytes(access[1]))
                continue
            _, address, length = access
            # every block that holds it: the snapshot takes one, the same one
            # for every record with these results
            holders = [(layout.data_start(i) + address - start, length) for i, (start, data) in enumerate(reads)
                       if data is not None and start <= address and address + length <= start + len(data)]
            if not holders:
                return None
            ranges += [(offset, offset + length) for offset, length in holders]
        return tuple(dict.fromkeys(ranges))
