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
from gdbklp.abi.designs import CodePoint, Design
from gdbklp.abi.invariants import Violation, stamp
from gdbklp.abi.livepatch import LayoutError
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.watch.model import Watch, code_facts
from gdbklp.gdbext.watch.probes import ProbePoint
from gdbklp.gdbext.watch.recipes import rfc_helper_recipe, rfc_redirect_recipe
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
    design = Design.RFC

    def __init__(self, kernel: Kernel, entry: int, options: WatchOptions):
        self.trampoline = decode_trampoline(kernel, entry)
        self.state = rfc.RfcState()
        self.hazards: dict[int, str | None] = {}   # C -> why it is unsafe in a mini frame
        self.reentered: set[int] = set()
        super().__init__(kernel, options)
        for c in sorted(set(patches.replacements(kernel).values())):
            self.hazard(c)

    def design_points(self) -> list[ProbePoint]:
        """P1 at the redirect path's entry, P3 at the return helper (no release:
        neither is an instruction klp-watch executes for the guest)."""
        t, describe = self.trampoline, self.kernel.describe
        return [ProbePoint(CodePoint.P1, t.address, f"the RFC redirect path (P1), {describe(t.address)},",
                           self.check_redirect, self.read_redirect,
                           recipe=rfc_redirect_recipe(self, rfc.RedirectSample)),
                ProbePoint(CodePoint.P3, t.helper.address, f"its return helper (P3), {describe(t.helper.address)},",
                           self.check_helper, self.read_helper, recipe=rfc_helper_recipe(self))]

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
                self.reporter.report.hazards.append(text)
                if not self.options.quiet:
                    gdb.write(f"klp-watch: design hazard (invariant 6): {text}\n")
        return self.hazards[c]

    # ---- P1 ------------------------------------------------------------------

    def read_redirect(self) -> rfc.RedirectSample:
        reg = target.register
        ra, sp = reg("lr"), reg("r1")
        return rfc.RedirectSample(tasks.current_task(self.kernel), vcpus.current_cpu(), ra, reg("r0"), sp, reg("r2"),
                                  reg("ctr"), code_facts(self.kernel).instruction(ra),
                                  target.read_memory(sp, rfc.ELFV2_HEADER_BYTES))

    def check_redirect(self, s: rfc.RedirectSample) -> bool:
        task, ra = s.task, s.ra
        facts = code_facts(self.kernel)
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
        context = self.reporter.context(tasks.identity(task), s.cpu, call_site=site.value,
                                        caller=facts.view.describe(ra), patched=self.describe(patched),
                                        replacement=self.describe(s.c))
        stamp(violations, context)
        if direct:
            self.record(s, context, violations, checked=True)
        else:
            owner = facts.view.object_at(ra)
            self.state.push(task, rfc.Pending(s, site, owner.toc if owner else None, violations, context))
        self.reporter.publish(violations)
        return self.reporter.stop_wanted(violations)

    # ---- P3 ------------------------------------------------------------------

    def read_helper(self) -> tuple[int, int]:
        """(task, r1) at the helper's entry."""
        return tasks.current_task(self.kernel), target.register("r1")

    def check_helper(self, state: tuple[int, int]) -> bool:
        task, sp = state
        t = self.trampoline
        pending = self.state.pop(task, sp, t.mini_frame)
        if pending is None:
            self.helper_without_frame(task, sp)
            return False
        frames = target.read_memory(sp, t.mini_frame + rfc.ELFV2_HEADER_BYTES)
        # stamped as the redirection P1 saw, with the task as it is now
        context = dataclasses.replace(pending.context, who=tasks.identity(task), seq=self.report.redirections)
        violations = stamp(rfc.check_helper(pending, sp, frames, t), context)
        self.record(pending.at_p1, context, pending.violations + violations, checked=True)
        self.reporter.publish(violations)
        return self.reporter.stop_wanted(violations)

    def helper_without_frame(self, task: int, sp: int) -> None:
        """The helper entered with no mini frame of this task at r1: it returned into
        itself (the posted helper's lost return address). What the guest does, once per task."""
        if task in self.reentered:
            return
        self.reentered.add(task)
        event = (f"{self.kernel.describe(self.trampoline.helper.address)} entered again by "
                 f"{tasks.identity(task)} on CPU {vcpus.current_cpu()} with r1 {sp:#x} and no mini frame "
                 "there: it returned into itself and pops A's frame")
        self.reporter.guest_going_down(event)

    # ---- the report ----------------------------------------------------------

    def record(self, s: rfc.RedirectSample, context, violations: list[Violation], checked: bool) -> None:
        """Into the report, numbered in the order redirections end."""
        context = dataclasses.replace(context, seq=self.report.redirections)
        self.report.add(Redirection.of(context, return_address=s.ra, toc=s.toc, sp=s.sp,
                                       depth=len(self.state.pending.get(s.task, ())),
                                       named_by=naming.BY_P1 if context.patched != "?" else "",
                                       violations=tuple(v.invariant for v in violations)), violations, checked=checked)

    def flush(self) -> None:
        """Mini-frame redirections whose helper never ran go into the report as unchecked."""
        for stack in self.state.pending.values():
            for p in stack:
                self.record(p.at_p1, p.context, p.violations, checked=False)
        self.state.pending.clear()
