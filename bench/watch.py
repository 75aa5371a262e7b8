"""klp-watch against a naive gdb script and the unwatched guest.

    .venv/bin/python bench/watch.py [--args "KLPLAB-RUN ARGS"]

The same workload (klplab-run in the guest's run mode: it starts right after
boot and the guest powers off when it is done) three times, on fresh guests:
unwatched; under gdb-multiarch -batch with bench/naive-watch.gdb
(breakpoints with `commands` at the trampoline's entry and at C's return,
the same checks as a plain script); under gdb-multiarch -batch with
gdbinit.d/watch-batch.gdb (klp-watch, one stop per redirection).

The workload's time is measured on the host, from the console line the
guest prints before it starts to the one it prints when done (the guest's
own clock stops while gdb holds it). Stops and memory-read packets come from
a second, small run of each watched mode with `set debug remote 1`.
"""

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.lab import build, workload  # noqa: E402
from gdbklp.lab.config import REPO_ROOT  # noqa: E402
from gdbklp.lab.qemu import Guest, kernel_cmdline  # noqa: E402

LOADER = REPO_ROOT / "gdbinit.d" / "gdbklp.py"
SCRIPTS = {
    "naive gdb script": ["-x", str(REPO_ROOT / "bench" / "naive-watch.gdb"), "-ex", "continue",
                         "-ex", "naive_summary"],
    "klp-watch": ["-x", str(REPO_ROOT / "gdbinit.d" / "watch-batch.gdb")],
}
STOP = re.compile(r"Packet received: T[0-9a-f]{2}")  # a stop reply: a breakpoint hit or a step over it
STEP = re.compile(r"Sending packet: \$vCont;s")  # gdb steps over the breakpoint once per hit
READ = re.compile(r"Sending packet: \$m[0-9a-f]+,[0-9a-f]+#")


def run(images, run_args: str, script: list[str] | None, debug: bool = False):
    """(workload seconds, guest counts, gdb's output) for one fresh guest."""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "gdb.log"
        guest = Guest(images.vmlinux, images.initramfs, stopped=script is not None, workdir=Path(tmp),
                      append=kernel_cmdline(mode="run", run_args=run_args))
        with guest.start(), contextlib.ExitStack() as stack:
            gdb = None
            if script is not None:
                # gdb writes to a file, not a pipe: a pipe nobody reads until
                # the end fills up and blocks gdb (and so the guest) mid-run
                log = stack.enter_context(open(log_path, "w"))
                gdb = subprocess.Popen(
                    ["gdb-multiarch", "-nx", "-batch", "-x", str(LOADER), "-ex", f"file {images.vmlinux}",
                     *(["-ex", "set debug remote 1"] if debug else []),
                     "-ex", f"target remote 127.0.0.1:{guest.gdb_port}", *script],
                    stdout=log, stderr=subprocess.STDOUT, text=True,
                    env={"KLP_REPORT_DIR": tmp, "PATH": "/usr/bin:/bin"})
            guest.wait_ready(300)
            start = time.monotonic()
            guest.wait_for(r"klplab-run: (done|FAILED)", 7200)
            elapsed = time.monotonic() - start
            counts = workload.parse_counts(guest.console)
            if gdb:
                gdb.wait(timeout=300)
            output = log_path.read_text() if gdb else ""
    return elapsed, counts, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--args", default="-t 2 -n 40", help="klplab-run arguments")
    parser.add_argument("--small", default="-t 1 -n 2", help="klplab-run arguments for the packet count")
    args = parser.parse_args()
    images = build.build_all()
    base, counts, _ = run(images, args.args, None)
    redirections = sum(c.new for c in counts.values())
    print(f"workload: klplab-run {args.args} = {redirections} redirections, unwatched {base:.2f} s")
    print(f"  {'':<18} {'time':>8} {'slowdown':>9} {'per redirection':>16} {'hits/redir.':>12} "
          f"{'stops/redir.':>13} {'reads/hit':>10}")
    times = {}
    for name, script in SCRIPTS.items():
        elapsed, counts, _ = run(images, args.args, script)
        assert sum(c.new for c in counts.values()) == redirections
        _, small_counts, log = run(images, args.small, script, debug=True)
        small = sum(c.new for c in small_counts.values())
        stops, hits, reads = len(STOP.findall(log)), len(STEP.findall(log)), len(READ.findall(log))
        times[name] = elapsed
        print(f"  {name:<18} {elapsed:>7.2f}s {elapsed / base:>8.0f}x {elapsed / redirections * 1000:>13.1f} ms "
              f"{hits / small:>12.2f} {stops / small:>13.2f} {reads / max(hits, 1):>10.1f}")
    print(f"  klp-watch is {times['naive gdb script'] / times['klp-watch']:.2f}x faster than the naive script")


if __name__ == "__main__":
    main()
