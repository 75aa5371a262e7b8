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
    """Return the address of a vmlinux or module function: $klp_addr("name").

Usage: $klp_addr("NAME"), NAME a function of vmlinux or of a module loaded in
the guest (read from the module's kallsyms in guest memory, no .ko needed):

    break *$klp_addr("klp_lab_c_local")
"""

    def __init__(self):
        super().__init__("klp_addr")

    def invoke(self, *args):
        """Every failure is one line, without the exception's class."""
        if len(args) != 1:
            raise gdb.GdbError(f'$klp_addr: takes one argument, a function\'s name: $klp_addr("name"), '
                               f"not {len(args)}")
        try:
            wanted = args[0].string()
        except gdb.error:
            raise gdb.GdbError(f'$klp_addr: the argument must be a string: $klp_addr("name"), '
                               f"not a value of type {args[0].type}") from None
        try:
            return self.address(wanted)
        except gdb.GdbError:
            raise
        except (GdbklpError, gdb.error) as e:  # gdb.MemoryError too
            raise gdb.GdbError(f"$klp_addr: {e}") from None
        except Exception as e:  # a bug: still one line, with what it was
            raise gdb.GdbError(f"$klp_addr: internal error: {type(e).__name__}: {e}") from None

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
