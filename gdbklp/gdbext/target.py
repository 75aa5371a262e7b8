"""What gdbklp knows about the kernel under gdb, cached until it changes.

Registers and memory are read directly (frame 0's registers, whole-block
memory reads): no gdb frame unwinding or prologue analysis. Static knowledge
(vmlinux symbols, the trampoline layout) is cached until a new objfile is
loaded; module symbols until an address falls outside every known module.
"""

import gdb

from gdbklp.abi import elf
from gdbklp.abi.kernel import THREAD_SIZE_DEFAULT, VMLINUX, KernelView, ObjectInfo, toc_from_global_entry
from gdbklp.abi.livepatch import LivepatchHandlerLayout, decode_livepatch_handler
from gdbklp.gdbext.commands import GdbklpError

HANDLER_BYTES = 128
BANNER_BYTES = 256


def read_memory(address: int, length: int) -> bytes:
    return gdb.selected_inferior().read_memory(address, length).tobytes()


def write_memory(address: int, data: bytes) -> None:
    gdb.selected_inferior().write_memory(address, data)


def read_u64(address: int) -> int:
    return int.from_bytes(read_memory(address, 8), "little")


def register(name: str) -> int:
    """A register of the selected frame (frame 0 at a stop or after a thread switch).

    Evaluated as $name, not through gdb.selected_frame(): making a gdb.Frame
    computes the frame's id, which runs gdb's sniffers and prologue analysis
    (about 20 four-byte reads of the function's code per stop); $name comes
    from the register cache gdb filled at the stop.
    """
    return int(gdb.parse_and_eval(f"${name}")) & 0xFFFFFFFFFFFFFFFF


def dwarf_offset(type_name: str, member: str) -> int | None:
    """A member's offset in a type, from DWARF (None without it)."""
    try:
        return int(gdb.parse_and_eval(f"(unsigned long)&(({type_name} *)0)->{member}"))
    except gdb.error:
        return None


def set_register(name: str, value: int) -> None:
    """Write a register of the selected vCPU."""
    gdb.parse_and_eval(f"${name} = {value:#x}")


MSR_PR = 1 << 14  # the vCPU runs user code


def select_kernel_vcpu() -> None:
    """QEMU reads kernel memory through the selected vCPU's MMU context:
    select one that runs kernel code."""
    if not register("msr") & MSR_PR:
        return
    for thread in gdb.selected_inferior().threads():
        thread.switch()
        if not register("msr") & MSR_PR:
            return
    raise GdbklpError("every vCPU runs user code, so kernel memory cannot be read through "
                      "the gdbstub now; stop the guest in the kernel (a breakpoint) and retry")


