"""klp-watch start | stop | status | report | finish: the command, and the one
watch it runs (ended and written, whatever ends it: the command, the
guest going away, gdb exiting)."""

import argparse
import json
import os

import gdb

from gdbklp.abi.designs import Design
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.commands.style import styled
from gdbklp.gdbext.inferior import target, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel
from gdbklp.gdbext.inferior.trampolines import live_redirect_entry
from gdbklp.gdbext.watch.model import Watch
from gdbklp.gdbext.watch.modes import parking
from gdbklp.options import Mode, WatchOptions, add_start_arguments
from gdbklp.versions import flushes_at_stops

_watch: Watch | None = None


def exit_status(report) -> int:
    """klp-watch finish's exit status: 1 violations or the guest went down, 0 clean, 2 nothing seen."""
    return 1 if report.violations or report.guest_events else 0 if report.redirections else 2


def _on_exit(event) -> None:
    """The guest died or the connection dropped: keep what was seen."""
    if _watch is not None and _watch.report.ended is None:
        code = getattr(event, "exit_code", None)
        _watch.finish(f"the guest exited (status {code})" if code is not None
                      else "the gdbstub connection dropped (the guest died or QEMU was killed)")
        where = f" (report in {_watch.options.report})" if _watch.options.report else ""
        gdb.write(f"klp-watch: {_watch.report.end_reason}; {_watch.report.redirections} "
                  f"redirections, {len(_watch.report.violations)} violations{where}\n")
        if _watch.options.batch:
            # gdb 13.1 aborts or crashes once a connection that dropped while a
            # probe ran is torn down (thread.c:85 internal error, SIGSEGV); the
            # reports are written: end here with the status finish would give
            gdb.write(_watch.report.format_text() + "\n")
            gdb.flush()
            os._exit(exit_status(_watch.report))


def _on_gdb_exiting(event) -> None:
    if _watch is not None and _watch.report.ended is None:
        _watch.finish("gdb exited")


gdb.events.exited.connect(_on_exit)
if hasattr(gdb.events, "gdb_exiting"):
    gdb.events.gdb_exiting.connect(_on_gdb_exiting)


def new_watch(kernel: Kernel, options: WatchOptions) -> Watch:
    """A watch of the design asked for, or of the one the running kernel uses,
    in the mode asked for, or else the one measured fastest on this QEMU."""
    if options.design == Design.LIVEPATCH_STACK or options.sample:  # sampling checks the livepatch stacks
        return Watch(kernel, options)
    from gdbklp.gdbext.watch import rfc_model  # optional: the merged model works without it
    entry = live_redirect_entry(kernel, kernel.livepatch_layout().address)
    if entry is not None:
        if options.park:
            raise GdbklpError("--park holds tasks where C returns into livepatch_handler, but the running "
                              "kernel redirects through the RFC mini frame: watch it without --park")
        return rfc_model.RfcWatch(kernel, entry, options)
    if options.design == Design.RFC:
        raise GdbklpError("the running kernel's ftrace trampolines branch to livepatch_handler "
                          "(the merged design), or its text is not readable yet: no RFC redirect path to watch")
    return Watch(kernel, options)


def mode_advice(asked: WatchOptions, watch: Watch) -> str | None:
    """A line for a user who left the mode to klp-watch on a QEMU where
    another mode would be faster, if there is one."""
    qemu = target.qemu_version()
    if asked.mode is not Mode.AUTO or not watch.options.breakpoint or not watch.can_park \
            or not flushes_at_stops(qemu):
        return None
    return (f"klp-watch: QEMU {'.'.join(map(str, qemu))} flushes its translations at every breakpoint stop: "
            "with the guest run in the background (continue &, gdb/MI), --park is faster on it")


