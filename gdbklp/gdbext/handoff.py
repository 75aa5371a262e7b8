"""Invariant 14 in the running kernel: ftrace's hand-off to livepatch_handler
(klp-watch --handoff) and the out-of-line ftrace stubs (klp-lint, and every
watch at its start and when the module list changes).

The pure checks are gdbklp.abi.handoff's; here they get their registers
from the probes and their stubs from guest memory (struct module's
arch.ool_stubs with DWARF, and the vmlinux's ftrace_ool_stub_* areas).
"""

import gdb

from gdbklp.abi.ftrace import decode_ool_stub
from gdbklp.abi.handoff import HANDOFF_REGISTERS, FtraceEntry, check_handoff, check_ool_stub, traced_function_site
from gdbklp.abi.invariants import Violation, stamp
from gdbklp.gdbext import patches, target, tasks, vcpus
from gdbklp.gdbext.events import cache_until
from gdbklp.gdbext.kernel import Kernel
from gdbklp.gdbext.probes import TRACE_TRAMPOLINES

MAX_HELD = 64  # P0 records kept per task: a task nests redirections a few deep at most
# the vmlinux's stub areas: (array symbol, count symbol)
VMLINUX_STUB_AREAS = (("ftrace_ool_stub_text", "ftrace_ool_stub_text_count"),
                      ("ftrace_ool_stub_text_end", "ftrace_ool_stub_text_end_count"))


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


def stub_areas(kernel: Kernel) -> list[tuple[str, int, int]]:
    """(owner, address, stubs in use) of each stub area: the vmlinux's (all of
    it; a stub never handed out has a zero first instruction) and each
    module's arch.ool_stubs up to arch.ool_stub_index (needs DWARF)."""
    areas = []
    for array, count in VMLINUX_STUB_AREAS:
        address, counter = kernel.symbols.address(array), kernel.symbols.address(count)
        count = int.from_bytes(target.read_memory(counter, 4), "little") if counter is not None else 0
        if address is not None and count:
            areas.append(("vmlinux", address, count))
    for mod in target.kernel_list("&modules", "struct module", "list"):
        arch = mod["arch"]
        stubs, used = int(arch["ool_stubs"]), int(arch["ool_stub_index"])
        if stubs and used:
            areas.append((mod["name"].string(), stubs, used))
    return areas


@cache_until("modules", "objfile")
def ool_stub_violations(kernel: Kernel) -> tuple[tuple[tuple[int, Violation], ...], int]:
    """Invariant 14 over every out-of-line stub in use: ((stub address,
    violation) of each corrupted one, stubs checked); ((), 0) for a kernel
    without them (or without DWARF for struct ftrace_ool_stub). Kept until
    the module list changes."""
    try:
        stub_type = gdb.lookup_type("struct ftrace_ool_stub")
    except gdb.error:
        return (), 0
    size, insn = stub_type.sizeof, target.dwarf_offset("struct ftrace_ool_stub", "insn")
    trampolines = {a for a in (kernel.symbols.address(n) for n in TRACE_TRAMPOLINES) if a is not None}
    patched = set(patches.replacements(kernel))
    out, checked = [], 0
    for owner, base, count in stub_areas(kernel):
        area = target.read_memory(base, size * count)
        for i in range(count):
            code = area[i * size + insn:i * size + insn + 16]
            if owner == "vmlinux" and not any(code[:4]):
                continue
            checked += 1
            # a module's stubs call its own ftrace trampoline (a stub of the module), not ftrace_caller;
            # the vmlinux has thousands of stubs: the sites read are those of patched functions
            in_vmlinux = owner == "vmlinux"
            stub = decode_ool_stub(code, base + i * size + insn)
            check_site = not in_vmlinux or stub is None or kernel.function_start(stub.returns_to - 4) in patched
            violation = check_ool_stub(base + i * size + insn, code, target.read_memory, kernel.describe,
                                       trampolines if in_vmlinux else None, check_site)
            if violation is not None:
                out.append((base + i * size + insn, violation))
    return tuple(out), checked
