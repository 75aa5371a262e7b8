"""What a watch saw, as plain data: counters, violations, events; JSON and JUnit.

Pure Python (no gdb): the gdb side fills it, the lab, the tests and the batch
scripts read it back from JSON.
"""

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from gdbklp.abi.invariants import Violation
from gdbklp.abi.kernel import function_of_label

FORMAT = "gdbklp-watch-report/4"


@dataclass(frozen=True)
class Redirection:
    """One redirection B -> C, seen when C returned into the trampoline."""

    seq: int
    task: int            # task_struct (== thread_info) address: the per-task key
    pid: int
    comm: str
    cpu: int
    return_address: int  # RA, in the caller A
    caller: str          # A as function+offset
    call_site: str       # gdbklp.abi.callsite.CallSite value
    patched: str         # B, or "?" where the call site does not tell (indirect)
    replacement: str     # C, or "?"
    toc: int             # the TOC the handler will restore
    sp: int              # r1 at the return (A's stack pointer if all is well)
    depth: int           # livepatch stack depth of this redirection
    violations: tuple[int, ...] = ()


@dataclass
class Tally:
    seen: int = 0
    checked: int = 0
    violations: int = 0


@dataclass
class TaskSummary:
    pid: int
    comm: str
    redirections: int = 0
    violations: int = 0
    cpus: list[int] = field(default_factory=list)


