"""The guest's state at one moment, recorded outside gdb (pure Python, no gdb).

The recorder plugin records registers and memory blocks at a probe point;
while a Snapshot is in force (gdbklp.gdbext.inferior.target.reading_from),
the checks that run at a stop run unchanged on the recording, and a read
the recording does not hold fails loudly instead of reading the live guest.
"""

import bisect

from gdbklp.errors import GdbklpError


class NotRecorded(GdbklpError):
    """A check read guest state its recording does not hold."""


class Snapshot:
    """Some registers and some blocks of memory, as recorded at one moment;
    code, which does not change with the moment, from code (a reader that
    raises NotRecorded for what it does not hold)."""

    def __init__(self, registers: dict[str, int], blocks: list[tuple[int, bytes]], code=None):
        self.registers = registers
        self.blocks = sorted(blocks)
        self.starts = [start for start, _ in self.blocks]
        self.code = code

    def read(self, address: int, length: int) -> bytes:
        i = bisect.bisect_right(self.starts, address) - 1
        while i >= 0:
            start, data = self.blocks[i]
            if address + length <= start + len(data):
                return data[address - start:address - start + length]
            i -= 1
        if self.code is not None:
            return self.code(address, length)
        raise NotRecorded(f"{length} bytes at {address:#x} were not recorded")

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
