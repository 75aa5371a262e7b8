"""Walk a ppc64le (ELFv2) Linux 6.1 kernel stack through live-patch trampolines.

Frame header: 0(r1) back chain, 8 CR save, 16 LR save, 24 TOC save. A
function stores its return address in its caller's header (16 bytes above
the caller's r1), so the header of frame N holds the address at which frame
N's function resumes. Interrupt frames carry the "REGS" marker at 96(r1) and
a pt_regs at 112(r1).

When C was entered from livepatch_handler, the LR slot of A's frame holds
the handler's return point, not an address in A: A's real return address is
on the task's livepatch stack. The walk replaces each such trampoline frame
by A, pairing them with livepatch-stack entries from the top down.

The walk never raises: a loop, a misaligned or out-of-stack pointer, or
unreadable memory ends it with a reason. It reads each frame header (with the
interrupt marker) in one block and no other stack memory, except pt_regs.
"""

import struct
from dataclasses import dataclass, field
from typing import Callable

from gdbklp.abi import ppc
from gdbklp.abi.kernel import KernelView
from gdbklp.abi.livepatch import LivepatchEntry

HEADER_AND_MARKER_BYTES = 104  # one read per frame: from the back chain to the end of the marker at 96
REGS_MARKER_OFFSET = 96        # STACK_FRAME_MARKER (12 longs)
REGS_MARKER = 0x53474552       # STACK_FRAME_REGS_MARKER, little-endian: "REGS"
PT_REGS_OFFSET = 112           # STACK_FRAME_OVERHEAD
PT_REGS_BYTES = 8 * 37         # gpr[32], nip, msr, orig_gpr3, ctr, link
MAX_FRAMES = 256


Reader = Callable[[int, int], bytes]


@dataclass
class Frame:
    index: int
    kind: str          # current | lr | caller | trampoline | livepatch-caller | interrupt
    sp: int
    pc: int
    function: str
    lr_save: int | None = None
    toc_save: int | None = None
    toc_owner: str | None = None
    call_site: str | None = None    # class of the call before pc (return addresses only)
    toc: int | None = None          # r2 the frame resumes with, where known
    notes: list[str] = field(default_factory=list)


END_OF_CHAIN = "end of the back chain"
FROM_USER = "interrupt from user space (the task's kernel entry)"


@dataclass
class Walk:
    frames: list[Frame]
    end: str
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Did the walk reach the top of the task's stack (every frame seen)?"""
        return self.end in (END_OF_CHAIN, FROM_USER)


@dataclass(frozen=True)
class Registers:
    pc: int
    sp: int
    lr: int | None = None
    toc: int | None = None


def u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


