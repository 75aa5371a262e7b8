"""What the tests share besides fixtures (those, and the hooks, are in conftest.py)."""

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gdbklp.lab import root as labroot
from gdbklp.lab import workload
from gdbklp.options import Mode, WatchOptions

REPO = Path(__file__).resolve().parent.parent
GDB = shutil.which("gdb-multiarch")

# gdb 16.3 aborts ("Recursive internal problem.") in parked watches when it
# runs inside the lab root's bubblewrap sandbox, which only CI's run on the
# other release does; on a Debian 13 installation they pass
PARKING = not labroot.inside_lab_root()
needs_parking = pytest.mark.skipif(not PARKING, reason="gdb 16.3 aborts in parked watches inside the lab root's "
                                   "sandbox (docs/known-problems.md)")


def in_lab_root(*cmd, where: Path) -> None:
    """Run a tool of the lab root (the cross toolchain, cpio: the host has
    none of them) on files under where."""
    subprocess.run(labroot.wrap(list(cmd), where, binds=(where,)), check=True)


def run_gdb_batch(*commands: str, args=(), timeout=120) -> subprocess.CompletedProcess:
    """gdb-multiarch -batch with gdbklp loaded and the given -ex commands."""
    cmd = [GDB, "-nx", "-batch", *args, "-x", str(REPO / "gdbinit.d" / "gdbklp.py")]
    for c in commands:
        cmd += ["-ex", c]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})


def assert_counts_agree(report, counts, kinds=workload.KINDS, minimum=0) -> list[workload.KindComparison]:
    """Assert, for every kind of kinds: the guest called it, gdb saw as many
    redirections from its caller A as the guest counted NEW results (at least
    minimum), and the guest counted no wrong result. Return the rows (one per
    kind of kinds, in order) for further checks.

    workload.compare raises if the guest's counts lack a kind of kinds, so
    empty counts fail here rather than pass with nothing compared.
    """
    rows = workload.compare(report.by_caller, counts, kinds)
    for row in rows:
        assert row.guest_calls > 0, f"the guest made no {row.kind} call: {row}"
        assert row.seen_by_gdb == row.guest_new >= minimum, row
        assert row.guest_bad == 0, row
    return rows


# a record-mode watch, for parametrize: its socket is given a place by recorder_for()
RECORDED = WatchOptions(record="recorder.sock")


def recorder_for(options: WatchOptions, workdir: Path) -> tuple[WatchOptions, Path | None]:
    """(options, the recorder plugin's socket to boot with): for a record-mode
    watch, the socket in workdir; for any other, options as they are and None."""
    if options.mode is not Mode.RECORD:
        return options, None
    socket = workdir / options.record
    return dataclasses.replace(options, record=str(socket)), socket


def readme_example(after: str) -> list[str]:
    """The lines of README.md's first ``` block after the text `after`,
    without the "..." that abbreviate it."""
    text = (REPO / "README.md").read_text().split(after, 1)[1]
    block = text.split("```\n", 2)[1]
    return [line for line in block.splitlines() if line.strip() not in ("", "...")]


def shape(line: str) -> str:
    """A line with its numbers and addresses as #, its spacing as one space."""
    return " ".join(re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?", "#", line).split())


def assert_shows_the_readme_example(after: str, output: str) -> None:
    """Every line of the README's example has a line of the same shape in
    output (a real run's): the README shows what the tool prints."""
    shapes = {shape(line) for line in output.splitlines()}
    missing = [line for line in readme_example(after) if shape(line) not in shapes]
    assert not missing, f"README lines no real output has: {missing}\n--- output:\n{output[-3000:]}"