@dataclass
class WatchReport:
    design: str = "livepatch-stack"
    vmlinux: str = ""
    probe: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    end_reason: str = ""
    redirections: int = 0
    by_call_site: dict[str, Tally] = field(default_factory=dict)
    by_caller: Counter = field(default_factory=Counter)
    by_patched: Counter = field(default_factory=Counter)
    by_replacement: Counter = field(default_factory=Counter)
    old_code_calls: Counter = field(default_factory=Counter)  # replaced functions that ran unredirected
    samples: int = 0                                          # sampling mode: pauses that checked tasks
    pauses: int = 0                                           # pauses by interrupt (sampling, parking)
    pause_ms: float = 0.0                                     # mean time the guest is held per pause
    sampled_tasks: dict[int, int] = field(default_factory=dict)  # task -> samples that checked it
    tasks: dict[int, TaskSummary] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    events: list[Redirection] = field(default_factory=list)
    guest_events: list[str] = field(default_factory=list)  # oopses, panics: what the guest did
    hazards: list[str] = field(default_factory=list)       # replacements the design cannot run safely
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    keep_events: int = 10000

    def add(self, r: Redirection, violations: list[Violation], checked: bool) -> None:
        self.redirections += 1
        tally = self.by_call_site.setdefault(r.call_site, Tally())
        tally.seen += 1
        tally.checked += checked
        tally.violations += len(violations)
        self.by_caller[function_of_label(r.caller)] += 1
        self.by_patched[r.patched] += 1
        self.by_replacement[r.replacement] += 1
        task = self.tasks.get(r.task)
        if task is None:
            task = self.tasks[r.task] = TaskSummary(r.pid, r.comm)
        task.redirections += 1
        task.violations += len(violations)
        if r.cpu not in task.cpus:
            task.cpus.append(r.cpu)
        self.violations.extend(violations)
        if len(self.events) < self.keep_events:
            self.events.append(r)

    def add_violations(self, task: int, pid: int, comm: str, violations: list[Violation]) -> None:
        """Violations not tied to one redirection: a call not redirected, a sample."""
        if violations:
            summary = self.tasks.get(task)
            if summary is None:
                summary = self.tasks[task] = TaskSummary(pid, comm)
            summary.violations += len(violations)
            self.violations.extend(violations)

    def summary(self, latest: int = 3) -> dict:
        """What a live view shows: counters, tasks, the latest violations in full."""
        return {
            "design": self.design, "probe": self.probe, "ended": self.end_reason if self.ended else None,
            "redirections": self.redirections, "violations": len(self.violations),
            "by_call_site": {k: asdict(v) for k, v in self.by_call_site.items()},
            "old_code_calls": sum(self.old_code_calls.values()), "samples": self.samples,
            "tasks": [{"task": k, **asdict(v)} for k, v in self.tasks.items()],
            "latest_violations": [v.format_text() for v in self.violations[-latest:]],
            "guest_events": self.guest_events[-latest:], "errors": self.errors[-latest:],
        }

    def finish(self, reason: str) -> None:
        if self.ended is None:
            self.ended = time.time()
            self.end_reason = reason

    @property
    def violated_invariants(self) -> list[int]:
        return sorted({v.invariant for v in self.violations})

    # ---- serialisation ------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "design": self.design, "vmlinux": self.vmlinux, "probe": self.probe,
            "started": self.started, "ended": self.ended, "end_reason": self.end_reason,
            "redirections": self.redirections,
            "by_call_site": {k: asdict(v) for k, v in self.by_call_site.items()},
            "by_caller": dict(self.by_caller), "by_patched": dict(self.by_patched),
            "by_replacement": dict(self.by_replacement), "old_code_calls": dict(self.old_code_calls),
            "samples": self.samples, "pauses": self.pauses, "pause_ms": self.pause_ms, "sampled_tasks": {f"{k:#x}": v for k, v in self.sampled_tasks.items()},
            "tasks": {f"{k:#x}": asdict(v) for k, v in self.tasks.items()},
            "violations": [asdict(v) for v in self.violations],
            "events": [{**asdict(e), "violations": list(e.violations)} for e in self.events],
            "guest_events": self.guest_events, "hazards": self.hazards, "notes": self.notes, "errors": self.errors,
            "keep_events": self.keep_events,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WatchReport":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} report (format {data.get('format')!r})")
        return cls(
            design=data["design"], vmlinux=data["vmlinux"], probe=data["probe"],
            started=data["started"], ended=data["ended"], end_reason=data["end_reason"],
            redirections=data["redirections"],
            by_call_site={k: Tally(**v) for k, v in data["by_call_site"].items()},
            by_caller=Counter(data["by_caller"]), by_patched=Counter(data["by_patched"]),
            by_replacement=Counter(data["by_replacement"]), old_code_calls=Counter(data["old_code_calls"]),
            samples=data["samples"], pauses=data["pauses"], pause_ms=data["pause_ms"], sampled_tasks={int(k, 16): v for k, v in data["sampled_tasks"].items()},
            tasks={int(k, 16): TaskSummary(**v) for k, v in data["tasks"].items()},
            violations=[Violation(**v) for v in data["violations"]],
            events=[Redirection(**{**e, "violations": tuple(e["violations"])}) for e in data["events"]],
            guest_events=list(data["guest_events"]), hazards=list(data["hazards"]), notes=list(data["notes"]),
            errors=list(data["errors"]), keep_events=data["keep_events"],
        )

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
        lines = [f"klp-watch ({self.design}): {self.redirections} redirections, "
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
        if self.old_code_calls:
            lines.append("  calls of replaced functions that ran the old code (not redirected):")
            width = max(map(len, self.old_code_calls))
            lines += [f"    {name:<{width}}  {n:>8}" for name, n in sorted(self.old_code_calls.items())]
        if self.tasks:
            lines.append(f"  {'task':>20}  {'pid':>6}  {'comm':<16}  {'cpus':<6}  {'redirections':>12}  violations")
            for addr, t in sorted(self.tasks.items(), key=lambda kv: kv[1].pid):
                cpus = ",".join(map(str, sorted(t.cpus)))
                lines.append(f"  {addr:#20x}  {t.pid:>6}  {t.comm:<16}  {cpus:<6}  {t.redirections:>12}  {t.violations}")
        if self.violations:
            lines.append(f"  invariants violated: {', '.join(map(str, self.violated_invariants))}")
        lines += [f"  design hazard (invariant 6): {h}" for h in self.hazards]
        lines += [f"  guest: {e}" for e in self.guest_events]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)
