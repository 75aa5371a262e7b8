"""The merged design's redirection invariants, checked at one stop per redirection.

klp-watch stops once per redirection, at P3: where C returns into
livepatch_handler (the instruction after its bctrl), before the handler
checks the magic, restores LR and r2 and pops. Everything the redirection
did is visible there, and nothing has yet gone wrong in A:

- the entry it pushed ([TOC, RA, magic] at livepatch_sp-24) is still there;
- r1 must be A's stack pointer again, and A's frame header is at r1;
- the values A will resume with are the ones the handler is about to load.

Instead of a second stop at P1 to compare before and after, each value is
cross-checked against what the code says it must be (static knowledge): the
instruction before RA (a call, and which class), the TOC of the object RA is
in, A's frame size from its prologue (so r1's back chain must lie exactly
that far above r1), and the module stub a global call went through (so the
saved TOC must be B's). Invariant numbers are those of docs/invariants.md.
"""

import struct
from dataclasses import dataclass, field

from gdbklp.abi import ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.kernel import KernelView, TaskIdentity, function_of_label
from gdbklp.abi.livepatch import LivepatchEntry, LivepatchHandlerLayout, entry_at

NOT_REDIRECTED = "not redirected"  # Violation.call_site of a call that ftrace let run B
SAMPLE = "sample"                  # Violation.call_site of what a sampling pause found


@dataclass(frozen=True)
class ReturnSample:
    """What one stop at P3 reads: r1 and r13, then small memory blocks.

    Of frame_header the checks read the back chain (the first
    HEADER_ALWAYS_READ bytes) and, only for a caller that reloads r2
    (CallSite.restores_toc), the TOC save slot (toc_slot_read()): record
    mode's verdict memo keys on those bytes alone (tests/test_invariants.py
    holds it)."""

    HEADER_ALWAYS_READ = 8  # the back chain

    task: int
    cpu: int
    sp: int                # r1
    livepatch_sp: int
    stack_base: int
    livepatch_block: bytes  # memory [stack_base, livepatch_sp + 24): the whole livepatch stack
    frame_header: bytes     # memory [sp, sp + 32): the header of (what must be) A's frame
    task_slot: int = 0      # where the PACA holds the task pointer (r13 + its offset)

    def toc_slot_read(self, site: CallSite) -> list[tuple[tuple, bytes]]:
        """The read of A's TOC save slot the checks made for a call of this
        kind, as a memo trace entry (("m", address, 8), bytes): none unless the
        caller reloads r2 from it."""
        if not site.restores_toc:
            return []
        slot = ppc.TOC_SAVE_SLOT
        return [(("m", self.sp + slot, 8), self.frame_header[slot:slot + 8])]


@dataclass(frozen=True)
class EventContext:
    """Where, to whom and in which redirection something was seen: what every
    violation of that event carries."""

    seq: int = -1
    who: TaskIdentity = TaskIdentity(0)
    cpu: int = -1
    call_site: str = "?"
    caller: str = "?"
    patched: str = "?"
    replacement: str = "?"

    @classmethod
    def from_dict(cls, data: dict) -> "EventContext":
        return cls(**{**data, "who": TaskIdentity(**data["who"])})


@dataclass
class Violation:
    """One invariant found broken: what was expected and found, where the state
    first went wrong (diagnosis, when known), and the event it was seen in."""

    invariant: int
    title: str
    expected: str
    found: str
    diagnosis: str = ""   # where the state first went wrong, and which instruction made it, if known
    context: EventContext = EventContext()

    @classmethod
    def from_dict(cls, data: dict) -> "Violation":
        return cls(**{**data, "context": EventContext.from_dict(data["context"])})

    # the event's fields, read as the violation's own
    seq = property(lambda self: self.context.seq)
    who = property(lambda self: self.context.who)
    task = property(lambda self: self.context.who.task)
    pid = property(lambda self: self.context.who.pid)
    comm = property(lambda self: self.context.who.comm)
    cpu = property(lambda self: self.context.cpu)
    call_site = property(lambda self: self.context.call_site)
    caller = property(lambda self: self.context.caller)
    patched = property(lambda self: self.context.patched)
    replacement = property(lambda self: self.context.replacement)

    @property
    def event(self) -> str:
        if self.call_site in (NOT_REDIRECTED, SAMPLE):
            return f"{'a call not redirected' if self.call_site == NOT_REDIRECTED else 'a sample'}, " \
                   f"after redirection #{self.seq}"
        return f"redirection #{self.seq}"

    def format_text(self) -> str:
        return "\n".join([
            f"VIOLATION of invariant {self.invariant}: {self.title}",
            f"  {self.event}: task {self.task:#x} (pid {self.pid} {self.comm}) on CPU {self.cpu}",
            f"  call site {self.call_site} in {self.caller}; patched {self.patched} -> replacement {self.replacement}",
            f"  expected: {self.expected}",
            f"  found:    {self.found}",
        ] + ([f"  diagnosis: {self.diagnosis}"] if self.diagnosis else [])
          + [f"  invariant {self.invariant}: docs/invariants.md#{self.invariant}"])


