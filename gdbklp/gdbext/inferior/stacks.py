"""Any task's kernel stack, decoded: a running task's from its vCPU's registers,
a sleeping one's as _switch left it. klp-frames, the unwinder (bt),
klp-transition and the captures share these; decoded stacks are kept
until the guest runs again.
"""

import dataclasses

import gdb

from gdbklp.abi.frames import Registers
from gdbklp.abi.kernel import KernelView
from gdbklp.abi.taskstack import TaskStack, decode_task_stack
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.events import RAN, cache_until
from gdbklp.gdbext.inferior import target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel


def registers(state: dict) -> Registers:
    return Registers(pc=state["pc"], sp=state["r1"], lr=state["lr"], toc=state["r2"], r0=state.get("r0"))


@cache_until(*RAN, "modules")
def _decode_running(kernel: Kernel, pc: int, r1: int, lr: int, r2: int, r13: int, r0: int | None,
                    view: KernelView) -> TaskStack:
    task = tasks.running_task(kernel, r13)
    who = tasks.identity(task)
    return decode_task_stack("", Registers(pc=pc, sp=r1, lr=lr, toc=r2, r0=r0), task, target.read_memory, view,
                             who.pid, who.comm, tasks.task_stack(task))


def decode_running(kernel: Kernel, state: dict, view: KernelView) -> TaskStack:
    """The stack of the task running on a vCPU in the kernel (state: its registers)."""
    return _decode_running(kernel, *(state[name] for name in ("pc", "r1", "lr", "r2", "r13")), state.get("r0"), view)


def running_stack(kernel: Kernel, label: str, state: dict) -> TaskStack:
    return dataclasses.replace(decode_running(kernel, state, kernel.view()), label=label)


def sleeping_context(kernel: Kernel, task: int) -> tuple[Registers, int]:
    """Registers a task that is not on a vCPU resumes with (in _switch, r1 =
    thread.ksp), and its stack base."""
    t = gdb.Value(task).cast(gdb.lookup_type(tasks.TASK).pointer()).dereference()
    return Registers(pc=kernel.symbols.address("_switch") or 0, sp=int(t["thread"]["ksp"])), int(t["stack"])


def sleeping_stack(kernel: Kernel, task: int) -> TaskStack:
    regs, base = sleeping_context(kernel, task)
    who = tasks.identity(task)
    return decode_task_stack(f"pid {who.pid}", regs, task, target.read_memory, kernel.view(), who.pid, who.comm,
                             stack_base=base)


class TaskInUserSpace(GdbklpError):
    """The task runs user code on a vCPU: no kernel stack of it is in use."""


def stack_of_task(kernel: Kernel, task: int) -> TaskStack:
    """Any task's stack: from its vCPU's registers if it runs, else as _switch
    left it. TaskInUserSpace for a task running user code: what _switch left
    on its stack is stale (the task has returned to user space since)."""
    vcpus.select_kernel_vcpu()
    who = tasks.identity(task)
    running = tasks.on_cpus(kernel, len(vcpus.vcpu_threads()))
    for label, state in vcpus.each_vcpu():
        if running:
            here = running.get(task) == vcpus.current_cpu()
        else:  # no DWARF for the PACAs: a vCPU in the kernel tells by its r13
            here = not vcpus.in_user_mode(state) and tasks.running_task(kernel, state["r13"]) == task
        if not here:
            continue
        elsewhere = vcpus.user_context(state)
        if elsewhere:
            raise TaskInUserSpace(f"pid {who.pid} {who.comm}: on {label}, {elsewhere} (no kernel stack in use)")
        return running_stack(kernel, f"{label} pid {who.pid}", state)
    vcpus.select_kernel_vcpu()
    return sleeping_stack(kernel, task)
