"""Boot the lab and attach gdb: the building blocks of the demo and the tests."""

import contextlib
import json
import tempfile
from pathlib import Path

from gdbklp.lab import build, workload
from gdbklp.lab.gdbmi import GdbSession
from gdbklp.lab.qemu import Guest, kernel_cmdline
from gdbklp.report import WatchReport


@contextlib.contextmanager
def booted(images: build.LabImages | None = None, *, patch: bool = True, smp: int | None = None,
           workdir: Path | None = None, ready_timeout: float = 120.0):
    """A lab guest in serve mode, ready for commands; killed on exit."""
    images = images or build.build_all()
    guest = Guest(images.vmlinux, images.initramfs, append=kernel_cmdline(patch=patch),
                  smp=smp, workdir=workdir)
    with guest:
        guest.wait_ready(ready_timeout)
        yield guest


@contextlib.contextmanager
def attached(guest: Guest, vmlinux: Path):
    """gdb-multiarch with gdbklp, connected to the guest (which it pauses)."""
    with GdbSession(vmlinux) as gdb:
        gdb.connect(guest.gdb_port)
        yield gdb


def watch_workload(guest: Guest, gdb: GdbSession, workload_args: str,
                   timeout: float = 1800.0) -> tuple[WatchReport, dict[str, workload.KindCounts]]:
    """Run klplab-run under klp-watch; return gdb's report and the guest's counts.

    The guest is left running or stopped as it was found.
    """
    was_running = gdb.running
    if was_running:
        gdb.interrupt()
    gdb.console("klp-watch start --quiet")
    gdb.cont()
    try:
        output = guest.check(f"klplab-run -r {workload_args}", timeout=timeout)
    finally:
        gdb.interrupt()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        gdb.console("klp-watch stop")
        gdb.console(f"klp-watch report --json {path}")
        report = WatchReport.read_json(path)
    if was_running:
        gdb.cont()
    return report, workload.parse_counts(output)


def report_json(report: WatchReport) -> str:
    return json.dumps(report.to_dict(), indent=1)
