"""ftrace's side of a redirection, from the kernel's own code.

ftrace_caller (and ftrace_regs_caller) is entered from a traced function's
profiling sequence, `mflr r0; bl ftrace_caller`: at its entry (P0) r0 is
the return address into A (RA) and LR points just after that bl, into B
(or, with CONFIG_PPC_FTRACE_OUT_OF_LINE, into B's out-of-line stub). It saves
the registers in a pt_regs on its own frame, calls the ftrace handler, which
for a live-patched B rewrites pt_regs->nip to C, and on the way out branches
to livepatch_handler if the nip changed.

Which registers then hold RA and C is not the same in every kernel: up to
6.12 LR holds RA and CTR holds C; with out-of-line stubs (6.13+) r0 holds
RA and LR holds C. decode_handler_entry reads it from ftrace_caller's code,
following values through its frame, so that livepatch_handler's own
assumption can be checked against it (invariant 14) instead of being assumed.

An out-of-line stub is four instructions, `mflr r0; bl ftrace_caller;
mtlr r0; b site+4`, reached from the `b stub` at the site in B (its first
instruction after the local entry); decode_ool_stub reads one.
"""

from dataclasses import dataclass

from gdbklp.abi import ppc
from gdbklp.errors import GdbklpError

MAX_INSNS = 256
# a call may change these (ELFv2): the volatile registers, CTR, and LR, which the call itself sets
CLOBBERED_BY_CALL = (*ppc.VOLATILE_GPRS, "ctr", "lr")
SPR_REGISTERS = {ppc.SPR_XER: "xer", ppc.SPR_LR: "lr", ppc.SPR_CTR: "ctr"}
# origins of values, as the walk follows them
RA = "RA"      # r0 at P0: the return address into A
SITE = "site"  # LR at P0 (just after B's profiling call) and values computed from it
C = "C"        # pt_regs->nip read back: the replacement, for a redirected call


class FtraceCodeError(GdbklpError):
    """ftrace code the decoder does not model; str() names the address and instruction."""


@dataclass(frozen=True)
class HandlerEntry:
    """The state ftrace_caller leaves for livepatch_handler when it redirects."""

    branch: int                       # its `bne- livepatch_handler`
    ra_registers: tuple[str, ...]     # registers holding RA there
    c_registers: tuple[str, ...]      # registers holding C there
    frame_popped: bool                # r1 is A's stack pointer again
    toc_restored: bool                # r2 is what it was at P0
    clobbered: tuple[str, ...]        # non-volatile registers not restored (r14..r31)


def refuse(name: str, word: int, at: int, why: str = "cannot model") -> FtraceCodeError:
    insn = ppc.disassemble(word.to_bytes(4, "little"), at)[0][1]
    return FtraceCodeError(f"{name}: {why} `{insn}` ({word:#010x}) at {at:#x}")


def decode_handler_entry(code: bytes, address: int, livepatch_handler: int,
                         name: str = "ftrace_caller") -> HandlerEntry:
    """Follow ftrace_caller from its entry to its branch to livepatch_handler.

    Values are tracked by origin: r0 = RA and LR = SITE at the entry, every
    other register its own entry value; stores to the frame (r1-relative,
    through its stdu's) remember the origin, loads bring it back, and a load
    of a slot stored from SITE reads C (the handler's rewritten nip). Calls
    clobber the volatile registers. Conditional branches decided by the
    compare of such a C with a SITE value (has the nip changed?) are taken
    as for a redirection; any other conditional branch is followed on its
    fall-through path (ftrace enabled, no direct call). An instruction the
    walk does not model is refused with its address.
    """
    insns = ppc.words(code)
    walk = _HandlerWalk(name, livepatch_handler)
    at = address
    for _ in range(MAX_INSNS):
        index = (at - address) // 4
        if not 0 <= index < len(insns):
            raise FtraceCodeError(f"{name}: ran past its code at {at:#x} before a branch to "
                                  f"livepatch_handler ({livepatch_handler:#x})")
        outcome = walk.step(insns[index], at)
        if isinstance(outcome, HandlerEntry):
            return outcome
        at = outcome
    raise FtraceCodeError(f"{name}: no branch to livepatch_handler within {MAX_INSNS} instructions of {address:#x}")


