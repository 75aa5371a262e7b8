"""klp-watch start --record SOCKET: every redirection checked, with no stop.

QEMU's gdbklp recorder plugin (qemu-images/plugin), loaded when QEMU
started, runs each design point's recipe (gdbklp.gdbext.watch.recipes) on
every vCPU that reaches it and streams the result; the guest waits when
gdbklp falls behind, so nothing is lost. A thread of gdb's Python reads
the records; gdb's own thread checks them with the model's usual checks,
reading from the record instead of the guest (target.reading_from).

The guard points (die, panic, the ftrace exits of calls not redirected) are
recorded too, and so are the places where the module list changes (a
module's init, a patch's transition starting, a module freed): a recorded
watch inserts no gdb breakpoint, which costs a QEMU 10.0 guest at every
lookup of a translated block whether it is hit or not. At a module list
change the records made before it are checked against the list as it was;
the guest is then paused by an interrupt (no translation flush), the list
read again, and the records made after the change are checked against it.
"""

import dataclasses
import threading

import gdb

from gdbklp.abi.callsite import CallSite
from gdbklp.abi.designs import CodePoint, Design
from gdbklp.abi.invariants import ReturnSample
from gdbklp.abi.kernel import local_entry
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import target, tasks, vcpus
from gdbklp.gdbext.watch.modes import WatchMode
from gdbklp.gdbext.watch.modes.parking import guest_stopped
from gdbklp.gdbext.unwind import handle_stops
from gdbklp.gdbext.watch.probes import RECORDED_REGISTERS, ProbePoint, describe_points
from gdbklp.gdbext.watch.recipes import guard_recipe
from gdbklp.options import Mode
from gdbklp.recorder import Recorder, RecordPoint, Repeat, layout_of
from gdbklp.report import Redirection
from gdbklp.sieve import RecordSieve
from gdbklp.snapshot import Snapshot, TracingSnapshot, VerdictMemo

POLL_SECONDS = 0.2  # how often the reading thread looks whether the watch ended
# where the module list or the patches' map changes: a module about to run
# its init, a patch starting its transition (before any task reaches its
# new code), a module being freed
MODULE_CHANGES = ("do_init_module", "klp_start_transition", "free_module")
# points whose records gdbklp must have at once, not in the plugin's next batch
AT_ONCE = (CodePoint.GUEST_DOWN, CodePoint.MODULES)
LOOK_UP_TRIES = 5  # pauses at which a module list change's look-up may fail before it is given up


