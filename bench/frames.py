"""klp-frames cost on the lab: time per call and per thread, memory packets per frame.

    .venv/bin/python bench/frames.py [--repeat N]

Stops the guest at the entry of a replacement C (a deep kernel stack with a
trampoline in it) and runs `klp-frames --all` repeatedly. Packets are counted
from gdb's remote-protocol log (`set debug remote 1`): every `m` packet is
one memory read sent to QEMU.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.lab import build, session  # noqa: E402

READ_PACKET = re.compile(r"Sending packet: \$m[0-9a-f]+,[0-9a-f]+#")


def timed_frames(gdb) -> tuple[float, dict, int]:
    gdb.console("set debug remote 1")
    start = time.monotonic()
    _, log = gdb.mi('-interpreter-exec console "klp-frames --all --json"', timeout=60)
    elapsed = time.monotonic() - start
    gdb.console("set debug remote 0")
    json_text = log[log.index("{"):log.rindex("}") + 1]
    return elapsed, json.loads(json_text), len(READ_PACKET.findall(log))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    images = build.build_all()
    with session.booted(images) as guest, session.attached(guest, images.vmlinux) as gdb:
        gdb.console('break *$klp_addr("klp_lab_c_many_args")')
        gdb.cont()
        start = guest.send("echo 'many_args 1 0' > /proc/klp_lab/run")
        gdb.wait_stopped(60)
        gdb.console("maint flush dcache")
        cold, data, cold_packets = timed_frames(gdb)
        warm = []
        for _ in range(args.repeat):
            gdb.console("maint flush dcache")
            elapsed, data, packets = timed_frames(gdb)
            warm.append((elapsed, packets))
        threads = len(data["stacks"]) + len(data["notes"])
        frames = sum(len(s["frames"]) for s in data["stacks"])
        best = min(t for t, _ in warm)
        packets = warm[-1][1]
        print(f"klp-frames --all: {threads} threads, {frames} frames")
        print(f"  first call (module symbols, layout): {cold * 1000:.1f} ms, {cold_packets} read packets")
        print(f"  repeated (best of {args.repeat}): {best * 1000:.1f} ms = {best * 1000 / threads:.1f} ms "
              f"per thread; {packets} read packets = {packets / frames:.2f} per frame")
        gdb.console("delete")
        gdb.cont()
        guest.wait_done(start, 60)


if __name__ == "__main__":
    main()
