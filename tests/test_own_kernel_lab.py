"""A user's own kernel in the lab (gdbklp lab ... --vmlinux): one built as a
user builds it, outside the lab's cache, watched as the lab kernel is; and
what is refused, in one line each."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from gdbklp.lab import build, ownkernel, workload
from gdbklp.lab import config as cfg

GENERATION = cfg.KERNELS["7.3"]
EXAMPLE = REPO / "qemu-images" / "examples" / "my_patch"
LOCALVERSION = "-mine"
RUN = "klplab-run -t 2 -n 10"


def gdbklp_lab(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdbklp", "lab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def patch_sources(where: Path) -> Path:
    """The example patch's sources, with the lab header it includes beside them."""
    shutil.copytree(EXAMPLE, where)
    shutil.copy2(REPO / "qemu-images" / "modules" / "klp_lab.h", where)
    return where


@pytest.fixture(scope="module")
def own_tree(tmp_path_factory) -> Path:
    """The 7.3 lab kernel as a user builds it: its build tree copied out of
    the cache, a release of their own set, make from the source with O=."""
    lab = build.build_all(kernel=GENERATION.name)
    tree = tmp_path_factory.mktemp("own-kernel") / "build"
    shutil.copytree(lab.kernel_build, tree, symlinks=True)
    source = (tree / "source").resolve()
    make = lambda *targets: build.make_cmd(GENERATION, "-C", str(source), f"O={tree}", *targets)
    build.run([str(source / "scripts" / "config"), "--file", str(tree / ".config"),
               "--set-str", "LOCALVERSION", LOCALVERSION], binds=(tree,))
    build.run(make("olddefconfig"), binds=(tree,))
    build.run(make("vmlinux", "modules"), binds=(tree,))
    return tree


def watched_demo(*args) -> tuple[dict, dict[str, workload.KindCounts]]:
    """gdbklp lab demo with the given options and its JSON report: (the
    report, the guest's counts)."""
    report = Path(args[args.index("--report") + 1])
    proc = gdbklp_lab("demo", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return json.loads(report.read_text()), workload.parse_counts(proc.stdout)


@pytest.mark.guest
@pytest.mark.gdb
def test_a_kernel_built_by_the_user_is_watched_as_the_lab_kernel_is(own_tree, tmp_path):
    vmlinux = own_tree / "vmlinux"
    release = ownkernel.read_vmlinux(vmlinux).release
    assert release == (own_tree / "include/config/kernel.release").read_text().strip()
    assert release.startswith(GENERATION.name) and release.endswith(LOCALVERSION)
    proc = gdbklp_lab("build-module", "--kernel-build", own_tree, patch_sources(tmp_path / "own"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    own_ko = tmp_path / "own" / "my_patch.ko"
    proc = gdbklp_lab("build-module", "--kernel", GENERATION.name, patch_sources(tmp_path / "lab"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lab_ko = tmp_path / "lab" / "my_patch.ko"

    own, own_counts = watched_demo("--vmlinux", vmlinux, "--kernel-build", own_tree, "--module", own_ko,
                                   "--run", RUN, "--report", tmp_path / "own.json")
    lab, lab_counts = watched_demo("--kernel", GENERATION.name, "--module", lab_ko,
                                   "--run", RUN, "--report", tmp_path / "lab.json")
    assert own["vmlinux"] == str(vmlinux)
    assert own_counts == lab_counts and own_counts["local"].new == own_counts["global"].new == 20
    for key in ("redirections", "by_call_site", "by_caller", "by_patched", "by_replacement", "violations", "errors"):
        assert own[key] == lab[key], key
    assert own["redirections"] == 40 and own["violations"] == []


@pytest.mark.toolchain
def test_a_module_built_for_another_kernel_is_refused_in_one_line(own_tree, tmp_path):
    proc = gdbklp_lab("build-module", "--kernel", GENERATION.name, patch_sources(tmp_path / "lab"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = gdbklp_lab("demo", "--vmlinux", own_tree / "vmlinux", "--kernel-build", own_tree,
                      "--module", tmp_path / "lab" / "my_patch.ko")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1:] == [
        f"gdbklp: {tmp_path / 'lab' / 'my_patch.ko'} was built for 7.3.4, the kernel {own_tree / 'vmlinux'} is "
        f"7.3.4{LOCALVERSION}: build it with 'gdbklp lab build-module --kernel-build DIR'"]


@pytest.mark.toolchain
@pytest.mark.parametrize("args, complaint", [
    (["boot", "--vmlinux", "/etc/hostname"],
     "cannot boot /etc/hostname in the lab: /etc/hostname is not a 64-bit little-endian ELF file"),
    (["boot", "--vmlinux", "/nonexistent/vmlinux"], "no kernel at /nonexistent/vmlinux"),
    (["boot", "--debug-vmlinux", "/etc/hostname"],
     "--debug-vmlinux and --kernel-build describe your own kernel: give --vmlinux too"),
    (["demo", "--vmlinux", "/etc/hostname", "--kernel", "7.3"],
     "--vmlinux boots your own kernel: --kernel and --trampoline choose lab kernels"),
    (["build-module", "--kernel-build", "/etc", str(EXAMPLE)],
     "/etc is not a built kernel tree (no .config, Module.symvers, include/config/kernel.release: "
     "run make vmlinux modules there first)"),
])
def test_bad_own_kernel_input_is_one_line(args, complaint):
    proc = gdbklp_lab(*args, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"gdbklp: {complaint}"]


@pytest.mark.toolchain
def test_a_demo_on_a_kernel_without_its_modules_says_what_it_needs(own_tree):
    proc = gdbklp_lab("demo", "--vmlinux", own_tree / "vmlinux")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"gdbklp: the demo's workload needs the lab's modules built for {own_tree / 'vmlinux'}: give its build "
        f"tree with --kernel-build DIR, or your own patch with --module and --run"]


@pytest.mark.distribution
def test_a_distribution_kernel_without_live_patching_boots_but_is_not_watched(distribution_kernel):
    vmlinux = distribution_kernel.vmlinux
    found = ownkernel.examine(ownkernel.OwnKernel(vmlinux))
    assert found.release == cfg.DEBIAN_KERNEL.name.removeprefix("debian-") + "-powerpc64le"
    assert ownkernel.watch_gaps(found) == [
        f"{vmlinux} needs CONFIG_LIVEPATCH=y for live patching (no klp_enable_patch in its symbols): "
        "klp-frames works, klp-watch will refuse"]
    assert distribution_kernel.modules is None  # the lab's are not built for it
    proc = gdbklp_lab("demo", "--vmlinux", vmlinux, "--debug-vmlinux", distribution_kernel.symbols, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines() == [f"note: {line}" for line in ownkernel.watch_gaps(found)]
    assert proc.stderr.strip().splitlines()[-1] == f"gdbklp: {vmlinux} cannot be watched (above)"
