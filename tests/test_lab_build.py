"""The lab builder: cache verification, config fragments, cpio, host checks."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

from gdbklp.lab import LabError, build, host
from gdbklp.lab import config as cfg
from gdbklp.lab import root as labroot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GDBKLP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cached_step_reuses_verified_output(cache):
    calls = []

    def make(out):
        calls.append(out)
        (out / "result").write_text("built")

    first = build.cached_step("demo", {"x": 1}, ("result",), make)
    second = build.cached_step("demo", {"x": 1}, ("result",), make)
    assert first.rebuilt and not second.rebuilt
    assert len(calls) == 1
    assert build.cached_step("demo", {"x": 2}, ("result",), make).rebuilt  # new inputs, new key


def test_corrupt_cache_entry_is_rebuilt(cache):
    def make(out):
        (out / "result").write_text("built")

    step = build.cached_step("demo", {"x": 1}, ("result",), make)
    (step / "result").write_text("tampered")
    again = build.cached_step("demo", {"x": 1}, ("result",), make)
    assert again.rebuilt
    assert (again / "result").read_text() == "built"


def test_interrupted_build_is_not_trusted(cache):
    def fail(out):
        (out / "result").write_text("half")
        raise LabError("compiler crashed")

    with pytest.raises(LabError):
        build.cached_step("demo", {"x": 1}, ("result",), fail)
    step = build.cached_step("demo", {"x": 1}, ("result",), lambda out: (out / "result").write_text("ok"))
    assert step.rebuilt and (step / "result").read_text() == "ok"


def test_fragment_applied_and_verified(tmp_path):
    fragment = tmp_path / "frag"
    fragment.write_text("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=4\n")
    config = tmp_path / ".config"
    config.write_text("CONFIG_A=m\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\n")
    values = build.read_fragment(fragment)
    assert values == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": "4"}
    build.apply_fragment(config, values)
    assert build.read_fragment(config) == {"CONFIG_D": "y", **values}
    assert build.unmet_fragment_lines(config, values) == []
    config.write_text("CONFIG_A=y\nCONFIG_C=8\n")  # what Kconfig might leave after olddefconfig
    assert build.unmet_fragment_lines(config, values) == ["CONFIG_C=4 (got 8)"]


# what each generation's fragments must give: how ftrace enters a function
ENTRY_OPTIONS = {
    "6.1": ("CONFIG_MPROFILE_KERNEL", "CONFIG_GDBKLP_RFC_TRAMPOLINES"),
    "6.12": ("CONFIG_ARCH_USING_PATCHABLE_FUNCTION_ENTRY", "CONFIG_GDBKLP_RFC_TRAMPOLINES"),
    "7.3": ("CONFIG_ARCH_USING_PATCHABLE_FUNCTION_ENTRY", "CONFIG_PPC_FTRACE_OUT_OF_LINE",
            "CONFIG_DYNAMIC_FTRACE_WITH_CALL_OPS"),
}


@pytest.mark.parametrize("name", cfg.KERNELS)
def test_lab_fragments_have_live_patching(name):
    values = build.read_fragments(cfg.KERNELS[name])
    for option in ("CONFIG_LIVEPATCH", "CONFIG_LIVEPATCH_64", "CONFIG_DYNAMIC_FTRACE_WITH_REGS",
                   *ENTRY_OPTIONS[name]):
        assert values.get(option) == "y", option
    assert values.get("CONFIG_SAMPLE_LIVEPATCH") == "m"  # livepatch-sample.ko goes into the initramfs
    # -mprofile-kernel only where asked for: the newer generations use the patchable entry
    assert (values.get("CONFIG_MPROFILE_KERNEL") == "y") == (name == "6.1")


def test_later_fragment_lines_win(tmp_path):
    (tmp_path / "a.config").write_text("CONFIG_A=y\nCONFIG_B=y\n")
    (tmp_path / "b.config").write_text("# CONFIG_A is not set\nCONFIG_C=m\n")
    kernel = dataclasses.replace(cfg.KERNEL, fragments=(tmp_path / "a.config", tmp_path / "b.config"))
    assert build.read_fragments(kernel) == {"CONFIG_A": "n", "CONFIG_B": "y", "CONFIG_C": "m"}


@pytest.mark.toolchain  # the lab root's cpio
def test_cpio_is_deterministic_and_readable(tmp_path):
    def archive():
        w = build.CpioWriter()
        w.directory("bin")
        w.file("bin/prog", b"\x7fELF" + bytes(100), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", b"#!/bin/sh\n", 0o755)
        return w.gzipped()

    data = archive()
    assert data == archive()
    (tmp_path / "a.cpio.gz").write_bytes(data)
    # the lab root's cpio (the host need not have one)
    listing = subprocess.run(labroot.wrap(["sh", "-c", "zcat a.cpio.gz | cpio -t --quiet"], tmp_path,
                                          binds=(tmp_path,)),
                             capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["bin", "bin/prog", "bin/sh", "init"]


def test_missing_host_tool_names_the_package():
    reqs = (cfg.HostRequirement("gdbklp-no-such-tool", "gdbklp-pkg"),
            cfg.HostRequirement("/no/such/file.a", "other-pkg"),
            cfg.HostRequirement("sh", "dash"))
    with pytest.raises(LabError) as e:
        host.check_host(reqs)
    assert str(e.value) == ("missing gdbklp-no-such-tool, /no/such/file.a: "
                            "install with 'apt-get install gdbklp-pkg other-pkg'")


@pytest.mark.skipif(labroot.inside_lab_root(), reason="the host's requirements: none inside the lab root")
def test_cli_reports_missing_qemu_in_one_line(tmp_path):
    # a PATH with everything but QEMU
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for req in cfg.HOST_REQUIREMENTS:
        if not req.path.startswith("/") and req.path != "qemu-system-ppc64":
            os.symlink(shutil.which(req.path), bindir / req.path)
    proc = subprocess.run([sys.executable, "-m", "gdbklp", "lab", "build"], capture_output=True,
                          text=True, env={**os.environ, "PATH": str(bindir)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "gdbklp: missing qemu-system-ppc64: install with 'apt-get install qemu-system-ppc'"]


def test_no_change_rebuild_reuses_everything(lab):
    kernel = build.build_kernel()
    modules = build.build_modules(kernel)
    initramfs = build.build_initramfs(modules)
    assert not (kernel.rebuilt or modules.rebuilt or initramfs.rebuilt)
    assert initramfs / "initramfs.cpio.gz" == lab.initramfs
