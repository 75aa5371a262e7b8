"""Breakpoints that check and let the guest go on, and the trampoline addresses
they are put on (read from the vmlinux file, so a watch can start before the
guest boots)."""

import gdb

from gdbklp.abi.livepatch import find_unredirected_exits
from gdbklp.gdbext import events
from gdbklp.gdbext.kernel import Kernel
from gdbklp.gdbext.unwinder import stop_unwinder

TRACE_TRAMPOLINES = ("ftrace_caller", "ftrace_regs_caller")
TRAMPOLINE_BYTES = 1024


def redirect_branches(kernel: Kernel, handler: int) -> list[int]:
    """The `bne- livepatch_handler` of each ftrace trampoline, as the vmlinux file has them."""
    branches = set()
    for name in TRACE_TRAMPOLINES:
        address = kernel.symbols.address(name)
        if address is not None:
            code = kernel.code(address, TRAMPOLINE_BYTES)
            branches.update(exit_ - 4 for exit_ in find_unredirected_exits(code, address, handler))
    return sorted(branches)


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
