"""Design 1, the 2015 RFC: the mini-frame trampoline and KLP_return_helper.

When ftrace redirects B to C, the RFC's trampoline reads the instruction at
RA (the return address into A). `ld r2,24(r1)` (0xe8410018) there means A
saved and will restore its own TOC: C is entered directly. Anything else is
taken as a local call: A's TOC goes into A's TOC slot, a 32-byte mini frame
is opened, and C is entered with LR = KLP_return_helper, which pops the
mini frame, reloads r2 and returns to RA.

This module decodes such a trampoline from its instructions (a small
register machine over the exact encodings: what each register holds when
it is compared, stored or branched through), lints it, and checks single
redirections at the two points klp-watch stops at: the trampoline's entry
(P1, the decision) and the helper's entry (P3). Offsets "in A's frame" are
relative to A's stack pointer, r1 at the trampoline's entry.
"""

import struct
from dataclasses import dataclass, field

from gdbklp.abi import ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.invariants import EventContext, Violation
from gdbklp.abi.livepatch import LayoutError
from gdbklp.abi.trampoline import Finding

TOC_RESTORE = ppc.LD_R2_24_R1  # what the instruction at RA must be compared with
LR_SLOT, TOC_SLOT = 16, 24     # ELFv2 frame header slots
HEADER_SLOTS = {0: "back chain", 8: "CR save word", LR_SLOT: "LR save slot (RA)", TOC_SLOT: "TOC save slot"}
# A frame's ELFv2 header: back chain, CR save word, LR and TOC save slots.
# Invariant 6 is checked on A's header only: bytes 32 and up may be A's own
# locals (ELFv2 omits the parameter save area when no callee needs it),
# which C may legitimately write through a pointer A passed it.
ELFV2_HEADER_BYTES = 32
PARAM_SAVE_AREA = 32           # offset of the parameter save area in a caller's frame
MAX_INSNS = 40

# symbolic register contents
RA, INSN_AT_RA, C, TOC = "the return address", "the instruction at RA", "C", "the TOC r2"


@dataclass(frozen=True)
class Value:
    """What a register holds, and the instructions that made it (for messages)."""

    what: object                    # an int constant, or one of the symbols above
    made_by: tuple[int, ...] = ()   # addresses of the instructions that built it


@dataclass(frozen=True)
class HelperLayout:
    """What KLP_return_helper does, relative to the mini frame it is entered with."""

    address: int
    pop: int              # bytes it adds to r1
    ra_offset: int        # where it loads the return address from, relative to A's sp
    ra_load: int          # address of that load
    toc_offset: int       # where it reloads r2 from, relative to A's sp


@dataclass(frozen=True)
class RfcTrampoline:
    address: int                     # P1: the entry of the redirect path
    compare_address: int
    constant: int                    # what the instruction at RA is compared with
    constant_made_by: tuple[int, ...]
    constant_overwrote: tuple[int, ...]  # instructions whose unused result the constant's register lost
    direct_branch: int               # the conditional bcctr into C when they are equal
    a_frame_stores: dict[int, str]   # offset in A's frame -> what the mini path stores there
    a_frame_store_at: dict[int, int]  # offset -> address of the store
    mini_frame: int                  # bytes of the mini frame
    helper: HelperLayout
    call_to_c: int                   # the bctr into C on the mini path

    def takes_direct_path(self, insn_at_ra: int) -> bool:
        """The trampoline's own decision (which may be wrong: see lint())."""
        return insn_at_ra & 0xFFFFFFFF == self.constant & 0xFFFFFFFF


def _not_understood(address: int, word: int, why: str) -> LayoutError:
    text = ppc.disassemble(word.to_bytes(4, "little"), address)[0][1]
    return LayoutError(f"cannot interpret `{text}` at {address:#x} ({word:#010x}): {why}")


SPR_REGISTERS = {ppc.SPR_LR: "lr", ppc.SPR_CTR: "ctr"}


