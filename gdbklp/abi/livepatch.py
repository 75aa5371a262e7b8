"""The merged design's trampoline (livepatch_handler) and its per-task stack.

livepatch_handler pushes [r2, RA, STACK_END_MAGIC] on a stack that grows up
from the bottom of the task's kernel stack (thread_info->livepatch_sp),
branches to C with bctrl, and pops on return. The offsets it uses are read
from its own instructions here, not hard-coded, so a kernel with another
PACA or thread_info layout is decoded correctly or refused with a reason.
"""

from dataclasses import dataclass

from gdbklp.abi import ppc
from gdbklp.errors import GdbklpError


class LayoutError(GdbklpError):
    """The trampoline's code does not have the expected shape; str() says where."""


@dataclass(frozen=True)
class LivepatchHandlerLayout:
    address: int            # livepatch_handler
    paca_thread_info: int   # offset of the thread_info pointer in the PACA (r13)
    ti_livepatch_sp: int    # offset of livepatch_sp in thread_info
    entry_size: int         # bytes pushed per redirection
    toc_slot: int           # offsets from the new livepatch_sp
    ra_slot: int
    magic_slot: int
    magic: int
    call_to_c: int          # address of the bctrl that enters C (P1's branch)
    pushed_before_call: bool = True  # livepatch_sp is stored back before the bctrl
    # where the handler takes RA and C from at its entry: LR and CTR up to 6.12,
    # r0 and LR with out-of-line ftrace stubs (what ftrace_caller must leave there)
    ra_register: str = "lr"
    c_register: str = "ctr"

    @property
    def return_point(self) -> int:
        """P3: where C returns to inside the handler."""
        return self.call_to_c + 4


def paca_load_target(word: int, paca_offset: int) -> int | None:
    """rT if word is `ld rT, paca_offset(r13)` (what the handler does first at
    P3: fetch thread_info from the PACA again), else None."""
    if not ppc.is_ld(word, ra=13, disp=paca_offset):
        return None
    rt = ppc.dsform(word).rt
    return rt if rt != 13 else None


def decode_livepatch_handler(code: bytes, address: int, max_insns: int = 24) -> LivepatchHandlerLayout:
    """Decode the push half of livepatch_handler from its code bytes.

    Registers are followed in program order: what a register holds when it
    is stored decides which slot the store fills: r2's entry value the TOC
    slot, another register's entry value (LR through mflr, or r0) the RA
    slot, a constant from lis/ori the magic. C is what CTR holds at the
    bctrl (its entry value, or LR's moved there with mflr/mtctr).
    """
    insns = ppc.words(code)[:max_insns]
    push = _Push()
    for i, word in enumerate(insns):
        if word == ppc.BCTRL:
            return push.layout(address, address + 4 * i, insns[i + 1:])
        push.step(word)
    raise LayoutError(f"livepatch_handler at {address:#x}: no bctrl in its first "
                      f"{len(insns)} instructions")


def _build_constant(holds: dict[int, object], word: int) -> bool:
    """Follow lis rT,imm and ori rA,rS,imm on a constant (how the magic is
    built) into holds (register -> value); False if word is neither."""
    if ppc.is_addis(word, ra=0):
        holds[ppc.dform(word).rt] = ppc.add_immediate(word) & ppc.MASK64
    elif ppc.is_ori(word) and isinstance(holds.get(ppc.dform(word).rs), int):
        ori = ppc.dform(word)
        holds[ori.ra] = holds[ori.rs] | ppc.or_immediate(word)
    else:
        return False
    return True


