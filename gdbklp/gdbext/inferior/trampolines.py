"""The trampolines of the running kernel, located and checked from their code:
the ftrace trampolines (ftrace_caller, ftrace_regs_caller), their branch to
livepatch_handler and their exits into B, and livepatch_handler with the
hand-off to it. The addresses come from the vmlinux file, so a watch can
place its probes before the guest boots; what klp-lint prints, and what
klp-watch blames a state found wrong at P3 on, come from here.
"""

import gdb

from gdbklp.abi import ppc, trampoline
from gdbklp.abi.ftrace import FtraceCodeError, HandlerEntry, decode_handler_entry
from gdbklp.abi.livepatch import LayoutError, find_redirect_branches, find_unredirected_exits
from gdbklp.gdbext.inferior import target
from gdbklp.gdbext.inferior.kernel import Kernel

TRACE_TRAMPOLINES = ("ftrace_caller", "ftrace_regs_caller")
TRAMPOLINE_BYTES = 1024


def trampoline_code(kernel: Kernel):
    """(name, address, code) of each ftrace trampoline, as the vmlinux file has them
    (to its symbol's end where the symbol has a size)."""
    for name in TRACE_TRAMPOLINES:
        address = kernel.symbols.address(name)
        if address is not None:
            found = kernel.symbols.lookup(address)
            size = found[0].size if found and found[0].size else TRAMPOLINE_BYTES
            yield name, address, kernel.code(address, size)


def redirect_branches(kernel: Kernel, handler: int) -> list[int]:
    """The `bne- livepatch_handler` of each ftrace trampoline, as the vmlinux file has them."""
    return sorted({branch for _, address, code in trampoline_code(kernel)
                   for branch in find_redirect_branches(code, address, handler)})


def unredirected_exits(kernel: Kernel, handler: int) -> tuple[list[int], list[str]]:
    """Where each ftrace trampoline continues into the traced function B itself:
    the bctr after its `bne- livepatch_handler`; in a trampoline without that
    branch (it never redirects), every bctr of its code. With notes on the latter."""
    exits, notes = set(), []
    for name, address, code in trampoline_code(kernel):
        found = find_unredirected_exits(code, address, handler)
        if not found:
            found = [address + 4 * i for i, word in enumerate(ppc.words(code)) if word == ppc.BCTR]
            notes.append(f"{name} has no `bne- livepatch_handler` before its exit: it never redirects; "
                         f"every call it lets through is checked ({', '.join(f'{a:#x}' for a in found) or 'none'})")
        exits.update(found)
    return sorted(exits), notes


def live_redirect_entry(kernel: Kernel, handler: int) -> int | None:
    """Where the running kernel's ftrace trampolines send a redirected call, when
    that is not livepatch_handler (their branch is read from memory, not the file:
    a kernel may retarget it at boot). None when it is livepatch_handler, or the
    kernel's text cannot be read yet (the guest has not booted)."""
    for branch in redirect_branches(kernel, handler):
        try:
            word = int.from_bytes(target.read_memory(branch, 4), "little")
        except gdb.MemoryError:
            return None
        entry = ppc.conditional_branch_target(word, branch)
        if entry is not None and entry != handler:
            return entry
    return None


DWARF_OFFSETS = (
    ("paca_thread_info", "struct paca_struct", "__current"),
    ("ti_livepatch_sp", "struct thread_info", "livepatch_sp"),
)


def handoffs(kernel: Kernel, handler: int) -> tuple[list[tuple[str, HandlerEntry]], list[trampoline.Finding]]:
    """How each ftrace trampoline hands a redirected call to livepatch_handler
    (gdbklp.abi.ftrace.decode_handler_entry), and a failed finding for each
    one whose code the decoder refuses (by address)."""
    decoded, refused = [], []
    for name, address, code in trampoline_code(kernel):
        try:
            decoded.append((name, decode_handler_entry(code, address, handler, name)))
        except FtraceCodeError as e:
            refused.append(trampoline.Finding(False, address, str(e)))
    return decoded, refused


def handler_findings(kernel: Kernel) -> list[trampoline.Finding]:
    """The static verdicts on livepatch_handler: its offsets (against DWARF
    where the vmlinux has it), that its pop mirrors its push, and that each
    ftrace trampoline leaves RA, C and the non-volatile registers where the
    handler expects them (invariant 14)."""
    layout = kernel.livepatch_layout()
    out = [trampoline.Finding(
        True, layout.address,
        f"livepatch_handler pushes {layout.entry_size} bytes [TOC at {layout.toc_slot}, RA (from "
        f"{layout.ra_register}) at {layout.ra_slot}, magic {layout.magic:#x} at {layout.magic_slot}] on "
        f"thread_info(PACA+{layout.paca_thread_info})->livepatch_sp(+{layout.ti_livepatch_sp}), enters C "
        f"(from {layout.c_register}); C returns to {layout.return_point:#x}")]
    for field_name, type_name, member in DWARF_OFFSETS:
        expected = target.dwarf_offset(type_name, member) if kernel.has_dwarf else None
        if expected is not None:
            used = getattr(layout, field_name)
            out.append(trampoline.Finding(used == expected, layout.address,
                                          f"it uses offset {used} for {type_name}.{member}; DWARF says {expected}"))
    try:
        out += trampoline.lint_livepatch_handler(kernel.handler_code(), layout.address,
                                                 layout.ra_register, layout.c_register)
    except LayoutError as e:  # an instruction the machine does not model: refused, by address
        out.append(trampoline.Finding(False, layout.address, str(e)))
    decoded, refused = handoffs(kernel, layout.address)
    for name, entry in decoded:
        out += trampoline.lint_handler_entry(name, entry, layout)
    return out + refused
