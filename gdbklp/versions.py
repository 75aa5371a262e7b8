"""Which gdb and QEMU versions gdbklp supports, and what it knows about them
(pure Python: the gdb loader, ./bootstrap, the lab and klp-watch ask here)."""

MIN_GDB = (13, 1)    # the oldest gdb-multiarch gdbklp is tested with (Debian 12's)
MIN_QEMU = (7, 2)    # the oldest qemu-system-ppc64 the lab runs on (Debian 12's)
# QEMU's gdbstub flushed its whole translation cache at every breakpoint or
# step stop until 10.2 (upstream dropped the tb_flush in gdb_vm_state_change).
QEMU_WITHOUT_STOP_FLUSH = (10, 2)


def dotted(version: tuple[int, ...]) -> str:
    """(13, 1) as "13.1"."""
    return ".".join(map(str, version))


def flushes_at_stops(qemu_version: tuple[int, ...] | None) -> bool:
    """Whether a breakpoint stop makes this QEMU re-translate the guest's
    working set (unknown versions are taken not to: no advice is better
    than wrong advice)."""
    return qemu_version is not None and qemu_version < QEMU_WITHOUT_STOP_FLUSH
