"""The out-of-line ftrace stubs (6.13+) in guest memory, checked against
invariant 14: the vmlinux's ftrace_ool_stub_* areas and each module's
arch.ool_stubs (DWARF for struct module); klp-lint and every watch (at its
start and when the module list changes) read them from here.
"""

import gdb

from gdbklp.abi.ftrace import decode_ool_stub
from gdbklp.abi.handoff import check_ool_stub
from gdbklp.abi.invariants import Violation
from gdbklp.gdbext.events import cache_until
from gdbklp.gdbext.inferior import patches, target
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.trampolines import TRACE_TRAMPOLINES

# the vmlinux's stub areas: (array symbol, count symbol)
VMLINUX_STUB_AREAS = (("ftrace_ool_stub_text", "ftrace_ool_stub_text_count"),
                      ("ftrace_ool_stub_text_end", "ftrace_ool_stub_text_end_count"))


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
