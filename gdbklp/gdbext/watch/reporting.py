"""Where a watch's verdicts go: into the report, onto gdb's console, and past
the stop policy (--fail-fast, --max-events); the report files are written
whenever the watch ends, however it ends."""

from collections.abc import Callable

import gdb

from gdbklp.abi.invariants import EventContext, Violation
from gdbklp.abi.kernel import TaskIdentity
from gdbklp.gdbext.commands.style import styled
from gdbklp.options import WatchOptions
from gdbklp.report import Redirection, WatchReport

MAX_ERRORS = 100  # probe errors kept: one broken probe would otherwise fill the report


class Reporter:
    """A watch's report and what it tells the user as it goes.

    end_watch(reason) is how the stop policy ends the watch; the watch sets it.
    """

    def __init__(self, report: WatchReport, options: WatchOptions):
        self.report = report
        self.options = options
        self.end_watch: Callable[[str], None] = lambda reason: None
        self.last_redirection: tuple[Redirection, bool] | None = None  # and whether it was checked
        self.errors_seen = 0  # every error, also those past MAX_ERRORS

    def context(self, who: TaskIdentity, cpu: int, **names) -> EventContext:
        """The event being handled now (its sequence number: redirections so far)."""
        return EventContext(self.report.redirections, who, cpu, **names)

    def redirection(self, redirection: Redirection, violations: list[Violation], checked: bool) -> bool:
        """One redirection and what is wrong with it; True if the guest must stop for the user."""
        self.last_redirection = (redirection, checked)
        self.report.add(redirection, violations, checked)
        self.publish(violations)
        return self.stop_wanted(violations)

    def clean_alike(self, redirection: Redirection, checked: bool, count: int) -> None:
        """count clean redirections alike but for their seq, from redirection's
        on: only where the stop policy cannot stop between them (batching())."""
        self.last_redirection = (redirection, checked)
        self.report.add_alike(redirection, [], checked, count)

    def batching(self) -> bool:
        """Whether clean redirections may be tallied in batches: no --max-events
        to stop at one of them, no event list left to keep them in order."""
        return not self.options.max_events and len(self.report.events) >= self.report.keep_events

    def violations(self, who: TaskIdentity, violations: list[Violation]) -> bool:
        """Violations not tied to one redirection (a call not redirected, a sample);
        True if the guest must stop for the user."""
        self.record(who, violations)
        return self.stop_wanted(violations)

    def record(self, who: TaskIdentity, violations: list[Violation]) -> None:
        """Violations found outside any event the stop policy applies to (the stubs, at the start)."""
        self.report.add_violations(who, violations)
        self.publish(violations)

    def publish(self, violations: list[Violation]) -> None:
        """Print violations as they happen."""
        for v in violations:
            gdb.write(styled(f"klp-watch: invariant {v.invariant} violated: {v.title} ({v.event})"
                             if self.options.quiet else v.format_text()) + "\n")

    def stop_wanted(self, violations: list[Violation]) -> bool:
        """Must the guest stop for the user now (--fail-fast, --max-events)? Ends the watch if so."""
        if violations and self.options.fail_fast:
            self.end_watch(f"--fail-fast: invariant {violations[0].invariant} violated")
            return True
        if self.options.max_events and self.report.redirections >= self.options.max_events:
            self.end_watch(f"--max-events {self.options.max_events} reached")
            return True
        return False

    def note(self, text: str) -> None:
        self.report.notes.append(text)

    def error(self, message: str) -> None:
        """A probe or a pause failed: kept (the first MAX_ERRORS), and said unless --quiet."""
        self.errors_seen += 1
        if len(self.report.errors) < MAX_ERRORS:
            self.report.errors.append(message)
            if not self.options.quiet:
                gdb.write(f"klp-watch: probe error: {message}\n")

    def guest_going_down(self, event: str) -> None:
        """What the guest did as it went down, and how many violations were reported before."""
        self.report.guest_events.append(event)
        if self.report.violations_at_down is None:
            self.report.violations_at_down = len(self.report.violations)
        gdb.write(f"klp-watch: the guest is going down: {event}\n")

    def write_files(self, junit: bool = True) -> None:
        """The report files the options ask for (the JSON one only, while the guest goes down)."""
        if self.options.report:
            self.report.write_json(self.options.report)
        if junit and self.options.junit:
            self.report.write_junit(self.options.junit)
