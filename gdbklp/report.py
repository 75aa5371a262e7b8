"""What a watch saw, as plain data: counters, violations, events; JSON and JUnit.

Pure Python (no gdb): the gdb side fills it, the lab, the tests and the batch
scripts read it back from JSON.
"""

import functools
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from gdbklp.abi.invariants import EventContext, Violation
from gdbklp.abi.kernel import TaskIdentity, function_of_label

FORMAT = "gdbklp-watch-report/6"


@dataclass(frozen=True)
class Redirection:
    """One redirection B -> C, seen when C returned into the trampoline."""

    seq: int
    who: TaskIdentity    # the task at this redirection: task_struct, pid, comm, exec generation
    cpu: int
    return_address: int  # RA, in the caller A
    caller: str          # A as function+offset
    call_site: str       # gdbklp.abi.callsite.CallSite value
    patched: str         # B, or "?" where nothing certain names it
    replacement: str     # C, or "?"
    toc: int             # the TOC the handler will restore
    sp: int              # r1 at the return (A's stack pointer if all is well)
    depth: int           # livepatch stack depth of this redirection
    violations: tuple[int, ...] = ()
    named_by: str = ""   # how B and C were found (gdbklp.abi.naming), "" if they were not

    task = property(lambda self: self.who.task)
    pid = property(lambda self: self.who.pid)
    comm = property(lambda self: self.who.comm)
    exec_id = property(lambda self: self.who.exec_id)

    @classmethod
    def of(cls, context: EventContext, **measured) -> "Redirection":
        """The redirection of an event: who, where and B -> C from its context."""
        return cls(seq=context.seq, who=context.who, cpu=context.cpu, caller=context.caller,
                   call_site=context.call_site, patched=context.patched, replacement=context.replacement,
                   **measured)

    @classmethod
    def from_dict(cls, data: dict) -> "Redirection":
        return cls(**{**data, "who": TaskIdentity(**data["who"]), "violations": tuple(data["violations"])})


@dataclass
class Tally:
    seen: int = 0
    checked: int = 0
    violations: int = 0


@dataclass
class TaskSummary:
    """One task incarnation: a task_struct with one pid and exec generation."""

    task: int
    pid: int
    comm: str
    exec_id: int = 0
    redirections: int = 0
    violations: int = 0
    cpus: list[int] = field(default_factory=list)


def _hex_keys(mapping: dict) -> dict:
    return {f"{k:#x}": v for k, v in mapping.items()}


def _int_keys(mapping: dict) -> dict:
    return {int(k, 16): v for k, v in mapping.items()}


# fields whose JSON form is not the value itself: name -> (to JSON, from JSON)
_CODECS = {
    "by_call_site": (lambda d: {k: asdict(v) for k, v in d.items()}, lambda d: {k: Tally(**v) for k, v in d.items()}),
    "by_caller": (dict, Counter), "by_patched": (dict, Counter), "by_replacement": (dict, Counter),
    "by_redirect": (dict, Counter),
    "old_code_calls": (dict, Counter),
    "sampled_tasks": (_hex_keys, _int_keys),
    "tasks": (lambda d: [asdict(t) for t in d.values()],
              lambda rows: {(t.task, t.pid, t.exec_id): t for t in (TaskSummary(**row) for row in rows)}),
    "violations": (lambda vs: [asdict(v) for v in vs], lambda vs: [Violation.from_dict(v) for v in vs]),
    "events": (lambda es: [{**asdict(e), "violations": list(e.violations)} for e in es],
               lambda es: [Redirection.from_dict(e) for e in es]),
}
# what a live view shows (klp-watch status --json, the monitor's feed)
SUMMARY_FIELDS = ("design", "probe", "mode", "redirections", "by_call_site", "samples", "tasks")


@functools.lru_cache(maxsize=4096)
def tally_keys(caller: str, call_site: str, patched: str, replacement: str, named_by: str) -> tuple[str, str]:
    """A redirection's keys in WatchReport.by_caller and by_redirect (a hot
    function's redirections repeat them: made once)."""
    return (function_of_label(caller),
            f"{call_site}: {patched} -> {replacement}" + (f" ({named_by})" if named_by else ""))