def decode_helper(code: bytes, address: int, mini_frame: int) -> HelperLayout:
    """Follow KLP_return_helper from its entry (r1 = the mini frame) to its blr."""
    delta = -mini_frame  # r1 relative to A's sp
    regs: dict[int, tuple[int, int]] = {}  # register -> (offset in A's frame it was loaded from, at)
    pop = 0
    ra = toc = None
    for i, word in enumerate(ppc.words(code)[:MAX_INSNS]):
        here = address + 4 * i
        if ppc.is_ld(word, ra=1):
            ld = ppc.dsform(word)
            if ld.rt == 2:
                toc = delta + ld.disp
            else:
                regs[ld.rt] = (delta + ld.disp, here)
        elif ppc.is_addi(word, rt=1, ra=1):
            popped = ppc.dform(word).disp
            delta += popped
            pop += popped
        elif ppc.is_mtlr(word) and ppc.xfxform(word).rs in regs:
            ra = regs[ppc.xfxform(word).rs]
        elif word == ppc.BLR:
            missing = [n for n, v in (("a load of the return address into LR", ra),
                                      ("a reload of r2", toc)) if v is None]
            if missing:
                raise LayoutError(f"KLP_return_helper at {address:#x}: no {' and no '.join(missing)} "
                                  f"before the blr at {here:#x}")
            return HelperLayout(address, pop, ra[0], ra[1], toc)
        else:
            raise _not_understood(here, word, "not a step of a return helper (ld, addi r1, mtlr, blr)")
    raise LayoutError(f"KLP_return_helper at {address:#x}: no blr in its first {MAX_INSNS} instructions")


def decode_rfc_trampoline(code: bytes, address: int, read_code) -> RfcTrampoline:
    """Follow the redirect path from its entry: the decision, the mini frame, the branch to C.

    At the entry LR = r0 = RA, CTR = C, r2 = the TOC, r1 = A's sp. read_code(address, n)
    supplies the helper's code once its address is known.
    """
    path = _RedirectPath(address, read_code)
    for i, word in enumerate(ppc.words(code)[:MAX_INSNS]):
        decoded = path.step(word, address + 4 * i)
        if decoded is not None:
            return decoded
    raise LayoutError(f"redirect path at {address:#x}: no bctr into C in its first {MAX_INSNS} instructions")


def _describe(value: Value | None) -> str:
    """A register's content for a message: its symbol or constant."""
    if value is None or value.what is None:
        return "nothing known"
    return value.what if isinstance(value.what, str) else f"{value.what:#x}"


