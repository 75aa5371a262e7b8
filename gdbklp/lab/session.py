"""Boot the lab and attach gdb: the building blocks of the demo and the tests."""

import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from gdbklp.lab import LabError, build, workload
from gdbklp.lab.config import DEFAULT_TRAMPOLINE
from gdbklp.gdbmi import GdbSession
from gdbklp.lab.qemu import Emulator, Guest, kernel_cmdline
from gdbklp.options import WatchOptions
from gdbklp.report import WatchReport


@contextlib.contextmanager
def booted(images: build.LabImages | None = None, *, patch: bool = True, smp: int | None = None,
           workdir: Path | None = None, ready_timeout: float = 120.0, trampoline: str = DEFAULT_TRAMPOLINE,
           emulator: Emulator | None = None, plugin_socket: Path | None = None):
    """A lab guest in serve mode, ready for commands; killed on exit. With
    plugin_socket, under the recorder's QEMU (emulator("record"), unless
    emulator is given) with its plugin listening on that UNIX socket for a
    gdbklp.recorder.Recorder."""
    images = images or build.build_all()
    guest = Guest(images.vmlinux, images.initramfs, append=kernel_cmdline(patch=patch, trampoline=trampoline),
                  smp=smp, workdir=workdir, emulator=emulator, plugin_socket=plugin_socket)
    with guest:
        guest.wait_ready(ready_timeout)
        yield guest


@contextlib.contextmanager
def attached(guest: Guest, vmlinux: Path):
    """gdb-multiarch with gdbklp, connected to the guest (which it pauses)."""
    with GdbSession(vmlinux) as gdb:
        gdb.connect(guest.gdb_port)
        yield gdb


def end_watch_running(gdb: GdbSession, timeout: float = 30.0) -> None:
    """klp-watch stop with the guest running, for a watch by pauses (--sample,
    --park: that one ends at its next pause); wait until it has ended."""
    gdb.console("klp-watch stop")
    deadline = time.monotonic() + timeout
    while "ended" not in gdb.console("klp-watch status"):
        if time.monotonic() > deadline:
            raise LabError(f"the watch did not end within {timeout:.0f} s of klp-watch stop")
        time.sleep(0.05)


class WorkloadError(LabError):
    """No counts from the guest for a watched workload; report is what the
    watch saw (its notes say how the guest command ended)."""

    def __init__(self, why: str, report: WatchReport):
        super().__init__(f"no counts from the guest: {why}\n{report.format_text()}")
        self.report = report


class WatchedGuest:
    """A booted guest with gdb attached (and the guest running between watches)."""

    def __init__(self, guest: Guest, gdb: GdbSession):
        self.guest = guest
        self.gdb = gdb
        # the last watched command's output, exit status (None: it did not finish) and report
        self.last_output, self.last_status, self.last_report = "", None, None

    def run(self, command: str, timeout: float = 600.0) -> tuple[int, str]:
        """Run a shell command in the guest, unwatched."""
        return self.guest.run(command, timeout)

    def watch(self, command: str, timeout: float = 1800.0, options: WatchOptions | None = None) -> WatchReport:
        """Run a shell command in the guest under klp-watch; return the watch's report."""
        if self.gdb.running:
            self.gdb.interrupt()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.json"
            # gdb runs the guest in the background here: klp-watch may park
            options = dataclasses.replace(options or WatchOptions(), quiet=True, report=str(path), background=True)
            self.gdb.console(options.command())
            mode = json.loads(self.gdb.console("klp-watch status --json"))["mode"]
            self.gdb.cont()
            try:
                status, output = self.guest.run(command, timeout)
                outcome = f"guest command exited {status}"
            except LabError as e:  # the guest died or hung: the report so far still counts
                status, output, outcome = None, "", f"guest command did not finish: {e}"
            finally:
                if mode != "breakpoint":
                    # end the pauses first, so that none resumes the guest after our interrupt
                    end_watch_running(self.gdb)
                if self.gdb.running:
                    self.gdb.interrupt()
                self.gdb.console("klp-watch stop")
            report = WatchReport.read_json(path)
        report.notes.append(outcome)
        self.last_output, self.last_status, self.last_report = output, status, report
        self.gdb.cont()
        return report

    def counts(self) -> dict[str, workload.KindCounts]:
        """The guest's counts from the last watched command's output (klplab-run's
        table). WorkloadError when it printed none, e.g. the command did not
        finish: the message has the end of the output and the watch's report."""
        if self.last_report is None:
            raise LabError("no command watched yet: no counts from the guest")
        try:
            return workload.parse_counts(self.last_output)
        except LabError as e:
            raise WorkloadError(str(e), self.last_report) from None

    @staticmethod
    def assert_clean(report: WatchReport) -> None:
        """No violation, no probe error, the guest did not go down, something was watched."""
        problems = [v.format_text() for v in report.violations] + report.guest_events + report.errors
        assert not problems, "\n".join(problems)
        assert report.redirections or report.old_code_calls, "the watch saw no call of a patched function"



def watch_workload(guest: Guest, gdb: GdbSession, workload_args: str, timeout: float = 1800.0,
                   options: WatchOptions | None = None) -> tuple[WatchReport, dict[str, workload.KindCounts]]:
    """Run klplab-run under klp-watch; return gdb's report and the guest's counts.

    WorkloadError (which carries the report) when the guest printed no counts,
    e.g. the workload did not finish. The guest is left running or stopped as
    it was found, either way.
    """
    was_running = gdb.running
    watched = WatchedGuest(guest, gdb)
    report = watched.watch(f"klplab-run -r {workload_args}", timeout, options)
    if not was_running and gdb.running:
        gdb.interrupt()
    return report, watched.counts()
