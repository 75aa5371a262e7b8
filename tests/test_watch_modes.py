"""klp-watch's modes behind their one interface, as gdb loads them (no guest)."""

import pytest

from helpers import run_gdb_batch
from gdbklp.options import Mode

pytestmark = [pytest.mark.gdb, pytest.mark.smoke]

LIST_MODES = ("python from gdbklp.gdbext.watch.modes import WatchMode, mode_classes; "
              "print(sorted((str(m), c.__module__.rsplit('.', 1)[-1], issubclass(c, WatchMode)) "
              "for m, c in mode_classes().items()))")


def test_every_mode_is_one_class_of_its_own_file():
    """Each Mode but AUTO has exactly one WatchMode, found by its file in modes/:
    a mode without a class, or two files claiming one, changes the list."""
    proc = run_gdb_batch(LIST_MODES)
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.strip().splitlines()[-1]
    assert listed == str(sorted((str(m), file, True) for m, file in (
        (Mode.BREAKPOINT, "breakpoint"), (Mode.PARK, "parking"), (Mode.SAMPLE, "sampling"),
        (Mode.RECORD, "recording"))))
    assert {m for m in Mode if m is not Mode.AUTO} == {Mode.BREAKPOINT, Mode.PARK, Mode.SAMPLE, Mode.RECORD}

