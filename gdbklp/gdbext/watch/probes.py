"""Probe points, and the breakpoints that check the guest at them and let it go on."""

from collections.abc import Callable
from dataclasses import dataclass

import gdb

from gdbklp.abi.designs import CodePoint
from gdbklp.gdbext import events
from gdbklp.gdbext.unwind import handle_stops
from gdbklp.sieve import MemoKey


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Recipe:
    """How the recorder plugin captures a point's state with no stop: the
    memory reads it makes there (gdbklp.recorder.Read, over the registers
    of RECORDED_REGISTERS) and how a record becomes the state check() takes;
    memo_key, for record mode's verdict memo: the
    values of a record that make all of its state the checks may read, but
    what they read through the snapshot (the memo traces that)."""

    reads: tuple
    state: Callable[[object], object]
    memo_key: MemoKey | None = None


# the registers every record carries: those the checks read at a stop
# (r3 and r4: the arguments of die() and panic(), at a guard point)
RECORDED_REGISTERS = ("r0", "r1", "r2", "r3", "r4", "r11", "r12", "r13", "lr", "ctr")


@dataclass(frozen=True)
class ProbePoint:
    """An address where a watch's model checks the guest, and how.

    capture() reads the state there from the vCPU held at address; check(state)
    is the model's verdict on a captured state (True: stop the guest for the
    user). release(state), where the model has one, lets the held vCPU past
    address without a step (it executes the instruction there for the guest):
    a mode that parks vCPUs needs it, a breakpoint can do without. A mode
    that captures states some other way hands them to check() itself: the
    recorder, with the point's recipe.
    """

    point: CodePoint
    address: int
    label: str  # what is there, for people: "livepatch_handler's return point (P3)"
    check: Callable[[object], bool]
    capture: Callable[[], object] = _nothing
    release: Callable[[object], None] | None = None
    recipe: Recipe | None = None

    def handle(self) -> bool:
        """A vCPU is held at the point: check it, and let it past if the guest goes on."""
        state = self.capture()
        if self.check(state):
            return True
        if self.release is not None:
            self.release(state)
        return False


class Probe(gdb.Breakpoint):
    """A silent breakpoint at a probe point whose check decides whether the guest
    stops, and never lets an exception reach gdb (on_error gets its one line)."""

    def __init__(self, point: ProbePoint, on_error: Callable[[str], None]):
        super().__init__(f"*{point.address:#x}", internal=True)
        self.silent = True
        self.point = point
        self.on_error = on_error

    def stop(self) -> bool:
        events.fire("probe")
        handle_stops(True)
        try:
            stop = self.point.handle()
        except Exception as e:  # a probe must never break the guest's run
            self.on_error(f"at {self.point.label}: {type(e).__name__}: {e}")
            stop = False
        finally:
            handle_stops(False)
        if stop:  # the user gets the guest: frames from gdb's own unwinders
            gdb.invalidate_cached_frames()
        return stop


def describe_points(points: list[ProbePoint]) -> str:
    """Each point's label and address, for the report's probe line."""
    return " and ".join(f"{p.label} at {p.address:#x}" for p in points)


class Probes:
    """The breakpoints one part of a watch inserted, removed together."""

    def __init__(self, points: list[ProbePoint], on_error: Callable[[str], None]):
        self.inserted = [Probe(point, on_error) for point in points]

    def __len__(self) -> int:
        return len(self.inserted)

    def remove(self) -> None:
        for probe in self.inserted:
            if probe.is_valid():
                probe.delete()
        self.inserted = []
