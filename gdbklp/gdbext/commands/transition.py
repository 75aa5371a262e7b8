"""klp-transition: a live-patch transition's progress, per task (invariant 12).

While a patch is in transition each task runs the old or the new functions
according to its own patch_state; the kernel switches a task only when none
of the functions being replaced is on its stack. This shows which tasks are
not switched yet and what holds each back (a replaced function on its
stack), and flags a task already switched while such a function is still on
its stack. Needs DWARF (task_struct.patch_state, the klp structures).
"""

import argparse
import json

import gdb

from gdbklp.abi.invariants import PATCH_STATE_NAMES, check_switched_task, replaced_on_stack
from gdbklp.gdbext.commands.base import Command
from gdbklp.gdbext.commands.style import styled
from gdbklp.gdbext.inferior import patches, stacks, target, tasks, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel


def transition_state(kernel: Kernel) -> dict:
    """The transition in progress (or none), its tasks, and what holds them."""
    transition = patches.transition_in_progress(kernel)
    if transition is None:
        return {"in_transition": False}
    patch, goal, replaced = transition
    pending, violations = [], []
    for task in tasks.all_tasks():
        who = tasks.identity(task)
        state = patches.patch_state(task)
        record = {"task": task, "pid": who.pid, "comm": who.comm,
                  "patch_state": PATCH_STATE_NAMES.get(state, str(state))}
        try:
            frames = stacks.stack_of_task(kernel, task).walk.frames
        except gdb.MemoryError as e:
            # a task exiting while the guest was stopped: its stack may be freed
            # already, and its saved stack pointer leads nowhere
            frames, record["unreadable"] = [], f"its stack is unreadable ({e})"
        except stacks.TaskInUserSpace:
            frames = []  # running user code: no kernel function of it is on its stack
        holders = record["held_by"] = replaced_on_stack([f.function for f in frames], replaced)
        if state != goal:
            pending.append(record)
        elif "unreadable" not in record and check_switched_task(state, goal, holders):
            violations.append(record)
    return {"in_transition": True, "patch": patch["mod"]["name"].string(), "target_state": PATCH_STATE_NAMES[goal],
            "replaced": sorted(replaced), "pending": pending, "switched_too_early": violations}


def format_state(data: dict) -> str:
    if not data["in_transition"]:
        return "klp-transition: no live-patch transition in progress"
    lines = [f"klp-transition: {data['patch']} going to {data['target_state']}; "
             f"tasks not switched yet: {len(data['pending'])}"]
    for t in data["pending"]:
        held = ", ".join(t["held_by"]) or t.get("unreadable") \
            or "nothing replaced on its stack (switches at its next chance)"
        lines.append(f"  pid {t['pid']:>6} {t['comm']:<16} {t['patch_state']:<14} held by: {held}")
    for t in data["switched_too_early"]:
        lines.append(f"  VIOLATION of invariant 12: pid {t['pid']} {t['comm']} is {t['patch_state']} "
                     f"while {', '.join(t['held_by'])} is on its stack")
    return "\n".join(lines)


class KlpTransition(Command):
    """Show a live-patch transition's progress per task and what holds each task back."""

    name = "klp-transition"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--json", action="store_true", help="print the same as JSON")

    def run(self, args: argparse.Namespace) -> None:
        kernel = current_kernel()
        kernel.require_live_patching("klp_transition_patch")
        target.require_target()
        vcpus.select_kernel_vcpu()
        data = transition_state(kernel)
        gdb.write((json.dumps(data, indent=1) if args.json else styled(format_state(data))) + "\n")


KlpTransition()
