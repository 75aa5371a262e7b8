"""Lab numbers for the README: build, cache check, boot, workload throughput.

    .venv/bin/python bench/lab.py [--cold] [--calls N]

--cold builds everything in an empty cache (GDBKLP_CACHE in a temp dir; the
kernel source is extracted again too). The unwatched and watched workloads
run side by side on one guest so their ratio is what matters.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.lab import build, session, workload  # noqa: E402


def timed(fn):
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


def run_workload(guest, args: str) -> tuple[int, float]:
    output, seconds = timed(lambda: guest.check(f"klplab-run -r {args}", timeout=3600))
    counts = workload.parse_counts(output)
    return sum(c.new for c in counts.values()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cold", action="store_true", help="also time a build from an empty cache")
    parser.add_argument("--calls", type=int, default=2000, help="unwatched calls per kind per task")
    parser.add_argument("--watched-calls", type=int, default=15)
    args = parser.parse_args()

    if args.cold:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["GDBKLP_CACHE"] = cache
            _, cold = timed(build.build_all)
            del os.environ["GDBKLP_CACHE"]
        print(f"cold build (kernel + modules + initramfs): {cold:.0f} s")
    images = build.build_all()
    _, check = timed(build.build_all)
    print(f"cached rebuild check: {check:.2f} s")

    boot_start = time.monotonic()
    with session.booted(images) as guest:
        print(f"boot to ready: {time.monotonic() - boot_start:.1f} s")
        n, seconds = run_workload(guest, f"-t 2 -n {args.calls}")
        unwatched = n / seconds
        print(f"unwatched: {n} redirections in {seconds:.2f} s = {unwatched:.0f}/s")
        with session.attached(guest, images.vmlinux) as gdb:
            wl = f"-t 2 -n {args.watched_calls}"
            (report, counts), seconds = timed(lambda: session.watch_workload(guest, gdb, wl))
            watched = report.redirections / seconds
            print(f"klp-watch (all checks, one stop each): {report.redirections} redirections in {seconds:.2f} s = "
                  f"{watched:.1f}/s, {1000 / watched:.1f} ms per redirection; "
                  f"slowdown {unwatched / watched:.0f}x")


if __name__ == "__main__":
    main()
