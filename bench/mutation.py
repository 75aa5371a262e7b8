"""The mutation bench: every mutant of the lab, watched in each mode.

    .venv/bin/python bench/mutation.py [--mutants NAME,...] [--modes breakpoint,park,sample,record]

Each mutant (gdbklp.lab.mutants.MUTANTS: a small edit of livepatch_handler,
ftrace_caller, the RFC paths, the module loader or C) is built as a lab
variant (a kernel variant from the lab's build tree, or modules), booted,
and its workload run under klp-watch in each mode. Per mutant and mode:
detected or not, the invariants violated (the expected one first), the
sequence number of the first violation, and whether it came before the
guest went down. The mutation score per mode is the share of mutants
detected with the expected invariant before any crash.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.errors import GdbklpError  # noqa: E402
from gdbklp.lab import build, session  # noqa: E402
from gdbklp.lab.config import DEFAULT_TRAMPOLINE  # noqa: E402
from gdbklp.lab.mutants import MUTANTS, Mutant  # noqa: E402
from gdbklp.options import Mode, WatchOptions  # noqa: E402

# record: the guest boots under the recorder's QEMU, its plugin on a socket in the workdir
MODES = {Mode.BREAKPOINT: WatchOptions(breakpoint=True), Mode.PARK: WatchOptions(park=True),
         Mode.SAMPLE: WatchOptions(sample=100), Mode.RECORD: WatchOptions(record="recorder.sock")}
RUN_TIMEOUT = 120.0


@dataclasses.dataclass
class Outcome:
    detected: bool
    invariants: list[int]
    first_seq: int | None
    before_crash: bool
    guest_down: bool
    finished: bool
    note: str = ""

    def right(self, mutant: Mutant) -> bool:
        return self.detected and self.invariants[:1] == [mutant.invariant] and self.before_crash

    def cell(self, mutant: Mutant) -> str:
        if self.note:
            return self.note
        if not self.detected:
            return "missed" + (" (guest down)" if self.guest_down else "")
        verdict = "caught" if self.right(mutant) else "WRONG"
        crash = "" if not self.guest_down else (", before the crash" if self.before_crash else ", AFTER the crash")
        return f"{verdict}: inv {','.join(map(str, self.invariants))} at #{self.first_seq}{crash}"


def not_applicable(mutant: Mutant, options: WatchOptions) -> str | None:
    """Why a mode cannot watch a mutant's design, if it cannot."""
    if mutant.trampoline != DEFAULT_TRAMPOLINE and options.mode not in (Mode.BREAKPOINT, Mode.RECORD):
        return "n/a (RFC design: no livepatch stack to park at or sample)"
    if mutant.handoff and options.mode is Mode.SAMPLE:
        return "n/a (the hand-off is checked at breakpoints: --handoff)"
    return None


def watch_mutant(mutant: Mutant, images: build.LabImages, options: WatchOptions, workdir: Path) -> Outcome:
    """Boot the mutant, run its workload under one watch; what the watch saw."""
    why_not = not_applicable(mutant, options)
    if why_not:
        return Outcome(False, [], None, False, False, False, note=why_not)
    socket = None
    if options.mode is Mode.RECORD:
        socket = workdir / options.record
        options = dataclasses.replace(options, record=str(socket))
    with session.booted(images, trampoline=mutant.trampoline, workdir=workdir, plugin_socket=socket) as guest, \
            session.attached(guest, images.vmlinux) as gdb:
        gdb.cont()
        watched = session.WatchedGuest(guest, gdb)
        try:
            report = watched.watch(f"klplab-run -r {mutant.run}", RUN_TIMEOUT,
                                   dataclasses.replace(options, handoff=mutant.handoff))
        except GdbklpError as e:  # e.g. the RFC model refuses --park
            return Outcome(False, [], None, False, False, False, note=f"n/a: {str(e).strip().splitlines()[-1]}")
    invariants = [v.invariant for v in report.violations]
    ordered = sorted(set(invariants), key=lambda i: (i != mutant.invariant, invariants.index(i)))
    # before any crash: the guest did not go down, or violations were reported by the time it first did
    before = not report.guest_events or (report.violations_at_down or 0) > 0
    return Outcome(bool(report.violations), ordered, min((v.seq for v in report.violations), default=None),
                   before, bool(report.guest_events), not any("did not finish" in n for n in report.notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mutants", default=",".join(MUTANTS), help=f"some of: {', '.join(MUTANTS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of: {', '.join(MODES)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gdbklp-mutation"))
    args = parser.parse_args()
    mutants = [MUTANTS[name.strip()] for name in args.mutants.split(",")]
    modes = [name.strip() for name in args.modes.split(",")]
    start = time.monotonic()
    rows = []
    for mutant in mutants:
        built = time.monotonic()
        images = build.build_all(mutant)
        build_seconds = time.monotonic() - built
        outcomes = {}
        for mode in modes:
            workdir = args.workdir / mutant.name / mode
            workdir.mkdir(parents=True, exist_ok=True)
            outcomes[mode] = watch_mutant(mutant, images, MODES[mode], workdir)
            print(f"{mutant.name:<24} {mode:<8} {outcomes[mode].cell(mutant)}", flush=True)
        rows.append((mutant, build_seconds, outcomes))
    print(f"\n| mutant | mutated code | defect | expected | build | {' | '.join(modes)} |")
    print("|" + "---|" * (5 + len(modes)))
    for mutant, seconds, outcomes in rows:
        print(f"| {mutant.name} | {mutant.mutated} | {mutant.defect} | {mutant.invariant} | {seconds:.0f} s | "
              + " | ".join(outcomes[m].cell(mutant) for m in modes) + " |")
    for mode in modes:
        applicable = [(mutant, outcomes[mode]) for mutant, _, outcomes in rows if not outcomes[mode].note]
        caught = sum(outcome.right(mutant) for mutant, outcome in applicable)
        print(f"mutation score, {mode}: {caught}/{len(applicable)} (of the mutants it can watch) detected with "
              "the expected invariant before any crash")
    print(f"total: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