class _HandlerWalk:
    """decode_handler_entry's state: the origin of each register's value (RA,
    SITE, C, "entry:<register>" for one untouched since the entry, None for
    one the walk does not follow), r1's offset from its value at the entry,
    the origins stored in the frame, and the origins each CR field compared."""

    def __init__(self, name: str, livepatch_handler: int):
        self.name = name
        self.livepatch_handler = livepatch_handler
        self.regs: dict[str, str | None] = {f"r{n}": f"entry:r{n}" for n in range(32)}
        self.regs.update(r0=RA, lr=SITE, ctr="entry:ctr", xer="entry:xer")
        self.frame = 0                            # r1 relative to its value at the entry
        self.slots: dict[int, str | None] = {}    # frame offset -> origin of the word stored there
        self.compares: dict[int, set] = {}        # CR field -> origins of the compared values

    def step(self, word: int, at: int) -> int | HandlerEntry:
        """Follow one instruction: the address of the next, or the hand-off at
        the branch to livepatch_handler."""
        if ppc.is_bc(word):
            return self.conditional_branch(word, at)
        if ppc.is_b(word):
            return ppc.branch_target(word, at)
        if ppc.is_bl(word) or word == ppc.BCTRL:
            self.call()
        elif word in (ppc.BLR, ppc.BCTR):
            raise refuse(self.name, word, at, "left through")
        elif ppc.is_conditional_bclr(word) or ppc.is_conditional_bcctr(word):
            pass  # a conditional blr/bctr: not the redirection's way out (it comes after the decision)
        elif not (word == ppc.NOP or self.load_or_store(word, at) or self.compute(word, at)):
            raise refuse(self.name, word, at)
        return at + 4

    def load_or_store(self, word: int, at: int) -> bool:
        """Follow a load or a store; False if word is none the walk models.

        std and stdu r1 into the frame remember the stored origin by frame
        offset (stdu r1 also moves r1); a std elsewhere changes nothing
        followed. ld brings an origin stored in the frame back, as C if it
        was SITE's; lbz, lhz and lwz bring none.
        """
        if ppc.is_std(word, ra=1) or ppc.is_stdu(word, ra=1):
            store = ppc.dsform(word)
            self.slots[self.frame + store.disp] = self.regs[f"r{store.rs}"]
            if ppc.is_stdu(word):
                if store.rs != 1:
                    raise refuse(self.name, word, at, "stdu of a register other than r1 into r1:")
                self.frame += store.disp
        elif ppc.is_ld(word):
            load = ppc.dsform(word)
            if load.rt == 1:
                raise refuse(self.name, word, at, "r1 loaded from memory by")
            origin = self.slots.get(self.frame + load.disp) if load.ra == 1 else None
            self.regs[f"r{load.rt}"] = C if origin == SITE else origin
        elif ppc.is_load_and_zero(word):
            self.regs[f"r{ppc.dform(word).rt}"] = None
        else:
            return ppc.is_std(word)
        return True

    def compute(self, word: int, at: int) -> bool:
        """Follow an arithmetic or logical operation, a move or a compare;
        False if word is none the walk models. Only SITE survives arithmetic
        (an address computed from the site is the site's); any other result
        is not followed."""
        if ppc.is_addi(word) or ppc.is_addis(word):
            self.add_immediate(word, at)
        elif ppc.is_add(word):
            add = ppc.xform(word)
            self.regs[f"r{add.rt}"] = SITE if SITE in (self.regs[f"r{add.ra}"], self.regs[f"r{add.rb}"]) else None
        elif ppc.is_mr(word):
            mr = ppc.xform(word)
            self.regs[f"r{mr.ra}"] = self.regs[f"r{mr.rs}"]
        elif ppc.is_shift_or_rotate(word):
            self.regs[f"r{ppc.xform(word).ra}"] = None
        elif ppc.is_mfmsr(word) or ppc.is_mfcr(word):
            self.regs[f"r{ppc.xform(word).rt}"] = None
        elif ppc.is_mfspr(word) or ppc.is_mtspr(word):
            self.move_spr(word, at)
        elif ppc.is_compare(word):
            compare = ppc.xform(word)
            self.compares[compare.bf] = {self.regs[f"r{compare.ra}"], self.regs[f"r{compare.rb}"]}
        elif ppc.is_compare_immediate(word):
            compare = ppc.dform(word)
            self.compares[compare.bf] = {self.regs[f"r{compare.ra}"], None}
        else:
            return False
        return True

    def add_immediate(self, word: int, at: int) -> None:
        """addi or addis: r1 may only move by addi r1,r1 (frame pushes and pops)."""
        d = ppc.dform(word)
        if d.rt == 1:
            if not ppc.is_addi(word, ra=1):
                raise refuse(self.name, word, at, "r1 set otherwise than by addi r1,r1 in")
            self.frame += d.disp
        else:
            self.regs[f"r{d.rt}"] = SITE if d.ra and self.regs[f"r{d.ra}"] == SITE else None

    def move_spr(self, word: int, at: int) -> None:
        """mfspr or mtspr of LR, CTR or XER (a write of XER is not followed)."""
        move = ppc.xfxform(word)
        spr = SPR_REGISTERS.get(move.spr)
        if spr is None:
            raise refuse(self.name, word, at)
        if ppc.is_mfspr(word):
            self.regs[f"r{move.rt}"] = self.regs[spr]
        elif spr != "xer":
            self.regs[spr] = self.regs[f"r{move.rs}"]

    def conditional_branch(self, word: int, at: int) -> int | HandlerEntry:
        """bc: the branch to livepatch_handler must be a bne on the compare of
        C with SITE (the nip has changed); on any other branch decided by that
        compare the walk goes where the nip-changed path goes, and on the
        rest it falls through."""
        bc = ppc.bform(word)
        target = ppc.conditional_branch_target(word, at)
        nip_changed = self.compares.get(bc.cr_field) == {SITE, C} and bc.cr_bit == ppc.CR_EQ
        if target == self.livepatch_handler:
            if not (nip_changed and bc.if_false):  # bne on that compare
                raise refuse(self.name, word, at, "a branch to livepatch_handler not decided by the "
                                                  "nip-changed compare:")
            return self.handed_over(at)
        if nip_changed and (bc.always or bc.if_false):  # taken when the nip has changed (not equal)
            return target
        return at + 4

    def call(self) -> None:
        """A call: the callee may change every volatile register (ELFv2)."""
        for reg in CLOBBERED_BY_CALL:
            self.regs[reg] = None

    def handed_over(self, branch: int) -> HandlerEntry:
        """The state at the branch to livepatch_handler."""
        regs = self.regs
        return HandlerEntry(
            branch=branch,
            ra_registers=tuple(r for r in ("lr", "r0", "ctr") if regs[r] == RA),
            c_registers=tuple(r for r in ("lr", "r0", "ctr") if regs[r] == C),
            frame_popped=self.frame == 0,
            toc_restored=regs["r2"] == "entry:r2",
            clobbered=tuple(r for r in ppc.CALLEE_SAVED_GPRS if regs[r] != f"entry:{r}"),
        )


