"""livepatch_handler and the ftrace trampolines' hand-off to it, checked from
their code as the vmlinux file has it: what klp-lint prints, and what
klp-watch blames a state found wrong at P3 on."""

from gdbklp.abi import trampoline
from gdbklp.abi.ftrace import FtraceCodeError, HandlerEntry, decode_handler_entry
from gdbklp.abi.livepatch import LayoutError
from gdbklp.gdbext import target
from gdbklp.gdbext.kernel import Kernel
from gdbklp.gdbext.probes import trampoline_code

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
