"""The guest's state at one moment, recorded outside gdb (pure Python, no gdb).

The recorder plugin records registers and memory blocks at a probe point;
while a Snapshot is in force (gdbklp.gdbext.inferior.target.reading_from),
the checks that run at a stop run unchanged on the recording, and a read
the recording does not hold fails loudly instead of reading the live guest.
"""

import bisect
import operator

from gdbklp.errors import GdbklpError


class NotRecorded(GdbklpError):
    """A check read guest state its recording does not hold."""


class Snapshot:
    """Some registers and some blocks of memory, as recorded at one moment;
    code, which does not change with the moment, from code (a reader that
    raises NotRecorded for what it does not hold)."""

    def __init__(self, registers: dict[str, int], blocks: list[tuple[int, bytes]], code=None,
                 vcpu: int | None = None):
        self.registers = registers
        self.vcpu = vcpu  # the vCPU it was recorded on
        # by start alone, the order recorded kept among equal starts: which block
        # a read takes follows from the blocks' places, never from their bytes
        # (RecordSieve relies on it)
        self.blocks = sorted(blocks, key=operator.itemgetter(0))
        self.starts = [start for start, _ in self.blocks]
        self.code = code

    def read(self, address: int, length: int) -> bytes:
        data = self.recorded(address, length)
        return data if data is not None else self.unrecorded(address, length)

    def unrecorded(self, address: int, length: int) -> bytes:
        """What no recorded block holds: from the code, or NotRecorded."""
        if self.code is not None:
            return self.code(address, length)
        raise NotRecorded(f"{length} bytes at {address:#x} were not recorded")

    def recorded(self, address: int, length: int) -> bytes | None:
        """The bytes if one recorded block holds them all, else None."""
        i = bisect.bisect_right(self.starts, address) - 1
        while i >= 0:
            start, data = self.blocks[i]
            if address + length <= start + len(data):
                return data[address - start:address - start + length]
            i -= 1
        return None

    def register(self, name: str) -> int:
        if name not in self.registers:
            raise NotRecorded(f"register {name} was not recorded")
        return self.registers[name]


class CodeImage:
    """The kernel's code: pieces of text (address, bytes) held in memory, and
    a reader for the rest (vmlinux's file), which may raise."""

    def __init__(self, pieces: list[tuple[int, bytes]], rest=None):
        self.pieces = Snapshot({}, pieces)
        self.rest = rest

    def read(self, address: int, length: int) -> bytes:
        try:
            return self.pieces.read(address, length)
        except NotRecorded:
            if self.rest is None:
                raise
        try:
            return self.rest(address, length)
        except GdbklpError:
            raise NotRecorded(f"no code of the kernel holds {length} bytes at {address:#x}") from None


class TracingSnapshot:
    """A Snapshot that logs every read a check makes of the recording, in
    order: ((kind, what), value) with kind "r" (a register) or "m" (memory).
    Reads of the code are not logged: the code stays while a VerdictMemo
    stays valid, so what such a read gives follows from its address."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self.vcpu = snapshot.vcpu
        self.trace: list[tuple[tuple, object]] = []

    def read(self, address: int, length: int) -> bytes:
        data = self.snapshot.recorded(address, length)
        if data is None:
            return self.snapshot.unrecorded(address, length)
        self.trace.append((("m", address, length), data))
        return data

    def register(self, name: str) -> int:
        value = self.snapshot.register(name)
        self.trace.append((("r", name), value))
        return value


class VerdictMemo:
    """The verdicts of a check that is a function of its state and of what it
    reads: a tree per state whose nodes are the check's reads, in order, and
    whose branches are the values they gave. A new snapshot walks the tree,
    making the same reads: where every value matches a path, the check would
    read and decide exactly as it did then; elsewhere it must run.

    Valid only while whatever else the check consults does not change: the
    caller clears it when that does (a new code image, a new module list).
    """

    def __init__(self, limit: int = 4096):
        self.roots: dict = {}
        self.limit = limit  # states kept: varied states are not worth the memory
        self.hits = 0

    def clear(self) -> None:
        self.roots.clear()

    def verdict(self, state, snapshot: Snapshot):
        """The verdict stored for state on a path snapshot follows, or None."""
        node = self.roots.get(state)
        registers, recorded = snapshot.registers, snapshot.recorded
        while type(node) is tuple:  # the same reads again, in the same order
            access, branches = node
            value = registers.get(access[1]) if access[0] == "r" else recorded(access[1], access[2])
            node = branches.get(value)  # None (not recorded) is no branch
        if node is not None:
            self.hits += 1
        return node.verdict if node is not None else None

    def store(self, state, trace: list[tuple[tuple, object]], verdict) -> bool:
        """Keep verdict for state and the reads (trace) the check made; whether
        it is kept (not past the limit, nor where the check once read
        differently on the same path: there it is no function of its reads)."""
        if state not in self.roots and len(self.roots) >= self.limit:
            return False
        leaf = _Leaf(verdict)
        if not trace:
            return isinstance(self.roots.setdefault(state, leaf), _Leaf)
        node = self.roots.setdefault(state, (trace[0][0], {}))
        for i, (access, value) in enumerate(trace):
            if not isinstance(node, tuple) or node[0] != access:
                return False
            following = trace[i + 1][0] if i + 1 < len(trace) else None
            nxt = node[1].get(value)
            if nxt is None:
                nxt = node[1][value] = (following, {}) if following is not None else leaf
            node = nxt
        return isinstance(node, _Leaf)


class _Leaf:
    __slots__ = ("verdict",)

    def __init__(self, verdict):
        self.verdict = verdict
