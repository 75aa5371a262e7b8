"""gdb side of tests/capture.py and tests/data/distribution/capture.py: write
one task's stack as a replayable image.

Sourced into gdb by those scripts. An image holds the task's whole kernel
stack, every other memory block the real decoder read (code around return
addresses, the livepatch_sp slot), the registers, the part of the symbol
tables that names what is on the stack, and the kernel code a view is
decoded from (the system call entry, the ftrace trampolines), so tests
replay the decoder on real memory without gdb or QEMU.
"""

import argparse
import base64
import dataclasses
import json
import zlib
from dataclasses import asdict

import gdb

from gdbklp.abi.frames import SCAN_INSNS, Registers
from gdbklp.abi.invariants import CodeFacts, ReturnSample, check_return
from gdbklp.abi.taskstack import decode_task_stack
from gdbklp.gdbext.inferior import stacks, target, tasks, vcpus
from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel
from gdbklp.gdbext.inferior.trampolines import trampoline_code


def kernel_code(kernel) -> dict:
    """The code a view decodes: the ftrace trampolines and the system call entry."""
    code = {name: {"address": address, "code": data.hex()} for name, address, data in trampoline_code(kernel)}
    entry = kernel.symbols.address("system_call_common")
    code["system_call_common"] = {"address": entry, "code": kernel.code(entry, 4 * SCAN_INSNS).hex()}
    return code


def capture(kernel, label: str, regs: Registers, task: int, stack_base: int | None) -> dict:
    # a fresh view: its code caches must not hide reads from the recording reader
    view = dataclasses.replace(kernel.view(), _call_sites={})
    base = stack_base if stack_base is not None else regs.sp & ~(view.thread_size - 1)
    reads = {}

    def read(address: int, length: int) -> bytes:
        data = target.read_memory(address, length)
        key = f"{address:#x}"
        if not base <= address < base + view.thread_size and len(data.hex()) > len(reads.get(key, "")):
            reads[key] = data.hex()
        return data

    who = tasks.identity(task)
    pid, comm = who.pid, who.comm
    regs_offset = target.dwarf_offset("struct task_struct", "thread.regs")
    stack = decode_task_stack(label, regs, task, read, view, pid, comm, base)
    if stack.livepatch and stack.livepatch.entries:
        # at C's entry the state is what P3 sees when C returns cleanly: record
        # what the return checks read from code (prologues, module stubs) too
        top = stack.livepatch.livepatch_sp + view.livepatch.entry_size
        sample = ReturnSample(task, 0, regs.sp, stack.livepatch.livepatch_sp, base,
                              read(base, top - base), read(regs.sp, 32))
        check_return(sample, CodeFacts(view, read))
    addresses = {f.pc for f in stack.walk.frames} | {regs.lr or 0, regs.r0 or 0}
    if stack.livepatch:
        addresses |= {e.ra for e in stack.livepatch.entries}
    symbols = set()
    for address in addresses:
        obj = view.object_at(address)
        found = obj.symbols.lookup(address) if obj else None
        if found:
            symbols.add((obj.name, found[0].name, found[0].address, found[0].size, found[0].type))
    return {
        "label": label, "task": task, "pid": pid, "comm": comm, "regs": asdict(regs),
        "stack_base": base, "thread_size": view.thread_size,
        "stack": base64.b64encode(zlib.compress(target.read_memory(base, view.thread_size), 9)).decode(),
        "reads": reads,
        "objects": [{"name": o.name, "base": o.base, "size": o.size, "toc": o.toc} for o in view.objects],
        "symbols": sorted(symbols),
        "livepatch": asdict(view.livepatch) if view.livepatch else None,
        "code": kernel_code(kernel),
        "system_call_exception": kernel.symbols.address("system_call_exception"),
        "thread_regs": target.read_u64(task + regs_offset) if regs_offset is not None else None,
        "decoded": stack.format_text(view),
    }


class KlpCapture(Command):
    """Write the selected vCPU's (or a task's) stack image as JSON (test tooling)."""

    name = "klp-capture"

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
            image = capture(kernel, "vCPU", stacks.registers(state), tasks.running_task(kernel, state["r13"]), None)
        with open(args.output, "w") as f:
            json.dump(image, f, indent=1)
            f.write("\n")
        gdb.write(image["decoded"] + "\n")


KlpCapture()