class RecordMode(WatchMode):
    mode = Mode.RECORD

    def __init__(self, watch):
        super().__init__(watch)
        self.points = dict(enumerate(watch.design_points(), 1))
        lacking = [p.label for p in self.points.values() if p.recipe is None]
        if lacking:
            raise GdbklpError(f"--record: the {watch.design} design's {', '.join(lacking)} has no recording "
                              "recipe yet: use --breakpoint")
        self.client: Recorder | None = None
        self.pending: list = []
        self.checking = False  # check_pending is running
        # a module list change was recorded: the records after it wait for the
        # list read again (at a pause, if the guest runs)
        self.look_up_wanted = False
        self.paused_for_look_up = False
        self.look_up_failures = 0  # in a row, at pauses for the same change
        self.lock = threading.Lock()  # pending
        self.io = threading.Lock()  # the client: the reading thread's, or gdb's at a stop
        self.ending = threading.Event()
        self.reader: threading.Thread | None = None
        self.code = None  # the kernel's code as of the last stop
        # a P3 check is a function of its state and its reads while the code and
        # module list stay (the memo is cleared with them); a P1 or a hand-off
        # probe would leave state for it to consult, so not with those
        only_p3 = [p.point for p in self.points.values()] == [CodePoint.P3] and not watch.options.handoff
        self.memo = VerdictMemo() if only_p3 and watch.design == Design.LIVEPATCH_STACK else None
        self.sieve: RecordSieve | None = None  # the memo's verdicts, for the reading thread
        self.sieved = 0  # records it passed on as known
        # id of a remembered verdict -> [it, how many records since got it]: with
        # no event list to keep in order, a hot function's are tallied per batch
        self.alike: dict[int, list] = {}

    def arm(self) -> str:
        self.client = Recorder(self.watch.options.record)
        self.look_up()
        gdb.events.stop.connect(self.at_stop)
        design = list(self.points.values())
        guards = [dataclasses.replace(p, check=self.while_armed(p.check), recipe=guard_recipe(self.watch, p))
                  for p in self.watch.guard_points() + self.module_change_points()]
        self.points.update(enumerate(guards, len(self.points) + 1))
        points = [RecordPoint(p.address, number, p.recipe.reads, flush=p.point in AT_ONCE)
                  for number, p in self.points.items()]
        if self.memo is not None:
            self.client.sieves = self.sieves(points)
        # live once a vCPU runs (the plugin drops the old translations from one):
        # the reading thread meets the plugin's answer before the first record
        self.client.arm(RECORDED_REGISTERS, points, wait=False)
        self.watch.reporter.end_watch = self.end_at_stop
        self.reader = threading.Thread(target=self.read_records, name="klp-record", daemon=True)
        self.reader.start()
        return (f"recording {describe_points(design)} and {len(guards)} guard points "
                "(QEMU's recorder plugin, every vCPU; no breakpoint)")

    def sieves(self, points: list[RecordPoint]) -> dict:
        """The reading thread's sieves: P3's remembered verdicts, forgotten
        from a module list change on (gdbklp.sieve)."""
        kinds = {p.point_id: self.points[p.point_id].point for p in points}
        p3 = next(p for p in points if kinds[p.point_id] == CodePoint.P3)
        self.sieve = RecordSieve(layout_of(p3, RECORDED_REGISTERS), self.points[p3.point_id].recipe.memo_key,
                                 constant=("pc",))
        sieves = {p3.point_id: self.sieve}
        sieves.update((p.point_id, self.sieve.forget_at) for p in points if kinds[p.point_id] == CodePoint.MODULES)
        return sieves

    def can_end_now(self) -> bool:
        """Only with the guest stopped: the records after a module list change
        are checked against the list read again, and gdb cannot take the
        hand-off probes' breakpoints out of an all-stop target while it runs."""
        return guest_stopped()

    def end_when_possible(self, reason: str) -> None:
        """The guest runs: pause it a moment, end the watch, let it run on."""
        self.end_at_stop(reason, then_continue=True)

    def end_at_stop(self, reason: str, then_continue: bool = False) -> None:
        """End the watch now if the guest is stopped, else at the stop asked for
        here (the stop policy's way: --fail-fast, --max-events stop the guest
        some records after the one that decided)."""
        if guest_stopped():
            self.watch.finish(reason)
            return

        def at_stop(_event):
            gdb.events.stop.disconnect(at_stop)
            self.watch.finish(reason)
            if then_continue:
                gdb.post_event(lambda: gdb.execute("continue &", to_string=True))

        gdb.events.stop.connect(at_stop)
        gdb.post_event(lambda: gdb.execute("interrupt", to_string=True))

    def module_change_points(self) -> list[ProbePoint]:
        kernel = self.watch.kernel
        points = []
        for name in MODULE_CHANGES:
            address = kernel.symbols.address(name)
            if address is not None:
                address = local_entry(kernel.code(address - 8, 16), address)
                points.append(ProbePoint(CodePoint.MODULES, address, name, self.while_armed(self.modules_change)))
        return points

    def modules_change(self, _state) -> bool:
        """A module list change recorded: the records after it wait for the list
        read again (check_pending)."""
        self.look_up_wanted = True
        return False

    def look_up_before_the_rest(self) -> bool:
        """At a module list change, read what the checks look up again: at once if
        the guest is stopped, else at a pause asked for here (False: the records
        after the change wait for it). With no guest left, they are checked
        against the old list."""
        thread = gdb.selected_thread()
        if thread is not None and thread.is_valid() and thread.is_running():
            if not self.paused_for_look_up:
                self.paused_for_look_up = True
                handle_stops(True)
                gdb.execute("interrupt", to_string=True)
            return False
        self.look_up_wanted = False
        if thread is None or not thread.is_valid():
            return True
        try:
            self.look_up()
        except (gdb.error, GdbklpError) as e:  # a module half made or half freed, say
            self.look_up_failures += 1
            if self.look_up_failures < LOOK_UP_TRIES:
                self.look_up_wanted = True  # again, at the next pause
                return False
            self.watch.record_error(f"recorder: the module list could not be read after a change ({e}): "
                                    "the records after it are checked against the list before it")
        self.look_up_failures = 0
        return True

    def look_up(self) -> None:
        """Read what the checks look up (the guest is stopped), through a vCPU
        that runs kernel code (at a stop in user code, the selected one cannot
        reach a module's text); what the memo remembers was decided on the old."""
        with vcpus.kernel_vcpu_selected():
            self.code = self.watch.look_up_while_stopped()
        if self.memo is not None:
            self.tally_alike()  # before the verdicts it counts go
            self.memo.clear()
            if self.sieve is not None:  # not yet at the arming's first look-up
                self.sieve.forget()

    def while_armed(self, check):
        """check, as long as the watch records (a guard hit after its end checks nothing)."""
        return lambda state: self.client is not None and check(state)

    def at_stop(self, event) -> None:
        """The guest stopped: check what it recorded up to here, then read again
        what the checks look up. A stop that is this mode's pause for a module
        list change lets the guest go on."""
        if self.client is None:
            return
        ours = self.paused_for_look_up and isinstance(event, gdb.SignalEvent)
        self.paused_for_look_up = False
        handle_stops(False)
        try:
            self.catch_up()  # at our pause, it has read the list after the change
            if not ours and not self.look_up_wanted:
                self.look_up()
        except (gdb.error, GdbklpError) as e:
            self.watch.record_error(f"recorder: at a stop: {type(e).__name__}: {e}")
        finally:
            if ours:  # our pause always ends: not in this observer, gdb is still inside its stop processing
                gdb.post_event(self.resume_after_look_up)

    def resume_after_look_up(self) -> None:
        if self.client is not None and guest_stopped():  # not if the watch ended for the user
            gdb.execute("continue &", to_string=True)
            if self.look_up_wanted:  # the list could not be read at that pause: at another
                self.check_pending()

    # ---- the reading thread: no gdb API here ------------------------------------

    def read_records(self) -> None:
        try:
            while not self.ending.is_set():
                with self.io:  # handed over before catch_up can take later ones
                    self.hand_over(self.client.records(POLL_SECONDS))
        except GdbklpError as e:  # the plugin went away (QEMU ended): what came before still counts
            message = f"recorder: {e}"
            gdb.post_event(lambda: self.watch.record_error(message))

    def hand_over(self, records: list) -> None:
        if not records:
            return
        with self.lock:
            first = not self.pending
            self.pending.extend(records)
        if first:
            gdb.post_event(self.check_pending)

    # ---- gdb's thread -------------------------------------------------------------

    def catch_up(self) -> None:
        """With the guest stopped: check every record it made up to the stop.
        The plugin answers a STATS message after every record before it, so
        once the answer is in, nothing recorded is still on its way. From a
        check of a record (a guard's), nothing: every record before it is checked."""
        if self.checking:
            return
        if self.client is not None:
            try:
                with self.io:
                    self.client.stats()
                    self.hand_over(self.client.records(0.0))
            except GdbklpError as e:
                self.watch.record_error(f"recorder: {e}")
        self.check_pending()

    def check_pending(self) -> None:
        """Check every record received so far, in the order the guest made them;
        those after a module list change only once the list is read again."""
        while not self.look_up_wanted or self.look_up_before_the_rest():
            with self.lock:
                batch, self.pending = self.pending, []
            if not batch:
                return
            self.checking = True
            try:
                for i, record in enumerate(batch):
                    if type(record) is Repeat:
                        self.count_repeat(record)
                    else:
                        self.check(record)
                    if self.look_up_wanted:
                        with self.lock:
                            self.pending[:0] = batch[i + 1:]
                        break
            finally:
                self.checking = False
            self.tally_alike()

    def check(self, record) -> None:
        point = self.points.get(record.point)
        if point is None:
            self.watch.record_error(f"recorder: a record of unknown point {record.point}")
            return
        # the guest ran since the last record: who a task pointer is must be read
        # again (from this record); what only changes with the module list, or
        # at a stop, stays as read at the last stop (look_up_while_stopped)
        tasks.identity.cache.clear()
        blocks = [(address, data) for address, data in record.reads if data is not None]
        record.registers["pc"] = point.address
        snapshot = Snapshot(record.registers, blocks, self.code.read, record.vcpu)
        try:
            # a hot function's redirections repeat one state and the same values read
            key = point.recipe.memo_key.of(record) if self.memo is not None and point.recipe.memo_key else None
            if key is not None and self.replay(key, snapshot):
                return
            # a check that wants the guest stopped has ended the watch (end_at_stop)
            with target.reading_from(snapshot):
                state = point.recipe.state(record)  # may read code (the RFC path's RA)
                if key is None:
                    point.check(state)
                    return
            self.check_remembering(point, key, state, record, snapshot)
        except Exception as e:  # one record's failure must not end the watch
            self.watch.record_error(f"record {record.seq} at {point.label}: {type(e).__name__}: {e}")

    def count_repeat(self, repeat: Repeat) -> None:
        """Records the reading thread knew clean (as check() does, a failure is
        one error line and the records after it are still checked)."""
        self.sieved += repeat.count
        try:
            self.count_clean(repeat.known, repeat.count)
        except Exception as e:
            self.watch.record_error(f"{repeat.count} records known clean at point {repeat.point}: "
                                    f"{type(e).__name__}: {e}")

    def replay(self, key: tuple, snapshot: Snapshot) -> bool:
        """Report the verdict the check gave on the same key and the same values
        read, if any; whether there was one."""
        remembered = self.memo.verdict(key, snapshot)
        if remembered is None:
            return False
        self.count_clean(remembered, 1)
        return True

    def count_clean(self, verdict: tuple, count: int) -> None:
        """Report count clean redirections whose check gave a remembered verdict."""
        reporter = self.watch.reporter
        after_seq, checked = verdict  # Redirection's fields but its first, seq
        for done in range(count):
            if reporter.batching():
                self.alike.setdefault(id(verdict), [verdict, 0])[1] += count - done
                return
            reporter.redirection(Redirection(reporter.report.redirections, *after_seq), [], checked)

    def check_remembering(self, point: ProbePoint, key: tuple, state: ReturnSample, record,
                          snapshot: Snapshot) -> None:
        """point.check(state), its verdict kept under key and the values it read
        if clean (for the reading thread too, with the record's raw bytes): a
        violation is always checked in full."""
        reporter = self.watch.reporter
        self.tally_alike()  # in order, before a check that may stop the watch
        seen, wrong, errors = reporter.report.redirections, len(reporter.report.violations), reporter.errors_seen
        tracing = TracingSnapshot(snapshot)
        with target.reading_from(tracing):
            stop = point.check(state)
        if stop or reporter.report.redirections != seen + 1 or len(reporter.report.violations) != wrong \
                or reporter.errors_seen != errors:
            return
        redirection, checked = reporter.last_redirection
        trace = state.toc_slot_read(CallSite(redirection.call_site)) + tracing.trace
        verdict = ([getattr(redirection, f.name) for f in dataclasses.fields(Redirection)][1:], checked)
        if self.memo.store(key, trace, verdict) and record.raw is not None:
            self.sieve.learn(record, trace, verdict)

    def tally_alike(self) -> None:
        """Report the remembered clean redirections counted since the last time."""
        reporter = self.watch.reporter
        for (after_seq, checked), count in self.alike.values():
            reporter.clean_alike(Redirection(reporter.report.redirections, *after_seq), checked, count)
        self.alike.clear()

    def close(self) -> None:
        if self.client is None:
            return
        self.ending.set()
        gdb.events.stop.disconnect(self.at_stop)
        if self.reader is not None:
            self.reader.join()
        stats = None
        try:
            # the guest is stopped: its plugin disarms itself when it resumes and
            # finds its client gone (a DISARM would wait for a vCPU to run)
            stats = self.client.stats()
            self.hand_over(self.client.records(0.0))
        except GdbklpError as e:
            self.watch.record_error(f"recorder: {e}")
        self.check_pending()
        self.client.close()
        self.client = None
        if stats is not None:
            sieved = f" ({self.sieved} known clean before decoding)" if self.sieve is not None else ""
            self.watch.reporter.note(f"recorder: {stats.records_sent} records{sieved}, the guest waited "
                                     f"{stats.ns_waited / 1e6:.1f} ms for klp-watch")
