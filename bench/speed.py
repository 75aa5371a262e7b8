"""The speed programme: every way of watching the lab, on one workload, side by side.

    .venv/bin/python bench/speed.py [--args "KLPLAB-RUN ARGS"] [--rounds N] [--modes M,...] [--qemus Q,...]
                                    [--kernels K,...] [--hot N] [--chart FILE.svg]

On each lab kernel generation (--kernels, default the default one) and each
QEMU the lab runs (the lab root's, which does not flush its translations at
a stop, and the host's), one after the other: one serve-mode guest and one
gdb-multiarch over MI (as the monitor drives it). Each round runs the same workload (klplab-run ARGS) once per mode, the
modes in turn:

  unwatched   gdb attached, no breakpoint, the guest running
  gdb script  bench/naive-watch.gdb: breakpoints with `commands` at the
              trampoline's entry and where C returns into it, the checks
              of a plain script
  breakpoint  klp-watch start --breakpoint: one breakpoint stop per redirection
  breakpoint+P1  klp-watch start --breakpoint --resolve-indirect: a second stop, at P1
              (the bctrl into C), names every indirect call's B and C
  breakpoint+handoff  klp-watch start --breakpoint --handoff: two more stops, at
              ftrace's entry (P0) and livepatch_handler's, check the hand-off
  park        klp-watch start --park: every redirection held at P3 until a
              pause by interrupt checks it; no breakpoint stop
  park+P1     klp-watch start --park --resolve-indirect: held at P1 too
  sample 10 Hz   klp-watch start --sample 10: pauses by interrupt, no breakpoints
  sample 100 Hz  klp-watch start --sample 100
  record      klp-watch start --record: no stop at all, QEMU's recorder plugin
              streams each redirection's state (only on the recorder's QEMU,
              --qemus record)

With --hot N, the hot workload too: a patched function called as fast as
the guest can (klplab-run -k local -b 1000 -w 0: a thousand calls per
system call, no other work between them), on 1 and 2 tasks, N calls per
task; modes that stop the guest per redirection get N/50 calls. Its table
compares time per redirection and redirections per second.

The time is taken on the host around the guest command (the guest's own
clock stops while gdb holds it); each mode's median over the rounds is
compared with the unwatched median. One more run per mode logs gdb's remote
protocol (`set debug remote 1`) to a file while the workload runs: stops
(stop replies), the debug stops among them (breakpoint hits and steps: a
QEMU older than 10.2 flushes its translation cache at each; an interrupt
does not) and
the packets gdb sends, per stop and per redirection.
"""

import argparse
import dataclasses
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.lab import build, session, workload  # noqa: E402
from gdbklp.lab.config import DEFAULT_KERNEL, KERNELS, QEMUS, REPO_ROOT  # noqa: E402
from gdbklp.lab.qemu import emulator  # noqa: E402
from gdbklp.report import WatchReport  # noqa: E402
from gdbklp.versions import dotted  # noqa: E402
from gdbklp.options import Mode, WatchOptions  # noqa: E402

from chart import bar_chart_svg  # noqa: E402 (bench/chart.py, beside this script)

NAIVE_SCRIPT = REPO_ROOT / "bench" / "naive-watch.gdb"
STOP_REPLY = re.compile(r"Packet received: [TS][0-9a-f]{2}")
DEBUG_STOP = re.compile(r"Packet received: [TS]05")  # a breakpoint hit or a step: QEMU < 10.2 flushes its translations
SENT = re.compile(r"Sending packet: \$")
NAIVE_SUMMARY = re.compile(r"naive: (\d+) entries, (\d+) returns, (\d+) violations")


@dataclasses.dataclass
class Run:
    seconds: float
    redirections: int  # the guest's own count of calls that reached the new code
    events: int        # what the mode handled: breakpoint hits or samples
    violations: int
    stops: int = 0     # from the protocol log (the counting run only)
    debug_stops: int = 0
    packets: int = 0


def paused(gdb, command: str) -> str:
    """Run a gdb command with the guest paused; it runs again afterwards."""
    gdb.interrupt()
    output = gdb.console(command)
    gdb.cont()
    return output