def stamp(violations: list[Violation], context: EventContext) -> list[Violation]:
    """Mark each violation with its event (in place); returns violations."""
    for v in violations:
        v.context = context
    return violations


@dataclass
class ReturnCheck:
    """The outcome for one redirection: the entry it used and what is wrong."""

    entry: LivepatchEntry | None
    call_site: CallSite
    caller: str
    patched: int | None
    violations: list[Violation] = field(default_factory=list)
    depth: int = 0


def frame_size_from_prologue(code: bytes) -> int | None:
    """Size of the frame a function's prologue allocates (stdu r1,-N(r1)), or None."""
    for word in ppc.words(code):
        if ppc.is_stdu(word, rs=1, ra=1):
            disp = ppc.dsform(word).disp
            return -disp if disp < 0 else None
        if word == ppc.BLR:
            return None
    return None


def module_stub_target(code: bytes) -> int | None:
    """Where an ELFv2 module-loader stub branches (its funcdata at +32), or None.

    Linux 6.1 ppc64_stub_entry: addis r11,r2,HI; addi r11,r11,LO; std r2,24(r1);
    ld r12,32(r11); mtctr r12; bctr; then the magic and the target address.
    """
    if len(code) < 40:
        return None
    w = ppc.words(code[:24])
    if (ppc.is_addis(w[0], rt=11, ra=2) and ppc.is_addi(w[1], rt=11, ra=11)
            and ppc.is_std(w[2], rs=2, ra=1, disp=24) and ppc.is_ld(w[3], rt=12, ra=11, disp=32)
            and ppc.is_mtctr(w[4], rs=12) and w[5] == ppc.BCTR):
        return struct.unpack_from("<Q", code, 32)[0]
    return None


class CodeFacts:
    """Facts read from the kernel's code once and kept: frame sizes, stub targets."""

    PROLOGUE_BYTES = 64

    def __init__(self, view: KernelView, read):
        self.view = view
        self.read = read
        self._frame_sizes: dict[int, int | None] = {}
        self._callees: dict[int, int | None] = {}
        self._ctr_neutral: dict[int, bool] = {}
        self._instructions: dict[int, int] = {}

    def frame_size(self, address: int) -> int | None:
        """Frame size of the function containing address."""
        start = self.view.function_start(address)
        if start is None:
            return None
        if start not in self._frame_sizes:
            try:
                self._frame_sizes[start] = frame_size_from_prologue(self.read(start, self.PROLOGUE_BYTES))
            except Exception:
                return None
        return self._frame_sizes[start]

    def instruction(self, address: int) -> int:
        """The instruction word at address (code does not change while the view lasts)."""
        if address not in self._instructions:
            self._instructions[address] = ppc.words(self.read(address, 4))[0]
        return self._instructions[address]

    def leaves_ctr_alone(self, function: int) -> bool:
        """Does the function starting at function return with CTR as it was at its
        entry? Only when its code, to its symbol's end, neither writes CTR nor
        calls or branches anywhere else (gdbklp.abi.ppc.may_change_ctr)."""
        if function not in self._ctr_neutral:
            symbol = self.view.symbol_at(function)
            neutral = False
            if symbol is not None and symbol.address == function and symbol.size:
                try:
                    code = self.read(function, symbol.size)
                    end = function + symbol.size
                    neutral = not any(ppc.may_change_ctr(word, function + 4 * i, function, end)
                                      for i, word in enumerate(ppc.words(code)))
                except Exception:
                    neutral = False
            self._ctr_neutral[function] = neutral
        return self._ctr_neutral[function]

    def callee(self, ra: int, site: CallSite) -> int | None:
        """B: the function the call before ra branches to (through a module stub if any)."""
        if site not in (CallSite.LOCAL, CallSite.LOCAL_OTHER, CallSite.GLOBAL):
            return None
        if ra not in self._callees:
            target = None
            try:
                call = ppc.words(self.read(ra - 4, 4))[0]
                target = ppc.branch_target(call, ra - 4)
                if site is CallSite.GLOBAL:
                    target = module_stub_target(self.read(target, 40))
            except Exception:
                target = None
            # a local call enters at B's local entry point: name B by its start
            start = self.view.function_start(target) if target is not None else None
            self._callees[ra] = start if start is not None else target
        return self._callees[ra]


