"""Breakpoints that check the guest's state and let it go on."""

import gdb

from gdbklp.gdbext import events
from gdbklp.gdbext.unwind import handle_stops


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
        handle_stops(True)
        try:
            stop = self.handler()
        except Exception as e:  # a probe must never break the guest's run
            self.on_error(f"{type(e).__name__}: {e}")
            stop = False
        finally:
            handle_stops(False)
        if stop:  # the user gets the guest: frames from gdb's own unwinders
            gdb.invalidate_cached_frames()
        return stop
