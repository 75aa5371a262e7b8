"""klp-watch's model of the merged design: every redirection checked at P3.

P3 is where C returns into livepatch_handler (the instruction after its
bctrl): each redirection passes there once, with everything it did still in
place; gdbklp.abi.invariants says what is checked there and why one look is
enough. A look reads r1 and r13 from gdb's register cache and a few small
memory blocks (the task pointer, livepatch_sp, the livepatch stack, A's
frame header, the task's identity, klp_transition_patch); facts derived from
code are kept until the module list changes.

How the guest is held at P3 is the watch's mode: a breakpoint there
(BreakpointMode, here), a branch to itself that pauses by interrupt release
(gdbklp.gdbext.parking), or no holding at all, only periodic samples of the
tasks' livepatch stacks (gdbklp.gdbext.sampler). Breakpoints on die() and
panic(), never hit while all is well, record what the guest did when it
goes down.
"""

import dataclasses

import gdb

from gdbklp.abi import ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.frames import Registers, prefetching_reader, walk_stack
from gdbklp.abi.ftrace import decode_ool_stub
from gdbklp.abi.invariants import (
    KLP_UNDEFINED,
    NOT_REDIRECTED,
    CodeFacts,
    EventContext,
    ReturnSample,
    Violation,
    check_balance,
    check_consistency,
    check_predicted_return,
    check_return,
    stamp,
)
from gdbklp.abi.kernel import KernelView, TaskIdentity, local_entry
from gdbklp.abi.livepatch import entries as livepatch_entries
from gdbklp.abi.livepatch import paca_load_target
from gdbklp.abi.naming import Names, ReturnRegisters, map_may_be_stale, name_redirection, patched_by
from gdbklp.abi.trampoline import predict_return
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.events import cache_until
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.stubs import ool_stub_violations
from gdbklp.gdbext.inferior.trampolines import TRACE_TRAMPOLINES, handler_findings, unredirected_exits
from gdbklp.gdbext.watch.handoff import HandoffProbes
from gdbklp.gdbext.watch.modes import parking
from gdbklp.gdbext.watch.modes import sampling as sampler
from gdbklp.gdbext.watch.probes import Probe
from gdbklp.options import WatchOptions
from gdbklp.report import Redirection, WatchReport

GUEST_DOWN = ("die", "panic")


def code_facts(kernel: Kernel, covering: int | None = None) -> CodeFacts:
    """Facts read from the running kernel's code (frame sizes, stub targets, ...),
    kept while the module list stays the same; covering: an address the view
    must hold (the module list is checked again if it does not)."""
    return _code_facts(kernel.view() if covering is None else kernel.view_covering(covering))


@cache_until("modules", "objfile")
def _code_facts(view: KernelView) -> CodeFacts:
    return CodeFacts(view, target.read_memory)


class BreakpointMode:
    """A breakpoint at each of the design's probe points: one stop per redirection
    (two for an RFC local call), every check made before A resumes."""

    def __init__(self, watch: "Watch"):
        watch.probes += watch.design_probes() + watch.guard_probes()

    def close(self) -> None:
        pass


MODES = {"breakpoint": BreakpointMode, "park": parking.Parking, "sample": sampler.Sampler}