def check_return(s: ReturnSample, facts: CodeFacts) -> ReturnCheck:
    """All checks for one redirection at P3; never raises."""
    out = _check_livepatch_sp(s, facts.view.livepatch)
    entry = _returning_entry(s, facts, out)
    if entry is None:
        return ReturnCheck(None, CallSite.NOT_A_CALL, "?", None, out)
    view = facts.view
    site = view.call_site(facts.read, entry.ra)
    patched = facts.callee(entry.ra, site)
    out += _check_resume_point(s, facts, entry, site)
    out += _check_resume_toc(s, facts, entry, site, patched)
    depth = (entry.address - _first_record(s)) // view.livepatch.entry_size + 1
    return ReturnCheck(entry, site, view.describe(entry.ra), patched, out, depth)


def _first_record(s: ReturnSample) -> int:
    """Where the livepatch stack's first record goes: just above the stack-end magic."""
    return s.stack_base + 8


def _back_chain(s: ReturnSample) -> int:
    """The back chain at r1."""
    return struct.unpack_from("<Q", s.frame_header, 0)[0]


def _check_livepatch_sp(s: ReturnSample, layout: LivepatchHandlerLayout) -> list[Violation]:
    """Invariant 10: livepatch_sp lies on a record boundary between the stack's
    first record and r1, and the stack-end magic below the records is intact."""
    out = []
    first, L = _first_record(s), s.livepatch_sp
    if (L - first) % layout.entry_size or not first + layout.entry_size <= L <= s.sp:
        out.append(Violation(10, "livepatch_sp out of place at a return from C",
                             f"base+8 + 24*k with k >= 1, below r1 {s.sp:#x} (base {s.stack_base:#x})",
                             f"livepatch_sp {L:#x} = base+{L - s.stack_base}"))
    end_magic = struct.unpack_from("<Q", s.livepatch_block, 0)[0] if len(s.livepatch_block) >= 8 else None
    if end_magic is not None and end_magic & 0xFFFFFFFF != ppc.STACK_END_MAGIC:
        out.append(Violation(10, "stack-end magic overwritten", f"{ppc.STACK_END_MAGIC:#x} at {s.stack_base:#x}",
                             f"{end_magic:#x}"))
    return out


def _frame_ok(s: ReturnSample, facts: CodeFacts, ra: int) -> bool | None:
    """Does r1 look like the stack pointer of the function containing ra (its
    back chain as far above r1 as that function's frame is big)? None when the
    frame size is not known."""
    size = facts.frame_size(ra)
    if size is None:
        return None
    return _back_chain(s) == s.sp + size


