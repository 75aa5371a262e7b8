"""klp-frames: every thread's ppc64le kernel stack, through live-patch trampolines.

Registers come from each vCPU's frame 0 and memory is read in whole frame
headers; gdb's own unwinder and prologue analysis are never used.
"""

import argparse
import json

import gdb

from gdbklp.errors import GdbklpError
from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.commands.style import styled
from gdbklp.gdbext.inferior import stacks, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel


def every_task(kernel) -> tuple[list, list[str]]:
    """The stack of every task, and a note for each whose stack cannot be read
    (a task exiting while the guest was stopped: its stack may be freed) or
    is not in use (a task running user code on a vCPU)."""
    if not kernel.has_dwarf:
        raise GdbklpError("--all-tasks needs DWARF (a vmlinux built with debug info)")
    vcpus.select_kernel_vcpu()
    found, notes = [], []
    for task in tasks.all_tasks():
        try:
            found.append(stacks.stack_of_task(kernel, task))
        except gdb.MemoryError as e:
            who = tasks.identity(task)
            notes.append(f"pid {who.pid} {who.comm}: its stack is unreadable ({e})")
        except stacks.TaskInUserSpace as e:
            notes.append(str(e))
    return found, notes


class KlpFrames(Command):
    """Decode kernel stacks through live-patch trampolines: frames, TOC slots, call sites,
    livepatch-stack entries, and anything inconsistent."""

    name = "klp-frames"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        who = parser.add_mutually_exclusive_group()
        who.add_argument("--all", action="store_true", help="every vCPU (gdb thread)")
        who.add_argument("--task", metavar="PID|ADDR", help="any task, running or asleep (needs DWARF)")
        who.add_argument("--all-tasks", action="store_true", help="every task, running or asleep (needs DWARF)")
        parser.add_argument("--json", action="store_true", help="print the same as JSON")

    def run(self, args: argparse.Namespace) -> None:
        kernel = current_kernel()
        target.require_target()
        found, notes = [], []
        if args.task:
            vcpus.select_kernel_vcpu()
            found.append(stacks.stack_of_task(kernel, tasks.find_task(kernel, args.task)))
        elif args.all_tasks:
            found, notes = every_task(kernel)
        elif args.all:
            for label, state in vcpus.each_vcpu():
                elsewhere = vcpus.user_context(state)
                if elsewhere:
                    notes.append(f"{label}: {elsewhere} (no kernel stack in use)")
                else:
                    found.append(stacks.running_stack(kernel, label, state))
        else:
            state = vcpus.vcpu_state()
            elsewhere = vcpus.user_context(state)
            if elsewhere:
                raise GdbklpError(f"{vcpus.label()} is {elsewhere}: use --all or --task")
            found.append(stacks.running_stack(kernel, vcpus.label(), state))
        view = kernel.view()
        if args.json:
            gdb.write(json.dumps({"stacks": [s.to_dict() for s in found], "notes": notes}, indent=1) + "\n")
            return
        for note in notes:
            gdb.write(note + "\n")
        for s in found:
            gdb.write(styled(s.format_text(view)) + "\n")


KlpFrames()