class _Walker:
    def __init__(self, read: Reader, view: KernelView, stack_base: int,
                 livepatch_entries: list[LivepatchEntry]):
        self.read = read
        self.view = view
        self.base = stack_base
        self.top = stack_base + view.thread_size
        self.pending = list(livepatch_entries)  # consumed from the end (the newest entry)
        self.frames: list[Frame] = []
        self.problems: list[str] = []

    def add(self, kind: str, sp: int, pc: int, header: bytes | None = None, toc=None, note=None) -> Frame:
        f = Frame(len(self.frames), kind, sp, pc, self.view.describe(pc), toc=toc)
        if header is not None:
            f.lr_save = u64(header, 16)
            f.toc_save = u64(header, 24)
            f.toc_owner = self.view.toc_owner(f.toc_save)
        if kind != "current" and kind != "interrupt":
            f.call_site = self.call_site(pc)
        if note:
            f.notes.append(note)
        self.frames.append(f)
        return f

    def call_site(self, ra: int) -> str:
        return self.view.call_site(self.read, ra).value

    def header(self, sp: int) -> bytes | str:
        """The header block at sp, or the reason it cannot be used."""
        if sp % 16:
            return f"misaligned stack pointer {sp:#x}"
        if not (self.base <= sp and sp + HEADER_AND_MARKER_BYTES <= self.top):
            return f"stack pointer {sp:#x} outside the task's stack [{self.base:#x}, {self.top:#x})"
        try:
            data = self.read(sp, HEADER_AND_MARKER_BYTES)
        except Exception as e:
            return f"cannot read the frame at {sp:#x}: {e}"
        return data if len(data) == HEADER_AND_MARKER_BYTES else f"short read at {sp:#x}"

    def trampoline(self, sp: int, pc: int, header: bytes | None) -> None:
        """A return into livepatch_handler: show it, then A from the livepatch stack.

        The handler has no frame: the header at sp is A's (its TOC slot is
        where a global caller's stub saved A's TOC).
        """
        self.add("trampoline", sp, pc, None, note="livepatch_handler: C returns here")
        if not self.pending:
            self.problems.append(f"frame at {sp:#x} returns into livepatch_handler but the "
                                 "livepatch stack has no entry left for it")
            return
        entry = self.pending.pop()
        self.add("livepatch-caller", sp, entry.ra, header, toc=entry.toc,
                 note=f"return address from the livepatch stack entry at {entry.address:#x}")

    def frame(self, kind: str, sp: int, pc: int, header: bytes) -> None:
        if self.view.is_livepatch_return(pc):
            self.trampoline(sp, pc, header)
        elif self.view.klp_return_helper is not None and pc == self.view.klp_return_helper:
            # the 2015 RFC's mini frame: C returns through KLP_return_helper, which
            # pops 32 bytes and returns to the RA kept in A's LR slot
            self.add("rfc-mini-frame", sp, pc, header,
                     note="RFC mini frame: KLP_return_helper in an LR slot; A's RA is in the next frame's LR slot")
        else:
            self.add(kind, sp, pc, header)

    def walk(self, regs: Registers) -> Walk:
        sp, pc, lr = regs.sp, regs.pc, regs.lr
        header = self.header(sp)
        self.add("current", sp, pc, header if isinstance(header, bytes) else None, toc=regs.toc)
        seen = set()
        while len(self.frames) < MAX_FRAMES:
            if isinstance(header, str):
                return self.end(header)
            back = u64(header, 0)
            if back == 0:
                return self.end(END_OF_CHAIN)
            if back <= sp or back in seen:
                return self.end(f"back chain at {sp:#x} does not rise ({back:#x}): loop")
            seen.add(back)
            next_header = self.header(back)
            if isinstance(next_header, str):
                return self.end(next_header)
            if u64(next_header, REGS_MARKER_OFFSET) == REGS_MARKER:
                resumed = self.interrupt(back)
                if isinstance(resumed, str):
                    return self.end(resumed)
                sp, pc, lr = resumed.sp, resumed.pc, resumed.lr
                header = self.header(sp)
                continue
            ip = u64(next_header, 16)
            if lr is not None:
                self.lr_frame(sp, pc, lr, ip, header)
            self.frame("caller", back, ip, next_header)
            sp, header, pc, lr = back, next_header, ip, None
        return self.end(f"more than {MAX_FRAMES} frames")

    def lr_frame(self, sp: int, pc: int, lr: int, next_ip: int, header: bytes) -> None:
        """The innermost function may not have saved LR yet: then its return
        address is only in the LR register (at C's entry: livepatch_handler)."""
        if lr == next_ip or self.view.function(lr) == self.view.function(pc):
            return
        if self.view.is_livepatch_return(lr):
            self.trampoline(sp, lr, header)
        elif self.view.object_at(lr):
            self.add("lr", sp, lr, note="return address still in the LR register")

    def interrupt(self, sp: int) -> Registers | str:
        """The interrupt frame at sp: record it; the interrupted context, or why to stop."""
        try:
            regs = self.read(sp + PT_REGS_OFFSET, PT_REGS_BYTES)
        except Exception as e:
            return f"cannot read pt_regs at {sp + PT_REGS_OFFSET:#x}: {e}"
        gpr1, toc, nip, msr, link = (u64(regs, off) for off in (8, 16, 256, 264, 288))
        user = bool(msr & ppc.MSR_PR)
        f = Frame(len(self.frames), "interrupt", sp, nip,
                  f"user {nip:#x}" if user else self.view.describe(nip), toc=toc)
        f.notes.append(f"interrupt frame: pt_regs at {sp + PT_REGS_OFFSET:#x}, msr {msr:#x}, "
                       f"lr {link:#x}, r1 {gpr1:#x}")
        self.frames.append(f)
        if user:
            return FROM_USER
        return Registers(pc=nip, sp=gpr1, lr=link, toc=toc)

    def end(self, reason: str) -> Walk:
        if self.pending:
            self.problems.append(f"{len(self.pending)} livepatch stack entries not matched by a "
                                 "trampoline frame on the stack")
        return Walk(self.frames, reason, self.problems)


def walk_stack(regs: Registers, read: Reader, view: KernelView, stack_base: int,
               livepatch_entries: list[LivepatchEntry] = ()) -> Walk:
    """Frames of one task's kernel stack, innermost first.

    regs: the task's pc, r1 (and lr, r2 if it is running); read(address,
    length): target memory; stack_base: the lowest address of the task's
    kernel stack; livepatch_entries: its livepatch stack, oldest first.
    """
    try:
        return _Walker(read, view, stack_base, list(livepatch_entries)).walk(regs)
    except Exception as e:  # the walk never throws; a bug here ends it with the reason
        return Walk([], f"internal error: {type(e).__name__}: {e}")


def prefetching_reader(read: Reader, start: int, end: int) -> Reader:
    """read, but [start, end) comes in one read the first time any of it is asked for.

    A stack walk reads one frame header at a time, a packet each over the
    gdbstub; the used part of a stack is a few packets in one read.
    """
    block: list[bytes] = []

    def reader(address: int, length: int) -> bytes:
        if not (start <= address and address + length <= end):
            return read(address, length)
        if not block:
            block.append(read(start, end - start))
        return block[0][address - start:address - start + length]

    return reader
