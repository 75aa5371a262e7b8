"""The kernels users run: the demo on every lab generation, their static
verdicts, and a live patch of one's own (gdbklp lab build-module, demo
--module). The faults per invariant family on each generation are in
test_watch_lab.py; the out-of-line mutants in test_mutants_lab.py."""

import subprocess
import sys

import pytest

from helpers import REPO, assert_shows_the_readme_example
from gdbklp.lab import config as cfg
from gdbklp.lab.session import attached, booted

pytestmark = [pytest.mark.guest, pytest.mark.gdb]  # each boots the lab and watches it
EXAMPLE = REPO / "qemu-images" / "examples" / "my_patch"


def gdbklp_lab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdbklp", "lab", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.smoke
@pytest.mark.parametrize("kernel", cfg.KERNELS)
@pytest.mark.parametrize("mode", ["", "--record"], ids=["auto", "record"])
def test_the_demo_on_each_generation(kernel, mode):
    proc = gdbklp_lab("demo", "--kernel", kernel, "--tasks", "1", "--calls", "5", *filter(None, [mode]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert ("record mode" in proc.stdout) == bool(mode)
    # every call kind, each seen by gdb as often as the guest counted it
    assert "35 redirections watched" in proc.stdout and "every kind agrees with the guest" in proc.stdout
    assert f"booting the lab (kernel-{kernel}-" in proc.stdout
    if not mode and kernel == cfg.DEFAULT_KERNEL:
        assert_shows_the_readme_example("`./bootstrap demo` boots the lab", proc.stdout)


@pytest.mark.parametrize("lab", [k for k in cfg.KERNELS if k != cfg.DEFAULT_KERNEL], indirect=True)
def test_klp_lint_decodes_each_generations_handoff(lab, tmp_path):
    with booted(lab, workdir=tmp_path) as guest, attached(guest, lab.vmlinux) as gdb:
        lint = gdb.console("klp-lint")
    assert lint.strip().endswith("klp-lint: clean"), lint
    ool = lab.kernel.name == "7.3"
    ra, c = ("r0", "lr") if ool else ("lr", "ctr")
    assert f"livepatch_handler takes it from {ra}" in lint and f"livepatch_handler takes it from {c}" in lint
    assert ("out-of-line ftrace stubs in use, 0 not as ftrace made them" in lint) == ool


def test_your_own_patch_module_on_the_lab(lab):
    built = gdbklp_lab("build-module", "--kernel", "7.3", str(EXAMPLE))
    assert built.returncode == 0, built.stderr[-2000:]
    ko = EXAMPLE / "my_patch.ko"
    assert built.stdout.split() == [str(ko)]
    # built for 7.3: another generation's lab refuses it before booting, in one line
    wrong = gdbklp_lab("demo", "--kernel", "6.12", "--module", str(ko), "--run", "true")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert wrong.stderr.strip().splitlines()[-1].startswith(f"gdbklp: {ko} was built for '7.3.")
    proc = gdbklp_lab("demo", "--kernel", "7.3", "--module", str(ko), "--handoff",
                      "--run", "klplab-run -t 1 -n 4 -k local,global")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "klp-watch (livepatch-stack, breakpoint mode): 8 redirections, 0 violations" in proc.stdout
    assert "local: klp_lab_b_local [klp_lab_target] -> my_local [my_patch]" in proc.stdout
    assert "global: klp_lab_b_global [klp_lab_target] -> my_global [my_patch]" in proc.stdout
    assert "local 4 0 4 0" in proc.stdout  # the guest's count: every local call reached my_local


@pytest.mark.parametrize("lab", ["7.3"], indirect=True)
def test_klp_frames_labels_an_out_of_line_stub(lab, tmp_path):
    # at ftrace_caller's entry (P0) LR is the stub's `mtlr r0`: the frame it makes is named by the stub's function
    with booted(lab, workdir=tmp_path) as guest, attached(guest, lab.vmlinux) as gdb:
        gdb.console("break *ftrace_caller")
        gdb.console("break *ftrace_regs_caller")
        gdb.cont()
        start = guest.send("echo 'local 1 0' > /proc/klp_lab/run")
        gdb.wait_stopped(60)
        frames = gdb.console("klp-frames")
        gdb.console("delete")
        gdb.cont()
        guest.wait_done(start, 60)
    assert "out-of-line ftrace stub of klp_lab_b_local+0x8 [klp_lab_target]" in frames, frames