class _Push:
    """What decode_livepatch_handler has learnt from the push half so far.

    holds: register -> ("entry", name) | "ti" (thread_info) | "sp" (livepatch_sp)
    | an int constant; a register not in it holds its entry value. spr: the
    same for LR and CTR, by SPR number.
    """

    def __init__(self):
        self.holds: dict[int, object] = {}
        self.spr: dict[int, object] = {ppc.SPR_LR: ("entry", "lr"), ppc.SPR_CTR: ("entry", "ctr")}
        self.paca_off = self.ti_off = self.size = None
        self.slots: dict[str, int] = {}
        self.magic = self.ra_register = None
        self.stored_sp = False

    def value(self, reg: int) -> object:
        """What register reg holds now."""
        return self.holds.get(reg, ("entry", f"r{reg}"))

    def step(self, word: int) -> None:
        """Follow one instruction before the bctrl; one not part of the push changes nothing."""
        if ppc.is_ld(word):
            self.load(ppc.dsform(word))
        elif ppc.is_addi(word) and self.holds.get(ppc.dform(word).ra) == "sp" and self.size is None:
            addi = ppc.dform(word)
            if addi.rt == addi.ra:
                self.size = addi.disp
        elif ppc.is_mflr(word) or ppc.is_mfctr(word):
            move = ppc.xfxform(word)
            self.holds[move.rt] = self.spr[move.spr]
        elif ppc.is_mtlr(word) or ppc.is_mtctr(word):
            move = ppc.xfxform(word)
            self.spr[move.spr] = self.value(move.rs)
        elif ppc.is_std(word):
            self.store(ppc.dsform(word))
        else:
            _build_constant(self.holds, word)

    def load(self, ld: ppc.DSForm) -> None:
        """ld: the first from the PACA (r13) fetches thread_info, the first from
        thread_info livepatch_sp."""
        if ld.ra == 13 and self.paca_off is None:
            self.paca_off = ld.disp
            self.holds[ld.rt] = "ti"
        elif self.holds.get(ld.ra) == "ti" and self.ti_off is None:
            self.ti_off = ld.disp
            self.holds[ld.rt] = "sp"

    def store(self, std: ppc.DSForm) -> None:
        """std: livepatch_sp back into thread_info, or a slot of the new record."""
        if self.holds.get(std.ra) == "ti" and std.disp == self.ti_off and self.holds.get(std.rs) == "sp":
            self.stored_sp = True
        elif self.holds.get(std.ra) == "sp" and self.size is not None:
            stored = self.value(std.rs)
            if stored == ("entry", "r2"):
                self.slots["toc"] = std.disp
            elif isinstance(stored, tuple):
                self.slots["ra"], self.ra_register = std.disp, stored[1]
            elif isinstance(stored, int):
                self.slots["magic"] = std.disp
                self.magic = stored

    def layout(self, address: int, bctrl: int, after: list[int]) -> LivepatchHandlerLayout:
        """The layout, at the bctrl (after: the instructions that follow it)."""
        if "magic" not in self.slots and None not in (self.ti_off, self.size):
            # the push stores no magic: take the slot and value its return half checks
            found = _checked_magic(after, self.ti_off)
            if found is not None:
                self.slots["magic"], self.magic = found
        missing = [n for n, v in (("ld rX,OFF(r13)", self.paca_off), ("ld rY,OFF(rX)", self.ti_off),
                                  ("addi rY,rY,SIZE", self.size)) if v is None]
        missing += [f"std of the {s} slot" for s in ("toc", "ra", "magic") if s not in self.slots]
        c = self.spr[ppc.SPR_CTR]
        if not isinstance(c, tuple):
            missing.append("register holding C at its entry moved to CTR")
        if missing:
            raise LayoutError(f"livepatch_handler at {address:#x}: no {', '.join(missing)} "
                              f"before the bctrl at {bctrl:#x}")
        return LivepatchHandlerLayout(
            address=address, paca_thread_info=self.paca_off, ti_livepatch_sp=self.ti_off,
            entry_size=self.size, toc_slot=self.slots["toc"], ra_slot=self.slots["ra"],
            magic_slot=self.slots["magic"], magic=self.magic, call_to_c=bctrl,
            pushed_before_call=self.stored_sp, ra_register=self.ra_register, c_register=c[1])


def _checked_magic(insns: list[int], ti_off: int) -> tuple[int, int] | None:
    """(slot, constant) the return half compares with `td`: a word loaded from
    livepatch_sp + slot against a constant built by lis/ori."""
    holds: dict[int, object] = {}  # register -> "ti" | "sp" | ("slot", disp) | int constant
    for word in insns:
        if ppc.is_ld(word):
            ld = ppc.dsform(word)
            if ld.ra == 13:
                holds[ld.rt] = "ti"
            elif holds.get(ld.ra) == "ti" and ld.disp == ti_off:
                holds[ld.rt] = "sp"
            elif holds.get(ld.ra) == "sp":
                holds[ld.rt] = ("slot", ld.disp)
        elif ppc.is_td(word):
            td = ppc.xform(word)
            a, b = holds.get(td.ra), holds.get(td.rb)
            for x, y in ((a, b), (b, a)):
                if isinstance(x, tuple) and isinstance(y, int):
                    return x[1], y
            return None
        elif word == ppc.BLR:
            return None
        else:
            _build_constant(holds, word)
    return None


def find_redirect_branches(code: bytes, address: int, livepatch_handler: int) -> list[int]:
    """The conditional branches to livepatch_handler in an ftrace trampoline's code."""
    return [address + 4 * i for i, word in enumerate(ppc.words(code))
            if ppc.conditional_branch_target(word, address + 4 * i) == livepatch_handler]


def find_unredirected_exits(code: bytes, address: int, livepatch_handler: int) -> list[int]:
    """Where an ftrace trampoline continues into the traced function itself.

    ftrace_caller and ftrace_regs_caller end with `bne- livepatch_handler`,
    taken when the ftrace handler changed the NIP (a redirection), then the
    way back into B when it did not: up to 6.12 a `bctr` (CTR is B just
    after its profiling call, LR the return address into A); with
    out-of-line stubs a `blr` (LR is the stub's `mtlr r0`, which puts RA,
    kept in r0, back into LR before the stub branches into B), after a
    conditional `bnectr` taken only for an ftrace direct call. At that exit
    the trampoline's frame is gone and r1 is A's stack pointer. Returns
    the address of each such exit in code.
    """
    insns = ppc.words(code)
    exits = []
    for branch in find_redirect_branches(code, address, livepatch_handler):
        j = (branch - address) // 4 + 1
        while j < len(insns) and ppc.is_conditional_bcctr(insns[j]):
            j += 1
        if j < len(insns) and insns[j] in (ppc.BCTR, ppc.BLR):
            exits.append(address + 4 * j)
    return exits


