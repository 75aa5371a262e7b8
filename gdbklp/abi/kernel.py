"""Static knowledge of a running kernel, as plain data: symbols, objects, TOCs.

Built by the gdb side (gdbklp.gdbext.inferior.target) from the vmlinux ELF file and the
module list in guest memory, or by the tests from a capture. Everything the
stack walker and the checks ask about addresses goes through here.
"""

from dataclasses import dataclass, field

from gdbklp.abi import callsite, ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.elf import Symbol, SymbolTable
from gdbklp.abi.ftrace import TracedCallFrames
from gdbklp.abi.livepatch import LivepatchHandlerLayout

VMLINUX = "vmlinux"
KERNEL_BASE = 0xC000000000000000  # ppc64's PAGE_OFFSET: kernel addresses (linear map, vmalloc) start here
THREAD_SIZE_DEFAULT = 16384  # THREAD_SHIFT 14: every ppc64 kernel with 64K or 4K pages


def toc_from_global_entry(code: bytes, address: int) -> int | None:
    """r2 that a function's global entry point computes, from the 8 bytes before
    it and its first two instructions; None if it has no global entry.

    ELFv2 has two forms: addis r2,r12,HI; addi r2,r2,LO (vmlinux), and
    ld r2,-8(r12); add r2,r2,r12 with the offset stored just before the
    function (modules, -mcmodel=large style).
    """
    if len(code) < 16:
        return None
    before, first, second = int.from_bytes(code[:8], "little"), *ppc.words(code[8:16])
    if ppc.is_addis(first, rt=2, ra=12) and ppc.is_addi(second, rt=2, ra=2):
        return (address + ppc.add_immediate(first) + ppc.add_immediate(second)) & ppc.MASK64
    if ppc.is_ld(first, rt=2, ra=12, disp=-8) and ppc.is_add(second, rt=2, ra=2, rb=12):
        return (address + before) & ppc.MASK64
    return None


def local_entry(code: bytes, address: int) -> int:
    """Where local callers enter the function at address: after its global entry
    code (the two instructions that compute r2), if it has any. A breakpoint on
    a function must go there to see calls from its own object."""
    return address + 8 if toc_from_global_entry(code, address) is not None else address


@dataclass(frozen=True)
class InterruptFrameLayout:
    """Where an interrupt frame keeps the "REGS" marker and its pt_regs, as offsets
    from its r1 (STACK_INT_FRAME_MARKER and STACK_INT_FRAME_REGS; before 6.2
    STACK_FRAME_MARKER longs and STACK_FRAME_OVERHEAD). Decoded from the kernel's
    system call entry (gdbklp.abi.frames.decode_interrupt_frame)."""

    marker_offset: int
    regs_offset: int


# the layout of ELFv2 kernels before 6.2 (the lab's 6.1): what a view made
# without the kernel's code (the 6.1 stack images of the unit tests) assumes
PRE_6_2_INTERRUPT_FRAME = InterruptFrameLayout(marker_offset=96, regs_offset=112)


@dataclass(frozen=True)
class TaskIdentity:
    """Who a task_struct was at one moment: its memory is reused by a new task
    (another pid) after an exit, and a task that execs gets a new comm and
    exec generation (task_struct.self_exec_id)."""

    task: int            # task_struct address
    pid: int = -1
    comm: str = "?"
    exec_id: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """One row per task incarnation: a reused task_struct or an exec is a new one."""
        return (self.task, self.pid, self.exec_id)

    def __str__(self) -> str:
        return f"task {self.task:#x} (pid {self.pid} {self.comm})"


def function_of_label(label: str) -> str:
    """The function's name in a label made by KernelView.describe ("name+0x1c [module]" -> "name")."""
    return label.split("+")[0].split(" ")[0]


@dataclass
class ObjectInfo:
    """vmlinux or one module: where its text is and which TOC its code runs with."""

    name: str
    base: int
    size: int
    symbols: SymbolTable
    toc: int | None

    def contains(self, address: int) -> bool:
        return self.base <= address < self.base + self.size


@dataclass(eq=False)  # compared and hashed by identity: one view per module list
class KernelView:
    objects: list[ObjectInfo]
    livepatch: LivepatchHandlerLayout | None = None
    klp_return_helper: int | None = None
    thread_size: int = THREAD_SIZE_DEFAULT
    ool_stubs: bool = False  # ftrace enters through out-of-line stubs (6.13+)
    # None when the kernel's code did not tell (interrupt_frame_problem says why)
    interrupt_frame: InterruptFrameLayout | None = PRE_6_2_INTERRUPT_FRAME
    interrupt_frame_problem: str | None = None
    # where ftrace_caller keeps a traced call's return address, per instruction
    traced_calls: TracedCallFrames | None = None
    _call_sites: dict[int, CallSite] = field(default_factory=dict)

    def object_at(self, address: int) -> ObjectInfo | None:
        for obj in self.objects:
            if obj.contains(address) and (obj.name != VMLINUX or obj.symbols.lookup(address)):
                return obj
        return None

    def describe(self, address: int) -> str:
        """"name+0x1c" in vmlinux, "name+0x1c [module]" in a module (see function_of_label)."""
        obj = self.object_at(address)
        if obj is None:
            return f"{address:#x}"
        text = obj.symbols.describe(address)
        return text if obj.name == VMLINUX else f"{text} [{obj.name}]"

    def symbol_at(self, address: int) -> Symbol | None:
        """The function (or code label) containing address, in any known object."""
        obj = self.object_at(address)
        found = obj.symbols.lookup(address) if obj else None
        return found[0] if found else None

    def function(self, address: int) -> str | None:
        symbol = self.symbol_at(address)
        return symbol.name if symbol else None

    def function_start(self, address: int) -> int | None:
        symbol = self.symbol_at(address)
        return symbol.address if symbol else None

    def is_toc_slot(self, value: int, call_site: CallSite) -> bool:
        """Does a frame's TOC save slot (24(r1)) hold a TOC? Only when its value is
        the TOC of vmlinux or of a module, or when the frame's call site reloads r2
        from it (a global or indirect call: the stub, or the caller, wrote it). A
        frame whose calls never touch the slot leaves in it whatever was there."""
        return self.toc_owner(value) is not None or call_site.restores_toc

    def toc_owner(self, value: int) -> str | None:
        for obj in self.objects:
            if obj.toc is not None and obj.toc == value:
                return obj.name
        return None

    def call_site(self, read, return_address: int) -> CallSite:
        """Class of the call before return_address, reading the code once per address.

        Code is cached for the life of this view (the gdb side makes a new one
        when modules come or go). ftrace's patching of function entries does
        not change a call site's class unless the return address is right
        after an mcount site, which only happens inside ftrace itself.
        """
        site = self._call_sites.get(return_address)
        if site is None:
            try:
                site = callsite.classify_bytes(read(return_address - 4, 8))
            except Exception:
                return CallSite.NOT_A_CALL  # unreadable: not cached, may be readable later
            self._call_sites[return_address] = site
        return site

    def is_livepatch_return(self, address: int) -> bool:
        """address is where C returns into livepatch_handler (P3)."""
        return self.livepatch is not None and address == self.livepatch.return_point