class Watching:
    """How one way of watching starts and ends around the workload (the guest running before and after)."""

    name = "unwatched"
    events = ""  # what an event is, for the table's legend
    per_redirection = 0  # events each redirection must cause (a check that the mode saw them all)
    needs_recorder = False  # runs only on a guest booted with the recorder's plugin
    stops_per_redirection = False  # the hot workload is made smaller for it

    def start(self, gdb, tmp: Path, guest) -> None:
        pass

    def finish(self, gdb, tmp: Path) -> tuple[int, int]:
        """(events, violations)"""
        return 0, 0


class NaiveScript(Watching):
    name = "gdb script"
    events = "breakpoint hits"
    per_redirection = 2
    stops_per_redirection = True

    def start(self, gdb, tmp, guest):
        paused(gdb, f"source {NAIVE_SCRIPT}")

    def finish(self, gdb, tmp):
        gdb.interrupt()
        entries, returns, violations = map(int, NAIVE_SUMMARY.search(gdb.console("naive_summary")).groups())
        gdb.console("delete")
        gdb.cont()
        return entries + returns, violations


class KlpWatch(Watching):
    def __init__(self, name: str, sample_hz: float | None = None, park: bool = False, p1: bool = False,
                 handoff: bool = False, record: bool = False):
        self.name = name
        self.options = WatchOptions(quiet=True, sample=sample_hz, park=park, resolve_indirect=p1,
                                    breakpoint=not (sample_hz or park or record), handoff=handoff)
        self.sampling = sample_hz is not None
        self.needs_recorder = record
        self.by_pauses = self.sampling or park or record  # the watch ends with the guest running
        self.stops_per_redirection = not (self.sampling or record)
        self.events = "samples" if self.sampling else "redirections checked"
        self.per_redirection = 0 if self.sampling else 1

    def start(self, gdb, tmp, guest):
        options = self.options
        if self.needs_recorder:
            options = dataclasses.replace(options, record=str(guest.plugin_socket))
        paused(gdb, dataclasses.replace(options, report=str(tmp / "report.json")).command())

    def finish(self, gdb, tmp):
        if self.by_pauses:
            session.end_watch_running(gdb)
        else:
            paused(gdb, "klp-watch stop")
        report = WatchReport.read_json(tmp / "report.json")
        return report.samples if self.sampling else report.redirections, len(report.violations)


# named by klp-watch's modes (options.Mode), with what each adds
MODES = {m.name: m for m in (
    Watching(), NaiveScript(),
    KlpWatch(Mode.BREAKPOINT), KlpWatch(f"{Mode.BREAKPOINT}+P1", p1=True),
    KlpWatch(f"{Mode.BREAKPOINT}+handoff", handoff=True),
    KlpWatch(Mode.PARK, park=True), KlpWatch(f"{Mode.PARK}+P1", park=True, p1=True),
    KlpWatch(f"{Mode.SAMPLE} 10 Hz", sample_hz=10), KlpWatch(f"{Mode.SAMPLE} 100 Hz", sample_hz=100),
    KlpWatch(Mode.RECORD, record=True))}


def run(guest, gdb, mode: Watching, command: str, protocol_log: Path | None = None) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        mode.start(gdb, Path(tmp), guest)
        if protocol_log:
            gdb.console(f"set logging file {protocol_log}")
            for setting in ("logging overwrite on", "logging debugredirect on", "logging enabled on",
                            "debug remote 1"):
                gdb.console(f"set {setting}")
        start = time.monotonic()
        output = guest.check(command, timeout=7200)
        seconds = time.monotonic() - start
        if protocol_log:
            gdb.console("set debug remote 0")
            gdb.console("set logging enabled off")
        events, violations = mode.finish(gdb, Path(tmp))
    redirections = sum(c.new for c in workload.parse_counts(output).values())
    if mode.per_redirection and events != mode.per_redirection * redirections:
        raise SystemExit(f"{mode.name}: {events} {mode.events} for {redirections} redirections")
    result = Run(seconds, redirections, events, violations)
    if protocol_log:
        log = protocol_log.read_text(errors="replace")
        result.stops, result.packets = len(STOP_REPLY.findall(log)), len(SENT.findall(log))
        result.debug_stops = len(DEBUG_STOP.findall(log))
    return result


