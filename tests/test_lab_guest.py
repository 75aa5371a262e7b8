"""The lab guest, for real: QEMU boots it, the modules patch every call kind,
gdb-multiarch sees each redirection exactly once, and no QEMU outlives us."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import assert_counts_agree
from gdbklp.lab import LabError, qemu, workload
from gdbklp.lab.qemu import Guest, kernel_cmdline
from gdbklp.lab.session import booted, watch_workload

pytestmark = pytest.mark.guest  # each boots QEMU (gdb: from the fixture)


def test_guest_loads_modules_and_enables_the_patch(guest):
    modules = guest.check("lsmod")
    for name in ("klp_lab_target", "klp_lab_caller", "klp_lab_patch"):
        assert name in modules
    assert guest.check("cat /sys/kernel/livepatch/klp_lab_patch/enabled").strip() == "1"


def test_every_kind_returns_the_patched_result(guest):
    counts = workload.parse_counts(guest.check("klplab-run -r -t 2 -n 30"))
    assert set(counts) == set(workload.KINDS)
    for kind, c in counts.items():
        assert (c.calls, c.old, c.new, c.bad) == (60, 0, 60, 0), kind


def test_unpatched_then_patched(lab, tmp_path):
    with booted(lab, patch=False, workdir=tmp_path) as g:
        counts = workload.parse_counts(g.check("klplab-run -r -t 1 -n 10"))
        assert {k: (c.old, c.new, c.bad) for k, c in counts.items()} == dict.fromkeys(workload.KINDS, (10, 0, 0))
        g.check("insmod /lib/modules/klp_lab_patch.ko && klplab_settle")
        counts = workload.parse_counts(g.check("klplab-run -r -t 1 -n 10 -f sleep,yield"))
        assert {k: (c.old, c.new, c.bad) for k, c in counts.items()} == dict.fromkeys(workload.KINDS, (0, 10, 0))


@pytest.mark.smoke
def test_gdb_sees_each_redirection_once_per_kind(guest, gdb):
    report, counts = watch_workload(guest, gdb, "-t 2 -n 15 -f yield")
    rows = assert_counts_agree(report, counts)
    assert [(r.kind, r.guest_new) for r in rows] == [(kind, 30) for kind in workload.KINDS]
    assert report.redirections == 30 * len(workload.KINDS)
    assert not report.errors and not report.violations
    # each event's call-site class, B and C match the kind's caller A
    for event in report.events:
        kind = event.caller.split("+")[0].removeprefix("klp_lab_a_")
        assert event.call_site == workload.CALLER_CALL_SITE[kind], event
        if kind != "indirect":  # a function pointer does not tell B at the return
            assert event.patched == f"klp_lab_b_{kind} [klp_lab_target]", event
            assert event.replacement == f"{workload.replacement_of(kind)} [klp_lab_patch]", event
        assert event.comm == "klplab-run" and event.depth == 1
    # two workload tasks, each seen with all its redirections
    assert sorted(t.redirections for t in report.tasks.values()) == [105, 105]


def test_gdb_counts_agree_while_the_patch_is_cycled(guest, gdb):
    report, counts = watch_workload(guest, gdb, "-t 2 -n 20 -b 5 -p 2 -k local,global,indirect")
    assert_counts_agree(report, counts, ("local", "global", "indirect"))
    assert {k: c.calls for k, c in counts.items() if c.calls} == {"local": 40, "global": 40, "indirect": 40}
    assert sum(c.old for c in counts.values()) > 0  # the patch really was off for a while
    assert guest.check("cat /sys/kernel/livepatch/klp_lab_patch/enabled").strip() == "1"


def test_early_qemu_exit_shows_the_serial_log(lab, tmp_path):
    bogus = tmp_path / "initramfs.cpio.gz"
    bogus.write_bytes(b"this is no initramfs")
    g = Guest(lab.vmlinux, bogus, append=kernel_cmdline(extra=("panic=1",)), workdir=tmp_path)
    with g:
        with pytest.raises(LabError) as e:
            g.wait_ready(120)
    message = str(e.value)
    assert message.startswith("QEMU exited while waiting for")
    assert "last lines of the serial log" in message
    assert "Kernel panic" in message


def test_busy_gdbstub_port_is_replaced(lab, tmp_path, monkeypatch):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    ports = iter([busy])
    real = qemu.free_port
    monkeypatch.setattr(qemu, "free_port", lambda: next(ports, None) or real())
    try:
        with Guest(lab.vmlinux, lab.initramfs, append=kernel_cmdline(), workdir=tmp_path) as g:
            assert g.gdb_port not in (None, busy)
            assert qemu.is_listening(g.gdb_port)
    finally:
        holder.close()


def qemu_children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "-P", str(pid), "qemu-system-ppc64"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # a zombie child of init still answers kill(0): check its state
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_qemu_survives_its_owner(lab, tmp_path, how):
    # SIGINT as a terminal's Ctrl-C delivers it: a background job of a
    # non-interactive shell (CI started with `&`) inherits it ignored
    script = textwrap.dedent(f"""
        import signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from gdbklp.lab.qemu import Guest, kernel_cmdline
        g = Guest({str(lab.vmlinux)!r}, {str(lab.initramfs)!r}, append=kernel_cmdline(),
                  workdir={str(tmp_path)!r}).start()
        print(g.proc.pid, flush=True)
        time.sleep(600)
    """)
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    qemu_pid = int(owner.stdout.readline())
    assert not process_gone(qemu_pid, timeout=0.5)
    owner.send_signal(how)
    try:
        assert process_gone(qemu_pid), f"QEMU {qemu_pid} survived {how.name} of its owner"
        owner.wait(timeout=30)  # and the owner ends (Ctrl-C on `gdbklp lab boot`)
    finally:
        owner.kill()


def test_context_manager_leaves_no_qemu(lab, tmp_path):
    with Guest(lab.vmlinux, lab.initramfs, append=kernel_cmdline(), workdir=tmp_path) as g:
        pid = g.proc.pid
    assert process_gone(pid)