def _returning_entry(s: ReturnSample, facts: CodeFacts, out: list[Violation]) -> LivepatchEntry | None:
    """The livepatch stack record of the redirection returning at P3.

    It is the record on top (just below livepatch_sp) when that one fits: the
    magic intact, RA after a call, r1 A's stack pointer. Otherwise the record
    one below or one above livepatch_sp that fits is taken, and livepatch_sp's
    imbalance appended to out (invariant 10); None when neither fits and
    there is no top record at all."""
    view, layout = facts.view, facts.view.livepatch
    L = s.livepatch_sp

    def record_at(record: int) -> LivepatchEntry | None:
        if record < _first_record(s):
            return None
        return entry_at(s.livepatch_block, s.stack_base, record, layout)

    def fits(e: LivepatchEntry | None) -> bool:
        return (e is not None and e.magic == layout.magic and view.call_site(facts.read, e.ra).is_call
                and _frame_ok(s, facts, e.ra) is not False)

    top = record_at(L - layout.entry_size)
    if fits(top):
        return top
    below, above = record_at(L - 2 * layout.entry_size), record_at(L)
    if fits(below):
        out.append(Violation(10, "livepatch_sp unbalanced: 24 bytes above the returning redirection's entry",
                             f"livepatch_sp {below.address + layout.entry_size:#x} (entry at {below.address:#x}, "
                             f"RA {view.describe(below.ra)})",
                             f"livepatch_sp {L:#x}: the handler will check and pop {top and top.address or 0:#x} "
                             f"(magic {top and top.magic or 0:#x})"))
        return below
    if fits(above):
        out.append(Violation(10, "livepatch_sp unbalanced: below the returning redirection's entry (popped early)",
                             f"livepatch_sp {above.address + layout.entry_size:#x} (entry at {above.address:#x}, "
                             f"RA {view.describe(above.ra)})",
                             f"livepatch_sp {L:#x}"))
        return above
    return top


def _check_resume_point(s: ReturnSample, facts: CodeFacts, entry: LivepatchEntry, site: CallSite) -> list[Violation]:
    """Where A resumes: invariant 8 (the magic the handler is about to check)
    and invariants 7 and 9 (the saved return address follows a call, and r1
    is A's stack pointer)."""
    view, layout = facts.view, facts.view.livepatch
    caller = view.describe(entry.ra)
    out = []
    if entry.magic != layout.magic:
        out.append(Violation(8, "livepatch stack magic overwritten while C ran (the handler's tdne will trap)",
                             f"{layout.magic:#x} at {entry.address + layout.magic_slot + layout.entry_size:#x}",
                             f"{entry.magic:#x}"))
    if not site.is_call:
        try:
            before = ppc.disassemble(facts.read(entry.ra - 4, 4), entry.ra - 4)[0][1]
        except Exception:
            before = "unreadable code"
        out.append(Violation(9, "saved return address does not follow a call: A would resume elsewhere",
                             "an address right after a bl or bctrl",
                             f"{entry.ra:#x} ({caller}), preceded by `{before}`, not a call"))
    elif _frame_ok(s, facts, entry.ra) is False:
        size = facts.frame_size(entry.ra)
        out.append(Violation(9, "r1 at the return from C is not A's stack pointer",
                             f"A ({caller}) has a {size}-byte frame: the back chain at r1 must be r1+{size} = "
                             f"{s.sp + size:#x}", f"r1 {s.sp:#x}, back chain there {_back_chain(s):#x}"))
    return out


def _check_resume_toc(s: ReturnSample, facts: CodeFacts, entry: LivepatchEntry, site: CallSite,
                      patched: int | None) -> list[Violation]:
    """The TOC A resumes with: invariants 7 and 9 on the TOC the record saved
    (A's own for a local call, B's for a global one, some object's for an
    indirect one), and invariant 3 on A's TOC save slot, 24(r1), for a
    caller that reloads r2 from it."""
    view = facts.view
    owner = lambda toc: view.toc_owner(toc) or "no object"
    caller_obj = view.object_at(entry.ra)
    out = []
    if site in (CallSite.LOCAL, CallSite.LOCAL_OTHER) and caller_obj and caller_obj.toc is not None:
        if entry.toc != caller_obj.toc:
            out.append(Violation(9, "A would resume with a TOC that is not its own (local call: A does not reload r2)",
                                 f"{caller_obj.name}'s TOC {caller_obj.toc:#x}",
                                 f"saved TOC {entry.toc:#x} ({owner(entry.toc)})"))
    elif site is CallSite.GLOBAL and patched is not None:
        callee_obj = view.object_at(patched)
        if callee_obj and callee_obj.toc is not None and entry.toc != callee_obj.toc:
            out.append(Violation(7, "saved TOC is not the one B's global entry computed",
                                 f"{callee_obj.name}'s TOC {callee_obj.toc:#x}",
                                 f"{entry.toc:#x} ({owner(entry.toc)})"))
    elif site is CallSite.INDIRECT and view.toc_owner(entry.toc) is None:
        out.append(Violation(7, "saved TOC is no loaded object's TOC", "the TOC of vmlinux or a module",
                             f"{entry.toc:#x}"))
    if site.restores_toc and caller_obj and caller_obj.toc is not None:
        slot = struct.unpack_from("<Q", s.frame_header, ppc.TOC_SAVE_SLOT)[0]
        if slot != caller_obj.toc:
            out.append(Violation(3, "A's TOC save slot 24(r1) was overwritten while C ran: "
                                    "A's ld r2,24(r1) will load a wrong TOC",
                                 f"{caller_obj.name}'s TOC {caller_obj.toc:#x} at {s.sp + ppc.TOC_SAVE_SLOT:#x}",
                                 f"{slot:#x} ({owner(slot)})"))
    return out


