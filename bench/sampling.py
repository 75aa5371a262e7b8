"""klp-watch's sampling mode against the unwatched guest, side by side on one guest.

    .venv/bin/python bench/sampling.py [--args "KLPLAB-RUN ARGS"] [--rounds N]

The workload runs in a serve-mode guest with gdb attached over MI (sampling
needs background execution): unwatched, then under `klp-watch start --sample
HZ` for each rate, in alternation for --rounds rounds; the median of each is
reported. The time is measured on the host around the guest command.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.lab import build, session  # noqa: E402
from gdbklp.report import WatchReport  # noqa: E402


def timed_run(guest, command: str) -> float:
    start = time.monotonic()
    guest.check(command, timeout=3600)
    return time.monotonic() - start


def sampled(guest, gdb, command: str, hz: float) -> tuple[float, WatchReport]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        gdb.interrupt()
        gdb.console(f"klp-watch start --quiet --sample {hz} --report {path}")
        gdb.cont()
        seconds = timed_run(guest, command)
        gdb.console("klp-watch stop")  # ends the pauses; the guest keeps running
        return seconds, WatchReport.read_json(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--args", default="-t 2 -n 100000", help="klplab-run arguments")
    parser.add_argument("--rates", default="10,100", help="sampling rates (Hz)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    command = f"klplab-run -r {args.args} > /dev/null"
    rates = [float(r) for r in args.rates.split(",")]
    images = build.build_all()
    times: dict[str, list[float]] = {"unwatched": [], **{f"{r:g} Hz": [] for r in rates}}
    reports: dict[str, WatchReport] = {}
    with session.booted(images) as guest, session.attached(guest, images.vmlinux) as gdb:
        gdb.cont()
        for _ in range(args.rounds):
            times["unwatched"].append(timed_run(guest, command))
            for rate in rates:
                seconds, reports[f"{rate:g} Hz"] = sampled(guest, gdb, command, rate)
                times[f"{rate:g} Hz"].append(seconds)
    base = statistics.median(times["unwatched"])
    print(f"workload: klplab-run {args.args}; median of {args.rounds} rounds, one guest, side by side")
    print(f"  {'':<10} {'time':>8} {'slowdown':>9} {'samples':>8} {'held per pause':>15} {'tasks checked':>14}")
    print(f"  {'unwatched':<10} {base:>7.2f}s {1:>8.2f}x")
    for name, values in times.items():
        if name == "unwatched":
            continue
        r = reports[name]
        print(f"  {name:<10} {statistics.median(values):>7.2f}s {statistics.median(values) / base:>8.2f}x "
              f"{r.samples:>8} {r.sample_pause_ms:>12.1f} ms {sum(r.sampled_tasks.values()):>14}")


if __name__ == "__main__":
    main()