class KlpWatch(Command):
    """Watch live-patch redirections per task: start | stop | status | report | finish."""

    name = "klp-watch"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        add_start_arguments(sub.add_parser("start", help="insert the probes; the guest keeps running"))
        sub.add_parser("stop", help="remove the probes, keep the report")
        status = sub.add_parser("status", help="one line: running or not, redirections and violations so far")
        status.add_argument("--json", action="store_true",
                            help="the counters, the tasks and the latest violations as one JSON line (the monitor's feed)")
        for name, text in (("report", "print the report (as text, or --json), or write it as JSON and/or JUnit XML"),
                           ("finish", "end the watch, write the reports, and quit gdb with status "
                                      "0 (clean), 1 (violations or the guest went down) or 2 (nothing seen)")):
            p = sub.add_parser(name, help=text)
            p.add_argument("--report", metavar="FILE", help="write the report as JSON (as klp-watch start --report)")
            p.add_argument("--junit", metavar="FILE", help="write the report as JUnit XML")
        sub.choices["report"].add_argument("--json", action="store_true", help="print the report as JSON")

    def run(self, args: argparse.Namespace) -> None:
        if args.action == "start":
            self.start(WatchOptions.from_args(args))
        elif _watch is None:
            self.without_watch(args)
        else:
            getattr(self, args.action)(_watch, args)

    def start(self, options: WatchOptions) -> None:
        global _watch
        if options.problem():
            raise GdbklpError(options.problem())
        if _watch is not None and _watch.report.ended is None:
            raise GdbklpError("a watch is already running (klp-watch stop first)")
        kernel = current_kernel()
        kernel.require_livepatch()
        target.require_target()
        vcpus.select_kernel_vcpu()
        kernel.check_matches_target()
        if parking.unpark_leftover(kernel):
            gdb.write("klp-watch: P3 was still parked by a watch whose gdb went away: its instruction is back\n")
        watch = new_watch(kernel, options)
        watch.start(target.qemu_version())
        _watch = watch
        if not options.quiet:
            gdb.write(f"klp-watch: {watch.report.probe}; {watch.breakpoints} breakpoints in all; "
                      "continue the guest to watch\n")
            advice = mode_advice(options, watch)
            if advice:
                gdb.write(advice + "\n")

    @staticmethod
    def without_watch(args: argparse.Namespace) -> None:
        if args.action == "stop" and parking.guest_stopped() and parking.unpark_leftover(current_kernel()):
            gdb.write("klp-watch: no watch, but P3 was still parked by a watch whose gdb went away: "
                      "its instruction is back\n")
            return
        raise GdbklpError("no watch: use 'klp-watch start'")

    def stop(self, watch: Watch, args: argparse.Namespace) -> None:
        report = watch.report
        if not watch.mode.can_end_now():
            watch.mode.end_when_possible("stopped by klp-watch stop")
            gdb.write("klp-watch: the watch ends at the next pause, in a few milliseconds "
                      "(klp-watch status says when)\n")
            return
        watch.finish("stopped by klp-watch stop")
        gdb.write(f"klp-watch: stopped after {report.redirections} redirections, "
                  f"{len(report.violations)} violations\n")

    @staticmethod
    def status(watch: Watch, args: argparse.Namespace) -> None:
        report = watch.report
        if args.json:
            gdb.write(json.dumps(report.summary()) + "\n")
            return
        state = "ended: " + report.end_reason if report.ended else "running"
        gdb.write(f"klp-watch: {state}; {report.redirections} redirections, "
                  f"{len(report.violations)} violations, {len(report.tasks)} tasks\n")

    @staticmethod
    def write_reports(watch: Watch, args: argparse.Namespace) -> None:
        if args.report:
            watch.report.write_json(args.report)
        if args.junit:
            watch.report.write_junit(args.junit)

    def report(self, watch: Watch, args: argparse.Namespace) -> None:
        self.write_reports(watch, args)
        if args.json:
            gdb.write(json.dumps(watch.report.to_dict(), indent=1) + "\n")
        elif not (args.report or args.junit):
            gdb.write(styled(watch.report.format_text()) + "\n")

    def finish(self, watch: Watch, args: argparse.Namespace) -> None:
        if not watch.mode.can_end_now():
            raise GdbklpError("the guest is running: klp-watch stop ends a --park watch at its next pause; "
                              "or interrupt the guest, then finish")
        watch.finish("klp-watch finish")
        self.write_reports(watch, args)
        gdb.write(styled(watch.report.format_text()) + "\n")
        gdb.execute(f"quit {exit_status(watch.report)}")


KlpWatch()
