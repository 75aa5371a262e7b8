"""klp-watch --handoff: invariant 14 live, ftrace's hand-off to livepatch_handler
checked per task from the registers at each ftrace trampoline's entry (P0)
to those at livepatch_handler's entry (the pure checks are gdbklp.abi.handoff's)."""

from gdbklp.abi.designs import CodePoint
from gdbklp.abi.handoff import HANDOFF_REGISTERS, FtraceEntry, check_handoff, traced_function_site
from gdbklp.abi.invariants import stamp
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.trampolines import TRACE_TRAMPOLINES
from gdbklp.gdbext.watch.probes import ProbePoint, Probes

MAX_HELD = 64  # P0 records kept per task: a task nests redirections a few deep at most


class HandoffProbes:
    """Breakpoints at each ftrace trampoline's entry (P0) and at livepatch_handler's
    entry: RA, C, r1, r2 and r14..r31 carried from one to the other, per task."""

    def __init__(self, watch):
        self.watch = watch
        self.kernel: Kernel = watch.kernel
        self.at_p0: dict[int, dict[int, FtraceEntry]] = {}  # task -> r1 at P0 -> its registers
        points = [ProbePoint(CodePoint.P0, address, name, self.keep_ftrace_entry, self.registers)
                  for name, address in ((n, self.kernel.symbols.address(n)) for n in TRACE_TRAMPOLINES)
                  if address is not None]
        points.append(ProbePoint(CodePoint.HANDLER_ENTRY, watch.layout.address, "livepatch_handler",
                                 self.check_handler_entry, self.registers))
        self.probes = Probes(points, watch.record_error)
        self.description = (" and, for the hand-off, the entries of "
                            f"{' and '.join(TRACE_TRAMPOLINES)} (P0) and livepatch_handler")

    @staticmethod
    def registers() -> dict[str, int]:
        return {name: target.register(name) for name in HANDOFF_REGISTERS}

    def keep_ftrace_entry(self, regs: dict[str, int]) -> bool:
        held = self.at_p0.setdefault(tasks.current_task(self.kernel), {})
        if len(held) >= MAX_HELD:  # P0s of calls ftrace did not redirect are never taken back
            held.clear()
        held[regs["r1"]] = FtraceEntry(regs)
        return False

    def check_handler_entry(self, regs: dict[str, int]) -> bool:
        task = tasks.current_task(self.kernel)
        p0 = self.at_p0.get(task, {}).pop(regs["r1"], None)
        patched = replacement = None
        if p0 is not None:
            patched = self.kernel.function_start(traced_function_site(p0.registers["lr"], target.read_memory))
            replacement = patches.replacement_of(self.kernel, patched)
        layout = self.watch.layout
        violations = check_handoff(p0, regs, layout.ra_register, layout.c_register, replacement,
                                   self.kernel.describe)
        if not violations:
            return False
        for v in violations:
            v.diagnosis = (f"ftrace's hand-off, between P0 and livepatch_handler: the handler takes RA from "
                           f"{layout.ra_register} and C from {layout.c_register} (decoded from its code)")
        who = tasks.identity(task)
        describe = self.watch.describe
        stamp(violations, self.watch.reporter.context(who, vcpus.current_cpu(), call_site="hand-off",
                                                      caller=describe(p0.ra if p0 else None),
                                                      patched=describe(patched), replacement=describe(replacement)))
        return self.watch.reporter.violations(who, violations)