# task_struct.patch_state values (include/linux/livepatch.h)
KLP_UNDEFINED, KLP_UNPATCHED, KLP_PATCHED = -1, 0, 1
PATCH_STATE_NAMES = {KLP_UNDEFINED: "KLP_UNDEFINED", KLP_UNPATCHED: "KLP_UNPATCHED", KLP_PATCHED: "KLP_PATCHED"}


def check_consistency(redirected: bool, in_transition: bool, patch_state: int,
                      old: str, new: str) -> Violation | None:
    """Invariant 12 for one call of a function B that an enabled patch replaces with C.

    The kernel's ftrace handler decides per call: during a transition it
    follows the calling task's patch_state (KLP_PATCHED -> C, KLP_UNPATCHED ->
    B); outside one, every call goes to C. KLP_UNDEFINED during a transition
    only occurs while the transition starts or completes, when the handler
    goes by func->transition instead: such calls are not judged.
    """
    state = PATCH_STATE_NAMES.get(patch_state, str(patch_state))
    if in_transition:
        if redirected and patch_state == KLP_UNPATCHED:
            return Violation(12, "an unpatched task was redirected to the new function during a transition",
                             f"the old function {old} (task patch_state {state})", f"redirected to {new}")
        if not redirected and patch_state == KLP_PATCHED:
            return Violation(12, "a patched task ran the old function during a transition",
                             f"redirected to {new} (task patch_state {state})", f"ran the old function {old}")
    elif not redirected:
        return Violation(12, "the old function ran while its replacement is enabled and no transition runs",
                         f"redirected to {new}", f"ran the old function {old} (task patch_state {state})")
    return None


def replaced_on_stack(frame_functions: list[str], replaced: set[str]) -> list[str]:
    """The frames' functions ("name+0x1c", "name+0x1c [module]") that are being replaced, sorted."""
    return sorted({label for label in frame_functions if function_of_label(label) in replaced})


def check_switched_task(patch_state: int, target_state: int, holders: list[str]) -> Violation | None:
    """Invariant 12's stack rule for one task during a transition.

    The kernel switches a task to the transition's target state only when none
    of the functions being replaced (the old ones when patching, the new ones
    when unpatching) is on its stack; holders are those on it now. A task
    still in the other state is merely pending, whatever it holds.
    """
    if patch_state != target_state or not holders:
        return None
    return Violation(12, "a task was switched while a function being replaced is on its stack",
                     f"none of the replaced functions on the stack of a {PATCH_STATE_NAMES[target_state]} task",
                     f"{', '.join(holders)} on its stack")


def check_settled_task(holders: list[str]) -> Violation | None:
    """Invariant 12's stack rule between transitions: a transition completes only
    when no task holds a function being replaced, so an old function of an
    enabled patch on a task's stack means a stack check failed (or the
    transition was forced): the task will go on running the old code."""
    if not holders:
        return None
    return Violation(12, "a replaced function is on a task's stack after its patch's transition completed",
                     "no old function of an enabled patch on any task's stack", f"{', '.join(holders)} on its stack")