class Watch:
    """A watch of the merged design's redirections: the checks at its probe points,
    and the report. Subclasses model other designs (design_probes, flush)."""

    design = "livepatch-stack"
    CAN_PARK = True  # --park can hold its redirections at P3

    def __init__(self, kernel: Kernel, options: WatchOptions):
        self.kernel = kernel
        self.options = options
        self.layout = kernel.livepatch_layout()
        self.thread_size = kernel.thread_size
        self.report = WatchReport(design=self.design, vmlinux=kernel.vmlinux)
        self.consistency = patches.consistency_available(kernel)
        if not self.consistency:
            self.report.notes.append("consistency model (invariant 12) not checked: the vmlinux has no "
                                     "DWARF for klp_transition_patch and task_struct.patch_state")
        self.probes: list[Probe] = []
        self.handler_code = kernel.handler_code()  # its return half is run at each P3
        self.p3_code = target.read_memory(self.layout.return_point, 4)  # P3's instruction, as the guest has it
        self.extra_loads = 0  # words the return half loaded that the P3 check had not read
        self.p3_diagnosis = self.diagnose_push()  # for states found wrong at P3
        # the register P3's instruction loads, when klp-watch executes it for the guest
        self.p3_loads_into = paca_load_target(int.from_bytes(self.p3_code, "little"), self.layout.paca_thread_info)
        self.p1_replacements: dict[int, dict[int, int]] = {}  # task -> livepatch entry address -> C
        if options.park and self.p3_loads_into is None:
            raise GdbklpError("--park: P3's instruction is not the `ld rT, OFF(r13)` klp-watch can "
                              "execute for the guest, so it cannot stand in for it")
        if options.resolve_indirect and not self.layout.pushed_before_call:
            raise GdbklpError(f"--resolve-indirect: livepatch_handler at {self.layout.address:#x} does not "
                              f"store livepatch_sp before its bctrl at {self.layout.call_to_c:#x}, so P1 "
                              "cannot tell which redirection it enters")
        self.mode = None
        self.stubs_checked = None  # the last ool_stub_violations() result looked at
        self.stub_violations_seen: set[str] = set()

    def diagnose_push(self) -> str:
        """Where a state found wrong at P3 comes from, as the static model of the
        handler tells: its push half (the instruction), or C, if push and pop are sound."""
        defects = [f for f in handler_findings(self.kernel) if not f.ok]
        for f in defects:
            self.report.notes.append(f"static model of livepatch_handler: {f.text} "
                                     f"({self.kernel.describe(f.address)}, {f.address:#x})")
        if defects:
            return "livepatch_handler is defective (static model): " + "; ".join(
                f"{f.text} at {self.kernel.describe(f.address)}" for f in defects)
        return "between P1 and P3, while C ran: the static model proves livepatch_handler's push and pop sound"

    def start(self) -> None:
        """Insert the probes (or start the pauses) of the mode the options ask for;
        check the out-of-line ftrace stubs before any redirection uses them."""
        if self.options.handoff and self.design != Watch.design:
            raise GdbklpError(f"--handoff checks the hand-off to livepatch_handler: the {self.design} design "
                              "does not use it")
        self.report.mode = self.options.mode
        self.mode = MODES[self.options.mode](self)
        if self.options.handoff:
            self.probes += HandoffProbes(self).probes
        self.check_ool_stubs()

    def check_ool_stubs(self) -> None:
        """Invariant 14 over the out-of-line ftrace stubs, once per module list
        (a module loaded since may have brought, or overwritten, stubs)."""
        try:
            found = ool_stub_violations(self.kernel)
        except gdb.error as e:  # before boot, say (a memory error): checked again when the modules change
            self.report.notes.append(f"out-of-line ftrace stubs not readable yet: {e}")
            return
        if found is self.stubs_checked:
            return
        self.stubs_checked = found
        violations, checked = found
        if checked:
            self.report.notes.append(f"{checked} out-of-line ftrace stubs checked (invariant 14), "
                                     f"{len(violations)} corrupted")
        fresh = [dataclasses.replace(v) for _, v in violations if v.found not in self.stub_violations_seen]
        self.stub_violations_seen.update(v.found for v in fresh)
        for v in fresh:
            v.diagnosis = "the stub area of its owner: ftrace's stub setup, or a relocation written over it"
        who = TaskIdentity(0, comm="(stubs)")
        stamp(fresh, self.context(who, -1, call_site="ool stub"))
        self.report.add_violations(who, fresh)
        self.publish(fresh)

    def probe(self, address: int, handler) -> Probe:
        return Probe(address, handler, self.record_error)

    def design_probes(self) -> list[Probe]:
        """Breakpoints at the design's probe points (breakpoint mode)."""
        self.report.probe = f"probing livepatch_handler's return point (P3) at {self.layout.return_point:#x}"
        probes = [self.probe(self.layout.return_point, self.on_return)]
        if self.options.resolve_indirect:
            self.report.probe += f" and its bctrl into C (P1) at {self.layout.call_to_c:#x}"
            probes.append(self.probe(self.layout.call_to_c, self.on_enter_replacement))
        return probes

    def guard_probes(self) -> list[Probe]:
        """Breakpoints that cost nothing while all is well: the trampolines' exits for
        calls ftrace did not redirect (invariant 12), die() and panic()."""
        probes = []
        if self.consistency:
            exits, notes = unredirected_exits(self.kernel, self.layout.address)
            self.report.notes += notes
            for address in exits:
                through_stub = self.kernel.code(address, 4) == ppc.BLR.to_bytes(4, "little")
                probes.append(self.probe(address, lambda stub=through_stub: self.on_unredirected(stub)))
            if not exits:
                self.report.notes.append("calls that are not redirected are not checked: no exit "
                                         f"(bctr or blr) found in {' or '.join(TRACE_TRAMPOLINES)}")
        for name in GUEST_DOWN:
            address = self.kernel.symbols.address(name)
            if address is not None:
                address = local_entry(self.kernel.code(address - 8, 16), address)
                probes.append(self.probe(address, lambda name=name: self.on_guest_down(name)))
        return probes

    def flush(self) -> None:
        """Put redirections still in flight into the report (the watch is ending)."""

    def context(self, who: TaskIdentity, cpu: int, **names) -> EventContext:
        """The event being handled now (its sequence number: redirections so far)."""
        return EventContext(self.report.redirections, who, cpu, **names)

    def describe(self, address: int | None) -> str:
        return self.kernel.describe(address) if address is not None else "?"

    # ---- P1: the bctrl into C (--resolve-indirect) ------------------------------

    def on_enter_replacement(self) -> bool:
        """At P1, CTR is C: keep it for this redirection's P3 (by task and the
        livepatch-stack entry just pushed), then execute the bctrl for the guest
        (LR = P3, pc = C): resumed where no breakpoint is, gdb need not step."""
        task = tasks.current_task(self.kernel)
        entry = target.read_u64(task + self.layout.ti_livepatch_sp) - self.layout.entry_size
        c = target.register("ctr")
        self.p1_replacements.setdefault(task, {})[entry] = c
        target.set_register("lr", self.layout.return_point)
        target.set_register("pc", c)
        return False

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

    def on_return(self) -> bool:
        s = self.read_return_state()
        facts = code_facts(self.kernel)
        self.check_ool_stubs()  # nothing to read unless the module list changed
        check = check_return(s, facts)
        if check.entry is not None and facts.view.object_at(check.entry.ra) is None:
            facts = code_facts(self.kernel, covering=check.entry.ra)  # A in a module loaded since?
            check = check_return(s, facts)
        who = tasks.identity(s.task)
        names = self.names_of(s, check.call_site, check.patched, check.entry)
        consistency = self.consistency_violation(s.task, True, names.patched, names.replacement)
        for v in check.violations:
            v.diagnosis = self.p3_diagnosis
        violations = check.violations + self.balance_violations(s, check, facts) \
            + check_predicted_return(s, check, facts, self.predicted_return(s)) + ([consistency] if consistency else [])
        context = self.context(who, s.cpu, call_site=check.call_site.value, caller=check.caller,
                               patched=self.describe(names.patched), replacement=self.describe(names.replacement))
        stamp(violations, context)
        entry = check.entry
        self.report.add(Redirection(
            seq=context.seq, task=who.task, pid=who.pid, comm=who.comm, exec_id=who.exec_id, cpu=s.cpu,
            return_address=entry.ra if entry else 0, toc=entry.toc if entry else 0, sp=s.sp, depth=check.depth,
            call_site=context.call_site, caller=context.caller, patched=context.patched,
            replacement=context.replacement, named_by=names.method,
            violations=tuple(v.invariant for v in violations)), violations, checked=entry is not None)
        self.publish(violations)
        stop = self.stop_wanted(violations)
        if not stop and self.p3_loads_into is not None:
            self.execute_p3_load(s.task)
        return stop

    def execute_p3_load(self, task: int) -> None:
        """Execute P3's `ld rT, OFF(r13)` for the guest: rT = the task pointer (read
        for the checks from that PACA slot), pc past it. Resumed at a pc without
        a breakpoint, gdb need not step the vCPU over one: that step would be a
        second stop per redirection, and QEMU 7.2 flushes its whole translation
        cache at every stop."""
        target.set_register(f"r{self.p3_loads_into}", task)
        target.set_register("pc", self.layout.return_point + 4)

    def publish(self, violations: list[Violation]) -> None:
        """Print violations as they happen."""
        for v in violations:
            gdb.write((f"klp-watch: invariant {v.invariant} violated: {v.title} ({v.event})"
                       if self.options.quiet else v.format_text()) + "\n")

    def stop_wanted(self, violations: list[Violation]) -> bool:
        """Must the guest stop for the user now (--fail-fast, --max-events)? Ends the watch if so."""
        if violations and self.options.fail_fast:
            self.finish(f"--fail-fast: invariant {violations[0].invariant} violated")
            return True
        if self.options.max_events and self.report.redirections >= self.options.max_events:
            self.finish(f"--max-events {self.options.max_events} reached")
            return True
        return False

    def consistency_violation(self, task: int, redirected: bool, patched: int | None,
                              replacement: int | None) -> Violation | None:
        """Invariant 12 for this call: does the task's patch_state agree with what ftrace did?"""
        if not self.consistency:
            return None
        in_transition = patches.transition_patch() != 0
        # outside a transition a redirection is always right: spare the read
        state = patches.patch_state(task) if in_transition or not redirected else KLP_UNDEFINED
        return check_consistency(redirected, in_transition, state, self.describe(patched), self.describe(replacement))

    # ---- calls that ftrace did not redirect ----------------------------------

    def unredirected_call(self, through_stub: bool) -> tuple[int, int]:
        """(where the call goes on, RA) at a trampoline's exit for a call it did not
        redirect: at a bctr, CTR and LR; at a blr (out-of-line stubs), LR is the
        stub's `mtlr r0`, so RA is in r0, and the stub's branch goes into B."""
        if not through_stub:
            return target.register("ctr"), target.register("lr")
        lr = target.register("lr")
        stub = decode_ool_stub(target.read_memory(lr - 8, 16), lr - 8)
        if stub is None:
            raise GdbklpError(f"the ftrace exit at {target.register('pc'):#x} returns to {lr:#x}, "
                              "which is not in an out-of-line ftrace stub (mflr r0; bl; mtlr r0; b)")
        return stub.returns_to, target.register("r0")

    def on_unredirected(self, through_stub: bool = False) -> bool:
        """At a trampoline's exit into B: a live-patched B running its own code must
        be right, and a replacement C must never be entered from here, past
        livepatch_handler (nothing would save A's TOC and return address)."""
        going_to, ra = self.unredirected_call(through_stub)
        target_function = self.kernel.function_start(going_to)
        if target_function in set(patches.replacements(self.kernel).values()):
            return self.on_replacement_without_handler(target_function, ra)
        patched = target_function
        replacement = patches.replacement_of(self.kernel, patched)
        if replacement is None or replacement == patched:  # not live-patched, or an atomic-replace nop
            return False
        task = tasks.current_task(self.kernel)
        v = self.consistency_violation(task, False, patched, replacement)
        violations = [v] if v else []
        who = tasks.identity(task)
        stamp(violations, self.context(who, vcpus.current_cpu(), call_site=NOT_REDIRECTED,
                                       caller=self.kernel.describe(ra),
                                       patched=self.describe(patched), replacement=self.describe(replacement)))
        self.report.old_code_calls[self.describe(patched)] += 1
        self.report.add_violations(who, violations)
        self.publish(violations)
        return self.stop_wanted(violations)

    def on_replacement_without_handler(self, replacement: int, ra: int) -> bool:
        """ftrace's exit for calls it did not redirect branches into C itself."""
        exit_ = target.register("pc")
        task = tasks.current_task(self.kernel)
        who = tasks.identity(task)
        patched = patched_by(replacement, patches.replacements(self.kernel))
        v = Violation(7, "C entered from ftrace without livepatch_handler: nothing saves A's TOC and RA",
                      f"a redirection to {self.describe(replacement)} through livepatch_handler (its push, P1)",
                      f"the trampoline's exit at {self.kernel.describe(exit_)} ({exit_:#x}) branches to C directly",
                      diagnosis=f"the ftrace trampoline's redirect decision, before P1 ({self.kernel.describe(exit_)})")
        violations = stamp([v], self.context(who, vcpus.current_cpu(), call_site=NOT_REDIRECTED,
                                             caller=self.kernel.describe(ra), patched=self.describe(patched),
                                             replacement=self.describe(replacement)))
        self.report.add_violations(who, violations)
        self.publish(violations)
        return self.stop_wanted(violations)

    # ---- the guest going down ----------------------------------------------

    def on_guest_down(self, name: str) -> bool:
        pc_of = {"die": "r4", "panic": None}
        what = name
        try:
            message = gdb.Value(target.register("r3")).cast(gdb.lookup_type("char").pointer()).string()
            what = f"{name}(\"{message.strip()[:120]}\")"
            if pc_of[name]:
                nip = target.read_u64(target.register(pc_of[name]) + 256)  # regs->nip
                what += f" at {self.kernel.describe(nip)}"
        except (gdb.error, gdb.MemoryError):
            pass
        who = tasks.identity(tasks.current_task(self.kernel))
        event = f"{what} in {who} on CPU {vcpus.current_cpu()}, after {self.report.redirections} redirections"
        self.report.guest_events.append(event)
        if self.report.violations_at_down is None:
            self.report.violations_at_down = len(self.report.violations)
        gdb.write(f"klp-watch: the guest is going down: {event}\n")
        self.flush()
        if self.options.report:
            self.report.write_json(self.options.report)
        return False

    def record_error(self, message: str) -> None:
        if len(self.report.errors) < 100:
            self.report.errors.append(message)
            if not self.options.quiet:
                gdb.write(f"klp-watch: probe error: {message}\n")

    def finish(self, reason: str) -> None:
        """Remove the probes and write the report (idempotent)."""
        if self.mode is not None:
            self.mode.close()
        self.flush()
        if self.extra_loads and self.report.ended is None:
            self.report.notes.append(f"the P4 prediction read {self.extra_loads} words the P3 check had not "
                                     "(the return half loads something other than the handler's own record)")
        self.report.finish(reason)
        for probe in self.probes:
            if probe.is_valid():
                probe.delete()
        self.probes = []
        if self.options.report:
            self.report.write_json(self.options.report)
        if self.options.junit:
            self.report.write_junit(self.options.junit)