class _RedirectPath:
    """decode_rfc_trampoline's register machine: what each register holds
    (a Value; r0..r31 by number, "lr", "ctr"), r1 relative to A's sp, and
    what the path has done so far (the compare, the direct branch, the mini
    frame, its stores into A's frame)."""

    def __init__(self, address: int, read_code):
        self.address, self.read_code = address, read_code
        self.regs: dict[object, Value] = {"lr": Value(RA), 0: Value(RA), 2: Value(TOC), "ctr": Value(C)}
        self.delta = 0                  # r1 relative to A's sp
        self.compare = self.direct = self.mini = None
        self.constant: Value | None = None
        self.lost: tuple[int, ...] = ()
        self.stores: dict[int, str] = {}
        self.store_at: dict[int, int] = {}
        self.unused: dict[int, tuple[int, ...]] = {}     # register -> instructions of a constant not read yet
        self.overwrote: dict[int, tuple[int, ...]] = {}  # register -> instructions of the constant it lost

    def holds(self, reg: object, what: object) -> bool:
        """Does register reg hold what (a symbol or a constant)?"""
        return reg in self.regs and self.regs[reg].what == what

    def step(self, word: int, here: int) -> RfcTrampoline | None:
        """Follow one instruction; the decoded trampoline at its bctr into C."""
        if (ppc.is_mfspr(word) or ppc.is_mtspr(word)) and ppc.xfxform(word).spr in SPR_REGISTERS:
            move = ppc.xfxform(word)
            spr = SPR_REGISTERS[move.spr]
            source, target = (spr, move.rt) if ppc.is_mfspr(word) else (move.rs, spr)
            self.regs[target] = self.regs.get(source, Value(None))
        elif ppc.is_lwz(word, disp=0) and self.holds(ppc.dform(word).ra, RA):
            self.regs[ppc.dform(word).rt] = Value(INSN_AT_RA, (here,))
        elif ppc.is_addi(word) or ppc.is_addis(word):
            self.add_immediate(word, here)
        elif ppc.is_ori(word) or ppc.is_oris(word):
            self.or_immediate(word, here)
        elif ppc.is_compare(word, bf=0):
            self.compare_insn_at_ra(word, here)
        elif ppc.is_bcctr(word):
            return self.branch_to_c(word, here)
        elif word == ppc.BCL_NEXT:
            self.regs["lr"] = Value(here + 4, (here,))
        elif ppc.is_std(word, ra=1):
            std = ppc.dsform(word)
            if self.delta == 0:
                self.stores[std.disp] = _describe(self.regs.get(std.rs))
                self.store_at[std.disp] = here
        elif ppc.is_stdu(word, rs=1, ra=1):
            if self.mini is not None:
                raise _not_understood(here, word, "a second frame")
            stdu = ppc.dsform(word)
            self.mini = -stdu.disp
            self.delta += stdu.disp
        else:
            raise _not_understood(here, word, "not a step of the RFC's redirect path")
        return None

    def add_immediate(self, word: int, here: int) -> None:
        """li and lis start a constant (losing one nothing read), addi and addis
        extend one, addi r1,r1 moves r1; nothing else is modelled."""
        d = ppc.dform(word)
        imm = ppc.add_immediate(word)
        src = self.regs.get(d.ra)
        if d.ra == 0:
            if d.rt in self.unused:  # li/lis over a constant nothing read: its work is lost
                self.overwrote[d.rt] = self.unused[d.rt]
            self.regs[d.rt] = Value(imm & ppc.MASK64, (here,))
            self.unused[d.rt] = (here,)
        elif src and isinstance(src.what, int):
            self.unused.pop(d.ra, None)
            self.regs[d.rt] = Value((src.what + imm) & ppc.MASK64, src.made_by + (here,))
        elif ppc.is_addi(word, rt=1, ra=1):
            self.delta += d.disp
        else:
            raise _not_understood(here, word, f"adds to r{d.ra}, which holds {_describe(src)}")

    def or_immediate(self, word: int, here: int) -> None:
        """ori and oris: the next part of a constant."""
        d = ppc.dform(word)
        value = self.regs.get(d.rs)
        if not (value and isinstance(value.what, int)):
            raise _not_understood(here, word, f"r{d.rs} holds no constant")
        self.regs[d.ra] = Value(value.what | ppc.or_immediate(word), value.made_by + (here,))
        self.unused.pop(d.rs, None)
        self.unused[d.ra] = self.regs[d.ra].made_by

    def compare_insn_at_ra(self, word: int, here: int) -> None:
        """cmp/cmpl into cr0: the decision, the instruction at RA against a constant."""
        cmp = ppc.xform(word)
        reg = next((other for insn, other in ((cmp.ra, cmp.rb), (cmp.rb, cmp.ra))
                    if self.holds(insn, INSN_AT_RA)), None)
        constant = self.regs.get(reg)
        if constant is None or not isinstance(constant.what, int):
            raise _not_understood(here, word, "not a compare of the instruction at RA with a constant")
        self.compare, self.constant, self.lost = here, constant, self.overwrote.get(reg, ())
        self.unused.pop(reg, None)

    def branch_to_c(self, word: int, here: int) -> RfcTrampoline | None:
        """bcctr: beqctr after the compare enters C directly (with r12 = C);
        bctr enters it on the mini path and ends the decoding."""
        if ppc.is_bcctr(word, bo=ppc.BO_ALWAYS, lk=0):
            return self.mini_path_enters_c(word, here)
        if not (ppc.is_bcctr(word, bo=ppc.BO_IF_TRUE, bi=ppc.CR_EQ, lk=0) and self.compare is not None):
            raise _not_understood(here, word, "only beqctr (after the compare) and bctr are expected")
        if not self.holds(12, C):
            raise _not_understood(here, word, "enters C directly without r12 = C")
        self.direct = here
        return None

    def mini_path_enters_c(self, word: int, here: int) -> RfcTrampoline:
        """The bctr into C, after the decision and the mini frame, with LR the helper."""
        if self.mini is None or self.compare is None or self.direct is None:
            raise _not_understood(here, word, "enters C before the decision and the mini frame")
        if not (self.holds(12, C) and self.holds("ctr", C)):
            raise _not_understood(here, word, "C's global entry needs r12 = CTR = C")
        helper = self.regs["lr"].what if "lr" in self.regs else None
        if not isinstance(helper, int):
            raise _not_understood(here, word, "LR does not hold the helper's address")
        return RfcTrampoline(
            address=self.address, compare_address=self.compare, constant=self.constant.what & 0xFFFFFFFF,
            constant_made_by=self.constant.made_by, constant_overwrote=self.lost, direct_branch=self.direct,
            a_frame_stores=self.stores, a_frame_store_at=self.store_at, mini_frame=self.mini,
            helper=decode_helper(self.read_code(helper, 4 * MAX_INSNS), helper, self.mini), call_to_c=here)


