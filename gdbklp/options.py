"""klp-watch start's options, as data: parsed inside gdb, written as a command
line by the lab and the monitor outside it (pure Python, no gdb)."""

import argparse
import shlex
from dataclasses import dataclass, fields, replace
from enum import StrEnum

from gdbklp.abi.designs import Design
from gdbklp.versions import flushes_at_stops

AUTO = "auto"  # --design auto: the design the running kernel uses
DESIGNS = (AUTO, *Design)


class Mode(StrEnum):
    """How a watch holds the guest at its probe points (gdbklp.gdbext.watch.modes)."""

    AUTO = "auto"              # not chosen yet: WatchOptions.resolved() chooses for the QEMU
    BREAKPOINT = "breakpoint"  # a breakpoint stop at each probe point
    PARK = "park"              # a branch to itself at P3, released by pauses by interrupt
    SAMPLE = "sample"          # no holding: pauses by interrupt sample the tasks' livepatch stacks
    RECORD = "record"          # no holding: QEMU's recorder plugin streams each probe point's state


@dataclass
class WatchOptions:
    max_events: int | None = None
    fail_fast: bool = False
    report: str | None = None
    junit: str | None = None
    batch: bool = False
    quiet: bool = False
    sample: float | None = None
    park: bool = False
    breakpoint: bool = False
    record: str | None = None  # the recorder plugin's socket
    background: bool = False
    resolve_indirect: bool = False
    handoff: bool = False
    design: str = AUTO

    @property
    def mode(self) -> Mode:
        """How the guest is held at the probe points; AUTO until resolved() has
        chosen for the QEMU."""
        return (Mode.SAMPLE if self.sample else Mode.PARK if self.park else Mode.BREAKPOINT if self.breakpoint
                else Mode.RECORD if self.record else Mode.AUTO)

    def resolved(self, qemu_version: tuple[int, ...] | None, can_park: bool = True) -> "WatchOptions":
        """These options with the mode chosen, where none was asked for, by
        what bench/speed.py measured (README, Numbers): a breakpoint probe
        on a QEMU that does not flush at stops (1.75x the unwatched time on
        QEMU 11.1.3, against 2.85x parked); parking on one that does (3.50x
        against 5.23x on QEMU 7.2), when gdb runs the guest in the
        background, which parking needs, and the design can be parked."""
        if self.mode is not Mode.AUTO:
            return self
        park = can_park and self.background and flushes_at_stops(qemu_version)
        return replace(self, park=park, breakpoint=not park)

    def command(self) -> str:
        """The klp-watch start command line that gives these options."""
        words = ["klp-watch", "start"]
        defaults = WatchOptions()
        for f in fields(self):
            value = getattr(self, f.name)
            if value == getattr(defaults, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            words += [flag] if value is True else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
        return shlex.join(words)

    def problem(self) -> str | None:
        """What makes these options contradict each other, in one line; None if nothing."""
        chosen = [flag for flag, on in (("--sample", self.sample), ("--park", self.park),
                                        ("--breakpoint", self.breakpoint), ("--record", self.record)) if on]
        if len(chosen) > 1:
            return f"{' and '.join(chosen)} are {('two', 'three', 'four')[len(chosen) - 2]} ways of watching: " \
                   "choose one"
        if self.sample and self.resolve_indirect:
            return "--resolve-indirect holds redirections at P1: sampling holds none"
        if self.sample and self.handoff:
            return "--handoff stops at P0 and at livepatch_handler's entry: sampling stops nowhere"
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "WatchOptions":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def add_start_arguments(start: argparse.ArgumentParser) -> None:
    """klp-watch start's arguments (one per WatchOptions field)."""
    start.add_argument("--max-events", type=int, metavar="N", help="stop the guest after N redirections")
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
    start.add_argument("--breakpoint", action="store_true",
                       help="every redirection checked at a breakpoint stop at P3 (the default, but on a QEMU "
                            "older than 10.2 with --background, where --park is faster)")
    start.add_argument("--record", metavar="SOCKET",
                       help="every redirection checked with no stop at all: QEMU's gdbklp recorder plugin, "
                            "loaded at QEMU's start with -plugin libklprecord.so,socket=SOCKET, streams the "
                            "state at each probe point to klp-watch")
    start.add_argument("--background", action="store_true",
                       help="gdb runs the guest in the background (gdb/MI, `continue &`): with no mode given, "
                            "a QEMU older than 10.2, which flushes its translations at every stop, is then "
                            "watched with --park")
    start.add_argument("--resolve-indirect", action="store_true",
                       help="name B and C of every indirect call: also hold each redirection at P1 (the "
                            "trampoline's bctrl, C in CTR), a breakpoint stop or a park there; without it "
                            "they are named where the patch's functions or C's code tell, else '?'")
    start.add_argument("--handoff", action="store_true",
                       help="also check ftrace's hand-off to livepatch_handler (invariant 14): breakpoints at "
                            "the ftrace trampolines' entry (P0) and the handler's entry, two more stops per "
                            "redirection, where RA, C, r1, r2 and r14..r31 must have come through")
    start.add_argument("--design", choices=DESIGNS, default=AUTO,
                       help="the trampoline design to model; auto: where the running kernel's ftrace "
                            "trampolines send redirected calls (livepatch_handler, or an RFC mini-frame path)")