@dataclass(frozen=True)
class OolStub:
    """An out-of-line ftrace stub: mflr r0; bl ftrace_caller (or nop); mtlr r0; b function+4."""

    address: int
    calls: int | None   # the ftrace trampoline it calls, None while its call is a nop
    returns_to: int     # where its final branch goes: the traced site + 4


def decode_ool_stub(code: bytes, address: int) -> OolStub | None:
    """The stub at address (16 bytes of code), None if those are not one."""
    words = ppc.words(code[:16])
    if len(words) < 4 or words[0] != ppc.MFLR_R0 or words[2] != ppc.MTLR_R0:
        return None
    if not ppc.is_b(words[3]):
        return None
    if ppc.is_bl(words[1]):
        calls = ppc.branch_target(words[1], address + 4)
    elif words[1] == ppc.NOP:
        calls = None
    else:
        return None
    return OolStub(address, calls, ppc.branch_target(words[3], address + 12))



def ool_stub_label(pc: int, read, describe) -> str | None:
    """"out-of-line ftrace stub of B+off" when pc is one of a stub's four
    instructions (as the stop at ftrace_caller's entry has it in LR, say);
    read(address, length) reads memory, describe names an address."""
    code = read(pc - 12, 28)
    for index in range(4):
        start = pc - 4 * index
        stub = decode_ool_stub(code[12 - 4 * index:28 - 4 * index], start)
        if stub is not None:
            return f"out-of-line ftrace stub of {describe(stub.returns_to - 4)}"
    return None


