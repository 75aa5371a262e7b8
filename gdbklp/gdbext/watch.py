"""klp-watch: check every live-patch redirection, per task, while the guest runs.

One non-stopping breakpoint at P3, where C returns into livepatch_handler
(the instruction after its bctrl), sees each redirection exactly once with
everything it did still in place; gdbklp.abi.invariants says what is checked
there and why one stop is enough. A stop reads r1 and r13 directly and five
small memory blocks (the task pointer, livepatch_sp, the livepatch stack,
A's frame header, klp_transition_patch); code-derived facts are read once
and kept.

Two more breakpoints, on die() and panic(), are never hit while all is well;
when the guest goes down they record what it did.
"""

import argparse
import json
import os
import struct

import gdb

from gdbklp.abi.invariants import (KLP_UNDEFINED, NOT_REDIRECTED, ReturnSample, StaticKnowledge, Violation, check_consistency,
                                   check_return)
from gdbklp.abi import elf
from gdbklp.abi.kernel import local_entry
from gdbklp.abi.livepatch import find_unredirected_exits, paca_load_target
from gdbklp.gdbext import parking, target
from gdbklp.gdbext.commands import Command, GdbklpError
from gdbklp.gdbext.unwinder import stop_unwinder
from gdbklp.report import Redirection, WatchReport

TRACE_TRAMPOLINES = ("ftrace_caller", "ftrace_regs_caller")
TRAMPOLINE_BYTES = 1024


def redirect_branches(kernel: target.Kernel, handler: int) -> list[int]:
    """The `bne- livepatch_handler` of each ftrace trampoline, as the vmlinux file has them."""
    branches = set()
    for name in TRACE_TRAMPOLINES:
        address = kernel.symbols.address(name)
        if address is not None:
            code = elf.read_loaded_bytes(kernel.vmlinux, address, TRAMPOLINE_BYTES)
            branches.update(exit_ - 4 for exit_ in find_unredirected_exits(code, address, handler))
    return sorted(branches)


class Probe(gdb.Breakpoint):
    """A breakpoint whose handler never lets an exception reach gdb."""

    def __init__(self, spec: str, handler):
        super().__init__(spec, internal=True)
        self.silent = True
        self.handler = handler

    def stop(self) -> bool:
        stop_unwinder.enabled = True
        try:
            stop = self.handler()
        except Exception as e:  # a probe must never break the guest's run
            _watch and _watch.record_error(f"{type(e).__name__}: {e}")
            stop = False
        finally:
            stop_unwinder.enabled = False
        if stop:  # the user gets the guest: frames from gdb's own unwinders
            gdb.invalidate_cached_frames()
        return stop


