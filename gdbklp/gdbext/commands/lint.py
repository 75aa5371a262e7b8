"""klp-lint: static checks of the live-patch trampolines, with verdicts and addresses.

    klp-lint [--rfc SYMBOL|ADDRESS] [--json]

- livepatch_handler: the offsets it uses (PACA -> thread_info, livepatch_sp,
  the entry layout, the magic), decoded from its code and, with DWARF,
  compared with struct paca_struct and struct thread_info; and, run as a
  register and memory machine (gdbklp.abi.trampoline), that its return half
  pops exactly what its push half pushed, each deviation at its instruction;
- the hand-off: each ftrace trampoline, followed from its entry to its
  branch to livepatch_handler, leaves RA and C in the registers the handler
  takes them from and restores A's r1, r2 and non-volatile registers
  (invariant 14; gdbklp.gdbext.handler);
- the out-of-line ftrace stubs in use (6.13+): each as ftrace made it, its
  branch back at the site that leads to it (invariant 14);
- where the ftrace trampolines send a redirected call: their `bne-` as the
  running kernel has it (a kernel may retarget it at boot), else as the file;
- an RFC mini-frame path (the one in use, or the one --rfc names, read from
  the vmlinux file): the constant the instruction at RA is compared with,
  whether the return address is kept where the helper reads it, the TOC and
  the pop (gdbklp.abi.rfc.lint).
"""

import argparse
import json

import gdb

from gdbklp.abi import rfc
from gdbklp.abi.livepatch import LayoutError
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.commands.style import styled
from gdbklp.gdbext.inferior import target, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel
from gdbklp.gdbext.inferior.stubs import ool_stub_violations
from gdbklp.gdbext.inferior.trampolines import handler_findings, live_redirect_entry, redirect_branches


def rfc_path(kernel: Kernel, spec: str | None, live: int | None) -> tuple[int, object] | None:
    """(entry, read_code) of the RFC path to lint: the one named, else the one in use."""
    if spec is None:
        return (live, target.read_memory) if live is not None else None
    entry = kernel.symbols.address(spec)
    if entry is None:
        try:
            entry = int(spec, 0)
        except ValueError:
            raise GdbklpError(f"no symbol {spec} in {kernel.vmlinux}") from None
    return entry, kernel.code


def stub_findings(kernel) -> list[rfc.Finding]:
    """The out-of-line ftrace stubs in use (invariant 14), if the kernel has them."""
    try:
        corrupted, checked = ool_stub_violations(kernel)
    except gdb.MemoryError as e:
        return [rfc.Finding(False, 0, f"the out-of-line ftrace stubs are not readable: {e}")]
    if not checked:
        return []
    first = kernel.symbols.address("ftrace_ool_stub_text") or 0
    return [rfc.Finding(not corrupted, first, f"{checked} out-of-line ftrace stubs in use, {len(corrupted)} "
                                              "not as ftrace made them")] + \
        [rfc.Finding(False, address, f"{v.title}: {v.found} (expected {v.expected})") for address, v in corrupted]


class KlpLint(Command):
    """Check the live-patch trampolines statically: offsets, the RFC's compare constant and return address."""

    name = "klp-lint"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--rfc", metavar="SYMBOL|ADDRESS",
                            help="lint this RFC redirect path from the vmlinux file (default: the one in use)")
        parser.add_argument("--json", action="store_true", help="print the verdicts as JSON")

    def run(self, args: argparse.Namespace) -> None:
        kernel = current_kernel()
        handler = kernel.require_livepatch()
        findings = handler_findings(kernel)
        live = None
        if gdb.selected_thread() is not None:
            vcpus.select_kernel_vcpu()  # the branches are read from kernel memory
            live = live_redirect_entry(kernel, handler)
        branches = redirect_branches(kernel, handler)
        if live is None:
            findings.append(rfc.Finding(True, branches[0] if branches else handler,
                                        f"the ftrace trampolines' redirect branches ({len(branches)}) go to "
                                        "livepatch_handler: the merged design"))
        else:
            findings.append(rfc.Finding(True, branches[0], f"the ftrace trampolines' redirect branches go to "
                                                           f"{kernel.describe(live)}: an RFC mini-frame path"))
        helper = kernel.symbols.address("KLP_return_helper")
        path = rfc_path(kernel, args.rfc, live)
        if path is None and helper is not None:
            findings.append(rfc.Finding(True, helper, "KLP_return_helper is present but not in use"))
        if path is not None:
            entry, read_code = path
            try:
                trampoline = rfc.decode_rfc_trampoline(read_code(entry, 4 * rfc.MAX_INSNS), entry, read_code)
                findings += rfc.lint(trampoline, kernel.describe)
            except LayoutError as e:
                findings.append(rfc.Finding(False, entry, f"cannot follow the redirect path at "
                                                          f"{kernel.describe(entry)}: {e}"))
        findings += stub_findings(kernel)
        verdict = "clean" if all(f.ok for f in findings) else "defects found"
        if args.json:
            gdb.write(json.dumps({"verdict": verdict, "findings": [
                {"ok": f.ok, "address": f.address, "where": kernel.describe(f.address), "text": f.text}
                for f in findings]}, indent=1) + "\n")
            return
        for f in findings:
            line = f"{'ok   ' if f.ok else 'ERROR'} {kernel.describe(f.address)} ({f.address:#x}): {f.text}"
            gdb.write(styled(line) + "\n")
        gdb.write(f"klp-lint: {verdict}\n")


KlpLint()
