"""Tasks: which one runs on a vCPU, who a task_struct is now, every task, a task's stack.

A task_struct is freed when its task exits and its memory is soon reused
by a new task with another pid; a task that execs keeps its task_struct and
pid but gets a new comm. So identity is read again at every stop, never
kept across one: each event is reported with the task as it was then.
"""

import gdb

from gdbklp.abi.kernel import TaskIdentity
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.events import RAN, cache_until
from gdbklp.gdbext.inferior import target
from gdbklp.gdbext.inferior.kernel import Kernel

TASK = "struct task_struct"
IDENTITY_FIELDS = ("pid", "comm", "self_exec_id")


@cache_until("objfile")
def identity_layout() -> dict[str, tuple[int, int]] | None:
    """field -> (offset, size) in task_struct of what identifies a task, with DWARF."""
    layout = {}
    for name in IDENTITY_FIELDS:
        offset, size = target.dwarf_offset(TASK, name), target.dwarf_size(TASK, name)
        if offset is None or size is None:
            return None
        layout[name] = (offset, size)
    return layout


# one read of the gdbstub (gdb splits larger ones): what the identity and
# another task_struct field cost when they lie within it
ONE_READ = 2048


def _identity_span(layout: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return (min(offset for offset, _ in layout.values()), max(offset + size for offset, size in layout.values()))


def _identity_of(task: int, field) -> TaskIdentity:
    """The identity from field(name), the bytes of each of IDENTITY_FIELDS."""
    return TaskIdentity(task, int.from_bytes(field("pid"), "little", signed=True),
                        field("comm").split(b"\0")[0].decode(errors="replace"),
                        int.from_bytes(field("self_exec_id"), "little"))


def _identity_from(task: int, layout: dict[str, tuple[int, int]], block: bytes, start: int) -> TaskIdentity:
    return _identity_of(task, lambda name: block[layout[name][0] - start:sum(layout[name]) - start])


@cache_until(*RAN)
def identity(task: int) -> TaskIdentity:
    """Who the task_struct at task is now: pid, comm and exec generation, in one
    read; (pid -1, comm '?') without DWARF or when it cannot be read."""
    layout = identity_layout()
    if layout is None:
        return TaskIdentity(task)
    if target.reading_a_recording():
        # field by field: no packet to save, and a check's verdict then depends
        # (record mode's memo) on these fields, not on the counters between them
        return _identity_of(task, lambda name: target.read_memory(task + layout[name][0], layout[name][1]))
    start, end = _identity_span(layout)
    try:
        return _identity_from(task, layout, target.read_memory(task + start, end - start), start)
    except gdb.MemoryError:
        return TaskIdentity(task)


def read_task_field(task: int, offset: int, length: int) -> bytes:
    """task_struct bytes [offset, offset + length), read together with the task's
    identity when both lie within one read (identity() then costs nothing)."""
    layout = identity_layout()
    if layout is None or (task,) in identity.cache:
        return target.read_memory(task + offset, length)
    start, end = _identity_span(layout)
    start, end = min(start, offset), max(end, offset + length)
    if end - start > ONE_READ:
        return target.read_memory(task + offset, length)
    block = target.read_memory(task + start, end - start)
    identity.cache[(task,)] = _identity_from(task, layout, block, start)
    return block[offset - start:offset - start + length]


@cache_until("objfile")
def paca_current_offset(kernel: Kernel) -> int:
    """Where the PACA (r13) keeps the running task: decoded from livepatch_handler's
    first load where the kernel has it, else from DWARF."""
    if kernel.symbols.address("livepatch_handler") is not None:
        return kernel.livepatch_layout().paca_thread_info
    offset = target.dwarf_offset("struct paca_struct", "__current")
    if offset is None:
        raise GdbklpError("finding the running task needs livepatch_handler or DWARF")
    return offset


def task_slot(kernel: Kernel, r13: int) -> int:
    """Where the PACA at r13 holds the pointer to the task it runs."""
    return r13 + paca_current_offset(kernel)


@cache_until(*RAN)
def on_cpus(kernel: Kernel, cpus: int) -> dict[int, int]:
    """task -> the CPU it runs on, for CPUs 0 to cpus - 1, from each CPU's PACA
    (paca_ptrs[cpu]->__current: right whatever the vCPU runs, user code
    included, where r13 is the user's); empty without DWARF for paca_ptrs.
    Read through the selected vCPU, which must run kernel code."""
    array = target.dwarf_address("paca_ptrs")
    if array is None:
        return {}
    offset = paca_current_offset(kernel)
    pacas = target.read_u64(array)
    found = {}
    for cpu in range(cpus):
        paca = target.read_u64(pacas + 8 * cpu)
        if paca:
            found[target.read_u64(paca + offset)] = cpu
    return found


def running_task(kernel: Kernel, r13: int) -> int:
    """The task_struct a vCPU in kernel mode runs, from its PACA (r13)."""
    return target.read_u64(task_slot(kernel, r13))


def current_task(kernel: Kernel) -> int:
    """The task the selected vCPU runs (in kernel mode)."""
    return running_task(kernel, target.register("r13"))


def all_tasks() -> list[int]:
    """Every task_struct (threads included), from init_task's lists (needs DWARF):
    each process on init_task.tasks, its threads on signal->thread_head (every
    kernel since 3.14; task_struct.thread_group is gone from 6.7 on)."""
    out = {}
    for proc in [gdb.parse_and_eval("init_task"), *target.kernel_list("&init_task.tasks", TASK, "tasks")]:
        out[int(proc.address)] = None
        for thread in target.kernel_list(proc["signal"]["thread_head"].address, TASK, "thread_node"):
            out[int(thread.address)] = None
    return list(out)


def find_task(kernel: Kernel, spec: str) -> int:
    """task_struct address of the task that has pid spec now (or an address given as 0x...)."""
    if spec.startswith("0x"):
        return int(spec, 16)
    if not kernel.has_dwarf:
        raise GdbklpError("--task PID needs DWARF (a vmlinux built with debug info)")
    try:
        pid = int(spec)
    except ValueError:
        raise GdbklpError(f"--task takes a pid or a task_struct address, not '{spec}'") from None
    for task in all_tasks():
        if identity(task).pid == pid:
            return task
    raise GdbklpError(f"no task with pid {pid}")


def task_stack(task: int) -> int | None:
    """task->stack, the bottom of the task's own kernel stack (needs DWARF)."""
    offset = target.dwarf_offset(TASK, "stack")
    return target.read_u64(task + offset) if offset is not None else None


def saved_sp(task: int) -> int | None:
    """task->thread.ksp: r1 of a task that is not running, as _switch left it (needs DWARF)."""
    offset = target.dwarf_offset(TASK, "thread.ksp")
    return target.read_u64(task + offset) if offset is not None else None