# ---- a traced call, seen from inside ftrace_caller ---------------------------

@dataclass(frozen=True)
class TracedCallState:
    """Where a traced call is kept at one instruction of an ftrace trampoline.

    At the entry (P0) r1 is still A's stack pointer (B's profiling call comes
    before its prologue), r0 is RA and LR the site in B. frame is r1 minus
    that entry value; the registers and frame slots (offsets from A's stack
    pointer) that hold RA and the site; kept: where r2 and the non-volatile
    registers still have their entry values (a register, or a slot offset)."""

    trampoline: str
    entry: int
    frame: int
    ra_registers: tuple[str, ...]
    ra_slots: tuple[int, ...]
    site_registers: tuple[str, ...]
    site_slots: tuple[int, ...]
    kept: tuple[tuple[str, str | int], ...]


@dataclass
class TracedCallFrames:
    """Every instruction of the ftrace trampolines reached from their entries,
    with its TracedCallState, and the ones the decoder refuses, with why."""

    states: dict[int, TracedCallState]
    refused: dict[int, str]

    def at(self, pc: int) -> TracedCallState | str | None:
        """The state at pc, the refusal (one line naming the address) if the
        decoder could not follow the code there, None if pc is not in a trampoline."""
        return self.states.get(pc) or self.refused.get(pc)


KEPT_REGISTERS = ("r2", *ppc.CALLEE_SAVED_GPRS)


class _TracedCallWalk(_HandlerWalk):
    """_HandlerWalk over every path of a trampoline (both ways at each
    conditional branch): a path ends where it leaves (blr, bctr, a branch
    out of the code), and the state is recorded before each instruction."""

    def snapshot(self, entry: int) -> TracedCallState:
        regs = self.regs
        slots = lambda origin: tuple(off for off, o in self.slots.items() if o == origin)
        kept = []
        for reg in KEPT_REGISTERS:
            here = f"entry:{reg}"
            if regs[reg] == here:
                kept.append((reg, reg))
            elif here in self.slots.values():
                kept.append((reg, next(off for off, o in self.slots.items() if o == here)))
        return TracedCallState(self.name, entry, self.frame,
                               tuple(r for r in ("r0", "lr", *KEPT_REGISTERS, *ppc.VOLATILE_GPRS[1:], "ctr")
                                     if regs.get(r) == RA),
                               slots(RA),
                               tuple(r for r in ("lr", *KEPT_REGISTERS, *ppc.VOLATILE_GPRS, "ctr")
                                     if regs.get(r) == SITE),
                               slots(SITE), tuple(kept))

    def fork(self) -> "_TracedCallWalk":
        other = _TracedCallWalk(self.name, self.livepatch_handler)
        other.regs, other.slots, other.frame = dict(self.regs), dict(self.slots), self.frame
        other.compares = {k: set(v) for k, v in self.compares.items()}
        return other

    def add_immediate(self, word: int, at: int) -> None:
        """As _HandlerWalk's, but an address computed from the site is no longer
        the site's value (the unwinder reads values, not origins)."""
        super().add_immediate(word, at)
        d = ppc.dform(word)
        if d.rt != 1 and (d.disp or ppc.is_addis(word)):
            self.regs[f"r{d.rt}"] = None

    def compute(self, word: int, at: int) -> bool:
        modelled = super().compute(word, at)
        if modelled and ppc.is_add(word):
            self.regs[f"r{ppc.xform(word).rt}"] = None  # a sum is neither RA nor the site
        return modelled

    def meet(self, other: "_TracedCallWalk") -> "_TracedCallWalk | None":
        """What this walk and other (at the same instruction, r1 in the same
        place) have in common; None if that is all of this one."""
        regs = {r: o if o == other.regs.get(r) else None for r, o in self.regs.items()}
        slots = {off: o for off, o in self.slots.items() if other.slots.get(off) == o}
        if regs == self.regs and slots == self.slots:
            return None
        met = self.fork()
        met.regs, met.slots, met.compares = regs, slots, {}
        return met

    def successors(self, word: int, at: int, inside) -> list[int]:
        """Follow one instruction; the addresses it may continue at in the
        trampoline (none where it leaves). Raises FtraceCodeError where the
        instruction is one the walk does not model."""
        if ppc.is_bc(word):
            target = ppc.conditional_branch_target(word, at)
            taken = [target] if inside(target) and target != self.livepatch_handler else []
            return taken if ppc.bform(word).always else [*taken, at + 4]
        if ppc.is_b(word):
            target = ppc.branch_target(word, at)
            return [target] if inside(target) else []
        if ppc.is_bl(word) or word in (ppc.BCTRL, ppc.BLRL):
            self.call()
        elif word in (ppc.BLR, ppc.BCTR):
            return []
        elif ppc.is_conditional_bclr(word) or ppc.is_conditional_bcctr(word):
            pass  # leaves when taken; the walk goes on where it is not
        elif not (word == ppc.NOP or self.load_or_store(word, at) or self.compute(word, at)):
            raise refuse(self.name, word, at)
        return [at + 4]