class Watch:
    """The merged design's model: one stop per redirection, at P3.

    Subclasses model other designs through design_probes() and flush().
    """

    design = "livepatch-stack"

    def __init__(self, kernel: target.Kernel, max_events: int | None, report_path: str | None,
                 quiet: bool, fail_fast: bool, sample_hz: float | None = None, park: bool = False):
        self.kernel = kernel
        self.layout = kernel.livepatch_layout()
        self.thread_size = kernel.thread_size
        self.statics = StaticKnowledge(kernel.view(), target.read_memory)
        self.max_events = max_events
        self.report_path = report_path
        self.quiet = quiet
        self.fail_fast = fail_fast
        self.report = WatchReport(design=self.design, vmlinux=kernel.vmlinux)
        self.consistency = self._consistency_offsets()
        if self.consistency is None:
            self.report.notes.append("consistency model (invariant 12) not checked: the vmlinux has no "
                                     "DWARF for task_struct.patch_state")
        self.probes: list[Probe] = []
        self.junit_path: str | None = None
        self.p3_code = target.read_memory(self.layout.return_point, 4)  # P3's instruction, as the guest has it
        # the register it loads, when klp-watch executes it for the guest
        self.p3_loads_into = paca_load_target(int.from_bytes(self.p3_code, "little"), self.layout.paca_thread_info)
        if park and self.p3_loads_into is None:
            raise GdbklpError("--park: P3's instruction is not the `ld rT, OFF(r13)` klp-watch can "
                              "execute for the guest, so it cannot stand in for it")
        self.exit_when_gone = False  # --batch
        self.pauses = None  # sampling or parking
        if sample_hz:
            # no breakpoint at all: gdb removes and reinserts breakpoints at every pause
            from gdbklp.gdbext.sampler import Sampler
            self.pauses = Sampler(self, sample_hz)
            self.report.probe = f"sampling at {sample_hz:g} Hz (pauses by interrupt, no breakpoints)"
            return
        if not park:
            self.probes = self.design_probes()
        if self.consistency is not None:
            exits = self._unredirected_exits()
            self.probes += [Probe(f"*{address:#x}", self.on_unredirected) for address in exits]
            if not exits:
                self.report.notes.append("calls that are not redirected are not checked: no `bne "
                                         f"livepatch_handler; bctr` found in {' or '.join(TRACE_TRAMPOLINES)}")
        for name in ("die", "panic"):
            address = kernel.symbols.address(name)
            if address is not None:
                address = local_entry(elf.read_loaded_bytes(kernel.vmlinux, address - 8, 16), address)
                self.probes.append(Probe(f"*{address:#x}", lambda name=name: self.on_guest_down(name)))
        if park:
            self.pauses = parking.Parking(self)
            self.report.probe = (f"parking at livepatch_handler's return point (P3) at {self.layout.return_point:#x} "
                                 "(pauses by interrupt, no breakpoint there)")

    def design_probes(self) -> list[Probe]:
        self.report.probe = f"probing livepatch_handler's return point (P3) at {self.layout.return_point:#x}"
        return [Probe(f"*{self.layout.return_point:#x}", self.on_return)]

    def flush(self) -> None:
        """Put redirections still in flight into the report (the watch is ending)."""

    def _consistency_offsets(self) -> tuple[int, int] | None:
        """(address of klp_transition_patch, offset of task_struct.patch_state), with DWARF."""
        if not self.kernel.has_dwarf:
            return None
        try:
            return (int(gdb.parse_and_eval("(unsigned long)&klp_transition_patch")),
                    int(gdb.parse_and_eval("(unsigned long)&((struct task_struct *)0)->patch_state")))
        except gdb.error:
            return None

    def _unredirected_exits(self) -> list[int]:
        """The bctr of each ftrace trampoline that continues into B when ftrace did not redirect."""
        return [branch + 4 for branch in redirect_branches(self.kernel, self.layout.address)]

    def statics_covering(self, address: int) -> StaticKnowledge:
        """Static knowledge from a view that knows address's object (a module loaded since?)."""
        for refresh in (False, True):
            statics = self.statics_of_view(refresh)
            if statics.view.object_at(address) is not None:
                break
        return statics

    def statics_of_view(self, refresh_modules: bool) -> StaticKnowledge:
        """Static knowledge of the current kernel view, kept while the view stays the same."""
        view = self.kernel.view(refresh_modules=refresh_modules)
        if view is not self.statics.view:
            self.statics = StaticKnowledge(view, target.read_memory)
        return self.statics

    # ---- the probe at P3 ---------------------------------------------------

    def sample(self) -> ReturnSample:
        sp, r13 = target.register("r1"), target.register("r13")
        task = target.read_u64(r13 + self.layout.paca_thread_info)
        livepatch_sp = target.read_u64(task + self.layout.ti_livepatch_sp)
        base = sp & ~(self.thread_size - 1)
        top = livepatch_sp + self.layout.entry_size
        length = top - base if base < top <= base + self.thread_size else 8
        return ReturnSample(task, target.current_cpu(), sp, livepatch_sp, base,
                            target.read_memory(base, length), target.read_memory(sp, 32))

    def checked(self, s: ReturnSample):
        """check_return with a view that knows the caller's module (loaded after start?)."""
        for refresh in (False, True):
            statics = self.statics_of_view(refresh)
            check = check_return(s, statics)
            if check.entry is None or statics.view.object_at(check.entry.ra) is not None:
                break
        return check

    def on_return(self) -> bool:
        s = self.sample()
        check = self.checked(s)
        pid, comm = self.kernel.task_identity(s.task)
        patched = check.patched
        replacement = self.replacement_of(patched)
        consistency = self.consistency_violation(s.task, True, patched, replacement)
        violations = check.violations + ([consistency] if consistency else [])
        seq = self.report.redirections
        names = dict(call_site=check.call_site.value, caller=check.caller,
                     patched=self.kernel.describe(patched) if patched else "?",
                     replacement=self.kernel.describe(replacement) if replacement else "?")
        for v in violations:
            v.seq, v.task, v.pid, v.comm, v.cpu = seq, s.task, pid, comm, s.cpu
            for key, value in names.items():
                setattr(v, key, value)
        entry = check.entry
        self.report.add(Redirection(
            seq=seq, task=s.task, pid=pid, comm=comm, cpu=s.cpu,
            return_address=entry.ra if entry else 0, toc=entry.toc if entry else 0, sp=s.sp,
            depth=check.depth, violations=tuple(v.invariant for v in violations), **names),
            violations, checked=entry is not None)
        stop = self.reported(violations)
        if not stop and self.p3_loads_into is not None:
            self.execute_p3_load(s.task)
        return stop

    def execute_p3_load(self, task: int) -> None:
        """Execute P3's `ld rT, OFF(r13)` for the guest: rT = the task pointer (read
        for the checks from that PACA slot), pc past it. Resumed at a pc without
        a breakpoint, gdb need not step the vCPU over one: that step would be a
        second stop per redirection, and QEMU 7.2 flushes its whole translation
        cache at every stop."""
        target.set_register(f"r{self.p3_loads_into}", task)
        target.set_register("pc", self.layout.return_point + 4)

    def reported(self, violations: list[Violation]) -> bool:
        """Print violations as they happen; True to stop the guest (--fail-fast, --max-events)."""
        for v in violations:
            gdb.write((f"klp-watch: invariant {v.invariant} violated: {v.title} ({v.event})"
                       if self.quiet else v.format_text()) + "\n")
        if violations and self.fail_fast:
            self.finish(f"--fail-fast: invariant {violations[0].invariant} violated")
            return True
        if self.max_events and self.report.redirections >= self.max_events:
            self.finish(f"--max-events {self.max_events} reached")
            return True
        return False

    def replacement_of(self, patched: int | None) -> int | None:
        if patched is None:
            return None
        replacements = self.kernel.replacements()
        if patched not in replacements:
            self.kernel.modules()  # a patch module may have been loaded since (one read per module)
            replacements = self.kernel.replacements()
        return replacements.get(patched)

    def transition_patch(self) -> int:
        """klp_transition_patch: the patch in transition, or 0 (needs self.consistency)."""
        return target.read_u64(self.consistency[0])

    def patch_state(self, task: int) -> int:
        """task->patch_state (needs self.consistency)."""
        return struct.unpack("<i", target.read_memory(task + self.consistency[1], 4))[0]

    def consistency_violation(self, task: int, redirected: bool, patched: int | None,
                              replacement: int | None) -> Violation | None:
        """Invariant 12 for this call: does the task's patch_state agree with what ftrace did?"""
        if self.consistency is None:
            return None
        in_transition = self.transition_patch() != 0
        # outside a transition a redirection is always right: spare the read
        state = self.patch_state(task) if in_transition or not redirected else KLP_UNDEFINED
        describe = lambda a: self.kernel.describe(a) if a else "?"
        return check_consistency(redirected, in_transition, state, describe(patched), describe(replacement))

    # ---- calls that ftrace did not redirect ----------------------------------

    def on_unredirected(self) -> bool:
        """At a trampoline's bctr into B: a live-patched B running its own code must be right."""
        patched = self.kernel.function_start(target.register("ctr"))
        replacement = self.replacement_of(patched)
        if replacement is None or replacement == patched:  # not live-patched, or an atomic-replace nop
            return False
        task = target.read_u64(target.register("r13") + self.layout.paca_thread_info)
        pid, comm = self.kernel.task_identity(task)
        v = self.consistency_violation(task, False, patched, replacement)
        violations = [v] if v else []
        for v in violations:
            v.seq, v.task, v.pid, v.comm, v.cpu = self.report.redirections, task, pid, comm, target.current_cpu()
            v.call_site, v.caller = NOT_REDIRECTED, self.kernel.describe(target.register("lr"))
            v.patched, v.replacement = self.kernel.describe(patched), self.kernel.describe(replacement)
        self.report.old_code_calls[self.kernel.describe(patched)] += 1
        self.report.add_violations(task, pid, comm, violations)
        return self.reported(violations)

    # ---- the guest going down ----------------------------------------------

    def on_guest_down(self, name: str) -> bool:
        pc_of = {"die": "r4", "panic": None}
        what = name
        try:
            message = gdb.Value(target.register("r3")).cast(gdb.lookup_type("char").pointer()).string()
            what = f"{name}(\"{message.strip()[:120]}\")"
            if pc_of[name]:
                nip = target.read_u64(target.register(pc_of[name]) + 256)  # regs->nip
                what += f" at {self.kernel.describe(nip)}"
        except (gdb.error, gdb.MemoryError):
            pass
        task = target.read_u64(target.register("r13") + self.layout.paca_thread_info)
        pid, comm = self.kernel.task_identity(task)
        event = f"{what} in task {task:#x} (pid {pid} {comm}) on CPU {target.current_cpu()}, " \
                f"after {self.report.redirections} redirections"
        self.report.guest_events.append(event)
        gdb.write(f"klp-watch: the guest is going down: {event}\n")
        self.flush()
        if self.report_path:
            self.report.write_json(self.report_path)
        return False

    def record_error(self, message: str) -> None:
        if len(self.report.errors) < 100:
            self.report.errors.append(message)
            if not self.quiet:
                gdb.write(f"klp-watch: probe error: {message}\n")

    def finish(self, reason: str) -> None:
        """Remove the probes and write the report (idempotent)."""
        if self.pauses:
            self.pauses.close()
        self.flush()
        self.report.finish(reason)
        for probe in self.probes:
            if probe.is_valid():
                probe.delete()
        self.probes = []
        if self.report_path:
            self.report.write_json(self.report_path)
        if self.junit_path:
            self.report.write_junit(self.junit_path)


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
        where = f" (report in {_watch.report_path})" if _watch.report_path else ""
        gdb.write(f"klp-watch: {_watch.report.end_reason}; {_watch.report.redirections} "
                  f"redirections, {len(_watch.report.violations)} violations{where}\n")
        if _watch.exit_when_gone:
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


