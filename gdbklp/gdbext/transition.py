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
from gdbklp.gdbext import frames, target
from gdbklp.gdbext.commands import Command, GdbklpError


def transition_in_progress(kernel: target.Kernel) -> tuple[gdb.Value, int, set[str]] | None:
    """(the patch in transition, the state its tasks go to, the functions that
    must leave a task's stack before it switches), or None between transitions."""
    if not kernel.has_dwarf:
        raise GdbklpError("the consistency model needs DWARF (task_struct.patch_state): "
                          "this vmlinux has none")
    patch = gdb.parse_and_eval("klp_transition_patch")
    if int(patch) == 0:
        return None
    goal = int(gdb.parse_and_eval("klp_target_state"))
    # what must leave the stacks: the old functions when patching, the new ones when unpatching
    replaced = set()
    for obj in kernel.kernel_list(patch["obj_list"].address, "struct klp_object", "node"):
        for func in kernel.kernel_list(obj["func_list"].address, "struct klp_func", "node"):
            replaced.add(kernel.function_name(int(func["old_func"] if goal == 1 else func["new_func"])))
    return patch, goal, replaced


def enabled_old_functions(kernel: target.Kernel) -> set[str]:
    """The functions that enabled patches replace, by name (needs DWARF)."""
    return {kernel.function_name(int(func["old_func"]))
            for patch in kernel.kernel_list("&klp_patches", "struct klp_patch", "list") if patch["enabled"]
            for obj in kernel.kernel_list(patch["obj_list"].address, "struct klp_object", "node")
            for func in kernel.kernel_list(obj["func_list"].address, "struct klp_func", "node")}


def task_patch_state(task: int) -> int:
    return int(gdb.parse_and_eval(f"((struct task_struct *){task:#x})->patch_state"))


def transition_state(kernel: target.Kernel) -> dict:
    """The transition in progress (or none), its tasks, and what holds them."""
    transition = transition_in_progress(kernel)
    if transition is None:
        return {"in_transition": False}
    patch, goal, replaced = transition
    pending, violations = [], []
    for task in frames.all_tasks(kernel):
        pid, comm = kernel.task_identity(task)
        state = task_patch_state(task)
        holders = replaced_on_stack([f.function for f in frames.stack_of_task(kernel, task).walk.frames], replaced)
        record = {"task": task, "pid": pid, "comm": comm, "patch_state": PATCH_STATE_NAMES.get(state, str(state)),
                  "held_by": holders}
        if state != goal:
            pending.append(record)
        elif check_switched_task(state, goal, holders):
            violations.append(record)
    return {"in_transition": True, "patch": patch["mod"]["name"].string(), "target_state": PATCH_STATE_NAMES[goal],
            "replaced": sorted(replaced), "pending": pending, "switched_too_early": violations}


def format_state(data: dict) -> str:
    if not data["in_transition"]:
        return "klp-transition: no live-patch transition in progress"
    lines = [f"klp-transition: {data['patch']} going to {data['target_state']}; "
             f"tasks not switched yet: {len(data['pending'])}"]
    for t in data["pending"]:
        held = ", ".join(t["held_by"]) or "nothing replaced on its stack (switches at its next chance)"
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
        kernel = target.kernel()
        target.require_target()
        target.select_kernel_vcpu()
        data = transition_state(kernel)
        gdb.write((json.dumps(data, indent=1) if args.json else format_state(data)) + "\n")


KlpTransition()
