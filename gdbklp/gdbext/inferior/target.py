"""The guest under gdb, at the lowest level: its memory, its registers, DWARF.

Registers are read from gdb's register cache (frame 0, filled at the stop)
and memory in whole blocks: no gdb frame unwinding or prologue analysis.
"""

import re

import gdb

from gdbklp.abi import ppc
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.events import cache_until
from gdbklp.snapshot import Snapshot

# QEMU's gdbstub reads and writes memory through the MMU of the vCPU that
# gdb last selected with an Hg packet. From gdb 14 on, Inferior.read_memory
# and write_memory select no thread (Hg p1.0: QEMU takes its first vCPU),
# whatever thread is selected in gdb; measured with gdb 16.3, a vCPU in real
# mode then fails kernel reads ("Cannot access memory") in the middle of a
# probe. A value's memory is read and written through the selected thread
# on every gdb, so from gdb 14 (which has Value.bytes and Value.assign)
# memory goes through values; gdb 13's Inferior methods use the selected
# thread themselves.
_THROUGH_VALUES = hasattr(gdb.Value, "bytes") and hasattr(gdb.Value, "assign")


@cache_until("objfile")
def _byte_array(length: int) -> gdb.Type:
    return gdb.lookup_type("unsigned char").array(length - 1)


def _memory_value(address: int, length: int) -> gdb.Value:
    array = _byte_array(length)
    return gdb.Value(address).cast(array.pointer()).dereference()


# a value bigger than gdb's max-value-size (64 KiB by default) is refused:
# longer reads (the out-of-line stub areas, say) go in pieces
VALUE_CHUNK = 32 * 1024


_snapshot: Snapshot | None = None


class reading_from:  # noqa: N801 (a context manager, used as a function)
    """Serve read_memory() and register() from snapshot inside this block.
    A class, not a generator: record mode enters it once or twice per
    record, tens of thousands of times a second."""

    __slots__ = ("snapshot", "outer")

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot

    def __enter__(self) -> Snapshot:
        global _snapshot
        self.outer, _snapshot = _snapshot, self.snapshot
        return self.snapshot

    def __exit__(self, *exc) -> None:
        global _snapshot
        _snapshot = self.outer


def reading_a_recording() -> bool:
    """Whether reads come from a recorded snapshot (the guest may be running:
    nothing can be read from it now)."""
    return _snapshot is not None


def recorded_vcpu() -> int | None:
    """The vCPU of the recording in force, if any."""
    return _snapshot.vcpu if _snapshot is not None else None


def read_memory(address: int, length: int) -> bytes:
    """Guest memory, read through the selected vCPU's MMU context (or from
    the snapshot in force)."""
    if length <= 0:  # gdb 16's Inferior.read_memory refuses a zero count
        return b""
    if _snapshot is not None:
        return _snapshot.read(address, length)
    if _THROUGH_VALUES:
        return b"".join(_memory_value(start, min(VALUE_CHUNK, address + length - start)).bytes
                        for start in range(address, address + length, VALUE_CHUNK))
    return gdb.selected_inferior().read_memory(address, length).tobytes()


def write_memory(address: int, data: bytes) -> None:
    """Write guest memory through the selected vCPU's MMU context."""
    if _THROUGH_VALUES and data:
        _memory_value(address, len(data)).assign(gdb.Value(data, _byte_array(len(data))))
    else:
        gdb.selected_inferior().write_memory(address, data)


def read_u64(address: int) -> int:
    return int.from_bytes(read_memory(address, 8), "little")


def register(name: str) -> int:
    """A register of the selected frame (frame 0 at a stop or after a thread switch).

    Evaluated as $name, not through gdb.selected_frame(): making a gdb.Frame
    computes the frame's id, which runs gdb's sniffers and prologue analysis
    (about 20 four-byte reads of the function's code per stop); $name comes
    from the register cache gdb filled at the stop.
    """
    if _snapshot is not None:
        return _snapshot.register(name)
    return int(gdb.parse_and_eval(f"${name}")) & ppc.MASK64


def set_register(name: str, value: int) -> None:
    """Write a register of the selected vCPU."""
    gdb.parse_and_eval(f"${name} = {value:#x}")


def require_target() -> None:
    if gdb.selected_thread() is None:
        raise GdbklpError("no target: connect to the guest's gdbstub first "
                          "(target remote 127.0.0.1:PORT)")


def qemu_version() -> tuple[int, ...] | None:
    """The version of the QEMU whose gdbstub gdb is connected to, asked from
    its monitor (`monitor info version`); None for a target that is not QEMU."""
    return _qemu_version(gdb.selected_inferior().connection_num)


@cache_until("objfile")
def _qemu_version(connection: int | None) -> tuple[int, ...] | None:
    try:
        text = gdb.execute("monitor info version", to_string=True)
    except gdb.error:
        return None
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g or 0) for g in match.groups()) if match else None


def has_dwarf_type(name: str) -> bool:
    try:
        gdb.lookup_type(name)
        return True
    except gdb.error:
        return False


def _dwarf_value(expression: str) -> int | None:
    try:
        return int(gdb.parse_and_eval(expression))
    except gdb.error:
        return None


@cache_until("objfile")
def dwarf_offset(type_name: str, member: str) -> int | None:
    """A member's offset in a type, from DWARF (None without it)."""
    return _dwarf_value(f"(unsigned long)&(({type_name} *)0)->{member}")


@cache_until("objfile")
def dwarf_size(type_name: str, member: str) -> int | None:
    """A member's size in bytes, from DWARF (None without it)."""
    return _dwarf_value(f"sizeof((({type_name} *)0)->{member})")


@cache_until("objfile")
def dwarf_address(symbol: str) -> int | None:
    """A kernel variable's address, from DWARF (None without it)."""
    return _dwarf_value(f"(unsigned long)&{symbol}")


def kernel_list(head, type_name: str, member: str, limit: int = 10000):
    """Entries of a kernel list_head list (container_of each node), as gdb.Values."""
    head = gdb.parse_and_eval(head) if isinstance(head, str) else head
    ptr = gdb.lookup_type(type_name).pointer()
    offset = dwarf_offset(type_name, member)
    node = head["next"]
    for _ in range(limit):
        if int(node) == int(head):
            return
        yield gdb.Value(int(node) - offset).cast(ptr).dereference()
        node = node["next"]
