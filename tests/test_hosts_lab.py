"""Both hosts, for real: the lab root's toolchain and QEMU, the demo on each
QEMU the lab runs, and a lab that keeps working without the archive."""

import os
import subprocess
import sys

import pytest

from helpers import run_gdb_batch
from gdbklp.lab import LabError, build, config as cfg, qemu, root as labroot
from gdbklp.lab.session import booted
from gdbklp.versions import flushes_at_stops


def test_the_lab_root_has_gcc_14_and_a_qemu_that_does_not_flush(lab):
    versions = labroot.package_versions(labroot.ensure_root())
    assert versions["gcc-powerpc64le-linux-gnu"].startswith("4:14.")
    assert versions["qemu-system-ppc"] == versions["qemu-system-common"]  # all of QEMU from backports
    lab_qemu = qemu.emulator("lab")
    assert lab_qemu.version_number >= (10, 2)  # no tb_flush at a gdbstub stop from 10.2 on
    assert "gcc version 14." in subprocess.run(
        labroot.wrap([cfg.KERNEL.cross_compile + "gcc", "-v"]), capture_output=True, text=True).stderr


@pytest.mark.smoke
@pytest.mark.guest
@pytest.mark.gdb
@pytest.mark.parametrize("which", list(cfg.QEMUS))
def test_the_demo_on_each_qemu(lab, which):
    proc = subprocess.run([sys.executable, "-m", "gdbklp", "lab", "demo", "--tasks", "1", "--calls", "5",
                           "--qemu", which], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    emulator = qemu.emulator(which)
    assert proc.stdout.splitlines()[0] == f"qemu: {emulator.describe()}"
    assert "35 redirections watched" in proc.stdout and "every kind agrees with the guest" in proc.stdout
    # the mode measured fastest on that QEMU (the demo runs gdb in the background)
    mode = "park" if flushes_at_stops(emulator.version_number) else "breakpoint"
    assert f"klp-watch (livepatch-stack, {mode} mode): 35 redirections" in proc.stdout


@pytest.mark.smoke
@pytest.mark.guest
@pytest.mark.gdb
@pytest.mark.parametrize("which", list(cfg.QEMUS))
def test_klp_watch_names_the_faster_mode_on_a_qemu_that_flushes(lab, tmp_path, which):
    emulator = qemu.emulator(which)
    with booted(lab, workdir=tmp_path, emulator=emulator) as guest:
        proc = run_gdb_batch(f"file {lab.vmlinux}", f"target remote 127.0.0.1:{guest.gdb_port}",
                             "klp-watch start", "klp-watch status --json")
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "probing livepatch_handler's return point (P3)" in proc.stdout  # a CLI `continue` cannot park
    advice = (f"klp-watch: QEMU {'.'.join(map(str, emulator.version_number))} flushes its translations at "
              "every breakpoint stop: with the guest run in the background (continue &, gdb/MI), --park is "
              "faster on it")
    assert (advice in proc.stdout) == flushes_at_stops(emulator.version_number), proc.stdout
    assert '"mode": "breakpoint"' in proc.stdout


def test_a_cached_lab_builds_without_the_archive(lab):
    env = {**os.environ, "GDBKLP_MIRROR": "http://127.0.0.1:9/debian"}
    proc = subprocess.run([sys.executable, "-m", "gdbklp", "lab", "build"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"initramfs: {lab.initramfs}" in proc.stdout


@pytest.mark.skipif(labroot.inside_lab_root(), reason="the lab root is / here: no cache of its own to make")
def test_a_package_fetch_without_the_archive_is_one_line(lab, tmp_path, monkeypatch):
    # a cache with the lab root but no package lists, and an archive nobody answers for
    root = labroot.ensure_root()
    monkeypatch.setenv("GDBKLP_CACHE", str(tmp_path))
    (tmp_path / root.name).symlink_to(root)
    monkeypatch.setattr(cfg, "MIRROR", "http://127.0.0.1:9/debian")
    with pytest.raises(LabError) as e:
        build.fetch_package(cfg.DebianPackage("hello", "trixie", "usr/bin/hello"))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("fetching hello from trixie: cannot reach the Debian archive http://127.0.0.1:9/debian")