def require_target() -> None:
    if gdb.selected_thread() is None:
        raise GdbklpError("no target: connect to the guest's gdbstub first "
                          "(target remote 127.0.0.1:PORT)")


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
        stext = self.symbols.address("_stext")
        if stext is None:
            raise GdbklpError(f"{self.vmlinux} has no kernel symbols (_stext not found)")
        end = self.symbols.address("_end") or self.symbols.symbols[-1].address
        self.vmlinux_object = ObjectInfo(VMLINUX, stext, end - stext, self.symbols,
                                         self.symbols.address(".TOC."))
        self.has_dwarf = has_dwarf_type("struct task_struct")
        self.thread_size = self._thread_size()
        self._layout: LivepatchHandlerLayout | None = None
        self._modules: list[ObjectInfo] | None = None
        self._signature: list[tuple[int, bytes]] = []
        self._module_offsets: tuple[int, int, int] | None = None
        self.modules_stale = False  # set at each stop: modules may have come or gone
        self._view: KernelView | None = None
        self.view_key: tuple = ()  # identifies the objects of the current view
        self._names: dict[int, str] = {}
        self._replacements: dict[int, int] | None = None
        self._tasks: dict[int, tuple[int, str]] = {}
        self._stack_offset: int | None = None

    def _thread_size(self) -> int:
        if self.has_dwarf:
            try:
                return gdb.lookup_type("union thread_union").sizeof
            except gdb.error:
                pass
        return THREAD_SIZE_DEFAULT

    # ---- the trampoline --------------------------------------------------

    def require_livepatch(self) -> int:
        """livepatch_handler's address; a one-line error for a kernel without it."""
        address = self.symbols.address("livepatch_handler")
        if address is None:
            raise GdbklpError(f"kernel without live patching: no livepatch_handler in {self.vmlinux}")
        return address

    def check_matches_target(self) -> None:
        """One-line error when the running kernel is not this vmlinux (their linux_banner
        differ); nothing to say before the guest has booted (its memory is not readable)."""
        address = self.symbols.address("linux_banner")
        if address is None:
            return
        ours = elf.read_loaded_bytes(self.vmlinux, address, BANNER_BYTES).split(b"\0")[0]
        try:
            theirs = read_memory(address, len(ours))
        except gdb.MemoryError:
            return
        if theirs != ours and theirs.strip(b"\0"):
            raise GdbklpError(f"{self.vmlinux} does not match the running kernel: its linux_banner is "
                              f"{ours.decode(errors='replace').strip()!r}, the guest has "
                              f"{theirs.decode(errors='replace').strip()!r} there")

    def livepatch_layout(self) -> LivepatchHandlerLayout:
        if self._layout is None:
            address = self.require_livepatch()
            # from the file: the handler is never patched, and the guest may not run yet
            self._layout = decode_livepatch_handler(
                elf.read_loaded_bytes(self.vmlinux, address, HANDLER_BYTES), address)
        return self._layout

    # ---- modules (need DWARF for struct module) ---------------------------

    def modules(self, refresh: bool = False) -> list[ObjectInfo]:
        """Loaded modules. After a stop, one small read per module checks the
        list; symbol tables are read again only if it changed."""
        if not self.has_dwarf:
            return []
        if self._modules is not None and self.modules_stale and not refresh:
            self.modules_stale = False
            if self._module_signature() == self._signature:
                return self._modules
            refresh = True
        if self._modules is None or refresh:
            try:
                self._signature = self._module_signature()
                self._modules = self._read_modules(self._signature)
            except (gdb.MemoryError, OverflowError):  # not booted yet: look again later
                self._signature, self._modules = [], []
                self.modules_stale = True
                return self._modules
            self._names.clear()
            self._replacements = None  # a patch module came or went
            self.modules_stale = False
        return self._modules

    def _module_layout(self) -> tuple[int, int, int]:
        """(address of the modules list head, offset of list and of name in struct module)."""
        if self._module_offsets is None:
            field = lambda f: int(gdb.parse_and_eval(f"(unsigned long)&((struct module *)0)->{f}"))
            self._module_offsets = (int(gdb.parse_and_eval("(unsigned long)&modules")),
                                    field("list"), field("name"))
        return self._module_offsets

    def _module_signature(self) -> list[tuple[int, bytes]]:
        """(struct module address, name bytes) of each loaded module, one read each."""
        head, list_off, name_off = self._module_layout()
        out = []
        node = read_u64(head)
        for _ in range(4096):  # a corrupt list must not loop forever
            if node == head or node < list_off:
                break
            block = read_memory(node - list_off, name_off + 56)
            out.append((node - list_off, block[name_off:].split(b"\0")[0]))
            node = int.from_bytes(block[list_off:list_off + 8], "little")
        return out

    def _read_modules(self, signature: list[tuple[int, bytes]]) -> list[ObjectInfo]:
        module_ptr = gdb.lookup_type("struct module").pointer()
        out = []
        for address, _ in signature:
            mod = gdb.Value(address).cast(module_ptr).dereference()
            layout = mod["core_layout"]
            kallsyms = mod["kallsyms"].dereference()
            count = int(kallsyms["num_symtab"])
            symtab = read_memory(int(kallsyms["symtab"]), count * elf.SYM_SIZE) if count else b""
            name_offsets = [int.from_bytes(symtab[i:i + 4], "little")
                            for i in range(0, len(symtab), elf.SYM_SIZE)]
            strtab = read_memory(int(kallsyms["strtab"]), max(name_offsets, default=0) + 256)
            name = mod["name"].string()
            symbols = elf.SymbolTable(elf.parse_symbols(symtab, strtab), owner=name)
            base, size = int(layout["base"]), int(layout["size"])
            toc = self._module_toc(symbols, base, int(layout["text_size"]))
            out.append(ObjectInfo(name, base, size, symbols, toc))
        return out

    def _module_toc(self, symbols: elf.SymbolTable, base: int, text_size: int) -> int | None:
        """A module's TOC, as the global entry point of its functions computes it.

        Reads the module's core text once; functions that never use the TOC
        (the linker's register save helpers, leaf functions) have no global
        entry code and are skipped.
        """
        try:
            text = read_memory(base, text_size)
        except gdb.MemoryError:
            return None
        for sym in symbols.symbols:
            offset = sym.address - base
            if sym.is_function and 8 <= offset <= text_size - 8:
                toc = toc_from_global_entry(text[offset - 8:offset + 8], sym.address)
                if toc is not None:
                    return toc
        return None

    def view(self, refresh_modules: bool = False, read_modules: bool = True) -> KernelView:
        """The pure-Python view of this kernel that the walker and checks use.

        read_modules=False uses only modules already read: an unwinder must not
        evaluate expressions (that needs frames) while gdb builds frames.
        """
        modules = self.modules(refresh_modules) if read_modules else (self._modules or [])
        key = tuple((m.name, m.base) for m in modules)
        if self._view is not None and self.view_key == key:
            return self._view
        objects = [self.vmlinux_object, *modules]
        layout = self.livepatch_layout() if self.symbols.address("livepatch_handler") else None
        self.view_key = key
        self._view = KernelView(objects, layout,
                                klp_return_helper=self.symbols.address("KLP_return_helper"),
                                thread_size=self.thread_size)
        return self._view

    # ---- names -----------------------------------------------------------

    def _view_covering(self, address: int) -> KernelView:
        view = self.view()
        return view if view.object_at(address) else self.view(refresh_modules=True)

    def describe(self, address: int) -> str:
        """function+off for vmlinux or module text; cached per address."""
        name = self._names.get(address)
        if name is None:
            name = self._names[address] = self._view_covering(address).describe(address)
        return name

    def function_name(self, address: int) -> str:
        """Bare function name (no offset, no module), or the address."""
        return self._view_covering(address).function(address) or f"{address:#x}"

    def function_start(self, address: int) -> int | None:
        return self._view_covering(address).function_start(address)

    # ---- live patches (DWARF) ------------------------------------------------

    def replacements(self) -> dict[int, int]:
        """old function (B) -> new function (C) of every registered klp_func."""
        if not self.has_dwarf:
            return {}
        if self._replacements is None:
            self._replacements = self._read_replacements()
        return self._replacements

    def _read_replacements(self) -> dict[int, int]:
        out = {}
        for patch in self.kernel_list("&klp_patches", "struct klp_patch", "list"):
            for obj in self.kernel_list(patch["obj_list"].address, "struct klp_object", "node"):
                for func in self.kernel_list(obj["func_list"].address, "struct klp_func", "node"):
                    out[int(func["old_func"])] = int(func["new_func"])
        return out

    def kernel_list(self, head, type_name: str, member: str, limit: int = 10000):
        """Entries of a kernel list_head list (container_of each node)."""
        head = gdb.parse_and_eval(head) if isinstance(head, str) else head
        ptr = gdb.lookup_type(type_name).pointer()
        offset = int(gdb.parse_and_eval(f"(unsigned long)&(({type_name} *)0)->{member}"))
        node = head["next"]
        for _ in range(limit):
            if int(node) == int(head):
                return
            yield gdb.Value(int(node) - offset).cast(ptr).dereference()
            node = node["next"]

    def task_stack(self, task: int) -> int | None:
        """task->stack, the bottom of the task's own kernel stack (needs DWARF)."""
        if self._stack_offset is None and self.has_dwarf:
            self._stack_offset = int(gdb.parse_and_eval("(unsigned long)&((struct task_struct *)0)->stack"))
        return read_u64(task + self._stack_offset) if self._stack_offset is not None else None

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


def _on_stop(_event):
    if _kernel is not None:
        _kernel.modules_stale = True


gdb.events.new_objfile.connect(_forget)
gdb.events.stop.connect(_on_stop)
gdb.events.clear_objfiles.connect(_forget)
