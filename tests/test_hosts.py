"""Both hosts: the supported releases, the lab root's making and its
failures, the QEMU choice. Fake mmdebstrap and QEMU binaries stand in where
the failure is the point (a root that fails to build, a QEMU too old)."""

import os
from pathlib import Path

import pytest

from gdbklp.lab import LabError, config as cfg, host, qemu, root as labroot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GDBKLP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# what the host does to make the lab root; inside it (CI's run on the other
# release) there is nothing to make
on_the_host = pytest.mark.skipif(labroot.inside_lab_root(), reason="runs inside the lab root")


def fake_program(directory: Path, name: str, script: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("release, problem", [
    ({"ID": "debian", "VERSION_ID": "12", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"}, None),
    ({"ID": "debian", "VERSION_ID": "13", "PRETTY_NAME": "Debian GNU/Linux 13 (trixie)"}, None),
    ({"ID": "debian", "VERSION_ID": "11", "PRETTY_NAME": "Debian GNU/Linux 11 (bullseye)"},
     "this host is Debian GNU/Linux 11 (bullseye); gdbklp supports Debian 12 (bookworm) and Debian 13 (trixie)"),
    ({"ID": "ubuntu", "VERSION_ID": "24.04", "PRETTY_NAME": "Ubuntu 24.04.1 LTS"},
     "this host is Ubuntu 24.04.1 LTS; gdbklp supports Debian 12 (bookworm) and Debian 13 (trixie)"),
])
def test_unsupported_hosts_get_one_line(release, problem):
    assert host.unsupported_host(release) == problem


def test_os_release_is_parsed(tmp_path):
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_ID="13"\n')
    assert host.os_release(tmp_path / "os-release") == {
        "PRETTY_NAME": "Debian GNU/Linux 13 (trixie)", "ID": "debian", "VERSION_ID": "13"}


def test_every_other_release_root_is_the_other_supported_release():
    assert set(cfg.OTHER_RELEASE_ROOTS) == set(cfg.SUPPORTED_RELEASES.values())
    for codename, spec in cfg.OTHER_RELEASE_ROOTS.items():
        assert spec.suite != codename and spec.suite in cfg.SUPPORTED_RELEASES.values()


@on_the_host
def test_a_root_that_fails_to_build_shows_apt_and_is_discarded(cache, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # what mmdebstrap does when apt cannot install: a half-made root, apt's errors, status 25
    fake_program(bindir, "mmdebstrap", 'shift $(($# - 3)); mkdir -p "$1/usr/bin"; touch "$1/usr/bin/half"\n'
                 'echo "I: installing packages..."\n'
                 'echo "The following packages have unmet dependencies:"\n'
                 'echo " qemu-system-ppc : Depends: qemu-system-common (= 1:11.1.3) but 1:10.0 is to be installed"\n'
                 'echo "E: Unable to correct problems, you have held broken packages." >&2\n'
                 'exit 25\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(LabError) as e:
        labroot.ensure_root()
    message = str(e.value)
    assert message.startswith(f"making the lab root {labroot.root_dir().name} failed:\n")
    assert "E: Unable to correct problems, you have held broken packages." in message
    assert "qemu-system-ppc : Depends: qemu-system-common" in message
    assert list(cache.glob("root-*")) == []  # neither the partial root nor a final one


@on_the_host
def test_a_host_without_the_archive_gets_one_line(cache, tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_program(bindir, "mmdebstrap", 'echo "W: Failed to fetch http://deb.debian.org/debian/dists/trixie/InRelease'
                 '  Temporary failure resolving \'deb.debian.org\'" >&2\necho "E: apt-get update failed" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    with pytest.raises(LabError) as e:
        labroot.ensure_root()
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"making the lab root {labroot.root_dir().name}: cannot reach the Debian archive ")
    assert message.endswith(f"what is already in {cache} still works")


def test_the_root_is_named_after_its_package_list():
    other = cfg.DebianRoot(cfg.LAB_ROOT.suite, cfg.LAB_ROOT.packages + ("strace",), cfg.LAB_ROOT.backports)
    assert labroot.root_dir(other) != labroot.root_dir(cfg.LAB_ROOT)
    assert labroot.root_dir(cfg.LAB_ROOT).name.startswith("root-trixie-")


def test_a_root_program_runs_through_the_roots_loader_and_libraries(tmp_path):
    # a root whose ld.so.conf includes a directory of further files, as Debian's does
    (tmp_path / "etc/ld.so.conf.d").mkdir(parents=True)
    (tmp_path / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (tmp_path / "etc/ld.so.conf.d/arch.conf").write_text("# Multiarch support\n/lib/arch-gnu\n/usr/lib/arch-gnu\n")
    for d in ("lib/arch-gnu", "usr/lib/arch-gnu/qemu", "usr/bin"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "usr/bin/prog").write_bytes(Path("/bin/true").read_bytes())
    argv, env = labroot.host_command(tmp_path, "/usr/bin/prog")
    assert argv[0] == str(tmp_path / labroot.elf_interpreter(Path("/bin/true")).lstrip("/"))
    assert argv[1:] == ["--library-path", f"{tmp_path}/lib/arch-gnu:{tmp_path}/usr/lib/arch-gnu:"
                        f"{tmp_path}/lib:{tmp_path}/usr/lib", str(tmp_path / "usr/bin/prog")]
    assert env == {"QEMU_MODULE_DIR": f"{tmp_path}/usr/lib/arch-gnu/qemu"}


def test_an_elf_interpreter_is_read_from_the_program(tmp_path):
    assert labroot.elf_interpreter(Path("/bin/true")).startswith("/lib")
    (tmp_path / "script").write_text("#!/bin/sh\n")
    with pytest.raises(LabError, match="is not a 64-bit little-endian ELF executable"):
        labroot.elf_interpreter(tmp_path / "script")


def test_a_qemu_too_old_is_refused_in_one_line(tmp_path):
    old = fake_program(tmp_path, "qemu-system-ppc64", 'echo "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)"\n')
    with pytest.raises(LabError) as e:
        qemu.emulator("host", qemu=cfg.QemuConfig(**{**vars(cfg.QEMU), "program": str(old)}))
    assert str(e.value) == f"{old} is QEMU 6.2.0; the lab needs QEMU 7.2 or newer"


def test_an_unknown_qemu_is_refused():
    with pytest.raises(LabError, match="unknown QEMU 'qemu-9' \\(one of lab, host, record\\)"):
        qemu.emulator("qemu-9")
