"""The lab workload's call kinds, and the guest's own counts of them."""

from dataclasses import dataclass

from gdbklp.lab import LabError

# The lab's call kinds, in the order of klp_lab.h; each kind's replacement C
# is klp_lab_c_<kind> in klp_lab_patch.ko.
KINDS = ("local", "local_other", "global", "indirect", "many_args", "varargs", "sibling")
# The call site each kind's caller A uses (qemu-images/modules/target_a.c).
CALLER_CALL_SITE = {
    "local": "local", "local_other": "local_other", "global": "global", "indirect": "indirect",
    "many_args": "local", "varargs": "local", "sibling": "local",
}
COUNTS_BEGIN = "klplab-counts-begin"
COUNTS_END = "klplab-counts-end"


def replacement_of(kind: str) -> str:
    return f"klp_lab_c_{kind}"


def caller_of(kind: str) -> str:
    return f"klp_lab_a_{kind}"


@dataclass(frozen=True)
class KindCounts:
    calls: int
    old: int
    new: int
    bad: int


def parse_counts(text: str) -> dict[str, KindCounts]:
    """The guest's counts by kind: the last table klplab-run printed in text
    (between its begin and end markers).

    LabError when text has no table or an empty one; the message quotes the
    end of text, where a workload that stopped early says why.
    """
    start = text.rfind(COUNTS_BEGIN)
    end = text.find(COUNTS_END, start) if start >= 0 else -1
    if end < 0:
        raise LabError(f"the workload printed no counts table ({_ending(text)})")
    rows = text[start + len(COUNTS_BEGIN):end].strip().splitlines()[1:]  # [0] is the header
    if not rows:
        raise LabError(f"the workload's counts table is empty ({_ending(text)})")
    counts = {}
    for line in rows:
        kind, *numbers = line.split()
        counts[kind] = KindCounts(*map(int, numbers))
    return counts


def _ending(text: str, lines: int = 5) -> str:
    tail = text.strip().splitlines()[-lines:]
    return "its output ended: " + " | ".join(tail) if tail else "it printed nothing"


@dataclass(frozen=True)
class KindComparison:
    kind: str
    seen_by_gdb: int
    guest_new: int
    guest_calls: int
    guest_bad: int

    @property
    def agrees(self) -> bool:
        return self.seen_by_gdb == self.guest_new and self.guest_bad == 0


def compare(by_caller: dict[str, int], counts: dict[str, KindCounts],
            kinds: tuple[str, ...] = KINDS) -> list[KindComparison]:
    """Per kind of kinds, in that order: redirections gdb saw from its caller A
    against the guest's NEW results.

    Each kind has its own A, so the caller identifies the kind for every call
    site (an indirect call does not tell B or C at the return). The guest
    counts every kind, whichever ran; a kind of kinds missing from counts
    (every kind, if counts is empty) is a LabError, not a row left out.
    """
    if not kinds:
        raise ValueError("compare: no kinds to compare")
    missing = [kind for kind in kinds if kind not in counts]
    if missing:
        raise LabError(f"the guest's counts have no {', '.join(missing)} "
                       f"(they have {', '.join(counts) or 'no kind at all'})")
    return [KindComparison(kind, by_caller.get(caller_of(kind), 0),
                           counts[kind].new, counts[kind].calls, counts[kind].bad)
            for kind in kinds]


def format_comparison(rows: list[KindComparison]) -> str:
    lines = [f"{'kind':<12} {'seen by gdb':>12} {'guest: new':>11} {'calls':>7} {'bad':>5}  verdict"]
    for r in rows:
        verdict = "ok" if r.agrees else "MISMATCH"
        lines.append(f"{r.kind:<12} {r.seen_by_gdb:>12} {r.guest_new:>11} {r.guest_calls:>7} "
                     f"{r.guest_bad:>5}  {verdict}")
    return "\n".join(lines)
