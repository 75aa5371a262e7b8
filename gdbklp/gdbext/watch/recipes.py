"""What the recorder plugin reads at the merged design's probe points, so
that a record holds everything the checks of that point read at a stop.

The reads are a small program the plugin runs at each hit: addresses come
from the recorded registers or from words read just before (the task from
the PACA, then its livepatch_sp), so nothing depends on gdb. Everything a
check reads beyond the record fails loudly (NotRecorded), never
silently from the live guest.
"""

from gdbklp.abi import ppc, rfc
from gdbklp.abi.designs import CodePoint
from gdbklp.abi.invariants import ReturnSample
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import target, tasks
from gdbklp.gdbext.watch.guards import MESSAGE_BYTES, PC_OF_GUEST_DOWN, PT_REGS_NIP
from gdbklp.gdbext.watch.probes import RECORDED_REGISTERS, ProbePoint, Recipe
from gdbklp.recorder import Read, Source
from gdbklp.sieve import MemoKey
from gdbklp.snapshot import NotRecorded

# the livepatch stack is read from the stack's base up to its top entry:
# this much at most (the deepest nesting seen in the lab is 3 entries)
MAX_LIVEPATCH_BLOCK = 1024
# the used top of the stack, for the balance walk of nested redirections
# (from r1 to the stack's top: a system call's stack in the lab uses about
# a kilobyte); a deeper stack is a NotRecorded error for that check only
STACK_TOP_WINDOW = 2048
R1, R3, R13, LR = (RECORDED_REGISTERS.index(name) for name in ("r1", "r3", "r13", "lr"))


def u64(data: bytes) -> int:
    return int.from_bytes(data[:8], "little")


def reads_of(record, count: int) -> list[tuple[int, bytes]]:
    """The record's first count reads as (address, bytes); NotRecorded for
    one the plugin could not make (what a stop meets as a memory error)."""
    found = record.reads[:count]
    for address, data in found:
        if data is None:
            raise NotRecorded(f"the recorder could not read {address:#x}")
    return found


def task_fields(watch) -> tuple[int, int] | None:
    """[start, end) in task_struct of what the checks read of the task after
    the state: its identity and its patch_state (None: nothing, no DWARF)."""
    spans = []
    layout = tasks.identity_layout()
    if layout is not None:
        spans += [(offset, offset + size) for offset, size in layout.values()]
    if watch.consistency:
        offset = target.dwarf_offset("struct task_struct", "patch_state")
        spans.append((offset, offset + 4))
    if not spans:
        return None
    return min(start for start, _ in spans), max(end for _, end in spans)


def running_task(watch) -> Read:
    """Read 0 of every recipe: the task, from the PACA (r13)."""
    return Read(Source.register(R13), offset=tasks.paca_current_offset(watch.kernel), length=8)


def task_fields_read(watch) -> list[Read]:
    """The block of the task (read 0) its checks read after the state, if any."""
    fields = task_fields(watch)
    return [Read(Source.read(0), offset=fields[0], length=fields[1] - fields[0])] if fields else []


def transition_patch_read(watch) -> list[Read]:
    """klp_transition_patch, which the consistency check reads (if it runs)."""
    if not watch.consistency:
        return []
    # an absolute address: the plugin adds the offset to 0 modulo 2**64
    address = target.dwarf_address("klp_transition_patch")
    return [Read(Source(), offset=address - (1 << 64) if address >> 63 else address, length=8)]


def task_and_livepatch_sp(watch) -> list[Read]:
    """Reads 0 and 1: the task, then its livepatch_sp."""
    return [running_task(watch), Read(Source.read(0), offset=watch.layout.ti_livepatch_sp, length=8)]


