"""The kernel's live patches (needs DWARF): which function replaces which, which
patch is in transition, and each task's patch_state.

Patches are registered by their module's init, after the module is on the
list, so the function map is read again when a lookup misses, once per stop.
"""

import struct

import gdb

from gdbklp.errors import GdbklpError
from gdbklp.gdbext.events import RAN, cache_until
from gdbklp.gdbext.inferior import target
from gdbklp.gdbext.inferior.kernel import Kernel


def klp_funcs(patch: gdb.Value):
    """Every struct klp_func of a struct klp_patch."""
    for obj in target.kernel_list(patch["obj_list"].address, "struct klp_object", "node"):
        yield from target.kernel_list(obj["func_list"].address, "struct klp_func", "node")


def registered_patches():
    return target.kernel_list("&klp_patches", "struct klp_patch", "list")


@cache_until("modules", "objfile")
def _replacements(kernel: Kernel) -> dict[int, int]:
    if not kernel.has_dwarf:
        return {}
    return {int(func["old_func"]): int(func["new_func"]) for patch in registered_patches() for func in klp_funcs(patch)}


@cache_until(*RAN)
def fresh_replacements(kernel: Kernel) -> dict[int, int]:
    """replacements() read again, at most once per stop or probe hit: for a lookup
    that missed (a patch module loaded since the module list was checked); for
    a recorded state, the map as of the last stop (nothing can be read now)."""
    if target.reading_a_recording():
        return _replacements(kernel)
    kernel.modules.refresh()
    _replacements.cache.clear()
    return _replacements(kernel)


def replacements(kernel: Kernel) -> dict[int, int]:
    """old function (B) -> new function (C) of every registered klp_func."""
    kernel.modules.current()  # a module came or went: read the map again
    return _replacements(kernel)


def replacement_of(kernel: Kernel, patched: int | None) -> int | None:
    """C for B, or None if no registered patch replaces B."""
    if patched is None:
        return None
    found = replacements(kernel).get(patched)
    if found is None and kernel.has_dwarf:  # a patch registered since the map was read?
        found = fresh_replacements(kernel).get(patched)
    return found


# ---- the consistency model ------------------------------------------------------

def consistency_available(kernel: Kernel) -> bool:
    """Can the consistency model be read (klp_transition_patch and task_struct.patch_state in DWARF)?"""
    return (kernel.has_dwarf and target.dwarf_address("klp_transition_patch") is not None
            and target.dwarf_offset("struct task_struct", "patch_state") is not None)


def transition_patch() -> int:
    """klp_transition_patch: the patch in transition, or 0."""
    return target.read_u64(target.dwarf_address("klp_transition_patch"))


def patch_state(task: int) -> int:
    """task->patch_state."""
    offset = target.dwarf_offset("struct task_struct", "patch_state")
    return struct.unpack("<i", target.read_memory(task + offset, 4))[0]


def transition_in_progress(kernel: Kernel) -> tuple[gdb.Value, int, set[str]] | None:
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
    replaced = {kernel.function_name(int(func["old_func"] if goal == 1 else func["new_func"]))
                for func in klp_funcs(patch)}
    return patch, goal, replaced


def enabled_old_functions(kernel: Kernel) -> set[str]:
    """The functions that enabled patches replace, by name."""
    return {kernel.function_name(int(func["old_func"]))
            for patch in registered_patches() if patch["enabled"] for func in klp_funcs(patch)}