@dataclass(frozen=True)
class LivepatchEntry:
    """One [TOC, RA, magic] record of a task's livepatch stack."""

    address: int  # address of the record's first slot
    toc: int
    ra: int
    magic: int


def entry_at(stack: bytes, base: int, record: int, layout: LivepatchHandlerLayout) -> LivepatchEntry | None:
    """The record whose first slot is at address record, from memory stack read
    at base; None where the record is not inside stack. The slots are the
    handler's, decoded (offsets from livepatch_sp after the push)."""
    top = record + layout.entry_size
    slots = (layout.toc_slot, layout.ra_slot, layout.magic_slot)
    if record < base or any(not 0 <= top + slot - base <= len(stack) - 8 for slot in slots):
        return None
    toc, ra, magic = (int.from_bytes(stack[top + slot - base:top + slot - base + 8], "little") for slot in slots)
    return LivepatchEntry(record, toc, ra, magic)


def entries(stack: bytes, base: int, livepatch_sp: int, layout: LivepatchHandlerLayout) -> list[LivepatchEntry]:
    """Records between the stack's base and livepatch_sp, oldest first.

    stack holds memory from address base upward, at least to livepatch_sp.
    """
    out = []
    record = livepatch_sp - layout.entry_size
    while record >= base:
        entry = entry_at(stack, base, record, layout)
        if entry is not None:
            out.append(entry)
        record -= layout.entry_size
    out.reverse()
    return out


@dataclass
class LivepatchStack:
    """A task's livepatch stack, read and validated (invariant 10 and the entries)."""

    base: int                 # lowest address of the task's kernel stack (end_of_stack)
    livepatch_sp: int
    entries: list[LivepatchEntry]
    problems: list[str]
    entry_problems: dict[int, list[str]]  # entry address -> what is wrong with it


def read_livepatch_stack(read, base: int, livepatch_sp: int, lowest_sp: int,
                         layout: LivepatchHandlerLayout, view) -> LivepatchStack:
    """Read and check the livepatch stack of the task whose kernel stack starts at base.

    read(address, length) reads target memory; lowest_sp is the task's r1 (the
    call stack grows down towards the livepatch stack growing up); view is a
    gdbklp.abi.kernel.KernelView for call sites and TOC owners.
    """
    problems: list[str] = []
    first = base + 8  # end_of_stack() + 1: the first slot above the stack-end magic
    if livepatch_sp < first or livepatch_sp > lowest_sp:
        problems.append(f"livepatch_sp {livepatch_sp:#x} outside [{first:#x}, sp {lowest_sp:#x}]")
        return LivepatchStack(base, livepatch_sp, [], problems, {})
    if (livepatch_sp - first) % layout.entry_size:
        problems.append(f"livepatch_sp {livepatch_sp:#x} is not {first:#x} plus whole "
                        f"{layout.entry_size}-byte entries")
    try:
        data = read(base, livepatch_sp - base)
    except Exception as e:
        problems.append(f"cannot read the livepatch stack at {base:#x}: {e}")
        return LivepatchStack(base, livepatch_sp, [], problems, {})
    end_magic = int.from_bytes(data[:8], "little")
    if end_magic & 0xFFFFFFFF != ppc.STACK_END_MAGIC:
        problems.append(f"stack-end magic at {base:#x} is {end_magic:#x}, not {ppc.STACK_END_MAGIC:#x}")
    found = entries(data, base, livepatch_sp, layout)
    found = [e for e in found if e.address >= first]
    entry_problems: dict[int, list[str]] = {}
    for e in found:
        bad = []
        if e.magic != layout.magic:
            bad.append(f"magic {e.magic:#x} instead of {layout.magic:#x}")
        site = view.call_site(read, e.ra)
        if not site.is_call:
            bad.append(f"return address {e.ra:#x} ({view.describe(e.ra)}) does not follow a call")
        else:
            owner = view.toc_owner(e.toc)
            caller = view.object_at(e.ra)
            if site.restores_toc:
                if owner is None:
                    bad.append(f"saved TOC {e.toc:#x} is no loaded object's TOC")
            elif caller is not None and caller.toc is not None and caller.toc != e.toc:
                bad.append(f"saved TOC {e.toc:#x} ({owner or 'no object'}) is not the TOC of the "
                           f"{site.value} caller's object {caller.name} ({caller.toc:#x})")
        if bad:
            entry_problems[e.address] = bad
    return LivepatchStack(base, livepatch_sp, found, problems, entry_problems)
