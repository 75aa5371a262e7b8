"""Walk a ppc64le (ELFv2) Linux kernel stack through live-patch trampolines.

Frame header: 0(r1) back chain, 8 CR save, 16 LR save, 24 TOC save. A
function stores its return address in its caller's header (16 bytes above
the caller's r1), so the header of frame N holds the address at which frame
N's function resumes. Interrupt frames carry the "REGS" marker and a pt_regs
at offsets the kernel's system call entry shows (decode_interrupt_frame;
96 and 112 before 6.2, 32 and 48 since); one from user space (MSR_PR in its
msr) is the task's kernel entry, and the walk ends there with the user pc
and sp.

When C was entered from livepatch_handler, the LR slot of A's frame holds
the handler's return point, not an address in A: A's real return address is
on the task's livepatch stack. The walk replaces each such trampoline frame
by A, pairing them with livepatch-stack entries from the top down.

In an ftrace trampoline (ftrace_caller), entered at B's first instructions
before B has a frame, the return address into A is in r0 or ftrace's own
frame, wherever the trampoline's code has put it by then
(gdbklp.abi.ftrace.decode_traced_calls): the walk shows B and A from there.

The walk never raises: a loop, a misaligned or out-of-stack pointer, or
unreadable memory ends it with a reason. It reads each frame header (with the
interrupt marker) in one block and no other stack memory, except pt_regs and
ftrace's slots.
"""

import struct
from dataclasses import dataclass, field
from typing import Callable

from gdbklp.abi import ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.ftrace import TracedCallState
from gdbklp.abi.kernel import InterruptFrameLayout, KernelView
from gdbklp.abi.livepatch import LivepatchEntry

HEADER_BYTES = 32              # STACK_FRAME_MIN_SIZE (ELFv2): back chain, CR, LR and TOC save
HEADER_AND_MARKER_BYTES = 104  # the header block up to the end of the marker before 6.2 (at 96)
REGS_MARKER = 0x53474552       # STACK_FRAME_REGS_MARKER, little-endian: "REGS"
PT_REGS_BYTES = 8 * 37         # gpr[32], nip, msr, orig_gpr3, ctr, link
MAX_FRAMES = 256
SCAN_INSNS = 128               # how far into the system call entry its frame setup is looked for


Reader = Callable[[int, int], bytes]


@dataclass
class Frame:
    index: int
    kind: str          # current | lr | caller | trampoline | livepatch-caller | interrupt | traced
    sp: int
    pc: int
    function: str
    lr_save: int | None = None
    toc_save: int | None = None     # the TOC save slot's value, where it holds a TOC (else None)
    toc_owner: str | None = None
    toc_slot_unused: bool = False   # the slot holds no TOC: the frame never wrote one
    call_site: str | None = None    # class of the call before pc (return addresses only)
    toc: int | None = None          # r2 the frame resumes with, where known
    notes: list[str] = field(default_factory=list)


END_OF_CHAIN = "end of the back chain"
FROM_USER = "entered from user space"


def from_user(pc: int, sp: int) -> str:
    """The end of a walk at the task's kernel entry: the user context it came from."""
    return f"{FROM_USER} (user pc {pc:#x}, sp {sp:#x})"


@dataclass
class Walk:
    frames: list[Frame]
    end: str
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Did the walk reach the top of the task's stack (every frame seen)?"""
        return self.end == END_OF_CHAIN or self.end.startswith(FROM_USER)


@dataclass(frozen=True)
class Registers:
    pc: int
    sp: int
    lr: int | None = None
    toc: int | None = None
    r0: int | None = None   # RA at ftrace_caller's entry


