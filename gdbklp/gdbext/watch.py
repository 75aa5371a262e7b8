"""klp-watch: observe every live-patch redirection, per task, while the guest runs.

A non-stopping breakpoint on livepatch_handler's entry (P1) sees each
redirection once: LR holds the return address into the caller A, CTR the
replacement C, r13 the PACA (and through it the running task). The stop
handler reads registers directly and the 8 bytes around the call site in one
packet; names are resolved once per address.
"""

import argparse

import gdb

from gdbklp.abi import callsite
from gdbklp.gdbext import target
from gdbklp.gdbext.commands import Command, GdbklpError
from gdbklp.report import Redirection, WatchReport


class HandlerProbe(gdb.Breakpoint):
    """Breakpoint at the trampoline entry; never leaves the guest stopped unless asked."""

    def __init__(self, watch: "Watch", address: int):
        super().__init__(f"*{address:#x}", internal=True)
        self.silent = True
        self.watch = watch

    def stop(self) -> bool:
        try:
            return self.watch.on_handler_entry()
        except Exception as e:  # a probe must never break the guest's run
            self.watch.record_error(f"{type(e).__name__}: {e}")
            return False


class Watch:
    def __init__(self, kernel: target.Kernel, max_events: int | None, report_path: str | None,
                 quiet: bool):
        self.kernel = kernel
        self.layout = kernel.livepatch_layout()
        self.max_events = max_events
        self.report_path = report_path
        self.quiet = quiet
        self.report = WatchReport(vmlinux=kernel.vmlinux)
        self.probe = HandlerProbe(self, self.layout.address)

    def on_handler_entry(self) -> bool:
        k = self.kernel
        ra = target.register("lr")
        replacement = target.register("ctr")
        task = target.read_u64(target.register("r13") + self.layout.paca_thread_info)
        pid, comm = k.task_identity(task)
        site = callsite.classify_bytes(target.read_memory(ra - 4, 8))
        self.report.add(Redirection(
            seq=self.report.redirections, task=task, pid=pid, comm=comm,
            cpu=target.current_cpu(), return_address=ra, caller=k.describe(ra),
            call_site=site.value, replacement=replacement,
            replacement_name=k.function_name(replacement),
            toc=target.register("r2"), sp=target.register("r1")))
        if self.max_events and self.report.redirections >= self.max_events:
            self.finish(f"--max-events {self.max_events} reached")
            return True
        return False

    def record_error(self, message: str) -> None:
        if len(self.report.errors) < 100:
            self.report.errors.append(message)
            if not self.quiet:
                gdb.write(f"klp-watch: probe error: {message}\n")

    def finish(self, reason: str) -> None:
        """Remove the probe and write the report (idempotent)."""
        self.report.finish(reason)
        if self.probe is not None and self.probe.is_valid():
            self.probe.delete()
        self.probe = None
        if self.report_path:
            self.report.write_json(self.report_path)


_watch: Watch | None = None


def current() -> Watch | None:
    return _watch


def _on_exit(event) -> None:
    """The guest died or the connection dropped: keep what was seen."""
    if _watch is not None and _watch.report.ended is None:
        code = getattr(event, "exit_code", None)
        _watch.finish("the target went away" + (f" (exit code {code})" if code is not None else ""))
        gdb.write(f"klp-watch: {_watch.report.end_reason}; {_watch.report.redirections} "
                  f"redirections seen{' (report in ' + _watch.report_path + ')' if _watch.report_path else ''}\n")


def _on_gdb_exiting(event) -> None:
    if _watch is not None and _watch.report.ended is None:
        _watch.finish("gdb exited")


gdb.events.exited.connect(_on_exit)
if hasattr(gdb.events, "gdb_exiting"):
    gdb.events.gdb_exiting.connect(_on_gdb_exiting)


class KlpWatch(Command):
    """Watch live-patch redirections per task: start | stop | status | report."""

    name = "klp-watch"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        start = sub.add_parser("start", help="insert the probes; the guest keeps running")
        start.add_argument("--max-events", type=int, metavar="N",
                           help="stop the guest after N redirections")
        start.add_argument("--report", metavar="FILE",
                           help="write the JSON report here when the watch ends, however it ends")
        start.add_argument("--quiet", action="store_true", help="print nothing while watching")
        sub.add_parser("stop", help="remove the probes, keep the report")
        sub.add_parser("status", help="one line: running or not, redirections so far")
        report = sub.add_parser("report", help="print the report, or write it as JSON")
        report.add_argument("--json", metavar="FILE", help="write the report as JSON")

    def run(self, args: argparse.Namespace) -> None:
        global _watch
        if args.action == "start":
            if _watch is not None and _watch.report.ended is None:
                raise GdbklpError("a watch is already running (klp-watch stop first)")
            kernel = target.kernel()
            kernel.require_livepatch()
            target.require_target()
            _watch = Watch(kernel, args.max_events, args.report, args.quiet)
            if not args.quiet:
                lay = _watch.layout
                gdb.write(f"klp-watch: probing livepatch_handler at {lay.address:#x} "
                          f"(thread_info at PACA+{lay.paca_thread_info}, livepatch_sp at "
                          f"thread_info+{lay.ti_livepatch_sp}); continue the guest to watch\n")
            return
        if _watch is None:
            raise GdbklpError("no watch: use 'klp-watch start'")
        if args.action == "stop":
            _watch.finish("stopped by klp-watch stop")
            gdb.write(f"klp-watch: stopped after {_watch.report.redirections} redirections\n")
        elif args.action == "status":
            state = "ended: " + _watch.report.end_reason if _watch.report.ended else "running"
            gdb.write(f"klp-watch: {state}; {_watch.report.redirections} redirections, "
                      f"{len(_watch.report.tasks)} tasks\n")
        elif args.action == "report":
            if args.json:
                _watch.report.write_json(args.json)
                gdb.write(f"klp-watch: report written to {args.json}\n")
            else:
                gdb.write(_watch.report.format_text() + "\n")


KlpWatch()
