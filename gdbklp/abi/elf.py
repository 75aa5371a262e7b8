"""ELF64 little-endian symbol tables: vmlinux files and module kallsyms in memory.

gdbklp's core checks need only ELF symbols (no DWARF): trampoline addresses,
which object a text address belongs to, and function names for reports.
"""

import bisect
import struct
from dataclasses import dataclass
from pathlib import Path

from gdbklp.errors import GdbklpError

SYM_SIZE = 24  # sizeof(Elf64_Sym)
STT_NOTYPE = 0
STT_OBJECT = 1
STT_FUNC = 2
_SYM = struct.Struct("<IBBHQQ")
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
EM_PPC64 = 21


class ElfError(GdbklpError):
    """Not a usable ppc64le ELF file; str() says why."""


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    size: int
    type: int = STT_FUNC  # ELF STT_*

    @property
    def is_function(self) -> bool:
        """Code: STT_FUNC, or an untyped label (assembly entry points such as
        livepatch_handler and _switch are often untyped)."""
        return self.type in (STT_FUNC, STT_NOTYPE)


class SymbolTable:
    """Address-sorted symbols with address -> name+offset lookup."""

    def __init__(self, symbols, owner: str = "vmlinux"):
        self.owner = owner
        # at one address a typed function wins over a label (__schedule over __sched_text_start)
        self.symbols = sorted((s for s in symbols if s.address),
                              key=lambda s: (s.address, s.type == STT_FUNC))
        self._addresses = [s.address for s in self.symbols]
        self._by_name = {}
        for s in self.symbols:
            self._by_name.setdefault(s.name, s)
        self._by_name.update((s.name, s) for s in self.symbols if s.type == STT_FUNC)

    def __len__(self) -> int:
        return len(self.symbols)

    def get(self, name: str) -> Symbol | None:
        return self._by_name.get(name)

    def address(self, name: str) -> int | None:
        sym = self._by_name.get(name)
        return sym.address if sym else None

    def lookup(self, address: int) -> tuple[Symbol, int] | None:
        """The function symbol containing address, and the offset into it."""
        i = bisect.bisect_right(self._addresses, address) - 1
        while i >= 0:
            sym = self.symbols[i]
            if sym.is_function:
                if sym.size == 0 or address < sym.address + sym.size:
                    return sym, address - sym.address
                return None
            i -= 1
        return None

    def describe(self, address: int) -> str:
        """name+0xoff, or the bare address if no function contains it."""
        found = self.lookup(address)
        if not found:
            return f"{address:#x}"
        sym, off = found
        return f"{sym.name}+{off:#x}" if off else sym.name


def parse_symbols(symtab: bytes, strtab: bytes) -> list[Symbol]:
    """Elf64_Sym records and their string table (file or module kallsyms)."""
    out = []
    for i in range(0, len(symtab) - SYM_SIZE + 1, SYM_SIZE):
        st_name, st_info, _other, _shndx, value, size = _SYM.unpack_from(symtab, i)
        end = strtab.find(b"\0", st_name)
        if st_name == 0 or end < 0:
            continue
        name = strtab[st_name:end].decode(errors="replace")
        out.append(Symbol(name, value, size, st_info & 0xF))
    return out


def read_loaded_bytes(path: Path, address: int, length: int) -> bytes:
    """Bytes a PT_LOAD segment of an ELF file puts at a virtual address
    (what the kernel's text holds before anything patches it)."""
    with open(path, "rb") as f:
        head = f.read(64)
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
            if p_type == 1 and vaddr <= address and address + length <= vaddr + filesz:
                f.seek(offset + address - vaddr)
                return f.read(length)
    raise ElfError(f"{address:#x} is in no loaded segment of {path}")


def _sections(path: Path) -> tuple[bytes, list[tuple], int]:
    """(file bytes, section headers, index of the section name table) of a
    ppc64le ELF file; ElfError if it is not one."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ElfError(f"cannot read {path}: {e.strerror}") from None
    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise ElfError(f"{path} is not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
    hdr = _EHDR.unpack_from(data)
    machine, shoff, shentsize, shnum, shstrndx = hdr[2], hdr[6], hdr[11], hdr[12], hdr[13]
    if machine != EM_PPC64:
        raise ElfError(f"{path} is not a ppc64 ELF file (e_machine {machine})")
    return data, [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)], shstrndx


def read_elf_symbols(path: Path) -> SymbolTable:
    """The .symtab of a ppc64le ELF file; ElfError if it is not one or has none."""
    data, sections, _ = _sections(path)
    for sh in sections:
        if sh[1] == 2:  # SHT_SYMTAB; sh_link names its string table
            strtab = sections[sh[6]]
            return SymbolTable(parse_symbols(data[sh[4]:sh[4] + sh[5]],
                                             data[strtab[4]:strtab[4] + strtab[5]]))
    raise ElfError(f"{path} has no symbol table (stripped?)")


def read_modinfo(path: Path) -> dict[str, str]:
    """A kernel module's .modinfo (vermagic=..., name=..., livepatch=Y, ...)."""
    data, sections, shstrndx = _sections(path)
    names = sections[shstrndx]
    for sh in sections:
        name = data[names[4] + sh[0]:].split(b"\0", 1)[0]
        if name == b".modinfo":
            entries = data[sh[4]:sh[4] + sh[5]].split(b"\0")
            return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if b"=" in e)
    raise ElfError(f"{path} has no .modinfo: not a kernel module")
