"""klp-watch's model of the merged design: every redirection checked at P3.

P3 is where C returns into livepatch_handler (the instruction after its
bctrl): each redirection passes there once, with everything it did still in
place; gdbklp.abi.invariants says what is checked there and why one look is
enough. A look reads r1 and r13 from gdb's register cache and a few small
memory blocks (the task pointer, livepatch_sp, the livepatch stack, A's
frame header, the task's identity, klp_transition_patch); facts derived from
code are kept until the module list changes.

The model says what is checked where (its design points and guard points,
gdbklp.gdbext.watch.guards); how the guest is held there is the watch's
mode (gdbklp.gdbext.watch.modes); its verdicts go through its Reporter.
"""

import dataclasses

import gdb

from gdbklp.abi.callsite import CallSite
from gdbklp.abi.designs import CodePoint, Design
from gdbklp.abi.frames import Registers, prefetching_reader, walk_stack
from gdbklp.abi.invariants import (
    KLP_UNDEFINED,
    CodeFacts,
    ReturnSample,
    Violation,
    check_balance,
    check_consistency,
    check_predicted_return,
    check_return,
    stamp,
)
from gdbklp.abi.kernel import VMLINUX, KernelView, TaskIdentity
from gdbklp.abi.livepatch import entries as livepatch_entries
from gdbklp.abi.livepatch import paca_load_target
from gdbklp.abi.naming import Names, ReturnRegisters, map_may_be_stale, name_redirection
from gdbklp.abi.trampoline import predict_return
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.events import cache_until
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.stubs import ool_stub_violations
from gdbklp.gdbext.inferior.trampolines import handler_findings
from gdbklp.gdbext.watch.guards import Guards
from gdbklp.gdbext.watch.handoff import HandoffProbes
from gdbklp.gdbext.watch.modes import WatchMode, mode_classes
from gdbklp.gdbext.watch.probes import ProbePoint
from gdbklp.gdbext.watch.recipes import p1_recipe, p3_recipe
from gdbklp.gdbext.watch.reporting import Reporter
from gdbklp.options import WatchOptions
from gdbklp.report import Redirection, WatchReport
from gdbklp.snapshot import CodeImage


def code_facts(kernel: Kernel, covering: int | None = None) -> CodeFacts:
    """Facts read from the running kernel's code (frame sizes, stub targets, ...),
    kept while the module list stays the same; covering: an address the view
    must hold (the module list is checked again if it does not)."""
    return _code_facts(kernel.view() if covering is None else kernel.view_covering(covering))


@cache_until("modules", "objfile")
def _code_facts(view: KernelView) -> CodeFacts:
    return CodeFacts(view, target.read_memory)


@dataclasses.dataclass(frozen=True)
class EnteringReplacement:
    """What P1 (the bctrl into C) captures: the task, its new livepatch-stack entry, C."""

    task: int
    entry: int
    c: int


