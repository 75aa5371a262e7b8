"""$klp_addr("name"): the address of a function in vmlinux or a loaded module.

gdb knows vmlinux's symbols but not those of modules loaded at run time;
gdbklp reads them from each module's kallsyms in guest memory, so

    break *$klp_addr("klp_lab_c_local")

stops in a live-patch replacement without loading any .ko file.
"""

import gdb

from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import vcpus
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel


class KlpAddr(gdb.Function):
    """Return the address of a vmlinux or module function: $klp_addr("name")."""

    def __init__(self):
        super().__init__("klp_addr")

    def invoke(self, name):
        try:
            return self.address(name.string())
        except (GdbklpError, gdb.MemoryError) as e:  # one line, not the exception's class
            raise gdb.GdbError(f"$klp_addr: {e}") from None

    @staticmethod
    def address(wanted: str) -> gdb.Value:
        kernel = current_kernel()
        if gdb.selected_thread() is not None:
            vcpus.select_kernel_vcpu()  # module lists are read from kernel memory
        for obj in kernel.view().objects:
            address = obj.symbols.address(wanted)
            if address is not None:
                return gdb.Value(address).cast(gdb.lookup_type("unsigned long"))
        raise gdb.GdbError(f"$klp_addr: no function '{wanted}' in vmlinux or a loaded module")


KlpAddr()