@dataclass
class WatchReport:
    design: str = "livepatch-stack"
    vmlinux: str = ""
    probe: str = ""
    mode: str = ""  # breakpoint, park or sample (WatchOptions.mode, as resolved for the QEMU)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    end_reason: str = ""
    redirections: int = 0
    by_call_site: dict[str, Tally] = field(default_factory=dict)
    by_caller: Counter = field(default_factory=Counter)
    by_patched: Counter = field(default_factory=Counter)
    by_replacement: Counter = field(default_factory=Counter)
    by_redirect: Counter = field(default_factory=Counter)     # "call site: B -> C (named by)"
    old_code_calls: Counter = field(default_factory=Counter)  # replaced functions that ran unredirected
    samples: int = 0                                          # sampling mode: pauses that checked tasks
    pauses: int = 0                                           # pauses by interrupt (sampling, parking)
    pause_ms: float = 0.0                                     # mean time the guest is held per pause
    sampled_tasks: dict[int, int] = field(default_factory=dict)  # task -> samples that checked it
    tasks: dict[tuple[int, int, int], TaskSummary] = field(default_factory=dict)  # by TaskIdentity.key
    violations: list[Violation] = field(default_factory=list)
    events: list[Redirection] = field(default_factory=list)
    guest_events: list[str] = field(default_factory=list)  # oopses, panics: what the guest did
    violations_at_down: int | None = None                  # violations reported when it first went down
    hazards: list[str] = field(default_factory=list)       # replacements the design cannot run safely
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    keep_events: int = 10000

    def task(self, who: TaskIdentity) -> TaskSummary:
        """The row of one task incarnation (a new one after pid reuse or exec)."""
        row = self.tasks.get(who.key)
        if row is None:
            row = self.tasks[who.key] = TaskSummary(who.task, who.pid, who.comm, who.exec_id)
        return row

    def add(self, r: Redirection, violations: list[Violation], checked: bool) -> None:
        self.add_alike(r, violations, checked, 1)

    def add_alike(self, r: Redirection, violations: list[Violation], checked: bool, count: int) -> None:
        """count redirections alike but for their seq (r's, then the next ones):
        a hot function's, remembered clean by record mode, tallied at once."""
        self.redirections += count
        tally = self.by_call_site.setdefault(r.call_site, Tally())
        tally.seen += count
        tally.checked += checked * count
        tally.violations += len(violations)
        caller, redirect = tally_keys(r.caller, r.call_site, r.patched, r.replacement, r.named_by)
        self.by_caller[caller] += count
        self.by_patched[r.patched] += count
        self.by_replacement[r.replacement] += count
        self.by_redirect[redirect] += count
        row = self.task(r.who)
        row.redirections += count
        row.violations += len(violations)
        if r.cpu not in row.cpus:
            row.cpus.append(r.cpu)
        self.violations.extend(violations)
        kept = min(count, self.keep_events - len(self.events))
        if kept > 0:
            self.events.extend(r if n == 0 else replace(r, seq=r.seq + n) for n in range(kept))

    def add_violations(self, who: TaskIdentity, violations: list[Violation]) -> None:
        """Violations not tied to one redirection: a call not redirected, a sample."""
        if violations:
            self.task(who).violations += len(violations)
            self.violations.extend(violations)

    def summary(self, latest: int = 3) -> dict:
        """What a live view shows: counters, tasks, the latest violations in full."""
        data = self.to_dict()
        return {**{name: data[name] for name in SUMMARY_FIELDS},
                "ended": self.end_reason if self.ended else None, "violations": len(self.violations),
                "old_code_calls": sum(self.old_code_calls.values()),
                "latest_violations": [v.format_text() for v in self.violations[-latest:]],
                "guest_events": self.guest_events[-latest:], "errors": self.errors[-latest:]}

    def finish(self, reason: str) -> None:
        if self.ended is None:
            self.ended = time.time()
            self.end_reason = reason

    @property
    def violated_invariants(self) -> list[int]:
        return sorted({v.invariant for v in self.violations})

    # ---- serialisation ------------------------------------------------------

    def to_dict(self) -> dict:
        out = {"format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = _CODECS[f.name][0](value) if f.name in _CODECS else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "WatchReport":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} report (format {data.get('format')!r})")
        return cls(**{f.name: _CODECS[f.name][1](data[f.name]) if f.name in _CODECS else data[f.name]
                      for f in fields(cls)})

    def write_json(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)  # a reader never sees half a report

    @classmethod
    def read_json(cls, path: Path) -> "WatchReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_junit(self, path: Path) -> None:
        """One test case per call-site class and one for the guest; each violation a failure."""
        cases = []
        for site, tally in sorted(self.by_call_site.items()):
            failures = [v for v in self.violations if v.call_site == site]
            body = "".join(f"<failure message={quoteattr(f'invariant {v.invariant}: {v.title}')}>"
                           f"{escape(v.format_text())}</failure>" for v in failures)
            cases.append(f'<testcase classname="klp-watch.{self.design}" name={quoteattr(f"{site} call sites: {tally.seen} redirections")}>{body}</testcase>')
        guest = "".join(f"<failure message={quoteattr(e)}/>" for e in self.guest_events)
        guest += "".join(f"<error message={quoteattr(e)}/>" for e in self.errors)
        cases.append(f'<testcase classname="klp-watch.{self.design}" name="guest">{guest}</testcase>')
        failures = len(self.violations) + len(self.guest_events)
        xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="klp-watch" tests="{len(cases)}" '
               f'failures="{failures}" errors="{len(self.errors)}">\n' + "\n".join(cases) + "\n</testsuite>\n")
        Path(path).write_text(xml)

    # ---- text ---------------------------------------------------------------

    def format_text(self) -> str:
        state = f"ended: {self.end_reason}" if self.ended else "running"
        mode = f", {self.mode} mode" if self.mode else ""
        lines = [f"klp-watch ({self.design}{mode}): {self.redirections} redirections, "
                 f"{len(self.violations)} violations ({state})"]
        if self.samples:
            lines.append(f"  sampling: {self.samples} samples checked {len(self.sampled_tasks)} tasks' livepatch "
                         f"stacks ({sum(self.sampled_tasks.values())} task checks); the guest was held "
                         f"{self.pause_ms:.1f} ms per pause")
        elif self.pauses:
            lines.append(f"  parking: {self.pauses} pauses let {self.redirections} redirections go on from P3; "
                         f"the guest was held {self.pause_ms:.1f} ms per pause")
        if self.by_call_site:
            lines.append(f"  {'call site':<16} {'seen':>8} {'checked':>8} {'violations':>10}")
            for site, t in sorted(self.by_call_site.items()):
                lines.append(f"  {site:<16} {t.seen:>8} {t.checked:>8} {t.violations:>10}")
        if self.by_caller:
            lines.append("  by caller A:")
            width = max(map(len, self.by_caller))
            lines += [f"    {name:<{width}}  {n:>8}" for name, n in sorted(self.by_caller.items())]
        if self.by_redirect:
            lines.append("  by call site, patched B -> replacement C (how they were named):")
            width = max(map(len, self.by_redirect))
            lines += [f"    {name:<{width}}  {n:>8}" for name, n in sorted(self.by_redirect.items())]
        if self.old_code_calls:
            lines.append("  calls of replaced functions that ran the old code (not redirected):")
            width = max(map(len, self.old_code_calls))
            lines += [f"    {name:<{width}}  {n:>8}" for name, n in sorted(self.old_code_calls.items())]
        if self.tasks:
            lines.append(f"  {'task':>20}  {'pid':>6}  {'comm':<16}  {'cpus':<6}  {'redirections':>12}  violations")
            for t in sorted(self.tasks.values(), key=lambda t: (t.pid, t.exec_id)):
                cpus = ",".join(map(str, sorted(t.cpus)))
                lines.append(f"  {t.task:#20x}  {t.pid:>6}  {t.comm:<16}  {cpus:<6}  {t.redirections:>12}  {t.violations}")
        if self.violations:
            numbers = self.violated_invariants
            anchor = f"#{numbers[0]}" if len(numbers) == 1 else ""
            lines.append(f"  invariants violated: {', '.join(map(str, numbers))} (docs/invariants.md{anchor})")
        lines += [f"  design hazard (invariant 6): {h}" for h in self.hazards]
        lines += [f"  guest: {e}" for e in self.guest_events]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)
