"""Breakpoints that check and let the guest go on, and the trampoline addresses
they are put on (read from the vmlinux file, so a watch can start before the
guest boots)."""

import gdb

from gdbklp.abi import ppc
from gdbklp.abi.livepatch import find_redirect_branches, find_unredirected_exits
from gdbklp.gdbext import events
from gdbklp.gdbext.kernel import Kernel
from gdbklp.gdbext.unwinder import stop_unwinder

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


class Probe(gdb.Breakpoint):
    """A silent breakpoint whose handler decides whether the guest stops, and
    never lets an exception reach gdb (on_error gets its one line)."""

    def __init__(self, address: int, handler, on_error):
        super().__init__(f"*{address:#x}", internal=True)
        self.silent = True
        self.handler = handler
        self.on_error = on_error

    def stop(self) -> bool:
        events.fire("probe")
        stop_unwinder.enabled = True
        try:
            stop = self.handler()
        except Exception as e:  # a probe must never break the guest's run
            self.on_error(f"{type(e).__name__}: {e}")
            stop = False
        finally:
            stop_unwinder.enabled = False
        if stop:  # the user gets the guest: frames from gdb's own unwinders
            gdb.invalidate_cached_frames()
        return stop