def lint(t: RfcTrampoline, describe=lambda a: f"{a:#x}") -> list[Finding]:
    """The RFC's known defects, as verdicts on the decoded code."""
    out = []
    made = ", ".join(describe(a) for a in t.constant_made_by)
    if t.constant_overwrote:
        made += (f", which overwrote the unused value built at "
                 f"{', '.join(describe(a) for a in t.constant_overwrote)}")
    if t.constant == TOC_RESTORE:
        out.append(Finding(True, t.compare_address, f"the instruction at RA is compared with {t.constant:#010x} "
                                                    f"(ld r2,24(r1)), built by {made}"))
    else:
        out.append(Finding(False, t.compare_address,
                           f"the instruction at RA is compared with {t.constant:#x}, not {TOC_RESTORE:#010x} "
                           f"(ld r2,24(r1)); the constant comes from {made}: a global call is taken as "
                           "local and its TOC slot overwritten"))
    h = t.helper
    if h.ra_offset < 0:
        out.append(Finding(False, h.ra_load,
                           f"the helper reads the return address from the mini frame (A's sp{h.ra_offset:+d}), "
                           "C's own LR save slot: C's prologue stores LR = the helper there, and RA is kept "
                           f"nowhere else ({', '.join(f'{o}(A sp): {v}' for o, v in sorted(t.a_frame_stores.items()))})"))
    elif t.a_frame_stores.get(h.ra_offset) != RA:
        out.append(Finding(False, h.ra_load, f"the helper reads the return address from {h.ra_offset}(A's sp), "
                                             "but the redirect path stores no RA there"))
    else:
        out.append(Finding(True, h.ra_load, f"RA is kept at {h.ra_offset}(A's sp) "
                                            f"(stored at {describe(t.a_frame_store_at[h.ra_offset])}) and read "
                                            "there by the helper after it pops the mini frame"))
    toc_ok = t.a_frame_stores.get(h.toc_offset) == TOC
    out.append(Finding(toc_ok, h.address, f"the helper reloads r2 from {h.toc_offset}(A's sp), where the "
                                          f"path {'stores' if toc_ok else 'does not store'} the TOC"))
    out.append(Finding(h.pop == t.mini_frame, h.address,
                       f"the helper pops {h.pop} bytes; the mini frame is {t.mini_frame}"))
    return out


# ---- checks at the two stops -------------------------------------------------

@dataclass(frozen=True)
class RedirectSample:
    """The registers and memory at P1, the redirect path's entry."""

    task: int
    cpu: int
    ra: int           # LR
    r0: int
    sp: int           # A's stack pointer
    toc: int          # r2
    c: int            # CTR
    insn_at_ra: int
    a_header: bytes   # ELFV2_HEADER_BYTES at sp


@dataclass
class Pending:
    """A redirection on the mini path, from P1 until the helper runs."""

    at_p1: RedirectSample
    call_site: CallSite
    a_toc: int | None   # the TOC A must resume with
    violations: list[Violation] = field(default_factory=list)  # found at P1
    context: EventContext | None = None  # the event P1 saw: caller, B, C as the report names them


def stack_argument_accesses(code: bytes) -> list[tuple[int, str]]:
    """C's loads and stores in its caller's parameter save area, as (offset from the
    caller's sp, "load"|"store"). Nothing else in the caller's frame is C's to touch;
    in a mini frame that area is A's frame header and locals (invariant 6)."""
    frame = 0
    out = []
    for word in ppc.words(code):
        access = ppc.dsform(word)
        if ppc.is_stdu(word, rs=1, ra=1):
            frame = -access.disp
        elif (ppc.is_ld(word, ra=1) or ppc.is_std(word, ra=1)) and access.disp - frame >= PARAM_SAVE_AREA:
            out.append((access.disp - frame, "load" if ppc.is_ld(word) else "store"))
        elif word == ppc.BLR:
            break
    return out


def hazard_reason(accesses: list[tuple[int, str]], mini_frame: int) -> str | None:
    """Why a C that makes these accesses is unsafe in a mini frame, or None."""
    if not accesses:
        return None
    stores = sorted({o for o, kind in accesses if kind == "store"})
    loads = sorted({o for o, kind in accesses if kind == "load"})
    parts = []
    if stores:
        in_a = [o - mini_frame for o in stores]
        hit = [name for offset, name in HEADER_SLOTS.items() if offset in in_a]
        parts.append(f"it stores into its caller's parameter save area at {stores} (varargs homing r3-r10): "
                     f"in a {mini_frame}-byte mini frame that is {in_a}(A's sp)"
                     + (f", over A's {' and '.join(hit)}" if hit else ", A's own frame"))
    if loads:
        parts.append(f"it reads stack-passed arguments at {loads} above its caller's sp (more than 8 "
                     f"arguments): A stored them {mini_frame} bytes higher")
    return "; ".join(parts)