def decode_traced_calls(trampolines, livepatch_handler: int | None = None) -> TracedCallFrames:
    """Follow each trampoline ((name, address, code): ftrace_caller,
    ftrace_regs_caller) from its entry along every path, recording at each
    instruction where RA and the site in B are. Where paths meet, a value is
    kept only where both have it (and followed on again until nothing
    changes); paths that meet with r1 at different places, and an instruction
    the walk does not model (with the code after it that no path reached),
    are refused."""
    out = TracedCallFrames({}, {})
    walks: dict[int, _TracedCallWalk] = {}   # pc -> what every path so far has in common there
    failures = []                             # (address, why, end of that trampoline's code)
    for name, address, code in trampolines:
        insns = ppc.words(code)
        inside = lambda at, start=address, end=address + 4 * len(insns): at is not None and start <= at < end
        work = [(address, _TracedCallWalk(name, livepatch_handler))]
        for _ in range(8 * MAX_INSNS):
            if not work:
                break
            at, walk = work.pop()
            if at in out.refused:
                continue
            seen = walks.get(at)
            if seen is not None:
                if seen.frame != walk.frame:
                    out.refused[at] = (f"{name}: paths meet at {at:#x} with r1 at entry{seen.frame:+#x} "
                                       f"and entry{walk.frame:+#x}: not followed")
                    continue
                walk = seen.meet(walk)
                if walk is None:
                    continue  # nothing new here
            walks[at] = walk.fork()
            out.states[at] = walk.snapshot(address)
            try:
                nexts = walk.successors(insns[(at - address) // 4], at, inside)
            except FtraceCodeError as e:
                failures.append((at, str(e), address + 4 * len(insns)))
                continue
            work += [(n, walk.fork() if i else walk) for i, n in enumerate(reversed(nexts))]
    for at, why, end in failures:
        refuse_rest(out, at, why, end)
    for at in out.refused:
        out.states.pop(at, None)
    return out


def refuse_rest(out: TracedCallFrames, at: int, why: str, end: int) -> None:
    """Refuse at and the code after it that no path reached: where a path the
    decoder could not follow would have gone, nothing is known."""
    out.refused[at] = why
    for address in range(at + 4, end, 4):
        if address not in out.states:
            out.refused.setdefault(address, why)
