"""klp-watch --handoff: invariant 14 live, ftrace's hand-off to livepatch_handler
checked per task from the registers at each ftrace trampoline's entry (P0)
to those at livepatch_handler's entry (the pure checks are gdbklp.abi.handoff's)."""

from gdbklp.abi.handoff import HANDOFF_REGISTERS, FtraceEntry, check_handoff, traced_function_site
from gdbklp.abi.invariants import stamp
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.trampolines import TRACE_TRAMPOLINES

MAX_HELD = 64  # P0 records kept per task: a task nests redirections a few deep at most


class HandoffProbes:
    """Breakpoints at each ftrace trampoline's entry (P0) and at livepatch_handler's
    entry: RA, C, r1, r2 and r14..r31 carried from one to the other, per task."""

    def __init__(self, watch):
        self.watch = watch
        self.kernel: Kernel = watch.kernel
        self.at_p0: dict[int, dict[int, FtraceEntry]] = {}  # task -> r1 at P0 -> its registers
        entries = [self.kernel.symbols.address(name) for name in TRACE_TRAMPOLINES]
        self.probes = [watch.probe(address, self.on_ftrace_entry) for address in entries if address is not None]
        self.probes.append(watch.probe(watch.layout.address, self.on_handler_entry))
        watch.report.probe += (" and, for the hand-off, the entries of "
                               f"{' and '.join(TRACE_TRAMPOLINES)} (P0) and livepatch_handler")

    @staticmethod
    def registers() -> dict[str, int]:
        return {name: target.register(name) for name in HANDOFF_REGISTERS}

    def on_ftrace_entry(self) -> bool:
        regs = self.registers()
        held = self.at_p0.setdefault(tasks.current_task(self.kernel), {})
        if len(held) >= MAX_HELD:  # P0s of calls ftrace did not redirect are never taken back
            held.clear()
        held[regs["r1"]] = FtraceEntry(regs)
        return False

    def on_handler_entry(self) -> bool:
        regs = self.registers()
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
        stamp(violations, self.watch.context(who, vcpus.current_cpu(), call_site="hand-off",
                                             caller=self.watch.describe(p0.ra if p0 else None),
                                             patched=self.watch.describe(patched),
                                             replacement=self.watch.describe(replacement)))
        self.watch.report.add_violations(who, violations)
        self.watch.publish(violations)
        return self.watch.stop_wanted(violations)
