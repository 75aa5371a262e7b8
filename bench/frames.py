"""klp-frames cost on the lab, per stop: time per thread, memory packets per frame.

    .venv/bin/python bench/frames.py [--stops N]

Stops the guest N times at the entry of a replacement C (a deep kernel stack
with a trampoline in it) and runs `klp-frames --all` once per stop, as a
user would: every stop starts with empty per-stop caches. Packets are
counted from gdb's remote-protocol log (`set debug remote 1`): every `m`
packet is one memory read sent to QEMU; frame headers are the 104-byte reads.
"""

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.abi.frames import HEADER_AND_MARKER_BYTES  # noqa: E402
from gdbklp.lab import build, session  # noqa: E402

READ_PACKET = re.compile(r"Sending packet: \$m([0-9a-f]+),([0-9a-f]+)#")


def frames_at_stop(gdb) -> tuple[float, dict, list[int]]:
    gdb.console("set debug remote 1")
    start = time.monotonic()
    _, log = gdb.mi('-interpreter-exec console "klp-frames --all --json"', timeout=60)
    elapsed = time.monotonic() - start
    gdb.console("set debug remote 0")
    data = json.loads(log[log.index('{\n "stacks"'):log.rindex("}") + 1])
    return elapsed, data, [int(n, 16) for _, n in READ_PACKET.findall(log)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stops", type=int, default=10)
    args = parser.parse_args()
    images = build.build_all()
    runs = []
    with session.booted(images) as guest, session.attached(guest, images.vmlinux) as gdb:
        gdb.console('break *$klp_addr("klp_lab_c_many_args")')
        for _ in range(args.stops + 1):  # the first stop also reads module symbols
            gdb.cont()
            start = guest.send("echo 'many_args 1 0' > /proc/klp_lab/run")
            gdb.wait_stopped(60)
            runs.append(frames_at_stop(gdb))
            gdb.cont()
            guest.wait_done(start, 60)
            gdb.interrupt()
    first, rest = runs[0], runs[1:]
    threads = len(first[1]["stacks"]) + len(first[1]["notes"])
    frames = [sum(len(s["frames"]) for s in data["stacks"]) for _, data, _ in rest]
    median = statistics.median(t for t, _, _ in rest)
    packets = [len(p) for _, _, p in rest]
    headers = [sum(1 for n in p if n == HEADER_AND_MARKER_BYTES) for _, _, p in rest]
    print(f"klp-frames --all, {threads} vCPUs, {frames[0]} frames, one call per stop")
    print(f"  first stop (module symbols, trampoline layout): {first[0] * 1000:.0f} ms, {len(first[2])} read packets")
    print(f"  later stops (median of {len(rest)}): {median * 1000:.0f} ms = {median * 1000 / threads:.0f} ms "
          f"per thread; {statistics.median(packets):.0f} read packets = "
          f"{statistics.median(packets) / frames[0]:.2f} per frame, of which frame headers "
          f"{statistics.median(headers) / frames[0]:.2f} per frame (one {HEADER_AND_MARKER_BYTES}-byte read each)")


if __name__ == "__main__":
    main()
