"""Invariant 14, live: ftrace's hand-off to livepatch_handler, and the
out-of-line stubs that lead into ftrace.

The hand-off is checked between two stops of one task: P0, the entry of
ftrace_caller (or ftrace_regs_caller), where r0 is RA, LR is the return
into B or its out-of-line stub and r1, r2, r14..r31 are A's; and the entry
of livepatch_handler, where RA and C must be in the registers the handler
takes them from (decoded from its code: LR and CTR up to 6.12, r0 and LR
with out-of-line stubs) and r1, r2 and every non-volatile register must be
A's again (ftrace_caller keeps its own return address in r15 with
out-of-line stubs and must put A's back).

An out-of-line stub (gdbklp.abi.ftrace.OolStub) must stay what ftrace made
it: `mflr r0; bl <ftrace trampoline> | nop; mtlr r0; b site+4`, where site,
in the traced function, holds `b stub` (traced) or a nop (not traced). A
relocation applied late (a livepatch module's klp relocations) that writes
over the stub area breaks this without any redirection showing it first.
"""

from dataclasses import dataclass

from gdbklp.abi import ppc
from gdbklp.abi.ftrace import OolStub, decode_ool_stub
from gdbklp.abi.invariants import Violation

HANDOFF_REGISTERS = ("r0", "r1", "r2", "lr", "ctr", *ppc.CALLEE_SAVED_GPRS)


@dataclass(frozen=True)
class FtraceEntry:
    """The registers of one task at P0 that the hand-off must carry over."""

    registers: dict[str, int]  # HANDOFF_REGISTERS

    @property
    def ra(self) -> int:
        return self.registers["r0"]

    @property
    def sp(self) -> int:
        return self.registers["r1"]


def check_handoff(p0: FtraceEntry | None, at_handler: dict[str, int], ra_register: str, c_register: str,
                  replacement: int | None, describe) -> list[Violation]:
    """Invariant 14 at livepatch_handler's entry, against the same task's P0.

    at_handler: the registers there (HANDOFF_REGISTERS); replacement: C as
    the live patch has it for the B P0 was in (None: not known); describe
    names an address.
    """
    if p0 is None:
        return [Violation(14, "livepatch_handler entered without an ftrace trampoline entry (P0) at this r1",
                          f"a P0 of this task with r1 {at_handler['r1']:#x}", "none")]
    out = []
    ra = at_handler[ra_register]
    if ra != p0.ra:
        out.append(Violation(14, f"RA is not in {ra_register} at livepatch_handler's entry",
                             f"{ra_register} = RA {p0.ra:#x} ({describe(p0.ra)}), r0 at P0",
                             f"{ra:#x} ({describe(ra)})"))
    c = at_handler[c_register]
    if replacement is not None and c != replacement:
        out.append(Violation(14, f"C is not in {c_register} at livepatch_handler's entry",
                             f"{c_register} = C {replacement:#x} ({describe(replacement)})",
                             f"{c:#x} ({describe(c)})"))
    changed = [name for name in ("r1", "r2", *ppc.CALLEE_SAVED_GPRS) if at_handler[name] != p0.registers[name]]
    if changed:
        out.append(Violation(14, f"{', '.join(changed)} not A's again at livepatch_handler's entry",
                             ", ".join(f"{n} = {p0.registers[n]:#x} as at P0" for n in changed),
                             ", ".join(f"{n} = {at_handler[n]:#x}" for n in changed)))
    return out


def traced_function_site(p0_lr: int, read) -> int:
    """The traced site in B of the call that entered ftrace at P0 with this LR:
    just before LR, or, when LR is in an out-of-line stub, where the stub returns
    (minus 4). read(address, length) reads memory."""
    stub = decode_ool_stub(read(p0_lr - 8, 16), p0_lr - 8)
    return stub.returns_to - 4 if stub is not None else p0_lr - 4


def check_ool_stub(stub_address: int, code: bytes, read, describe, trampolines: set[int] | None = None,
                   check_site: bool = True) -> Violation | None:
    """An out-of-line stub as ftrace made it, pointing back at a site that leads
    to it (traced) or is a nop (not traced). code: the stub's 16 bytes;
    trampolines: where its bl may go (None: anywhere, e.g. a module's ftrace
    trampoline); check_site: also read the site (one small read)."""
    stub: OolStub | None = decode_ool_stub(code, stub_address)
    where = f"stub at {stub_address:#x} ({describe(stub_address)})"
    if stub is None:
        words = " ".join(f"{w:08x}" for w in ppc.words(code))
        return Violation(14, "out-of-line ftrace stub corrupted",
                         "mflr r0; bl <ftrace> or nop; mtlr r0; b <site+4>", f"{where}: {words}")
    if stub.calls is not None and trampolines is not None and stub.calls not in trampolines:
        return Violation(14, "out-of-line ftrace stub calls something other than ftrace",
                         "bl to " + " or ".join(describe(t) for t in sorted(trampolines)),
                         f"{where}: bl {stub.calls:#x} ({describe(stub.calls)})")
    if not check_site:
        return None
    site = stub.returns_to - 4
    word = int.from_bytes(read(site, 4), "little")
    leads_here = ppc.is_b(word) and ppc.branch_target(word, site) == stub_address
    if not (leads_here or word == ppc.NOP):
        return Violation(14, "out-of-line ftrace stub returns to a site that does not lead to it",
                         f"the instruction before {stub.returns_to:#x} ({describe(stub.returns_to)}) is "
                         f"`b {stub_address:#x}` or a nop", f"{where}: it is {word:#010x}")
    return None