def ratio(numerator: float, denominator: float, fmt: str) -> str:
    return format(numerator / denominator, fmt) if denominator else "-"


@dataclasses.dataclass(frozen=True)
class Workload:
    """A klplab-run workload; stopping_args: a smaller one for the modes
    that stop the guest per redirection (the hot workload)."""

    name: str
    args: str
    stopping_args: str = ""

    def command(self, mode: Watching) -> str:
        args = self.stopping_args if mode.stops_per_redirection and self.stopping_args else self.args
        return f"klplab-run -r {args}"


def hot_workloads(calls: int) -> list[Workload]:
    """The hot workload on 1 and 2 tasks: a patched function called as fast as the guest can."""
    shape = "-k local -b 1000 -w 0"
    return [Workload(f"hot, {tasks} task{'s' if tasks > 1 else ''}", f"-t {tasks} -n {calls} {shape}",
                     f"-t {tasks} -n {max(calls // 50, 1000)} {shape}") for tasks in (1, 2)]


def measure(images, emulator_, modes, workloads, rounds: int) -> dict[str, tuple[dict, dict]]:
    """Per workload: (timed runs per mode, the protocol-counting run per
    mode) on one QEMU; a mode that needs the recorder only on its QEMU."""
    recorder = emulator_.which == "record"
    modes = [m for m in modes if recorder or not m.needs_recorder]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        socket = Path(tmp) / "recorder.sock" if recorder else None
        with session.booted(images, emulator=emulator_, plugin_socket=socket) as guest, \
                session.attached(guest, images.vmlinux) as gdb:
            gdb.cont()
            for load in workloads:
                timed: dict[str, list[Run]] = {m.name: [] for m in modes}
                for _ in range(rounds):
                    for mode in modes:
                        timed[mode.name].append(run(guest, gdb, mode, load.command(mode)))
                counted = {mode.name: run(guest, gdb, mode, load.command(mode), Path(tmp) / "remote.log")
                           for mode in modes}
                out[load.name] = (timed, counted)
    return out


def median_seconds(runs: list[Run]) -> float:
    return statistics.median(r.seconds for r in runs)


def per_redirection(runs: list[Run]) -> float:
    """Median seconds per redirection (workloads of different sizes compare)."""
    return statistics.median(r.seconds / r.redirections for r in runs if r.redirections)


def row_cells(runs: list[Run], count: Run, base: list[Run] | None) -> str:
    seconds = median_seconds(runs)
    slowdown = ratio(per_redirection(runs), per_redirection(base), ".2f") if base else "-"
    values = (f"{seconds:.2f}s", f"{slowdown}x", ratio(count.stops, count.redirections, ".3f"),
              ratio(count.debug_stops, count.redirections, ".3f"), ratio(count.packets, count.stops, ".1f"),
              f"{statistics.median(r.events / r.seconds for r in runs):.1f}")
    return " ".join(f"{v:>9}" for v in values)


COLUMNS = ("time", "slowdown", "stops/r", "debug/r", "pkts/stop", "events/s")


def print_table(load: Workload, modes, names: list[str], results: dict) -> None:
    """One workload's table: a row per mode, a column group per (kernel, QEMU)."""
    sizes = sorted({c.redirections for name in names for c in results[name][load.name][1].values()})
    print(f"\n{load.name}: klplab-run {load.args}" + (f" ({load.stopping_args} for modes that stop per "
                                                      f"redirection)" if load.stopping_args else "")
          + f" = {' or '.join(map(str, sizes))} redirections")
    group = " ".join(f"{c:>9}" for c in COLUMNS)
    print(f"  {'':<18} " + " | ".join(f"{name:^{len(group)}}" for name in names))
    print(f"  {'':<18} " + " | ".join(group for _ in names) + "  events (violations)")
    for mode in modes:
        cells, violations = [], 0
        for name in names:
            timed, counted = results[name][load.name]
            if mode.name not in timed:
                cells.append(" ".join(f"{'-':>9}" for _ in COLUMNS))
                continue
            cells.append(row_cells(timed[mode.name], counted[mode.name], timed.get("unwatched")))
            violations += sum(r.violations for r in timed[mode.name])
        print(f"  {mode.name:<18} " + " | ".join(cells) + f"  {mode.events or '-'} ({violations})")


