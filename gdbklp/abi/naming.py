"""Which B was called and which C ran, for one redirection seen at P3.

A direct call names B in its own code (the `bl`, through a module stub for a
global call), and the patches' function lists give C. An indirect call
(`bctrl`) names nothing: the function pointer is gone by P3. What is still
certain there:

- C from P1: where the watch also holds the trampoline's `bctrl` (P1), CTR
  there is C (--resolve-indirect);
- C from CTR at P3: livepatch_handler enters C with CTR = C; if no
  replacement that could have run can change CTR (none writes it, calls out
  or branches out), CTR at P3 is still C;
- the only candidate: C's global entry sets r2 to its object's TOC. When r2
  at P3 differs from the TOC saved for A, C set it, so C is in the object
  with that TOC; if that object holds one replacement, it is C.

B is then the one function C replaces. Where nothing is certain the names
stay unknown (None): a name is never guessed.
"""

from dataclasses import dataclass

from gdbklp.abi.callsite import CallSite

BY_CALL_SITE = "call site"
BY_P1 = "CTR at P1"
BY_CTR = "CTR at P3"
BY_ONLY_CANDIDATE = "only replacement in r2's object"


@dataclass(frozen=True)
class Names:
    patched: int | None = None       # B
    replacement: int | None = None   # C
    method: str = ""                 # how they were found; "" when they were not


@dataclass(frozen=True)
class ReturnRegisters:
    """What P3 offers for naming: r2 and CTR as C left them, the TOC saved for A."""

    r2: int
    ctr: int
    saved_toc: int


def patched_by(replacement: int, replacements: dict[int, int]) -> int | None:
    """The one B that C replaces, or None when none or several do."""
    found = [b for b, c in replacements.items() if c == replacement]
    return found[0] if len(found) == 1 else None


def candidates(regs: ReturnRegisters, replacements: dict[int, int], toc_of) -> set[int]:
    """The replacements that can have run: all, or those of r2's object when C set r2.

    toc_of(address) gives the TOC of the object holding address (None if unknown).
    """
    every = set(replacements.values())
    if regs.r2 == regs.saved_toc:  # C may not have touched r2: it tells nothing
        return every
    return {c for c in every if toc_of(c) == regs.r2}


def _toc_of(facts):
    def toc_of(address: int) -> int | None:
        obj = facts.view.object_at(address)
        return obj.toc if obj else None
    return toc_of


def map_may_be_stale(callee: int | None, regs: ReturnRegisters | None, replacements: dict[int, int],
                     facts) -> bool:
    """Could reading the patches' function lists again name more? When B is known
    but nothing replaces it, or C set r2 to an object without any known
    replacement (a patch registered since the lists were read)."""
    if callee is not None:
        return callee not in replacements
    return regs is not None and regs.r2 != regs.saved_toc and not candidates(regs, replacements, _toc_of(facts))


def name_redirection(site: CallSite, callee: int | None, regs: ReturnRegisters | None,
                     replacements: dict[int, int], facts, p1_replacement: int | None = None) -> Names:
    """B and C of one redirection, or as much of them as is certain.

    callee: B as the call site names it (CodeFacts.callee); regs: registers at
    P3 (None when not available); facts: a CodeFacts, for the object TOCs and
    leaves_ctr_alone; p1_replacement: CTR at this redirection's P1, if held there.
    """
    if p1_replacement is not None:
        return Names(patched_by(p1_replacement, replacements), p1_replacement, BY_P1)
    if callee is not None:
        return Names(callee, replacements.get(callee), BY_CALL_SITE)
    if site is not CallSite.INDIRECT or regs is None:
        return Names()
    possible = candidates(regs, replacements, _toc_of(facts))
    if regs.ctr in possible and all(facts.leaves_ctr_alone(c) for c in possible):
        return Names(patched_by(regs.ctr, replacements), regs.ctr, BY_CTR)
    if len(possible) == 1 and regs.r2 != regs.saved_toc:
        (c,) = possible
        return Names(patched_by(c, replacements), c, BY_ONLY_CANDIDATE)
    return Names()
