"""How a watch holds the guest at its probe points: its mode.

A watch's model knows what to check and where (gdbklp.gdbext.watch.model:
its design points, each a ProbePoint with a capture, a check and maybe a
release, and its guard points); a mode decides how the guest gets checked
there. Every mode is a WatchMode, one class per file of this package, found
by its `mode` (options.Mode); nothing else needs to know a new one.
"""

import importlib
import pkgutil

from gdbklp.options import Mode


class WatchMode:
    """The interface between a watch and its mode.

    - __init__(watch) refuses, in one line (GdbklpError), what the mode cannot
      do with this watch; it changes nothing yet;
    - arm() starts watching (breakpoints, parking, pauses) and returns the
      line the report's `probe` field shows;
    - a held vCPU is handed to the model by a point's handle() (capture,
      check, release); a mode that captures states elsewhere calls the
      point's check(state) with them; violations go to watch.reporter;
    - can_end_now() is False while the watch can only be ended from the
      mode's own pauses (then end_when_possible(reason) asks for that);
    - catch_up() checks, with the guest stopped, every state captured up to
      that stop and not yet checked (a mode whose states arrive from outside
      gdb): the watch calls it before it reports;
    - close() stops watching and leaves the guest as the mode found it.

    What a mode may use of its watch: design_points() and guard_points(),
    reporter (verdicts, counters), record_error(), finish(), and the facts
    the model read at its start: kernel, layout, options, thread_size,
    consistency, handler_code.
    """

    mode: Mode | None = None
    breakpoints = 0  # breakpoints inserted, for the start message

    def __init__(self, watch):
        self.watch = watch

    def arm(self) -> str:
        raise NotImplementedError

    def can_end_now(self) -> bool:
        return True

    def end_when_possible(self, reason: str) -> None:
        self.watch.finish(reason)

    def catch_up(self) -> None:
        pass

    def close(self) -> None:
        pass


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def mode_classes() -> dict[Mode, type[WatchMode]]:
    """Every mode of this package, by its Mode."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return {cls.mode: cls for cls in _subclasses(WatchMode) if cls.mode is not None}