def start_watch(kernel: target.Kernel, design: str, options: tuple) -> Watch:
    """A watch of the design asked for, or of the one the running kernel uses."""
    sample_hz, park = options[-2:]
    if design == "livepatch-stack" or sample_hz:  # sampling checks the livepatch stacks
        return Watch(kernel, *options)
    from gdbklp.gdbext import rfcwatch  # the RFC model is optional: the merged one works without it
    handler = kernel.livepatch_layout().address
    entry = rfcwatch.live_redirect_entry(kernel, handler)
    if entry is not None:
        if park:
            raise GdbklpError("--park holds tasks where C returns into livepatch_handler, but the running "
                              "kernel redirects through the RFC mini frame: watch it without --park")
        return rfcwatch.RfcWatch(kernel, entry, *options)
    if design == "rfc":
        raise GdbklpError("the running kernel's ftrace trampolines branch to livepatch_handler "
                          "(the merged design), or its text is not readable yet: no RFC redirect path to watch")
    return Watch(kernel, *options)


class KlpWatch(Command):
    """Watch live-patch redirections per task: start | stop | status | report | finish."""

    name = "klp-watch"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        start = sub.add_parser("start", help="insert the probes; the guest keeps running")
        start.add_argument("--max-events", type=int, metavar="N",
                           help="stop the guest after N redirections")
        start.add_argument("--fail-fast", action="store_true", help="stop the guest at the first violation")
        start.add_argument("--report", metavar="FILE",
                           help="write the JSON report here when the watch ends, however it ends")
        start.add_argument("--junit", metavar="FILE",
                           help="write the report as JUnit XML here when the watch ends, however it ends")
        start.add_argument("--batch", action="store_true",
                           help="for scripts: when the guest goes away (power-off, crash, dropped connection), "
                                "write the reports and end gdb with klp-watch finish's exit status")
        start.add_argument("--quiet", action="store_true",
                           help="one line per violation instead of a block; no other output")
        start.add_argument("--sample", type=float, metavar="HZ",
                           help="no breakpoints: pause the guest HZ times a second and check every running "
                                "task's livepatch stack and a few others' (needs background execution)")
        start.add_argument("--park", action="store_true",
                           help="every redirection checked without a breakpoint stop: a branch to itself at P3 "
                                "holds each returning task until a pause by interrupt checks it (needs background "
                                "execution)")
        start.add_argument("--design", choices=("auto", "livepatch-stack", "rfc"), default="auto",
                           help="the trampoline design to model; auto: where the running kernel's ftrace "
                                "trampolines send redirected calls (livepatch_handler, or an RFC mini-frame path)")
        sub.add_parser("stop", help="remove the probes, keep the report")
        status = sub.add_parser("status", help="one line: running or not, redirections and violations so far")
        status.add_argument("--json", action="store_true",
                            help="the counters, the tasks and the latest violations as one JSON line (the monitor's feed)")
        for name, text in (("report", "print the report, or write it as JSON and/or JUnit XML"),
                           ("finish", "end the watch, write the reports, and quit gdb with status "
                                      "0 (clean), 1 (violations or the guest went down) or 2 (nothing seen)")):
            p = sub.add_parser(name, help=text)
            p.add_argument("--json", metavar="FILE", help="write the report as JSON")
            p.add_argument("--junit", metavar="FILE", help="write the report as JUnit XML")

    def run(self, args: argparse.Namespace) -> None:
        global _watch
        if args.action == "start":
            if args.sample and args.park:
                raise GdbklpError("--sample and --park are two ways of watching: choose one")
            if _watch is not None and _watch.report.ended is None:
                raise GdbklpError("a watch is already running (klp-watch stop first)")
            kernel = target.kernel()
            kernel.require_livepatch()
            target.require_target()
            target.select_kernel_vcpu()
            kernel.check_matches_target()
            if parking.unpark_leftover(kernel):
                gdb.write("klp-watch: P3 was still parked by a watch whose gdb went away: its instruction is back\n")
            options = (args.max_events, args.report, args.quiet, args.fail_fast, args.sample, args.park)
            _watch = start_watch(kernel, args.design, options)
            _watch.junit_path, _watch.exit_when_gone = args.junit, args.batch
            if not args.quiet:
                gdb.write(f"klp-watch: {_watch.report.probe}; {len(_watch.probes)} breakpoints in all; "
                          "continue the guest to watch\n")
            return
        if _watch is None:
            if args.action == "stop" and parking.guest_stopped() and parking.unpark_leftover(target.kernel()):
                gdb.write("klp-watch: no watch, but P3 was still parked by a watch whose gdb went away: "
                          "its instruction is back\n")
                return
            raise GdbklpError("no watch: use 'klp-watch start'")
        report = _watch.report
        parked_and_running = isinstance(_watch.pauses, parking.Parking) and report.ended is None \
            and not parking.guest_stopped()
        if args.action == "stop" and parked_and_running:
            _watch.pauses.end_at_next_pause("stopped by klp-watch stop")
            gdb.write("klp-watch: the watch ends at the next pause, in a few milliseconds "
                      "(klp-watch status says when)\n")
        elif args.action == "finish" and parked_and_running:
            raise GdbklpError("the guest is running: klp-watch stop ends a --park watch at its next pause; "
                              "or interrupt the guest, then finish")
        elif args.action == "stop":
            _watch.finish("stopped by klp-watch stop")
            gdb.write(f"klp-watch: stopped after {report.redirections} redirections, "
                      f"{len(report.violations)} violations\n")
        elif args.action == "status" and args.json:
            gdb.write(json.dumps(report.summary()) + "\n")
        elif args.action == "status":
            state = "ended: " + report.end_reason if report.ended else "running"
            gdb.write(f"klp-watch: {state}; {report.redirections} redirections, "
                      f"{len(report.violations)} violations, {len(report.tasks)} tasks\n")
        else:
            if args.action == "finish":
                _watch.finish("klp-watch finish")
            if args.json:
                report.write_json(args.json)
            if args.junit:
                report.write_junit(args.junit)
            if args.action == "report" and not (args.json or args.junit):
                gdb.write(report.format_text() + "\n")
            if args.action == "finish":
                gdb.write(report.format_text() + "\n")
                gdb.execute(f"quit {exit_status(report)}")


KlpWatch()
