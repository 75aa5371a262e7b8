"""gdb side of the distribution kernel's captures (run by
tests/data/distribution/capture.py, which boots the guest): write one task's
stack as a replayable image, like tests/capture_gdb.py, plus what a view of a
kernel without live patching is made from: the code of the system call entry
(the interrupt frame layout is decoded from it) and of the ftrace
trampolines (where they keep a traced call), the registers with r0, and
task->thread.regs (the user pt_regs, to check the user entry against).

    klp-capture-distribution OUTPUT [--task PID]
"""

import argparse
import base64
import dataclasses
import json
import zlib
from dataclasses import asdict

import gdb

from gdbklp.abi.frames import SCAN_INSNS, Registers
from gdbklp.abi.taskstack import decode_task_stack
from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.inferior import stacks, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel
from gdbklp.gdbext.inferior.trampolines import trampoline_code


def kernel_code(kernel) -> dict:
    code = {name: {"address": address, "code": data.hex()} for name, address, data in trampoline_code(kernel)}
    entry = kernel.symbols.address("system_call_common")
    code["system_call_common"] = {"address": entry, "code": kernel.code(entry, 4 * SCAN_INSNS).hex()}
    return code


def capture(kernel, label: str, regs: Registers, task: int, stack_base: int | None) -> dict:
    view = dataclasses.replace(kernel.view(), _call_sites={})  # a fresh code cache: every read is recorded
    base = stack_base if stack_base is not None else regs.sp & ~(view.thread_size - 1)
    reads = {}

    def read(address: int, length: int) -> bytes:
        data = target.read_memory(address, length)
        key = f"{address:#x}"
        if not base <= address < base + view.thread_size and len(data.hex()) > len(reads.get(key, "")):
            reads[key] = data.hex()
        return data

    who = tasks.identity(task)
    stack = decode_task_stack(label, regs, task, read, view, who.pid, who.comm, base)
    symbols = set()
    for address in {f.pc for f in stack.walk.frames} | {regs.lr or 0, regs.r0 or 0}:
        obj = view.object_at(address)
        found = obj.symbols.lookup(address) if obj else None
        if found:
            symbols.add((obj.name, found[0].name, found[0].address, found[0].size, found[0].type))
    regs_offset = target.dwarf_offset("struct task_struct", "thread.regs")
    return {
        "label": label, "task": task, "pid": who.pid, "comm": who.comm, "regs": asdict(regs),
        "stack_base": base, "thread_size": view.thread_size,
        "stack": base64.b64encode(zlib.compress(target.read_memory(base, view.thread_size), 9)).decode(),
        "reads": reads,
        "objects": [{"name": o.name, "base": o.base, "size": o.size, "toc": o.toc} for o in view.objects],
        "symbols": sorted(symbols),
        "code": kernel_code(kernel),
        "system_call_exception": kernel.symbols.address("system_call_exception"),
        "thread_regs": target.read_u64(task + regs_offset),
        "source": f"Debian's kernel ({kernel.vmlinux.split('/')[-1]}) in the lab's QEMU",
        "decoded": stack.format_text(view),
    }


class KlpCaptureDistribution(Command):
    """Write the selected vCPU's (or a task's) stack image as JSON (test tooling)."""

    name = "klp-capture-distribution"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("output")
        parser.add_argument("--task", metavar="PID")

    def run(self, args: argparse.Namespace) -> None:
        kernel = current_kernel()
        if args.task:
            vcpus.select_kernel_vcpu()
            task = tasks.find_task(kernel, args.task)
            regs, base = stacks.sleeping_context(kernel, task)
            image = capture(kernel, f"pid {args.task}", regs, task, base)
        else:
            state = vcpus.vcpu_state()
            task = tasks.running_task(kernel, state["r13"])
            image = capture(kernel, "vCPU", stacks.registers(state), task, tasks.task_stack(task))
        with open(args.output, "w") as f:
            json.dump(image, f, indent=1)
            f.write("\n")
        gdb.write(image["decoded"] + "\n")


KlpCaptureDistribution()
