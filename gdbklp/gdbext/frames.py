"""klp-frames: every thread's ppc64le kernel stack, through live-patch trampolines.

Registers come from each vCPU's frame 0 and memory is read in whole frame
headers; gdb's own unwinder and prologue analysis are never used.
"""

import argparse
import dataclasses
import json

import gdb

from gdbklp.abi.frames import Registers
from gdbklp.abi.kernel import KernelView
from gdbklp.abi.taskstack import TaskStack, decode_task_stack
from gdbklp.gdbext import target
from gdbklp.gdbext.commands import Command, GdbklpError


def vcpu_state() -> dict:
    """pc, lr, r1, r2, r13 and msr of the selected vCPU."""
    return {name: target.register(name) for name in ("pc", "lr", "r1", "r2", "r13", "msr")}


def running_task(kernel: target.Kernel, state: dict) -> int:
    offset = kernel.livepatch_layout().paca_thread_info if kernel.view().livepatch \
        else paca_current_offset(kernel)
    return target.read_u64(state["r13"] + offset)


# Stacks decoded since the guest last stopped, by the registers they start from
# and the kernel view used: klp-frames and the unwinder (bt) share them.
decoded: dict[tuple, TaskStack] = {}


def decode_running(kernel: target.Kernel, state: dict, view: KernelView) -> TaskStack:
    """The stack of the task running on a vCPU in the kernel (state: its registers)."""
    key = (*(state[name] for name in ("pc", "r1", "lr", "r2", "r13")), kernel.view_key)
    stack = decoded.get(key)
    if stack is None:
        task = running_task(kernel, state)
        pid, comm = kernel.task_identity(task)
        regs = Registers(pc=state["pc"], sp=state["r1"], lr=state["lr"], toc=state["r2"])
        stack = decoded[key] = decode_task_stack("", regs, task, target.read_memory, view, pid, comm,
                                                  kernel.task_stack(task))
    return stack


def running_stack(kernel: target.Kernel, label: str, state: dict) -> TaskStack:
    return dataclasses.replace(decode_running(kernel, state, kernel.view()), label=label)


def _forget_decoded(_event) -> None:
    decoded.clear()


gdb.events.stop.connect(_forget_decoded)
gdb.events.cont.connect(_forget_decoded)


def paca_current_offset(kernel: target.Kernel) -> int:
    if not kernel.has_dwarf:
        raise GdbklpError("finding the running task needs livepatch_handler or DWARF")
    return int(gdb.parse_and_eval("(unsigned long)&((struct paca_struct *)0)->__current"))


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
            yield f"vCPU {thread.num - 1}", vcpu_state()
    finally:
        if original is not None and original.is_valid():
            original.switch()


def all_tasks(kernel: target.Kernel) -> list[int]:
    """Every task_struct (threads included), from init_task's lists (needs DWARF)."""
    out = []
    for proc in [gdb.parse_and_eval("init_task"), *kernel.kernel_list("&init_task.tasks", "struct task_struct", "tasks")]:
        out.append(int(proc.address))
        out += [int(t.address) for t in kernel.kernel_list(proc["thread_group"].address, "struct task_struct",
                                                            "thread_group")]
    return out


def find_task(kernel: target.Kernel, spec: str) -> int:
    """task_struct address of a pid (or an address given as 0x...)."""
    if spec.startswith("0x"):
        return int(spec, 16)
    if not kernel.has_dwarf:
        raise GdbklpError("--task PID needs DWARF (a vmlinux built with debug info)")
    try:
        pid = int(spec)
    except ValueError:
        raise GdbklpError(f"--task takes a pid or a task_struct address, not '{spec}'") from None
    for task in all_tasks(kernel):
        if kernel.task_identity(task)[0] == pid:
            return task
    raise GdbklpError(f"no task with pid {pid}")


def sleeping_context(kernel: target.Kernel, task: int) -> tuple[Registers, int]:
    """Registers a sleeping task resumes with (r1 saved by _switch) and its stack base."""
    t = gdb.Value(task).cast(gdb.lookup_type("struct task_struct").pointer()).dereference()
    return Registers(pc=kernel.symbols.address("_switch") or 0, sp=int(t["thread"]["ksp"])), int(t["stack"])


def sleeping_stack(kernel: target.Kernel, task: int) -> TaskStack:
    regs, base = sleeping_context(kernel, task)
    pid, comm = kernel.task_identity(task)
    return decode_task_stack(f"pid {pid}", regs, task, target.read_memory, kernel.view(), pid, comm,
                             stack_base=base)


def stack_of_task(kernel: target.Kernel, task: int) -> TaskStack:
    """Any task's stack: from its vCPU's registers if it runs, else as _switch left it."""
    for label, state in each_vcpu():
        if not state["msr"] & target.MSR_PR and running_task(kernel, state) == task:
            pid, _ = kernel.task_identity(task)
            return running_stack(kernel, f"{label} pid {pid}", state)
    target.select_kernel_vcpu()
    return sleeping_stack(kernel, task)


class KlpFrames(Command):
    """Decode kernel stacks through live-patch trampolines: frames, TOC slots, call sites,
    livepatch-stack entries, and anything inconsistent."""

    name = "klp-frames"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        who = parser.add_mutually_exclusive_group()
        who.add_argument("--all", action="store_true", help="every vCPU (gdb thread)")
        who.add_argument("--task", metavar="PID|ADDR", help="any task, running or asleep (needs DWARF)")
        parser.add_argument("--json", action="store_true", help="print the same as JSON")

    def run(self, args: argparse.Namespace) -> None:
        kernel = target.kernel()
        target.require_target()
        stacks, notes = [], []
        if args.task:
            target.select_kernel_vcpu()
            stacks.append(stack_of_task(kernel, find_task(kernel, args.task)))
        elif args.all:
            for label, state in each_vcpu():
                if state["msr"] & target.MSR_PR:
                    notes.append(f"{label}: in user space at {state['pc']:#x} (no kernel stack in use)")
                else:
                    stacks.append(running_stack(kernel, label, state))
        else:
            state = vcpu_state()
            label = f"vCPU {gdb.selected_thread().num - 1}"
            if state["msr"] & target.MSR_PR:
                raise GdbklpError(f"{label} is in user space at {state['pc']:#x}: "
                                  "use --all or --task")
            stacks.append(running_stack(kernel, label, state))
        view = kernel.view()
        if args.json:
            gdb.write(json.dumps({"stacks": [s.to_dict() for s in stacks], "notes": notes}, indent=1) + "\n")
            return
        for note in notes:
            gdb.write(note + "\n")
        for s in stacks:
            gdb.write(s.format_text(view) + "\n")


KlpFrames()
