"""klp-watch's model of design 1, the 2015 RFC's mini frame (gdbklp.abi.rfc).

Two probes: P1 at the redirect path's entry, where the trampoline decides
from the instruction at RA, and P3 at KLP_return_helper. A redirection on
the direct path (a global call, entered into C as is) is complete at P1; one
on the mini-frame path is kept per task until its helper runs. Violations
found at P1 print at once: the guest may not live to P3.
"""

import dataclasses

import gdb

from gdbklp.abi import naming, rfc
from gdbklp.abi.invariants import Violation, stamp
from gdbklp.abi.livepatch import LayoutError
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.watch.model import Watch, code_facts
from gdbklp.gdbext.watch.probes import Probe
from gdbklp.options import WatchOptions
from gdbklp.report import Redirection

C_CODE_BYTES = 512  # a replacement's code when its symbol has no size


def decode_trampoline(kernel: Kernel, entry: int) -> rfc.RfcTrampoline:
    try:
        return rfc.decode_rfc_trampoline(target.read_memory(entry, 4 * rfc.MAX_INSNS), entry,
                                         target.read_memory)
    except LayoutError as e:
        raise GdbklpError(f"the redirect path at {kernel.describe(entry)} is not the RFC's shape, "
                          f"refusing the RFC model: {e}") from None


class RfcWatch(Watch):
    design = "rfc-mini-frame"
    CAN_PARK = False  # parking holds tasks at livepatch_handler's P3, which this design never reaches

    def __init__(self, kernel: Kernel, entry: int, options: WatchOptions):
        self.trampoline = decode_trampoline(kernel, entry)
        self.state = rfc.RfcState()
        self.hazards: dict[int, str | None] = {}   # C -> why it is unsafe in a mini frame
        self.reentered: set[int] = set()
        super().__init__(kernel, options)
        for c in sorted(set(patches.replacements(kernel).values())):
            self.hazard(c)

    def design_probes(self) -> list[Probe]:
        t, describe = self.trampoline, self.kernel.describe
        self.report.probe = (f"probing the RFC redirect path (P1) at {describe(t.address)} and "
                             f"its return helper (P3) at {describe(t.helper.address)}")
        return [self.probe(t.address, self.on_redirect), self.probe(t.helper.address, self.on_helper)]

    def hazard(self, c: int) -> str | None:
        """Invariant 6, read from C's code once: does C use its caller's parameter save area?"""
        if c not in self.hazards:
            symbol = self.kernel.view().symbol_at(c)
            length = symbol.size if symbol and symbol.size else C_CODE_BYTES  # not into the next function
            reason = rfc.hazard_reason(rfc.stack_argument_accesses(target.read_memory(c, length)),
                                       self.trampoline.mini_frame)
            self.hazards[c] = reason
            if reason:
                text = f"{self.kernel.describe(c)} cannot run in a mini frame: {reason}"
                self.report.hazards.append(text)
                if not self.options.quiet:
                    gdb.write(f"klp-watch: design hazard (invariant 6): {text}\n")
        return self.hazards[c]

    # ---- P1 ------------------------------------------------------------------

    def on_redirect(self) -> bool:
        reg = target.register
        ra, sp = reg("lr"), reg("r1")
        task = tasks.current_task(self.kernel)
        facts = code_facts(self.kernel)
        s = rfc.RedirectSample(task, vcpus.current_cpu(), ra, reg("r0"), sp, reg("r2"), reg("ctr"),
                               facts.instruction(ra), target.read_memory(sp, rfc.HEADER_BYTES))
        site = facts.view.call_site(facts.read, ra)
        direct, violations = rfc.check_redirect(s, self.trampoline, site)
        hazard = self.hazard(s.c)
        if hazard and not direct:
            violations.append(Violation(6, "a replacement that uses stack-passed arguments runs in a mini frame",
                                        "C takes no stack-passed arguments and keeps out of its caller's frame",
                                        hazard))
        # B from the call site, else as the one function C replaces (C is CTR at P1)
        patched = facts.callee(ra, site)
        if patched is None:
            patched = naming.patched_by(s.c, patches.replacements(self.kernel))
        context = self.context(tasks.identity(task), s.cpu, call_site=site.value, caller=facts.view.describe(ra),
                               patched=self.describe(patched), replacement=self.describe(s.c))
        stamp(violations, context)
        if direct:
            self.record(s, context, violations, checked=True)
        else:
            owner = facts.view.object_at(ra)
            self.state.push(task, rfc.Pending(s, site, owner.toc if owner else None, violations, context))
        self.publish(violations)
        return self.stop_wanted(violations)

    # ---- P3 ------------------------------------------------------------------

    def on_helper(self) -> bool:
        sp = target.register("r1")
        task = tasks.current_task(self.kernel)
        t = self.trampoline
        pending = self.state.pop(task, sp, t.mini_frame)
        if pending is None:
            self.helper_without_frame(task, sp)
            return False
        frames = target.read_memory(sp, t.mini_frame + rfc.HEADER_BYTES)
        # stamped as the redirection P1 saw, with the task as it is now
        context = dataclasses.replace(pending.context, who=tasks.identity(task), seq=self.report.redirections)
        violations = stamp(rfc.check_helper(pending, sp, frames, t), context)
        self.record(pending.at_p1, context, pending.violations + violations, checked=True)
        self.publish(violations)
        return self.stop_wanted(violations)

    def helper_without_frame(self, task: int, sp: int) -> None:
        """The helper entered with no mini frame of this task at r1: it returned into
        itself (the posted helper's lost return address). What the guest does, once per task."""
        if task in self.reentered:
            return
        self.reentered.add(task)
        event = (f"{self.kernel.describe(self.trampoline.helper.address)} entered again by "
                 f"{tasks.identity(task)} on CPU {vcpus.current_cpu()} with r1 {sp:#x} and no mini frame "
                 "there: it returned into itself and pops A's frame")
        self.report.guest_events.append(event)
        gdb.write(f"klp-watch: {event}\n")

    # ---- the report ----------------------------------------------------------

    def record(self, s: rfc.RedirectSample, context, violations: list[Violation], checked: bool) -> None:
        who = context.who
        self.report.add(Redirection(
            seq=self.report.redirections, task=who.task, pid=who.pid, comm=who.comm, exec_id=who.exec_id,
            cpu=s.cpu, return_address=s.ra, toc=s.toc, sp=s.sp, depth=len(self.state.pending.get(s.task, ())),
            call_site=context.call_site, caller=context.caller, patched=context.patched,
            replacement=context.replacement, named_by=naming.BY_P1 if context.patched != "?" else "",
            violations=tuple(v.invariant for v in violations)), violations, checked=checked)

    def flush(self) -> None:
        """Mini-frame redirections whose helper never ran go into the report as unchecked."""
        for stack in self.state.pending.values():
            for p in stack:
                self.record(p.at_p1, p.context, p.violations, checked=False)
        self.state.pending.clear()
