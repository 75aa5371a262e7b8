"""The running kernel's modules, read from guest memory (needs DWARF for struct module).

The list is checked (one small read per module) at most once per stop gdb
reports, and at a probe hit only when an address falls outside every known
object (refresh): a probe stays a handful of packets. It is read in full,
symbols and TOC, only when it changed; a change fires the "modules" event,
which ends every cache that depends on the loaded modules.
"""

import gdb

from gdbklp.abi import elf
from gdbklp.abi.kernel import ObjectInfo, toc_from_global_entry
from gdbklp.gdbext import events
from gdbklp.gdbext.inferior import target

MODULE_NAME_BYTES = 56


class ModuleList:
    def __init__(self, has_dwarf: bool):
        self.has_dwarf = has_dwarf
        self.signature: list[tuple[int, bytes]] | None = None
        self.objects: list[ObjectInfo] = []

    def current(self) -> list[ObjectInfo]:
        """The loaded modules, as of the last stop gdb reported (or refresh())."""
        return self._check(self._signature)

    def refresh(self) -> list[ObjectInfo]:
        """The loaded modules now: checked again, at most once per probe hit or stop;
        for a recorded state, as of the last stop (the guest runs on meanwhile)."""
        if target.reading_a_recording():
            return self.objects
        return self._check(self._signature_now)

    def _check(self, signature_of) -> list[ObjectInfo]:
        if not self.has_dwarf:
            return []
        try:
            signature = signature_of()
        except (gdb.MemoryError, OverflowError):  # not booted yet: look again at the next stop
            return self.objects
        if signature != self.signature:
            self.objects = self._read(signature)
            self.signature = signature
            events.fire("modules")
        return self.objects

    @events.cache_until("stop")
    def _signature(self) -> list[tuple[int, bytes]]:
        return self._read_signature()

    @events.cache_until(*events.RAN)
    def _signature_now(self) -> list[tuple[int, bytes]]:
        signature = self._signature.cache[(self,)] = self._read_signature()
        return signature

    def _read_signature(self) -> list[tuple[int, bytes]]:
        """(struct module address, name bytes) of each loaded module, one read each."""
        head = target.dwarf_address("modules")
        list_off = target.dwarf_offset("struct module", "list")
        name_off = target.dwarf_offset("struct module", "name")
        out = []
        node = target.read_u64(head)
        for _ in range(4096):  # a corrupt list must not loop forever
            if node == head or node < list_off:
                break
            block = target.read_memory(node - list_off, name_off + MODULE_NAME_BYTES)
            out.append((node - list_off, block[name_off:].split(b"\0")[0]))
            node = int.from_bytes(block[list_off:list_off + 8], "little")
        return out

    def _read(self, signature: list[tuple[int, bytes]]) -> list[ObjectInfo]:
        module_ptr = gdb.lookup_type("struct module").pointer()
        out = []
        for address, _ in signature:
            mod = gdb.Value(address).cast(module_ptr).dereference()
            kallsyms = mod["kallsyms"].dereference()
            count = int(kallsyms["num_symtab"])
            symtab = target.read_memory(int(kallsyms["symtab"]), count * elf.SYM_SIZE) if count else b""
            name_offsets = [int.from_bytes(symtab[i:i + 4], "little")
                            for i in range(0, len(symtab), elf.SYM_SIZE)]
            strtab = target.read_memory(int(kallsyms["strtab"]), max(name_offsets, default=0) + 256)
            name = mod["name"].string()
            symbols = elf.SymbolTable(elf.parse_symbols(symtab, strtab), owner=name)
            base, size, text_size = core_memory(mod)
            out.append(ObjectInfo(name, base, size, symbols, module_toc(symbols, base, text_size)))
        return out


def core_memory(mod: gdb.Value) -> tuple[int, int, int]:
    """(base, size, text size) of a module's core memory: one core_layout up to
    Linux 6.3; from 6.4 one region per kind, of which the text (mem[MOD_TEXT])
    is what return addresses and call sites fall in."""
    if any(f.name == "core_layout" for f in mod.type.fields()):
        layout = mod["core_layout"]
        return int(layout["base"]), int(layout["size"]), int(layout["text_size"])
    text = mod["mem"][int(gdb.parse_and_eval("MOD_TEXT"))]
    return int(text["base"]), int(text["size"]), int(text["size"])


def module_toc(symbols: elf.SymbolTable, base: int, text_size: int) -> int | None:
    """A module's TOC, as the global entry point of its functions computes it.

    Reads the module's core text once; functions that never use the TOC
    (the linker's register save helpers, leaf functions) have no global
    entry code and are skipped.
    """
    try:
        text = target.read_memory(base, text_size)
    except gdb.MemoryError:
        return None
    for sym in symbols.symbols:
        offset = sym.address - base
        if sym.is_function and 8 <= offset <= text_size - 8:
            toc = toc_from_global_entry(text[offset - 8:offset + 8], sym.address)
            if toc is not None:
                return toc
    return None
