"""klp-watch start --breakpoint: a breakpoint at each probe point.

One stop per redirection (two for an RFC local call), every check made
before A resumes. Where the model can execute the probed instruction for
the guest (P3's load, P1's bctrl), the vCPU resumes past it without a step.
"""

from gdbklp.gdbext.watch.modes import WatchMode
from gdbklp.gdbext.watch.probes import Probes, describe_points
from gdbklp.options import Mode


class BreakpointMode(WatchMode):
    mode = Mode.BREAKPOINT

    def __init__(self, watch):
        super().__init__(watch)
        self.probes: Probes | None = None

    def arm(self) -> str:
        points = self.watch.design_points()
        self.probes = Probes(points + self.watch.guard_points(), self.watch.record_error)
        return f"probing {describe_points(points)}"

    @property
    def breakpoints(self) -> int:
        return len(self.probes) if self.probes else 0

    def close(self) -> None:
        if self.probes is not None:
            self.probes.remove()
