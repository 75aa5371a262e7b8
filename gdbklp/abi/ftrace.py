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

MAX_INSNS = 256
VOLATILE = ("r0", *(f"r{n}" for n in range(3, 13)), "ctr", "lr")
NON_VOLATILE = tuple(f"r{n}" for n in range(14, 32))
SPRS = {1: "xer", 8: "lr", 9: "ctr"}
# origins of values, as the walk follows them
RA = "RA"      # r0 at P0: the return address into A
SITE = "site"  # LR at P0 (just after B's profiling call) and values computed from it
C = "C"        # pt_regs->nip read back: the replacement, for a redirected call


class FtraceCodeError(Exception):
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


def _field(word: int, shift: int) -> int:
    return (word >> shift) & 31


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
    regs: dict[str, str | None] = {f"r{n}": f"entry:r{n}" for n in range(32)}
    regs.update(r0=RA, lr=SITE, ctr="entry:ctr", xer="entry:xer")
    frame = 0                             # r1 relative to its value at the entry
    slots: dict[int, str | None] = {}     # frame offset -> origin of the word stored there
    compares: dict[int, set] = {}         # CR field -> origins of the compared values
    at = address
    for _ in range(MAX_INSNS):
        index = (at - address) // 4
        if not 0 <= index < len(insns):
            raise FtraceCodeError(f"{name}: ran past its code at {at:#x} before a branch to "
                                  f"livepatch_handler ({livepatch_handler:#x})")
        word = insns[index]
        op, rt, ra = word >> 26, _field(word, 21), _field(word, 16)
        xo = (word >> 1) & 0x3FF
        d = ppc.decode_dform(word)
        next_at = at + 4
        if word == ppc.NOP:
            pass
        elif op == 62 and word & 3 in (0, 1) and ra == 1:  # std / stdu rS,d(r1)
            slots[frame + d.disp] = regs[f"r{rt}"]
            if word & 3 == 1:
                if rt != 1:
                    raise refuse(name, word, at, "stdu of a register other than r1 into r1:")
                frame += d.disp
        elif op == 62 and word & 3 == 0:  # std to memory other than the frame
            pass
        elif op == 58 and word & 3 == 0:  # ld
            if rt == 1:
                raise refuse(name, word, at, "r1 loaded from memory by")
            origin = slots.get(frame + d.disp) if ra == 1 else None
            regs[f"r{rt}"] = C if origin == SITE else origin
        elif op in (32, 34, 40):  # lwz, lbz, lhz
            regs[f"r{rt}"] = None
        elif op in (14, 15):  # addi (li), addis (lis)
            if rt == 1:
                if op != 14 or ra != 1:
                    raise refuse(name, word, at, "r1 set otherwise than by addi r1,r1 in")
                frame += d.disp
            else:
                regs[f"r{rt}"] = SITE if ra and regs[f"r{ra}"] == SITE else None
        elif op == 31 and xo == 266:  # add
            rb = _field(word, 11)
            regs[f"r{rt}"] = SITE if SITE in (regs[f"r{ra}"], regs[f"r{rb}"]) else None
        elif op == 31 and xo == 444 and rt == _field(word, 11):  # mr rA,rS
            regs[f"r{ra}"] = regs[f"r{rt}"]
        elif op == 21 or (op == 31 and xo in (824, 24, 27, 83, 19)):  # rlwinm, srawi, slw, sld, mfmsr, mfcr
            regs[f"r{ra}" if op == 21 or xo in (824, 24, 27) else f"r{rt}"] = None
        elif op == 31 and xo in (339, 467):  # mfspr, mtspr
            spr = SPRS.get(_field(word, 16) | (_field(word, 11) << 5))
            if spr is None:
                raise refuse(name, word, at)
            if xo == 339:
                regs[f"r{rt}"] = regs[spr]
            elif spr != "xer":
                regs[spr] = regs[f"r{rt}"]
        elif op in (10, 11) or (op == 31 and xo in (0, 32)):  # cmp[l]di, cmp[l]d (and word forms)
            compared = {regs[f"r{ra}"], regs[f"r{_field(word, 11)}"] if op == 31 else None}
            compares[rt >> 2] = compared
        elif op == 16:  # bc
            target = ppc.conditional_branch_target(word, at)
            bo, bi = rt, ra
            nip_changed = compares.get(bi >> 2) == {SITE, C} and bi & 3 == 2
            if target == livepatch_handler:
                if not (nip_changed and bo & 0x1C == 0x04):  # bne on that compare
                    raise refuse(name, word, at, "a branch to livepatch_handler not decided by the "
                                                 "nip-changed compare:")
                return _entry(at, regs, frame, slots)
            if word & 1:
                raise refuse(name, word, at)
            if nip_changed:  # the redirection's path: the nip has changed (not equal)
                taken = bo & 0x14 == 0x14 or (bo & 0x14 == 0x04 and not bo & 0x08)
                if taken:
                    next_at = target
        elif op == 18:  # b, bl
            if word & 2:
                raise refuse(name, word, at)
            if word & 1:
                _clobber(regs)
            else:
                next_at = ppc.branch_target(word, at)
        elif word == ppc.BCTRL:
            _clobber(regs)
        elif op == 19 and xo in (16, 528) and not word & 1 and rt & 0x14 != 0x14:
            pass  # a conditional blr/bctr: not the redirection's way out (it comes after the decision)
        elif word in (ppc.BLR, ppc.BCTR):
            raise refuse(name, word, at, "left through")
        else:
            raise refuse(name, word, at)
        at = next_at
    raise FtraceCodeError(f"{name}: no branch to livepatch_handler within {MAX_INSNS} instructions of {address:#x}")


def _clobber(regs: dict) -> None:
    """A call: the callee may change every volatile register (ELFv2)."""
    for reg in VOLATILE:
        regs[reg] = None


def _entry(at: int, regs: dict, frame: int, slots: dict) -> HandlerEntry:
    return HandlerEntry(
        branch=at,
        ra_registers=tuple(r for r in ("lr", "r0", "ctr") if regs[r] == RA),
        c_registers=tuple(r for r in ("lr", "r0", "ctr") if regs[r] == C),
        frame_popped=frame == 0,
        toc_restored=regs["r2"] == "entry:r2",
        clobbered=tuple(r for r in NON_VOLATILE if regs[r] != f"entry:{r}"),
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
    if not (words[3] & 0xFC000003) == 0x48000000:  # b (not bl, not absolute)
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