def p3_recipe(watch) -> Recipe:
    """At P3: what read_return_state reads at a stop (task, livepatch_sp, the
    livepatch stack, A's frame header) and what the checks after it read
    (the top of the stack, the task's identity and patch_state,
    klp_transition_patch)."""
    layout, thread_size = watch.layout, watch.thread_size
    reads = task_and_livepatch_sp(watch) + [
        Read(Source.register(R1), mask=ppc.MASK64 & ~(thread_size - 1), length=MAX_LIVEPATCH_BLOCK,
             end=Source.read(1), end_offset=layout.entry_size),
        Read(Source.register(R1), length=32),
        Read(Source.register(R1), mask=ppc.MASK64 & ~(thread_size - 1), offset=thread_size - STACK_TOP_WINDOW,
             length=STACK_TOP_WINDOW),
    ]
    reads += task_fields_read(watch) + transition_patch_read(watch)

    def state(record) -> ReturnSample:
        (task_slot, task), (_, livepatch_sp), (base, block), (_, header) = reads_of(record, 4)
        sp = record.registers["r1"]
        top = u64(livepatch_sp) + layout.entry_size
        if not base < top <= base + thread_size:
            block = block[:8]  # what a stop reads of a livepatch_sp outside the stack
        elif top - base > len(block):
            raise NotRecorded(f"the livepatch stack of task {u64(task):#x} is deeper than the "
                                     f"{MAX_LIVEPATCH_BLOCK} bytes recorded")
        return ReturnSample(u64(task), record.vcpu, sp, u64(livepatch_sp), base, block, header, task_slot)

    # what state() makes the ReturnSample from, but the frame header's bytes
    # the checks may not read
    memo_key = MemoKey(("r1",), ((0, None), (1, None), (2, None), (3, ReturnSample.HEADER_ALWAYS_READ)))
    return Recipe(tuple(reads), state, memo_key)


def p1_recipe(watch, make_state) -> Recipe:
    """At P1 (--resolve-indirect): the task, its new livepatch-stack entry, C in CTR."""
    entry_size = watch.layout.entry_size

    def state(record):
        (_, task), (_, livepatch_sp) = reads_of(record, 2)
        return make_state(u64(task), u64(livepatch_sp) - entry_size, record.registers["ctr"])

    return Recipe(tuple(task_and_livepatch_sp(watch)), state)


def rfc_redirect_recipe(watch, make_state) -> Recipe:
    """At the RFC redirect path's entry (P1): its registers, the task, A's
    frame header (make_state: rfc.RedirectSample)."""
    reads = (running_task(watch), Read(Source.register(R1), length=rfc.ELFV2_HEADER_BYTES),
             *task_fields_read(watch))

    def state(record):
        (_, task), (_, header) = reads_of(record, 2)
        r = record.registers
        ra = r["lr"]
        return make_state(u64(task), record.vcpu, ra, r["r0"], r["r1"], r["r2"], r["ctr"],
                          ppc.words(target.read_memory(ra, 4))[0], header)  # from the code image

    return Recipe(reads, state)


def rfc_helper_recipe(watch) -> Recipe:
    """At the RFC return helper (P3): the task, and the mini frame and A's
    header above r1."""
    length = watch.trampoline.mini_frame + rfc.ELFV2_HEADER_BYTES
    reads = (running_task(watch), Read(Source.register(R1), length=length), *task_fields_read(watch))

    def state(record):
        (_, task), _ = reads_of(record, 2)
        return u64(task), record.registers["r1"]

    return Recipe(reads, state)


def guard_recipe(watch, point: ProbePoint) -> Recipe:
    """At a guard point, what its check reads at a stop: at an ftrace exit
    for a call not redirected, the task (its identity and patch_state),
    klp_transition_patch and the out-of-line stub LR returns into; at die()
    or panic(), the task and the message (die's pt_regs' nip too); at a
    module list change, nothing: the list is read again at a pause."""
    if point.point == CodePoint.MODULES:
        return Recipe((), lambda record: None)
    reads = [running_task(watch), *task_fields_read(watch)]
    if point.point == CodePoint.FTRACE_EXIT:
        reads += transition_patch_read(watch) + [Read(Source.register(LR), offset=-8, length=16)]
    elif point.point == CodePoint.GUEST_DOWN:
        reads.append(Read(Source.register(R3), length=MESSAGE_BYTES))
        regs = PC_OF_GUEST_DOWN[point.label]
        if regs is not None:
            reads.append(Read(Source.register(RECORDED_REGISTERS.index(regs)), offset=PT_REGS_NIP, length=8))
    else:
        raise GdbklpError(f"--record: no recipe for the guard point {point.label} ({point.point})")
    return Recipe(tuple(reads), lambda record: None)
