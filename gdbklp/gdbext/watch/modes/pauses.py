"""Pauses by interrupt, at a period, with work done while the guest is held.

A pause by interrupt does not flush QEMU 7.2's translation cache (a
breakpoint stop does: see the README's speed section), so the guest pays only
for the time gdb holds it. The pauses come from a timer thread through
gdb's event loop, so they need background execution (`continue &`, gdb/MI,
or the monitor). The sampler (--sample) and parking (--park) build on this.
"""

import threading
import time

import gdb

from gdbklp.gdbext.inferior import vcpus
from gdbklp.gdbext.unwind import handle_stops
from gdbklp.gdbext.watch.modes import WatchMode

LOST_INTERRUPT_SECONDS = 0.5  # no stop this long after our interrupt: it was lost, send another


class PeriodicPauses(WatchMode):
    """Interrupt the guest a period after each resume, run on_pause(), resume.

    Subclasses implement on_pause() and may change self.period from it; their
    arm() calls start_pauses().
    """

    def __init__(self, watch, period: float):
        super().__init__(watch)
        self.period = period
        self.pauses = 0
        self.paused = 0.0      # seconds the guest spent held by our pauses
        self.interrupted_at = 0.0
        self.our_interrupt = False
        self.pausing = False   # a pause's work is posted, not run yet
        self.vcpus: list = []
        self.stopping = threading.Event()
        self.resumed = threading.Event()  # the next pause comes a period after a resume
        self.resumed.set()
        self.connected = False
        self.thread: threading.Thread | None = None

    def start_pauses(self) -> None:
        self.vcpus = vcpus.vcpu_threads()  # vCPUs never come and go; asking costs packets each pause
        # each pause prints where the guest was: no source line (a file read per
        # pause), no arguments (read from a frame the stop-handling unwinder does not describe)
        self.frame_info = gdb.parameter("print frame-info")
        self.frame_arguments = gdb.parameter("print frame-arguments")
        gdb.execute("set print frame-info short-location")
        gdb.execute("set print frame-arguments presence")
        gdb.events.stop.connect(self.on_stop)
        self.connected = True
        self.thread = threading.Thread(target=self._timer, name=f"klp-watch {type(self).__name__}", daemon=True)
        self.thread.start()

    def on_pause(self) -> bool:
        """The work of one pause, the guest held; True keeps it stopped (for the user)."""
        raise NotImplementedError

    def close(self) -> None:
        """No more pauses; a pause in progress still ends with the guest resumed."""
        if self.stopping.is_set() or self.thread is None:
            return
        self.stopping.set()
        self.resumed.set()
        gdb.execute(f"set print frame-info {self.frame_info}")
        gdb.execute(f"set print frame-arguments {self.frame_arguments}")
        handle_stops(False)
        if not self.our_interrupt and not self.pausing:
            self._disconnect()

    def _disconnect(self) -> None:
        if self.connected:
            self.connected = False
            gdb.events.stop.disconnect(self.on_stop)

    def _timer(self) -> None:
        # a fixed rate would pile pauses up when a pause takes longer than the
        # period: the guest always runs a whole period between two pauses
        while not self.stopping.is_set():
            if not self.resumed.wait(LOST_INTERRUPT_SECONDS):
                if self.our_interrupt:
                    gdb.post_event(self._interrupt_again)
                continue
            if self.stopping.wait(self.period):
                break
            self.resumed.clear()
            gdb.post_event(self._interrupt)

    def _interrupt(self) -> None:
        thread = gdb.selected_thread()
        if self.stopping.is_set() or self.our_interrupt or thread is None or not thread.is_running():
            self.resumed.set()  # stopped by someone else: try again a period later
            return
        self.our_interrupt = True
        self.interrupted_at = time.monotonic()
        handle_stops(True)
        gdb.execute("interrupt", to_string=True)

    def _interrupt_again(self) -> None:
        """Our interrupt got no stop: it reached QEMU while a breakpoint probe
        held the guest (QEMU drops an interrupt then, and gdb resumes after
        the probe). Send another."""
        thread = gdb.selected_thread()
        if self.our_interrupt and thread is not None and thread.is_running():
            gdb.execute("interrupt", to_string=True)

    def on_stop(self, event) -> None:
        if not self.our_interrupt:
            return
        self.our_interrupt = False
        if not isinstance(event, gdb.SignalEvent):
            # a probe stopped the guest for the user before our interrupt did
            handle_stops(False)
            self.resumed.set()
            return
        self.pausing = True
        # not in this observer: gdb is still inside its stop processing, and
        # the work switches threads (gdb dumped core once when it did)
        gdb.post_event(self._pause_and_resume)

    def _pause_and_resume(self) -> None:
        self.pausing = False
        keep_stopped = False
        if not self.stopping.is_set():
            try:
                keep_stopped = self.on_pause()
            except Exception as e:  # a pause must never keep the guest stopped
                self.watch.record_error(f"{type(self).__name__}: {type(e).__name__}: {e}")
        self.pauses += 1
        self.paused += time.monotonic() - self.interrupted_at
        report = self.watch.report
        report.pauses, report.pause_ms = self.pauses, 1000 * self.paused / self.pauses
        handle_stops(False)
        if keep_stopped:
            gdb.invalidate_cached_frames()  # the user gets the guest: frames from gdb's own unwinders
            self._disconnect()
            return
        gdb.execute("continue &", to_string=True)
        if self.stopping.is_set():  # the pause that was in flight when the watch ended
            self._disconnect()
            return
        self.resumed.set()
