"""On the real lab: a vCPU stopped at the first instructions of an interrupt
from user space, where the kernel still runs on the user's r1 (and, before
it swaps it with an SPRG, the user's r13). gdb's interrupts land there about
once in 15 while shells start tasks (their pages fault in); klp-frames once
read the user's r1 as a kernel stack pointer there and failed
("Cannot access memory"), test_identity_lab's pid test with it.
"""

import pytest

from gdbklp.abi.kernel import KERNEL_BASE
from gdbklp.gdbmi import GdbCommandError

# the data storage interrupt's relocation-on vector (6.1): +0 still has the
# user's r13 (mfsprg r13,1 follows), +20 the PACA in r13 but the user's r1
VECTOR = "exc_virt_0x4300_data_access"
FAULTING_WORKLOAD = "for i in $(seq 20); do sleep 0; done"  # new processes fault their pages in


def register(gdb, name: str) -> int:
    return int(gdb.console(f"output/x ${name}").strip(), 16)


def stop_entering_from_user_space(guest, gdb, offset: int, tries: int = 200) -> int:
    """Continue to the vector + offset until a stop there came from user space; its pc."""
    for _ in range(tries):
        gdb.cont()
        gdb.wait_stopped(60)
        if register(gdb, "r1") < KERNEL_BASE:
            return register(gdb, "pc")
    pytest.fail(f"no interrupt from user space reached {VECTOR}+{offset} in {tries} stops")


@pytest.mark.parametrize("offset", [0, 20])
def test_a_vcpu_entering_the_kernel_from_user_space_has_no_kernel_stack_yet(guest, gdb, offset):
    if gdb.running:
        gdb.interrupt()
    gdb.console(f"break *({VECTOR} + {offset})")
    start = guest.send(FAULTING_WORKLOAD)
    try:
        pc = stop_entering_from_user_space(guest, gdb, offset)
        entering = f"entering the kernel from user space at {pc:#x}"
        assert entering in gdb.console("klp-frames --all")
        with pytest.raises(GdbCommandError, match=f"klp-frames: vCPU [0-9]+ is {entering}"):
            gdb.console("klp-frames")
        if offset == 20:  # r13 is the PACA: the task it interrupted is known, and its stack decodes
            pid = int(gdb.console("output ((struct paca_struct *)$r13)->__current->pid").strip())
            assert f"pid {pid} " in gdb.console(f"klp-frames --task {pid}")
    finally:
        gdb.console("delete")
        gdb.cont()
    guest.wait_done(start, timeout=60)
