"""Capture test data from the lab into tests/data/ (run: python tests/capture.py).

handler: livepatch_handler's code bytes, read from the lab vmlinux's ELF
program headers (what the CPU executes; the handler is never patched at run
time), with the symbol's address.
"""

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.abi.elf import read_elf_symbols  # noqa: E402
from gdbklp.lab import build  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def read_vaddr(path: Path, address: int, length: int) -> bytes:
    data = path.read_bytes()
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and vaddr <= address < vaddr + filesz:
            return data[offset + address - vaddr: offset + address - vaddr + length]
    raise ValueError(f"{address:#x} is in no loaded segment of {path}")


def capture_handler(vmlinux: Path) -> dict:
    symbols = read_elf_symbols(vmlinux)
    address = symbols.address("livepatch_handler")
    return {"source": "lab vmlinux (Linux 6.1, Debian linux-source-6.1)",
            "address": address, "code": read_vaddr(vmlinux, address, 128).hex()}


def main() -> None:
    images = build.build_all()
    DATA.mkdir(exist_ok=True)
    (DATA / "livepatch_handler.json").write_text(json.dumps(capture_handler(images.vmlinux), indent=1) + "\n")


if __name__ == "__main__":
    main()
