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
    """The table klplab-run prints (between its begin/end markers)."""
    start = text.rfind(COUNTS_BEGIN)
    end = text.find(COUNTS_END, start)
    if start < 0 or end < 0:
        raise LabError("the workload printed no counts table")
    counts = {}
    for line in text[start + len(COUNTS_BEGIN):end].strip().splitlines()[1:]:
        kind, *numbers = line.split()
        counts[kind] = KindCounts(*map(int, numbers))
    return counts


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


def compare(by_caller: dict[str, int], counts: dict[str, KindCounts]) -> list[KindComparison]:
    """Per kind: redirections gdb saw from its caller A against the guest's NEW results.

    Each kind has its own A, so the caller identifies the kind for every call
    site (an indirect call does not tell B or C at the return).
    """
    return [KindComparison(kind, by_caller.get(caller_of(kind), 0),
                           counts[kind].new, counts[kind].calls, counts[kind].bad)
            for kind in KINDS if kind in counts]


def format_comparison(rows: list[KindComparison]) -> str:
    lines = [f"{'kind':<12} {'seen by gdb':>12} {'guest: new':>11} {'calls':>7} {'bad':>5}  verdict"]
    for r in rows:
        verdict = "ok" if r.agrees else "MISMATCH"
        lines.append(f"{r.kind:<12} {r.seen_by_gdb:>12} {r.guest_new:>11} {r.guest_calls:>7} "
                     f"{r.guest_bad:>5}  {verdict}")
    return "\n".join(lines)