def check_redirect(s: RedirectSample, t: RfcTrampoline, call_site: CallSite) -> tuple[bool, list[Violation]]:
    """At P1: (the trampoline takes the direct path, violations of invariants 1 and 2)."""
    out = []
    if s.r0 != s.ra:
        out.append(Violation(1, "r0 is not the return address at the trampoline's entry",
                             f"r0 == LR == {s.ra:#x}", f"r0 {s.r0:#x}"))
    if not call_site.is_call:
        out.append(Violation(1, "the return address does not follow a call",
                             "bl or bctrl before RA", f"{s.ra:#x}: {call_site.value}"))
    direct = t.takes_direct_path(s.insn_at_ra)
    global_call = s.insn_at_ra == TOC_RESTORE
    if direct != global_call:
        out.append(Violation(2, ("a global call taken as local: the trampoline opens a mini frame and overwrites "
                                 "A's TOC slot") if global_call else "a local call taken as global",
                             f"{'direct' if global_call else 'mini-frame'} path: the instruction at RA "
                             f"{s.ra:#x} is {s.insn_at_ra:#010x} ({call_site.value} call)",
                             f"{'direct' if direct else 'mini-frame'} path: the trampoline compares it with "
                             f"{t.constant:#x} at {t.compare_address:#x}"))
    return direct, out


def check_helper(p: Pending, sp: int, frames: bytes, t: RfcTrampoline) -> list[Violation]:
    """At P3 (the helper's entry, r1 = sp): invariants 3, 4 (as C leaves it), 5, 6 and 9.

    frames holds memory from sp: the mini frame, then A's frame header.
    """
    s = p.at_p1
    out = []
    mini = s.sp - t.mini_frame
    word = lambda off: struct.unpack_from("<Q", frames, off - mini)[0]  # off: an address
    if sp != mini:
        out.append(Violation(4, "r1 at the helper is not the mini frame",
                             f"r1 == A's sp - {t.mini_frame} = {mini:#x}", f"r1 {sp:#x}"))
        return out  # nothing below is where it is expected
    if word(mini) != s.sp:
        out.append(Violation(4, "the mini frame's back chain is not A's sp",
                             f"{s.sp:#x} at {mini:#x}", f"{word(mini):#x}"))
    h = t.helper
    returns_to = word(s.sp + h.ra_offset)
    if returns_to != s.ra:
        out.append(Violation(5, "the helper will not return to RA: the return address was lost",
                             f"RA {s.ra:#x} at {h.ra_offset}(A's sp) = {s.sp + h.ra_offset:#x}, read at {h.ra_load:#x}",
                             f"{returns_to:#x} there"))
    if mini + h.pop != s.sp:
        out.append(Violation(9, "r1 after the helper is not A's sp",
                             f"{s.sp:#x}", f"{mini + h.pop:#x} (the helper pops {h.pop})"))
    restored = word(s.sp + h.toc_offset)
    if p.a_toc is not None and restored != p.a_toc:
        inv = 3 if p.call_site in (CallSite.GLOBAL, CallSite.INDIRECT) else 9
        out.append(Violation(inv, "A will resume with another TOC (its TOC slot was overwritten)"
                             if inv == 3 else "A will resume with another TOC",
                             f"A's TOC {p.a_toc:#x} at {h.toc_offset}(A's sp)", f"{restored:#x}"))
    kept = {h.ra_offset, h.toc_offset}
    before, after = s.a_header, frames[s.sp - mini:s.sp - mini + ELFV2_HEADER_BYTES]
    changed = [o for o in range(0, min(len(before), len(after)), 8)
               if o not in kept and before[o:o + 8] != after[o:o + 8]]
    if changed:
        out.append(Violation(6, "A's frame was written while C ran in the mini frame",
                             f"0..{ELFV2_HEADER_BYTES - 1}(A's sp) unchanged but for the trampoline's "
                             f"slots {sorted(kept)}",
                             "changed at " + ", ".join(f"{o}(A's sp): {before[o:o + 8].hex()} -> "
                                                       f"{after[o:o + 8].hex()}" for o in changed)))
    return out


@dataclass
class RfcState:
    """Per-task redirections in flight on the mini path (keyed by task, never by vCPU)."""

    pending: dict[int, list[Pending]] = field(default_factory=dict)

    def push(self, task: int, p: Pending) -> None:
        self.pending.setdefault(task, []).append(p)

    def pop(self, task: int, sp: int, mini_frame: int) -> Pending | None:
        """The innermost pending redirection of the task whose mini frame is at sp."""
        stack = self.pending.get(task, [])
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].at_p1.sp - mini_frame == sp:
                return stack.pop(i)
        return None
