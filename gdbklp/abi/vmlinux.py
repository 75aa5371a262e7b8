"""What a vmlinux file says about itself: its release, its embedded
configuration and whether it has what booting in the lab and watching
live patches need (pure Python, no gdb).

A kernel is asked, never assumed: the configuration embedded with
CONFIG_IKCONFIG where there is one, otherwise the symbols each option
brings into the kernel (a distribution kernel ships its config beside the
vmlinux, not in it).
"""

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from gdbklp.abi.elf import ElfError, SymbolTable, read_elf_symbols, read_loaded_bytes

EF_PPC64_ABI = 0x3  # e_flags bits: 1 = ELFv1 (function descriptors), 2 = ELFv2
ELFV2 = 2
IKCONFIG_START = b"IKCFG_ST"  # kernel/configs.c wraps the gzipped .config in these
IKCONFIG_END = b"IKCFG_ED"
BANNER_PREFIX = b"Linux version "


@dataclass(frozen=True)
class Requirement:
    """A kernel option the lab or a watch needs; symbols: any one of them in
    the symbol table shows the option is built in (=y)."""

    options: tuple[str, ...]  # any one of these CONFIG_ names will do
    needed_for: str
    symbols: tuple[str, ...]

    def met(self, config: dict[str, str] | None, symbols: SymbolTable) -> bool:
        if config is not None:
            return any(config.get(option) == "y" for option in self.options)
        return any(symbols.get(name) is not None for name in self.symbols)

    def missing_line(self, config: dict[str, str] | None) -> str:
        """One line naming the option and how its absence was seen."""
        options = " or ".join(self.options)
        seen = "its embedded config" if config is not None else f"no {' or '.join(self.symbols)} in its symbols"
        return f"needs {options}=y for {self.needed_for} ({seen})"


BOOT_REQUIREMENTS = (
    Requirement(("CONFIG_PPC_PSERIES",), "the pseries machine the lab's QEMU emulates", ("pSeries_probe",)),
    Requirement(("CONFIG_HVC_CONSOLE",), "the hvc console the lab talks to", ("hvc_vio_init",)),
    Requirement(("CONFIG_BLK_DEV_INITRD",), "the lab's initramfs", ("initrd_start",)),
)
WATCH_REQUIREMENTS = (
    Requirement(("CONFIG_LIVEPATCH",), "live patching", ("klp_enable_patch",)),
    Requirement(("CONFIG_DYNAMIC_FTRACE_WITH_REGS", "CONFIG_DYNAMIC_FTRACE_WITH_ARGS"),
                "ftrace to redirect a patched function", ("ftrace_regs_caller",)),
)


@dataclass(frozen=True)
class Vmlinux:
    """A kernel image as read from its file."""

    path: Path
    release: str | None  # uname -r, from linux_banner
    config: dict[str, str] | None  # the embedded .config (CONFIG_X -> value), None without IKCONFIG
    symbols: SymbolTable

    def missing(self, requirements=BOOT_REQUIREMENTS) -> list[str]:
        """One line per requirement this kernel does not meet."""
        return [r.missing_line(self.config) for r in requirements if not r.met(self.config, self.symbols)]


def read_vmlinux(path: Path) -> Vmlinux:
    """The kernel in path; ElfError, in one line, if it is not a 64-bit
    little-endian ELFv2 ppc64 kernel with its symbols."""
    path = Path(path)
    check_elfv2(path)
    symbols = read_elf_symbols(path)
    return Vmlinux(path, read_release(path, symbols), read_embedded_config(path), symbols)


def check_elfv2(path: Path) -> None:
    """ElfError unless path is a 64-bit little-endian ppc64 ELF file of the
    ELFv2 ABI (read_elf_symbols checks the class, byte order and machine)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ElfError(f"cannot read {path}: {e.strerror}") from None
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    e_flags = struct.unpack_from("<I", head, 48)[0]
    if e_flags & EF_PPC64_ABI != ELFV2:
        raise ElfError(f"{path} is not an ELFv2 kernel (e_flags {e_flags:#x}: a big-endian or ELFv1 build)")


def read_release(path: Path, symbols: SymbolTable) -> str | None:
    """The kernel's release (uname -r) from linux_banner, "Linux version
    RELEASE (...)"; None where the banner cannot be read."""
    banner = symbols.get("linux_banner")
    if banner is None:
        return None
    try:
        text = read_loaded_bytes(path, banner.address, min(banner.size or 256, 256))
    except ElfError:
        return None
    if not text.startswith(BANNER_PREFIX):
        return None
    return text[len(BANNER_PREFIX):].split(b" ", 1)[0].decode(errors="replace")


def read_embedded_config(path: Path) -> dict[str, str] | None:
    """The .config a CONFIG_IKCONFIG kernel carries; None without one."""
    data = Path(path).read_bytes()
    start = data.find(IKCONFIG_START)
    end = data.find(IKCONFIG_END, start + len(IKCONFIG_START)) if start >= 0 else -1
    if end < 0:
        return None
    try:
        text = gzip.decompress(data[start + len(IKCONFIG_START):end]).decode(errors="replace")
    except (OSError, EOFError, zlib.error):
        return None
    return parse_config(text)


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value of a .config ("# CONFIG_X is not set" lines: absent)."""
    config = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.startswith("CONFIG_"):
            config[name] = value.strip('"') if value.startswith('"') else value
    return config


def module_release(vermagic: str) -> str:
    """The kernel release a module's vermagic names (its first word)."""
    return vermagic.split(" ", 1)[0]