def compare_with_script(load: Workload, names: list[str], results: dict) -> None:
    for name in names:
        timed = results[name][load.name][0]
        if "gdb script" not in timed:
            continue
        naive = median_seconds(timed["gdb script"])
        base = median_seconds(timed["unwatched"]) if "unwatched" in timed else None
        for mode_name in (Mode.BREAKPOINT, f"{Mode.BREAKPOINT}+P1", Mode.PARK, f"{Mode.PARK}+P1"):
            if mode_name in timed:
                seconds = median_seconds(timed[mode_name])
                print(f"  [{name}] {mode_name} is {naive / seconds:.2f}x faster than the gdb script "
                      f"(watching cost {ratio(naive - base, seconds - base, '.2f') if base else '-'}x less)")


def write_chart(path: Path, load: Workload, modes, names: list[str], labels: list[str], results: dict) -> None:
    """load's slowdown per mode (time per redirection against unwatched), one
    bar per kernel and QEMU, as an SVG chart."""
    values = {}
    for name, label in zip(names, labels):
        timed = results[name][load.name][0]
        for mode in modes:
            if mode.name in timed and "unwatched" in timed and mode.name != "unwatched":
                values[(mode.name, label)] = per_redirection(timed[mode.name]) / per_redirection(timed["unwatched"])
    rows = [m.name for m in modes if any((m.name, label) in values for label in labels)]
    path.write_text(bar_chart_svg(f"slowdown against unwatched: klplab-run {load.args}", rows, labels, values))
    print(f"chart: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args", default="-t 2 -n 40 -b 1 -w 2000", help="klplab-run arguments")
    parser.add_argument("--hot", type=int, metavar="N", help="also the hot workload, N calls per task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"some of: {', '.join(MODES)}")
    parser.add_argument("--qemus", default=",".join(QEMUS), help=f"some of: {', '.join(QEMUS)}")
    parser.add_argument("--kernels", default=DEFAULT_KERNEL, help=f"some of: {', '.join(KERNELS)}")
    parser.add_argument("--chart", type=Path, metavar="FILE.svg",
                        help="also draw the standard workload's slowdowns as an SVG chart")
    args = parser.parse_args()
    modes = [MODES[name.strip()] for name in args.modes.split(",")]
    emulators = [emulator(name.strip()) for name in args.qemus.split(",")]
    workloads = [Workload("standard", args.args)] + (hot_workloads(args.hot) if args.hot else [])
    # one column per (kernel generation, QEMU)
    setups = [(build.build_all(kernel=k.strip()), e) for k in args.kernels.split(",") for e in emulators]
    names = [f"{images.kernel.name}/{e.which}" for images, e in setups]
    results = {name: measure(images, e, modes, workloads, args.rounds) for name, (images, e) in zip(names, setups)}
    print(f"per kernel and QEMU one guest, workloads and modes in turn, median of {args.rounds} rounds; "
          "slowdown: time per redirection against unwatched")
    for name, (images, e) in zip(names, setups):
        print(f"  [{name}] Linux {images.kernel.name} ({images.kernel.summary}) on {e.describe()}")
    for load in workloads:
        print_table(load, modes, names, results)
        compare_with_script(load, names, results)
    if args.chart:
        labels = [f"Linux {images.kernel.name}, QEMU {dotted(e.version_number)} ({e.which})" for images, e in setups]
        write_chart(args.chart, workloads[0], modes, names, labels, results)


if __name__ == "__main__":
    main()
