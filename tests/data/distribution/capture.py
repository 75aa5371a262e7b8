"""Capture the distribution kernel's stack images for tests/test_frames_distribution.py
(run: .venv/bin/python tests/data/distribution/capture.py [DIRECTORY], default: this one).

Boots Debian's own ppc64el kernel (gdbklp.lab.config.DEBIAN_KERNEL, no live
patching) in the lab's QEMU with the lab's initramfs, attaches gdb with its
debug vmlinux and writes, with tests/capture_gdb.py's klp-capture:

- user-entry.json: a `sleep` asleep in its system call from user space;
- ftrace-entry.json: a vCPU stopped at ftrace_caller's first instruction,
  function tracing on for vfs_read only (B = vfs_read, A = ksys_read);
- ftrace-inside.json: the same at ftrace_call (the trampoline's frame built).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from gdbklp.lab import build, session  # noqa: E402
from gdbklp.lab import config as cfg  # noqa: E402
from gdbklp.lab.qemu import Guest, kernel_cmdline  # noqa: E402

HERE = Path(__file__).resolve().parent
CAPTURE_GDB = HERE.parents[1] / "capture_gdb.py"
TRACING = "/sys/kernel/tracing"


def stop_at(gdb, guest, location: str, out: Path) -> None:
    gdb.interrupt()
    gdb.console(f"break *{location}")
    gdb.cont()
    guest.send("cat /proc/cmdline > /dev/null")  # its read, and the shell's, call vfs_read
    gdb.wait_stopped(60)
    print(gdb.console(f"klp-capture {out}"))
    gdb.console("delete")
    gdb.cont()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    images = build.build_all()
    image, debug = build.fetch_member(cfg.DEBIAN_KERNEL.image), build.fetch_member(cfg.DEBIAN_KERNEL.debug)
    with Guest(image, images.initramfs, append=kernel_cmdline(patch=False)) as guest:
        guest.wait_ready(120)
        sleeper = guest.check("sleep 1000 > /dev/null 2>&1 & echo $!").strip()
        guest.check(f"mount -t tracefs nodev {TRACING} 2>/dev/null; echo vfs_read > {TRACING}/set_ftrace_filter")
        with session.attached(guest, debug) as gdb:
            gdb.console(f"source {CAPTURE_GDB}")
            print(gdb.console(f"klp-capture {out / 'user-entry.json'} --task {sleeper}"))
            gdb.cont()
            guest.check(f"echo function > {TRACING}/current_tracer")
            stop_at(gdb, guest, "ftrace_caller", out / "ftrace-entry.json")
            stop_at(gdb, guest, "ftrace_call", out / "ftrace-inside.json")
            guest.check(f"echo nop > {TRACING}/current_tracer")


if __name__ == "__main__":
    main()