def u64(data: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", data, offset)[0]


def decode_interrupt_frame(code: bytes, address: int, system_call_exception: int) -> InterruptFrameLayout:
    """The interrupt frame layout, from the system call entry (system_call_common)
    up to its call of system_call_exception(regs, r0): r3 then points at the
    pt_regs (`addi r3,r1,REGS`), and the marker was stored r1-relative, or
    relative to a register set from r1, from a register loaded with
    STACK_FRAME_REGS_MARKER (lis/ori). Raises ValueError naming what is missing."""
    from_r1: dict[int, int] = {}   # register -> its value minus r1
    constant: dict[int, int] = {}  # register -> the constant lis/ori/li built in it
    marker = None
    for i, word in enumerate(ppc.words(code[:4 * SCAN_INSNS])):
        at = address + 4 * i
        # a local call enters after the callee's global entry (its two TOC instructions)
        if ppc.is_bl(word) and ppc.branch_target(word, at) in (system_call_exception, system_call_exception + 8):
            if 3 not in from_r1 or marker is None:
                raise ValueError(f"system_call_common ({address:#x}) calls system_call_exception at {at:#x} "
                                 "without a pt_regs pointer from r1 in r3 and a REGS marker stored")
            return InterruptFrameLayout(marker_offset=marker, regs_offset=from_r1[3])
        if ppc.is_addi(word) or ppc.is_addis(word) or ppc.is_ori(word) or ppc.is_mr(word):
            track_register(word, from_r1, constant)
        elif ppc.is_std(word) and not ppc.is_stdu(word):
            store = ppc.dsform(word)
            if constant.get(store.rs) == REGS_MARKER and store.ra in from_r1:
                marker = from_r1[store.ra] + store.disp
        elif ppc.is_ld(word) or ppc.is_load_and_zero(word):
            load = ppc.dsform(word) if ppc.is_ld(word) else ppc.dform(word)
            from_r1.pop(load.rt, None), constant.pop(load.rt, None)
            if load.rt == 1:
                from_r1 = {1: 0}  # the kernel stack pointer is loaded: offsets count from here
    raise ValueError(f"no call of system_call_exception within {SCAN_INSNS} instructions of "
                     f"system_call_common ({address:#x})")


def track_register(word: int, from_r1: dict[int, int], constant: dict[int, int]) -> None:
    """addi/addis/ori/mr: a register's offset from r1, or the constant built in it."""
    if ppc.is_mr(word):
        mr = ppc.xform(word)
        dest, source, add = mr.ra, mr.rs, 0
    elif ppc.is_ori(word):
        d = ppc.dform(word)
        dest, source = d.ra, d.rt
        value = constant.get(source)
        from_r1.pop(dest, None), constant.pop(dest, None)
        if value is not None:
            constant[dest] = value | ppc.or_immediate(word)
        return
    else:
        d = ppc.dform(word)
        dest, source, add = d.rt, d.ra, ppc.add_immediate(word)
    literal_zero = source == 0 and not ppc.is_mr(word)  # addi/addis with rA 0: li/lis
    offset = None if literal_zero else from_r1.get(source)
    value = 0 if literal_zero else constant.get(source)
    from_r1.pop(dest, None), constant.pop(dest, None)
    if offset is not None:
        from_r1[dest] = offset + add
    elif value is not None:
        constant[dest] = (value + add) & ppc.MASK64


@dataclass(frozen=True)
class TracedCall:
    """A traced call seen from inside an ftrace trampoline: A's stack pointer,
    (RA, where it was read), and (the site in B, where) if it is known."""

    a_sp: int
    ra: tuple[int, str]
    site: tuple[int, str] | None


def traced_call(state: TracedCallState, sp: int, registers: dict, read: Reader) -> TracedCall | str:
    """Where the trampoline keeps the traced call at state, read from the
    registers known (name -> value or None) and memory; or why RA is not known.
    Every place that holds RA must agree (a tracer may have changed one: the
    graph tracer's return_to_handler), or RA is not given."""
    a_sp = (sp - state.frame) & ppc.MASK64
    ra = _agreed(state.ra_registers, state.ra_slots, a_sp, registers, read)
    if isinstance(ra, str):
        return f"the return address into the traced function's caller {ra}"
    site = _agreed(state.site_registers, state.site_slots, a_sp, registers, read)
    return TracedCall(a_sp, ra, None if isinstance(site, str) else site)


def _agreed(names, slots, a_sp: int, registers: dict, read: Reader) -> tuple[int, str] | str:
    """(value, where) of what the registers and A-relative slots all hold, or why there is none."""
    found = [(registers[r], r) for r in names if registers.get(r) is not None]
    for offset in slots:
        try:
            found.append((u64(read(a_sp + offset, 8), 0), f"the trampoline's frame at {a_sp + offset:#x}"))
        except Exception as e:
            return f"is unreadable at {a_sp + offset:#x}: {e}"
    if not found:
        return "is in no register or slot known here"
    if len({v for v, _ in found}) > 1:
        return "differs between " + ", ".join(f"{where} ({v:#x})" for v, where in found)
    return found[0]


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
        layout = view.interrupt_frame
        self.block = max(HEADER_BYTES, layout.marker_offset + 8) if layout else HEADER_BYTES

    def add(self, kind: str, sp: int, pc: int, header: bytes | None = None, toc=None, note=None) -> Frame:
        f = Frame(len(self.frames), kind, sp, pc, self.view.describe(pc), toc=toc)
        if kind != "current" and kind != "interrupt":
            f.call_site = self.call_site(pc)
        if header is not None:
            f.lr_save = u64(header, 16)
            self.toc_slot(f, u64(header, ppc.TOC_SAVE_SLOT))
        if note:
            f.notes.append(note)
        self.frames.append(f)
        return f

    def toc_slot(self, f: Frame, value: int) -> None:
        """The frame's TOC save slot: a TOC, or a slot its calls never wrote (see KernelView.is_toc_slot)."""
        site = CallSite(f.call_site) if f.call_site else CallSite.NOT_A_CALL
        if self.view.is_toc_slot(value, site):
            f.toc_save, f.toc_owner = value, self.view.toc_owner(value)
        else:
            f.toc_slot_unused = True

    def call_site(self, ra: int) -> str:
        return self.view.call_site(self.read, ra).value

    def header(self, sp: int) -> bytes | str:
        """The header block at sp (with the interrupt marker where the stack has
        room for it: the top frame may be a minimal one), or why it cannot be used."""
        if sp % 16:
            return f"misaligned stack pointer {sp:#x}"
        if not (self.base <= sp and sp + HEADER_BYTES <= self.top):
            return f"stack pointer {sp:#x} outside the task's stack [{self.base:#x}, {self.top:#x})"
        length = min(self.block, self.top - sp)
        try:
            data = self.read(sp, length)
        except Exception as e:
            return f"cannot read the frame at {sp:#x}: {e}"
        return data if len(data) == length else f"short read at {sp:#x}"

    def is_interrupt_frame(self, header: bytes) -> bool:
        layout = self.view.interrupt_frame
        return (layout is not None and len(header) >= layout.marker_offset + 8
                and u64(header, layout.marker_offset) == REGS_MARKER)

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
        header = self.header(regs.sp)
        self.add("current", regs.sp, regs.pc, header if isinstance(header, bytes) else None, toc=regs.toc)
        if isinstance(header, bytes) and self.is_interrupt_frame(header):
            # stopped in interrupt entry or exit code, which runs on the interrupt frame itself
            interrupted = self.interrupt(regs.sp)
            if isinstance(interrupted, str):
                return self.end(interrupted)
            regs = interrupted
        resumed = self.resume(regs)
        if isinstance(resumed, str):
            return self.end(resumed)
        sp, header, pc, lr = resumed
        seen = set()
        while len(self.frames) < MAX_FRAMES:
            if isinstance(header, str):
                return self.end(header)
            back = u64(header, 0)
            if back == 0:
                return self.end(END_OF_CHAIN)
            if back <= sp or back in seen:
                return self.end(self.loop(sp, back))
            seen.add(back)
            next_header = self.header(back)
            if isinstance(next_header, str):
                return self.end(next_header)
            if self.is_interrupt_frame(next_header):
                interrupted = self.interrupt(back)
                if isinstance(interrupted, str):
                    return self.end(interrupted)
                resumed = self.resume(interrupted)
                if isinstance(resumed, str):
                    return self.end(resumed)
                sp, header, pc, lr = resumed
                continue
            ip = u64(next_header, 16)
            if lr is not None:
                self.lr_frame(sp, pc, lr, ip, header)
            self.frame("caller", back, ip, next_header)
            sp, header, pc, lr = back, next_header, ip, None
        return self.end(f"more than {MAX_FRAMES} frames")

    def loop(self, sp: int, back: int) -> str:
        why = f"back chain at {sp:#x} does not rise ({back:#x}): loop"
        if self.view.interrupt_frame is None and self.view.interrupt_frame_problem:
            why += f" (interrupt frames not recognised: {self.view.interrupt_frame_problem})"
        return why

    def resume(self, regs: Registers) -> tuple[int, bytes | str, int, int | None] | str:
        """Where the walk goes on from a context (the stop's, or an interrupted
        one): (sp, header, pc, lr); inside an ftrace trampoline, from A, after
        B and A are shown; or why it cannot go on."""
        state = self.view.traced_calls.at(regs.pc) if self.view.traced_calls else None
        if state is None:
            return regs.sp, self.header(regs.sp), regs.pc, regs.lr
        if isinstance(state, str):
            return state
        return self.traced_call(regs, state)

    def traced_call(self, regs: Registers, state: TracedCallState) -> tuple[int, bytes | str, int, None] | str:
        """B (the traced function) and A (its caller) from where the ftrace trampoline keeps them."""
        found = traced_call(state, regs.sp, {"r0": regs.r0, "lr": regs.lr}, self.read)
        if isinstance(found, str):
            return f"{state.trampoline} at {regs.pc:#x}: {found}"
        if found.site is not None:
            self.add("traced", found.a_sp, found.site[0], note=f"traced function: {state.trampoline} called "
                                                              f"from its entry (the site from {found.site[1]})")
        header = self.header(found.a_sp)
        self.add("caller", found.a_sp, found.ra[0], header if isinstance(header, bytes) else None,
                 note=f"caller of the traced function: return address from {found.ra[1]}")
        return found.a_sp, header, found.ra[0], None

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
        """The interrupt frame at sp: record it; the interrupted context, or the
        end of the walk (entered from user space, or why to stop)."""
        where = sp + self.view.interrupt_frame.regs_offset
        try:
            regs = self.read(where, PT_REGS_BYTES)
        except Exception as e:
            return f"cannot read pt_regs at {where:#x}: {e}"
        gpr0, gpr1, toc, nip, msr, link = (u64(regs, off) for off in (0, 8, 16, 256, 264, 288))
        user = bool(msr & ppc.MSR_PR)
        f = Frame(len(self.frames), "interrupt", sp, nip,
                  f"user {nip:#x}" if user else self.view.describe(nip), toc=toc)
        f.notes.append(f"interrupt frame: pt_regs at {where:#x}, msr {msr:#x}, lr {link:#x}, r1 {gpr1:#x}")
        self.frames.append(f)
        if user:
            return from_user(nip, gpr1)
        return Registers(pc=nip, sp=gpr1, lr=link, toc=toc, r0=gpr0)

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
