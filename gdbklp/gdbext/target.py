"""What gdbklp knows about the kernel under gdb, cached until it changes.

Registers and memory are read directly (frame 0's registers, whole-block
memory reads): no gdb frame unwinding or prologue analysis. Static knowledge
(vmlinux symbols, the trampoline layout) is cached until a new objfile is
loaded; module symbols until an address falls outside every known module.
"""

import gdb

from gdbklp.abi import elf
from gdbklp.abi.livepatch import LivepatchHandlerLayout, decode_livepatch_handler
from gdbklp.gdbext.commands import GdbklpError

HANDLER_BYTES = 128


def read_memory(address: int, length: int) -> bytes:
    return gdb.selected_inferior().read_memory(address, length).tobytes()


def read_u64(address: int) -> int:
    return int.from_bytes(read_memory(address, 8), "little")


def register(name: str) -> int:
    return int(gdb.selected_frame().read_register(name)) & 0xFFFFFFFFFFFFFFFF


def current_cpu() -> int:
    """QEMU's gdbstub numbers threads 1..N for vCPUs 0..N-1."""
    thread = gdb.selected_thread()
    return thread.num - 1 if thread else -1


def has_dwarf_type(name: str) -> bool:
    try:
        gdb.lookup_type(name)
        return True
    except gdb.error:
        return False


class Module:
    def __init__(self, name: str, base: int, size: int, symbols: elf.SymbolTable):
        self.name = name
        self.base = base
        self.size = size
        self.symbols = symbols

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size


class Kernel:
    """The vmlinux gdb has loaded, and the running kernel's modules."""

    def __init__(self):
        arch = gdb.selected_inferior().architecture().name() if gdb.selected_inferior().pid else None
        progspace = gdb.current_progspace()
        if not progspace.filename:
            raise GdbklpError("no vmlinux loaded: use 'file vmlinux' first")
        if arch is not None and "powerpc" not in arch:
            raise GdbklpError(f"the target is not ppc64le (gdb architecture '{arch}')")
        self.vmlinux = progspace.filename
        self.symbols = elf.read_elf_symbols(self.vmlinux)
        if self.symbols.address("_stext") is None:
            raise GdbklpError(f"{self.vmlinux} has no kernel symbols (_stext not found)")
        self.has_dwarf = has_dwarf_type("struct task_struct")
        self._layout: LivepatchHandlerLayout | None = None
        self._modules: list[Module] | None = None
        self._names: dict[int, str] = {}
        self._tasks: dict[int, tuple[int, str]] = {}

    # ---- the trampoline --------------------------------------------------

    def livepatch_layout(self) -> LivepatchHandlerLayout:
        if self._layout is None:
            address = self.symbols.address("livepatch_handler")
            if address is None:
                raise GdbklpError(f"kernel without live patching: no livepatch_handler in {self.vmlinux}")
            self._layout = decode_livepatch_handler(read_memory(address, HANDLER_BYTES), address)
        return self._layout

    # ---- modules (need DWARF for struct module) ---------------------------

    def modules(self, refresh: bool = False) -> list[Module]:
        if self._modules is None or refresh:
            self._modules = self._read_modules() if self.has_dwarf else []
        return self._modules

    def _read_modules(self) -> list[Module]:
        head = gdb.parse_and_eval("&modules")
        module_ptr = gdb.lookup_type("struct module").pointer()
        list_offset = int(gdb.parse_and_eval("(unsigned long)&((struct module *)0)->list"))
        out = []
        node = head["next"]
        for _ in range(4096):  # a corrupt list must not loop forever
            if int(node) == int(head):
                break
            mod = gdb.Value(int(node) - list_offset).cast(module_ptr).dereference()
            layout = mod["core_layout"]
            kallsyms = mod["kallsyms"].dereference()
            count = int(kallsyms["num_symtab"])
            symtab = read_memory(int(kallsyms["symtab"]), count * elf.SYM_SIZE) if count else b""
            name_ends = [int.from_bytes(symtab[i:i + 4], "little")
                         for i in range(0, len(symtab), elf.SYM_SIZE)]
            strtab = read_memory(int(kallsyms["strtab"]), max(name_ends, default=0) + 256)
            name = mod["name"].string()
            out.append(Module(name, int(layout["base"]), int(layout["size"]),
                              elf.SymbolTable(elf.parse_symbols(symtab, strtab), owner=name)))
            node = node["next"]
        return out

    def module_at(self, address: int) -> Module | None:
        for refresh in (False, True):
            for mod in self.modules(refresh):
                if mod.contains(address):
                    return mod
        return None

    # ---- names -----------------------------------------------------------

    def describe(self, address: int) -> str:
        """function+off for vmlinux or module text; cached per address."""
        name = self._names.get(address)
        if name is None:
            if self.symbols.lookup(address):
                name = self.symbols.describe(address)
            else:
                mod = self.module_at(address)
                name = f"{mod.symbols.describe(address)} [{mod.name}]" if mod else f"{address:#x}"
            self._names[address] = name
        return name

    def function_name(self, address: int) -> str:
        """Bare function name (no offset, no module), or the address."""
        found = self.symbols.lookup(address)
        if not found:
            mod = self.module_at(address)
            found = mod.symbols.lookup(address) if mod else None
        return found[0].name if found else f"{address:#x}"

    def task_identity(self, task: int) -> tuple[int, str]:
        """(pid, comm) of a task_struct, read once per task; (-1, '?') without DWARF."""
        ident = self._tasks.get(task)
        if ident is None:
            ident = (-1, "?")
            if self.has_dwarf:
                try:
                    t = gdb.Value(task).cast(gdb.lookup_type("struct task_struct").pointer()).dereference()
                    ident = (int(t["pid"]), t["comm"].string())
                except gdb.error:
                    pass
            self._tasks[task] = ident
        return ident


_kernel: Kernel | None = None


def kernel() -> Kernel:
    """The cached Kernel; rebuilt after gdb loads another objfile."""
    global _kernel
    if _kernel is None:
        _kernel = Kernel()
    return _kernel


def _forget(*_):
    global _kernel
    _kernel = None


gdb.events.new_objfile.connect(_forget)
gdb.events.clear_objfiles.connect(_forget)
