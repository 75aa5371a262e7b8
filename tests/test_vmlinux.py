"""What a vmlinux says about itself (gdbklp.abi.vmlinux): its ELF kind,
release, embedded config and the requirements of the lab and of a watch."""

import gzip
import struct

import pytest

from gdbklp.abi.elf import ElfError, Symbol, SymbolTable
from gdbklp.abi.vmlinux import (BOOT_REQUIREMENTS, IKCONFIG_END, IKCONFIG_START, WATCH_REQUIREMENTS, check_elfv2,
                                module_release, parse_config, read_embedded_config, read_vmlinux)

REQUIREMENTS = BOOT_REQUIREMENTS + WATCH_REQUIREMENTS
# lines of the 6.1 lab kernel's .config (the form make writes)
LAB_CONFIG_LINES = """\
CONFIG_CC_VERSION_TEXT="powerpc64le-linux-gnu-gcc (Debian 14.2.0-19) 14.2.0"
CONFIG_PPC_PSERIES=y
CONFIG_HVC_CONSOLE=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_LIVEPATCH=y
CONFIG_DYNAMIC_FTRACE_WITH_REGS=y
# CONFIG_IKCONFIG is not set
CONFIG_NR_CPUS=32
"""


def elf_header(ei_class=2, ei_data=1, e_flags=2) -> bytes:
    """An ELF64 header (its fields at their offsets in the ELF specification)."""
    ident = b"\x7fELF" + bytes((ei_class, ei_data, 1)) + bytes(9)
    return ident + struct.pack("<HHIQQQIHHHHHH", 2, 21, 1, 0, 64, 0, e_flags, 64, 56, 0, 64, 0, 0)


@pytest.mark.parametrize("header, complaint", [
    (elf_header(), None),
    (elf_header(e_flags=1), "not an ELFv2 kernel (e_flags 0x1"),
    (elf_header(ei_data=2), "not a 64-bit little-endian ELF file"),
    (elf_header(ei_class=1), "not a 64-bit little-endian ELF file"),
    (b"070701" + bytes(100), "not a 64-bit little-endian ELF file"),
])
def test_only_a_64_bit_little_endian_elfv2_file_passes(tmp_path, header, complaint):
    path = tmp_path / "vmlinux"
    path.write_bytes(header)
    if complaint is None:
        check_elfv2(path)
    else:
        with pytest.raises(ElfError, match=complaint.replace("(", r"\(")):
            check_elfv2(path)


def test_a_config_is_read_as_make_writes_it():
    config = parse_config(LAB_CONFIG_LINES)
    assert config["CONFIG_CC_VERSION_TEXT"] == "powerpc64le-linux-gnu-gcc (Debian 14.2.0-19) 14.2.0"
    assert config["CONFIG_LIVEPATCH"] == "y" and config["CONFIG_NR_CPUS"] == "32"
    assert "CONFIG_IKCONFIG" not in config


def test_the_embedded_config_is_found_between_its_markers(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\0" * 4096 + IKCONFIG_START + gzip.compress(LAB_CONFIG_LINES.encode()) + IKCONFIG_END + b"\0")
    assert read_embedded_config(path) == parse_config(LAB_CONFIG_LINES)
    path.write_bytes(b"\0" * 4096 + IKCONFIG_START + b"not gzip" + IKCONFIG_END)
    assert read_embedded_config(path) is None
    path.write_bytes(b"\0" * 4096)
    assert read_embedded_config(path) is None


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=lambda r: r.options[0])
def test_each_missing_requirement_is_one_line_naming_its_option(requirement):
    full = parse_config(LAB_CONFIG_LINES)
    without = {k: v for k, v in full.items() if k not in requirement.options}
    symbols = SymbolTable([Symbol(name, 0xc000000000001000 + 16 * i, 16)
                           for r in REQUIREMENTS for i, name in enumerate(r.symbols)])
    no_symbols = SymbolTable([])
    assert requirement.met(full, no_symbols)  # the config decides where there is one
    assert not requirement.met(without, symbols)
    assert requirement.met(None, symbols) and not requirement.met(None, no_symbols)
    by_config, by_symbols = requirement.missing_line(without), requirement.missing_line(None)
    for line in (by_config, by_symbols):
        assert "\n" not in line and all(option in line for option in requirement.options)
    assert "embedded config" in by_config
    assert all(name in by_symbols for name in requirement.symbols)


def test_a_module_names_its_release_first_in_its_vermagic():
    assert module_release("7.3.4-mine SMP mod_unload modversions ") == "7.3.4-mine"


@pytest.mark.toolchain
@pytest.mark.parametrize("generation", ["6.1", "7.3"])
def test_a_lab_kernel_meets_every_requirement(generation):
    from gdbklp.lab import build
    images = build.build_all(kernel=generation)
    found = read_vmlinux(images.vmlinux)
    release = (images.kernel_build / "include/config/kernel.release").read_text().strip()
    assert found.release == release and found.release.startswith(generation)
    assert found.config is None  # the lab kernels do not embed theirs: the symbols decide
    assert found.missing(REQUIREMENTS) == []