class Watch:
    """A watch of the merged design's redirections: its probe points and their
    checks. Subclasses model other designs (design_points, flush)."""

    design = Design.LIVEPATCH_STACK

    def __init__(self, kernel: Kernel, options: WatchOptions):
        self.kernel = kernel
        self.options = options
        self.layout = kernel.livepatch_layout()
        self.thread_size = kernel.thread_size
        self.reporter = Reporter(WatchReport(design=self.design, vmlinux=kernel.vmlinux), options)
        self.reporter.end_watch = self.finish
        self.consistency = patches.consistency_available(kernel)
        if not self.consistency:
            self.reporter.note("consistency model (invariant 12) not checked: the vmlinux has no "
                               "DWARF for klp_transition_patch and task_struct.patch_state")
        self.handler_code = kernel.handler_code()  # its return half is run at each P3
        self.extra_loads = 0  # words the return half loaded that the P3 check had not read
        self.p3_diagnosis = self.diagnose_push()  # for states found wrong at P3
        # the register P3's instruction loads, when klp-watch executes it for the guest
        p3_word = int.from_bytes(target.read_memory(self.layout.return_point, 4), "little")
        self.p3_loads_into = paca_load_target(p3_word, self.layout.paca_thread_info)
        self.p1_replacements: dict[int, dict[int, int]] = {}  # task -> livepatch entry address -> C
        if options.resolve_indirect and not self.layout.pushed_before_call:
            raise GdbklpError(f"--resolve-indirect: livepatch_handler at {self.layout.address:#x} does not "
                              f"store livepatch_sp before its bctrl at {self.layout.call_to_c:#x}, so P1 "
                              "cannot tell which redirection it enters")
        self.mode = WatchMode(self)  # no mode until start()
        self.handoff: HandoffProbes | None = None
        self.stubs_checked = None  # the last ool_stub_violations() result looked at
        self.stub_violations_seen: set[str] = set()

    @property
    def report(self) -> WatchReport:
        return self.reporter.report

    def diagnose_push(self) -> str:
        """Where a state found wrong at P3 comes from, as the static model of the
        handler tells: its push half (the instruction), or C, if push and pop are sound."""
        defects = [f for f in handler_findings(self.kernel) if not f.ok]
        for f in defects:
            self.reporter.note(f"static model of livepatch_handler: {f.text} "
                               f"({self.kernel.describe(f.address)}, {f.address:#x})")
        if defects:
            return "livepatch_handler is defective (static model): " + "; ".join(
                f"{f.text} at {self.kernel.describe(f.address)}" for f in defects)
        return "between P1 and P3, while C ran: the static model proves livepatch_handler's push and pop sound"

    # ---- the watch's life ------------------------------------------------------

    @property
    def can_park(self) -> bool:
        """Whether every design point can hold a parked vCPU (klp-watch can
        execute the instruction there for the guest)."""
        return all(point.release is not None for point in self.design_points())

    def start(self, qemu_version: tuple[int, ...] | None) -> None:
        """Arm the mode the options ask for, or the one measured fastest on this
        QEMU (and the hand-off probes); check the out-of-line ftrace stubs
        before any redirection uses them."""
        if self.options.handoff and self.design is not Design.LIVEPATCH_STACK:
            raise GdbklpError(f"--handoff checks the hand-off to livepatch_handler: the {self.design} design "
                              "does not use it")
        self.options = self.reporter.options = self.options.resolved(qemu_version, self.can_park)
        self.report.mode = self.options.mode
        self.mode = mode_classes()[self.options.mode](self)
        self.report.probe = self.mode.arm()
        if self.options.handoff:
            self.handoff = HandoffProbes(self)
            self.report.probe += self.handoff.description
        self.check_ool_stubs()

    @property
    def breakpoints(self) -> int:
        return self.mode.breakpoints + (len(self.handoff.probes) if self.handoff else 0)

    def finish(self, reason: str) -> None:
        """Remove the probes and write the report (idempotent)."""
        self.mode.catch_up()
        self.mode.close()
        if self.handoff is not None:
            self.handoff.probes.remove()
        self.flush()
        if self.extra_loads and self.report.ended is None:
            self.reporter.note(f"the P4 prediction read {self.extra_loads} words the P3 check had not "
                               "(the return half loads something other than the handler's own record)")
        self.report.finish(reason)
        self.reporter.write_files()

    def flush(self) -> None:
        """Put redirections still in flight into the report (the watch is ending)."""

    def record_error(self, message: str) -> None:
        self.reporter.error(message)

    def describe(self, address: int | None) -> str:
        return self.kernel.describe(address) if address is not None else "?"

    # ---- where the model checks ---------------------------------------------------

    def design_points(self) -> list[ProbePoint]:
        """P3, and P1 with --resolve-indirect: where every redirection is checked."""
        release = self.execute_p3_load if self.p3_loads_into is not None else None
        points = [ProbePoint(CodePoint.P3, self.layout.return_point, "livepatch_handler's return point (P3)",
                             self.check_return_state, self.read_return_state, release, p3_recipe(self))]
        if self.options.resolve_indirect:
            points.append(ProbePoint(CodePoint.P1, self.layout.call_to_c, "its bctrl into C (P1)",
                                     self.keep_replacement, self.read_replacement, self.enter_replacement,
                                     p1_recipe(self, EnteringReplacement)))
        return points

    def look_up_while_stopped(self) -> CodeImage:
        """Read now what the checks look up beyond the state they are given (the
        module list, the code facts, the patches' functions, the modules' code):
        for checks that run on recorded states while the guest runs, where gdb
        can read nothing. Returns the code they may read.

        The module list is read now: at a probe hit (a module change) it may
        differ from the last stop gdb reported."""
        self.kernel.modules.refresh()
        facts = code_facts(self.kernel)
        patches.replacements(self.kernel)
        texts = [(o.base, target.read_memory(o.base, o.size)) for o in facts.view.objects if o.name != VMLINUX]
        return CodeImage(texts, self.kernel.code)

    def guard_points(self) -> list[ProbePoint]:
        """The trampolines' exits for calls ftrace did not redirect, die() and panic()."""
        return Guards(self).points()

    def check_ool_stubs(self) -> None:
        """Invariant 14 over the out-of-line ftrace stubs, once per module list
        (a module loaded since may have brought, or overwritten, stubs)."""
        try:
            found = ool_stub_violations(self.kernel)
        except gdb.error as e:  # before boot, say (a memory error): checked again when the modules change
            self.reporter.note(f"out-of-line ftrace stubs not readable yet: {e}")
            return
        if found is self.stubs_checked:
            return
        self.stubs_checked = found
        violations, checked = found
        if checked:
            self.reporter.note(f"{checked} out-of-line ftrace stubs checked (invariant 14), "
                               f"{len(violations)} corrupted")
        fresh = [dataclasses.replace(v) for _, v in violations if v.found not in self.stub_violations_seen]
        self.stub_violations_seen.update(v.found for v in fresh)
        for v in fresh:
            v.diagnosis = "the stub area of its owner: ftrace's stub setup, or a relocation written over it"
        who = TaskIdentity(0, comm="(stubs)")
        stamp(fresh, self.reporter.context(who, -1, call_site="ool stub"))
        self.reporter.record(who, fresh)

    # ---- P1: the bctrl into C (--resolve-indirect) ------------------------------

    def read_replacement(self) -> EnteringReplacement:
        """At P1, CTR is C, and the entry just pushed tells the redirection."""
        task = tasks.current_task(self.kernel)
        entry = target.read_u64(task + self.layout.ti_livepatch_sp) - self.layout.entry_size
        return EnteringReplacement(task, entry, target.register("ctr"))

    def keep_replacement(self, state: EnteringReplacement) -> bool:
        """Keep C for this redirection's P3 (by task and livepatch-stack entry)."""
        self.p1_replacements.setdefault(state.task, {})[state.entry] = state.c
        return False

    def enter_replacement(self, state: EnteringReplacement) -> None:
        """Execute the bctrl for the guest (LR = P3, pc = C): resumed where no
        breakpoint is, gdb need not step."""
        target.set_register("lr", self.layout.return_point)
        target.set_register("pc", state.c)

    def p1_replacement(self, task: int, entry: int) -> int | None:
        """C as P1 saw it for the redirection whose entry is at entry; forgets it
        and any deeper one left by a redirection that never returned."""
        held = self.p1_replacements.get(task)
        if not held:
            return None
        c = held.pop(entry, None)
        for deeper in [address for address in held if address > entry]:
            del held[deeper]
        return c

    # ---- P3: C returns into the trampoline --------------------------------------

    def read_return_state(self) -> ReturnSample:
        """r1, the task, its livepatch stack and A's frame header, at P3."""
        sp = target.register("r1")
        task_slot = tasks.task_slot(self.kernel, target.register("r13"))
        task = target.read_u64(task_slot)
        livepatch_sp = int.from_bytes(tasks.read_task_field(task, self.layout.ti_livepatch_sp, 8), "little")
        base = sp & ~(self.thread_size - 1)
        top = livepatch_sp + self.layout.entry_size
        length = top - base if base < top <= base + self.thread_size else 8
        return ReturnSample(task, vcpus.current_cpu(), sp, livepatch_sp, base,
                            target.read_memory(base, length), target.read_memory(sp, 32), task_slot)

    def check_return_state(self, s: ReturnSample) -> bool:
        """Every check of one redirection at P3; True if the guest must stop for the user."""
        facts = code_facts(self.kernel)
        self.check_ool_stubs()  # nothing to read unless the module list changed
        check = check_return(s, facts)
        if check.entry is not None and facts.view.object_at(check.entry.ra) is None:
            facts = code_facts(self.kernel, covering=check.entry.ra)  # A in a module loaded since?
            check = check_return(s, facts)
        names = self.names_of(s, check.call_site, check.patched, check.entry)
        consistency = self.consistency_violation(s.task, True, names.patched, names.replacement)
        for v in check.violations:
            v.diagnosis = self.p3_diagnosis
        violations = check.violations + self.balance_violations(s, check, facts) \
            + check_predicted_return(s, check, facts, self.predicted_return(s)) + ([consistency] if consistency else [])
        context = self.reporter.context(tasks.identity(s.task), s.cpu, call_site=check.call_site.value,
                                        caller=check.caller, patched=self.describe(names.patched),
                                        replacement=self.describe(names.replacement))
        stamp(violations, context)
        entry = check.entry
        redirection = Redirection.of(context, return_address=entry.ra if entry else 0, toc=entry.toc if entry else 0,
                                     sp=s.sp, depth=check.depth, named_by=names.method,
                                     violations=tuple(v.invariant for v in violations))
        return self.reporter.redirection(redirection, violations, checked=entry is not None)

    def execute_p3_load(self, s: ReturnSample) -> None:
        """Execute P3's `ld rT, OFF(r13)` for the guest: rT = the task pointer (read
        for the checks from that PACA slot), pc past it. Resumed at a pc without
        a breakpoint, gdb need not step the vCPU over one: that step would be a
        second stop per redirection, and QEMU 7.2 flushes its whole translation
        cache at every stop."""
        target.set_register(f"r{self.p3_loads_into}", s.task)
        target.set_register("pc", self.layout.return_point + 4)

    def names_of(self, s: ReturnSample, site: CallSite, callee: int | None, entry) -> Names:
        """B and C of the redirection returning now, as far as they are certain."""
        if entry is None:
            return Names()
        facts = code_facts(self.kernel)
        p1 = self.p1_replacement(s.task, entry.address)
        regs = (ReturnRegisters(target.register("r2"), target.register("ctr"), entry.toc)
                if site is CallSite.INDIRECT else None)
        replacements = patches.replacements(self.kernel)
        stale = map_may_be_stale(callee, regs, replacements, facts) if p1 is None else \
            p1 not in replacements.values()
        if stale:
            # a patch registered since its module appeared? (fresh_replacements checks the module list too)
            replacements, facts = patches.fresh_replacements(self.kernel), code_facts(self.kernel)
        return name_redirection(site, callee, regs, replacements, facts, p1)

    def predicted_return(self, s: ReturnSample):
        """The return half run on the P3 state: registers from gdb's cache, the
        words it loads from those the P3 check read (no other read if the
        code is the handler's own)."""
        words = {s.task_slot: s.task, s.task + self.layout.ti_livepatch_sp: s.livepatch_sp}

        def load(address: int) -> int:
            if address in words:
                return words[address]
            offset = address - s.stack_base
            if 0 <= offset <= len(s.livepatch_block) - 8:
                return int.from_bytes(s.livepatch_block[offset:offset + 8], "little")
            self.extra_loads += 1
            return target.read_u64(address)

        registers = {"r1": s.sp}
        return predict_return(self.handler_code, self.layout.address, self.layout.return_point,
                              lambda name: registers[name] if name in registers else target.register(name), load)

    def balance_violations(self, s: ReturnSample, check, facts: CodeFacts) -> list[Violation]:
        """Invariant 10 over time, at P3: the entries below this redirection's are
        the redirections in flight around it, one trampoline frame each up the
        task's stack. Only with such entries (nested redirections, or one left
        behind): the walk reads the used stack, a few packets, and the usual
        redirection has none."""
        if check.entry is None or check.depth < 2 or any(v.invariant == 10 for v in check.violations):
            return []
        first = s.stack_base + 8
        outer = [e for e in livepatch_entries(s.livepatch_block, s.stack_base, check.entry.address, self.layout)
                 if e.address >= first]
        top = s.stack_base + self.thread_size
        walk = walk_stack(Registers(pc=self.layout.return_point, sp=s.sp),
                          prefetching_reader(target.read_memory, s.sp, top), facts.view, s.stack_base, outer)
        violation, _ = check_balance(outer, walk, "P3 check")
        if violation:
            violation.diagnosis = ("an earlier redirection of this task: its entry stayed (pushed without pop)"
                                   if "pushed" in violation.title else "an earlier redirection popped an entry "
                                                                       "that was still in flight")
        return [violation] if violation else []

    def consistency_violation(self, task: int, redirected: bool, patched: int | None,
                              replacement: int | None) -> Violation | None:
        """Invariant 12 for this call: does the task's patch_state agree with what ftrace did?"""
        if not self.consistency:
            return None
        in_transition = patches.transition_patch() != 0
        # outside a transition a redirection is always right: spare the read
        state = patches.patch_state(task) if in_transition or not redirected else KLP_UNDEFINED
        return check_consistency(redirected, in_transition, state, self.describe(patched), self.describe(replacement))
