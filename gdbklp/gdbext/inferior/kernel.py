"""The kernel under gdb: the vmlinux gdb has loaded, and a view of the running
kernel's objects (vmlinux and its modules) for the pure-Python walker and checks.

Facts from the vmlinux file (symbols, the trampoline layout) are kept until
gdb loads another objfile; the view until the module list changes.
"""

import gdb

from gdbklp.abi import elf
from gdbklp.abi.frames import SCAN_INSNS, decode_interrupt_frame
from gdbklp.abi.ftrace import TracedCallFrames, decode_traced_calls
from gdbklp.abi.kernel import (
    THREAD_SIZE_DEFAULT,
    VMLINUX,
    InterruptFrameLayout,
    KernelView,
    ObjectInfo,
)
from gdbklp.abi.livepatch import LivepatchHandlerLayout
from gdbklp.abi.trampoline import decode_layout
from gdbklp.errors import GdbklpError
from gdbklp.gdbext import events
from gdbklp.gdbext.inferior import target
from gdbklp.gdbext.inferior.modules import ModuleList

HANDLER_BYTES = 256  # livepatch_handler's code, both halves
BANNER_BYTES = 256


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
        self.has_dwarf = target.has_dwarf_type("struct task_struct")
        self.thread_size = self._thread_size()
        self.modules = ModuleList(self.has_dwarf)
        self._layout: LivepatchHandlerLayout | None = None
        self._interrupt_frame: tuple[InterruptFrameLayout | None, str | None] | None = None
        self._traced_calls: TracedCallFrames | None = None
        self._view: KernelView | None = None
        self._view_objects: list[ObjectInfo] | None = None

    def _thread_size(self) -> int:
        if self.has_dwarf:
            try:
                return gdb.lookup_type("union thread_union").sizeof
            except gdb.error:
                pass
        return THREAD_SIZE_DEFAULT

    def code(self, address: int, length: int) -> bytes:
        """Code as the vmlinux file has it (readable before the guest boots)."""
        return elf.read_loaded_bytes(self.vmlinux, address, length)

    # ---- the trampoline --------------------------------------------------

    def require_live_patching(self, symbol: str = "livepatch_handler") -> int:
        """The address of a symbol of the kernel's live patching (livepatch_handler,
        klp_transition_patch, ...); the one-line refusal every command gives on a
        kernel built without it (a distribution's, say)."""
        address = self.symbols.address(symbol)
        if address is None:
            raise GdbklpError(f"kernel without live patching: no {symbol} in {self.vmlinux}")
        return address

    def require_livepatch(self) -> int:
        """livepatch_handler's address; a one-line error for a kernel without it."""
        return self.require_live_patching("livepatch_handler")

    def handler_code(self) -> bytes:
        """livepatch_handler's code, both halves, from the file: the handler is
        never patched, and the guest may not run yet."""
        return self.code(self.require_livepatch(), HANDLER_BYTES)

    def livepatch_layout(self) -> LivepatchHandlerLayout:
        if self._layout is None:
            self._layout = decode_layout(self.handler_code(), self.require_livepatch())
        return self._layout

    def check_matches_target(self) -> None:
        """One-line error when the running kernel is not this vmlinux (their linux_banner
        differ); nothing to say before the guest has booted (no banner there yet)."""
        address = self.symbols.address("linux_banner")
        if address is None:
            return
        ours = self.code(address, BANNER_BYTES).split(b"\0")[0]
        try:
            theirs = target.read_memory(address, len(ours))
        except gdb.MemoryError:
            return
        # before the kernel runs (stopped at the firmware), its address holds whatever
        # the firmware put there: only another kernel's banner is a mismatch
        if theirs != ours and theirs.startswith(b"Linux version"):
            raise GdbklpError(f"{self.vmlinux} does not match the running kernel: its linux_banner is "
                              f"{ours.decode(errors='replace').strip()!r}, the guest has "
                              f"{theirs.decode(errors='replace').strip()!r} there")

    # ---- what the walker needs from the kernel's code ----------------------

    def interrupt_frame(self) -> tuple[InterruptFrameLayout | None, str | None]:
        """Where interrupt frames keep the marker and pt_regs (decoded from the
        system call entry), or None and why not."""
        if self._interrupt_frame is None:
            entry = self.symbols.address("system_call_common")
            callee = self.symbols.address("system_call_exception")
            if entry is None or callee is None:
                self._interrupt_frame = (None, f"no system_call_common or system_call_exception in {self.vmlinux}")
            else:
                try:
                    self._interrupt_frame = (decode_interrupt_frame(self.code(entry, 4 * SCAN_INSNS), entry,
                                                                    callee), None)
                except ValueError as e:
                    self._interrupt_frame = (None, str(e))
        return self._interrupt_frame

    def traced_calls(self) -> TracedCallFrames:
        """Where each ftrace trampoline keeps a traced call, per instruction."""
        if self._traced_calls is None:
            from gdbklp.gdbext.inferior.trampolines import (
                trampoline_code,  # it imports this module
            )
            self._traced_calls = decode_traced_calls(list(trampoline_code(self)),
                                                     self.symbols.address("livepatch_handler"))
        return self._traced_calls

    # ---- the view ----------------------------------------------------------

    def view(self, read_modules: bool = True) -> KernelView:
        """The pure-Python view of this kernel that the walker and checks use, as of this stop.

        read_modules=False uses only modules already read: an unwinder must not
        evaluate expressions (that needs frames) while gdb builds frames.
        """
        modules = self.modules.current() if read_modules else self.modules.objects
        if self._view is None or modules is not self._view_objects:
            layout = self.livepatch_layout() if self.symbols.address("livepatch_handler") else None
            self._view_objects = modules
            interrupt_frame, why_not = self.interrupt_frame()
            self._view = KernelView([self.vmlinux_object, *modules], layout,
                                    klp_return_helper=self.symbols.address("KLP_return_helper"),
                                    thread_size=self.thread_size,
                                    ool_stubs=self.symbols.address("ftrace_ool_stub_text") is not None,
                                    interrupt_frame=interrupt_frame, interrupt_frame_problem=why_not,
                                    traced_calls=self.traced_calls())
        return self._view

    def view_covering(self, address: int) -> KernelView:
        """The view, with the module list checked again if no object holds address
        (a module loaded since the last stop gdb reported)."""
        view = self.view()
        if view.object_at(address) is None:
            self.modules.refresh()
            view = self.view()
        return view

    def describe(self, address: int) -> str:
        """function+off for vmlinux or module text."""
        return _describe(self, address)

    def function_name(self, address: int) -> str:
        """Bare function name (no offset, no module), or the address."""
        return self.view_covering(address).function(address) or f"{address:#x}"

    def function_start(self, address: int) -> int | None:
        return self.view_covering(address).function_start(address)


@events.cache_until("modules", "objfile")
def _describe(kernel: Kernel, address: int) -> str:
    return kernel.view_covering(address).describe(address)


@events.cache_until("objfile")
def kernel() -> Kernel:
    """The Kernel of the vmlinux gdb has loaded."""
    return Kernel()