def check_predicted_return(s: ReturnSample, check: ReturnCheck, facts: CodeFacts, prediction) -> list[Violation]:
    """Invariant 9 at P4, from the return half run on the P3 state
    (gdbklp.abi.trampoline.predict_return), before A resumes.

    check_return has judged the state at P3 (the entry, r1, the TOC saved
    for A, A's TOC slot); what is left is the code that runs after P3: its
    blr must go to the entry's RA, r1 must stay A's stack pointer, r2 must
    be the TOC saved for A (for a global or indirect call A then reloads its
    own from 24(r1): invariant 3), livepatch_sp must be back at the entry,
    where it was before the push, and an intact magic must not trap. A
    state already wrong at P3 (no entry, livepatch_sp out of place) is
    reported there, at the point it first went wrong, and not again here.
    Each wrong value names the instruction that made it.
    """
    entry, view = check.entry, facts.view
    if entry is None or any(v.invariant == 10 for v in check.violations):
        return []

    def insn(at: int) -> str:
        return f"`{ppc.disassemble(facts.read(at, 4), at)[0][1]}` at {view.describe(at)} ({at:#x})"

    def by(key) -> str:
        at = prediction.writer.get(key)
        return f"set by {insn(at)}" if at is not None else "left as it was at P3"

    if prediction.trap_at is not None:
        if entry.magic != view.livepatch.magic:
            return []  # invariant 8, reported at P3
        return [Violation(8, "the return half will trap on an intact magic (P4 predicted at P3)",
                          f"its check passes on the entry's magic {entry.magic:#x}", f"{insn(prediction.trap_at)} traps")]
    out: list[Violation] = []
    return_half = "in livepatch_handler's return half, after P3 (the state at P3 was right)"
    if prediction.pc != entry.ra:
        out.append(Violation(9, "the return half will not return to RA (P4 predicted at P3)",
                             f"its blr goes to RA {entry.ra:#x} ({check.caller})",
                             f"LR {prediction.pc:#x} ({view.describe(prediction.pc)}), {by('lr')}"))
    if prediction.r1 != s.sp:
        out.append(Violation(9, "the return half will move r1 (P4 predicted at P3)",
                             f"r1 at P4 is r1 at P3, {s.sp:#x}", f"r1 {prediction.r1:#x}, {by('r1')}"))
    if prediction.r2 != entry.toc:
        out.append(Violation(9, "A will resume with a TOC the push did not save (P4 predicted at P3)",
                             f"the TOC saved for A at P1, {entry.toc:#x} ({view.toc_owner(entry.toc) or 'no object'})",
                             f"r2 {prediction.r2:#x} ({view.toc_owner(prediction.r2) or 'no object'}), {by('r2')}"))
    for cell, value in prediction.livepatch_sp.items():
        if value != entry.address:
            out.append(Violation(9, "livepatch_sp will not be back where it was before the push "
                                    "(P4 predicted at P3)",
                                 f"{entry.address:#x} (the popped entry) at {cell:#x}", f"{value:#x}, {by(cell)}"))
    if not prediction.livepatch_sp:
        out.append(Violation(9, "the return half will not pop the livepatch stack (P4 predicted at P3)",
                             f"livepatch_sp back to {entry.address:#x}", "no store to livepatch_sp"))
    for v in out:
        v.diagnosis = return_half
    return out


def check_balance(entries, walk, seen_by: str) -> tuple[Violation | None, set[int]]:
    """Invariant 10 over time: a task's livepatch stack holds one entry per
    redirection in flight, and each of those has its trampoline frame on the
    task's stack (C returns into livepatch_handler: the LR slot of C's caller
    frame holds P3). More entries: pushed without pop (the extra ones, on top,
    are stale: returned as such); fewer: popped early. Judged only on a walk
    that reached the top of the stack (walk: a gdbklp.abi.frames.Walk)."""
    in_flight = sum(f.kind == "trampoline" for f in walk.frames)
    if not walk.complete or len(entries) == in_flight:
        return None, set()
    pushed_without_pop = len(entries) > in_flight
    stale = {e.address for e in entries[in_flight:]} if pushed_without_pop else set()
    return Violation(10, "livepatch stack unbalanced: " + ("pushed without pop" if pushed_without_pop
                                                          else "popped early") + f" (seen by a {seen_by})",
                     f"one entry per redirection in flight: {in_flight} (trampoline frames on its stack)",
                     f"{len(entries)} entries"), stale
