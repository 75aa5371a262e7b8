"""The guest's vCPUs as gdb sees them: one thread per vCPU (QEMU's gdbstub
numbers threads 1..N for vCPUs 0..N-1)."""

import contextlib

import gdb

from gdbklp.abi.kernel import KERNEL_BASE
from gdbklp.abi.ppc import MSR_PR
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import target

# r0: the return address into the traced function's caller at ftrace_caller's entry
STATE_REGISTERS = ("pc", "lr", "r1", "r2", "r13", "msr", "r0")


def current_cpu() -> int:
    """The selected vCPU's number, or the recording's in force."""
    recorded = target.recorded_vcpu()
    if recorded is not None:
        return recorded
    thread = gdb.selected_thread()
    return thread.num - 1 if thread else -1


def label(thread=None) -> str:
    return f"vCPU {(thread or gdb.selected_thread()).num - 1}"


def vcpu_state() -> dict:
    """pc, lr, r1, r2, r13, msr and r0 of the selected vCPU."""
    return {name: target.register(name) for name in STATE_REGISTERS}


def user_context(state: dict) -> str | None:
    """Why a vCPU (state: its registers) has no kernel stack in use, or None if it has.

    In user space (MSR_PR), or entering the kernel from it: the first
    instructions of an interrupt or system call from user space run in the
    kernel with the user's r1 and, until they swap it with an SPRG, the
    user's r13 (seen at gdb's interrupts: about 1 in 15 while shells start
    tasks); r1 is not a kernel stack pointer yet.
    """
    pc = state["pc"]
    if state["msr"] & MSR_PR:
        return f"in user space at {pc:#x}"
    if state["r1"] < KERNEL_BASE or state["r13"] < KERNEL_BASE:
        return (f"entering the kernel from user space at {pc:#x} (r1 {state['r1']:#x} is still the user's "
                "stack pointer)")
    return None


def in_user_mode(state: dict) -> bool:
    """No kernel stack in use on this vCPU (see user_context)."""
    return user_context(state) is not None


def vcpu_threads() -> list:
    """gdb's threads, one per vCPU, in vCPU order (asks the stub for its thread list)."""
    return sorted(gdb.selected_inferior().threads(), key=lambda t: t.num)


def select_each(vcpus: list):
    """Select each of vcpus in turn (yielding it), the one gdb stopped on first:
    its registers came with the stop; each other costs a switch and a fetch."""
    selected = gdb.selected_thread()
    for thread in sorted(vcpus, key=lambda t: t.num != selected.num):
        if gdb.selected_thread().num != thread.num:
            thread.switch()
        yield thread


def each_vcpu():
    """Select each vCPU in turn (yielding (label, state)); restore the selection after."""
    original = gdb.selected_thread()
    try:
        for thread in vcpu_threads():
            thread.switch()
            yield label(thread), vcpu_state()
    finally:
        if original is not None and original.is_valid():
            original.switch()


def found_kernel_vcpu() -> bool:
    """QEMU reads and writes kernel memory through the selected vCPU's MMU
    context, and one that runs user code cannot reach it: select one that runs
    kernel code (the selected one if it does). False if none does."""
    if not target.register("msr") & MSR_PR:
        return True
    for thread in gdb.selected_inferior().threads():
        thread.switch()
        if not target.register("msr") & MSR_PR:
            return True
    return False


def select_kernel_vcpu() -> None:
    """Select a vCPU that runs kernel code (found_kernel_vcpu), or refuse."""
    if not found_kernel_vcpu():
        raise GdbklpError("every vCPU runs user code, so kernel memory cannot be read through "
                      "the gdbstub now; stop the guest in the kernel (a breakpoint) and retry")


@contextlib.contextmanager
def kernel_vcpu_selected():
    """Select a vCPU that runs kernel code for the block (select_kernel_vcpu),
    then the one selected before: what gdbklp reads at a stop the user made
    must not change the user's thread."""
    original = gdb.selected_thread()
    select_kernel_vcpu()
    try:
        yield
    finally:
        if original is not None and original.is_valid() and gdb.selected_thread().num != original.num:
            original.switch()
