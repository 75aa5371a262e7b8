"""What a watch saw, as plain data: counters, kept events, JSON round trip.

Pure Python (no gdb): the gdb side fills it, the lab, the tests and the batch
scripts read it back from JSON.
"""

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "gdbklp-watch-report/1"


@dataclass(frozen=True)
class Redirection:
    """One redirection B -> C, seen when it entered the trampoline."""

    seq: int
    task: int           # task_struct (== thread_info) address: the per-task key
    pid: int
    comm: str
    cpu: int
    return_address: int  # RA, in the caller A
    caller: str          # A as function+offset
    call_site: str       # gdbklp.abi.callsite.CallSite value
    replacement: int     # C's entry
    replacement_name: str
    toc: int             # r2 at the trampoline
    sp: int              # r1 at the trampoline (A's stack pointer)


@dataclass
class TaskSummary:
    pid: int
    comm: str
    redirections: int = 0
    cpus: list[int] = field(default_factory=list)


@dataclass
class WatchReport:
    design: str = "livepatch-stack"
    vmlinux: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    end_reason: str = ""
    redirections: int = 0
    by_replacement: Counter = field(default_factory=Counter)
    by_call_site: Counter = field(default_factory=Counter)
    tasks: dict[int, TaskSummary] = field(default_factory=dict)
    events: list[Redirection] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    keep_events: int = 10000

    def add(self, r: Redirection) -> None:
        self.redirections += 1
        self.by_replacement[r.replacement_name] += 1
        self.by_call_site[r.call_site] += 1
        task = self.tasks.get(r.task)
        if task is None:
            task = self.tasks[r.task] = TaskSummary(r.pid, r.comm)
        task.redirections += 1
        if r.cpu not in task.cpus:
            task.cpus.append(r.cpu)
        if len(self.events) < self.keep_events:
            self.events.append(r)

    def finish(self, reason: str) -> None:
        if self.ended is None:
            self.ended = time.time()
            self.end_reason = reason

    # ---- serialisation ------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "design": self.design,
            "vmlinux": self.vmlinux,
            "started": self.started,
            "ended": self.ended,
            "end_reason": self.end_reason,
            "redirections": self.redirections,
            "by_replacement": dict(self.by_replacement),
            "by_call_site": dict(self.by_call_site),
            "tasks": {f"{k:#x}": asdict(v) for k, v in self.tasks.items()},
            "events": [asdict(e) for e in self.events],
            "errors": self.errors,
            "keep_events": self.keep_events,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "WatchReport":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} report (format {data.get('format')!r})")
        return cls(
            design=data["design"], vmlinux=data["vmlinux"], started=data["started"],
            ended=data["ended"], end_reason=data["end_reason"],
            redirections=data["redirections"],
            by_replacement=Counter(data["by_replacement"]),
            by_call_site=Counter(data["by_call_site"]),
            tasks={int(k, 16): TaskSummary(**v) for k, v in data["tasks"].items()},
            events=[Redirection(**e) for e in data["events"]],
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

    # ---- text ---------------------------------------------------------------

    def format_text(self) -> str:
        state = f"ended: {self.end_reason}" if self.ended else "running"
        lines = [f"klp-watch ({self.design}): {self.redirections} redirections ({state})"]
        if self.by_replacement:
            lines.append("  by replacement function:")
            width = max(map(len, self.by_replacement))
            lines += [f"    {name:<{width}}  {n:>8}" for name, n in sorted(self.by_replacement.items())]
        if self.by_call_site:
            lines.append("  by call site of the caller:")
            lines += [f"    {name:<15}  {n:>8}" for name, n in sorted(self.by_call_site.items())]
        if self.tasks:
            lines.append("  by task:")
            lines.append(f"    {'task':>18}  {'pid':>6}  {'comm':<16}  {'cpus':<6}  redirections")
            for addr, t in sorted(self.tasks.items(), key=lambda kv: kv[1].pid):
                cpus = ",".join(map(str, sorted(t.cpus)))
                lines.append(f"    {addr:#18x}  {t.pid:>6}  {t.comm:<16}  {cpus:<6}  {t.redirections:>8}")
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)
