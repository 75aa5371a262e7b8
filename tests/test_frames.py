"""The stack walker and livepatch-stack checks, replayed on stacks captured from the lab.

Each image is a real task of the lab guest: stopped at the entry of a call
kind's replacement C (entered from livepatch_handler), or asleep inside C.
The corrupted variants change one thing in a real image.
"""

import dataclasses

import pytest

from gdbklp.abi import ppc
from gdbklp.abi.frames import HEADER_AND_MARKER_BYTES
from gdbklp.abi.invariants import check_balance
from gdbklp.lab.workload import CALLER_CALL_SITE as CALL_SITE
from gdbklp.lab.workload import KINDS, caller_of
from images import StackImage


@pytest.mark.parametrize("kind", KINDS)
def test_inside_c_shows_the_caller_from_the_livepatch_stack(kind):
    image = StackImage(f"inside-c-{kind}")
    stack = image.decode()
    frames = stack.walk.frames
    assert frames[0].kind == "current"
    assert frames[0].function.startswith(f"klp_lab_c_{kind} ")  # at C's entry: "klp_lab_c_x [klp_lab_patch]"
    assert frames[1].kind == "trampoline"
    assert frames[1].pc == image.view.livepatch.return_point
    assert frames[2].kind == "livepatch-caller"
    assert frames[2].function.startswith(caller_of(kind) + "+")
    assert frames[2].call_site == CALL_SITE[kind]
    assert frames[2].sp == frames[1].sp == image.regs.sp  # the handler has no frame of its own
    # the entry A returns through, with A's TOC for a local call
    (entry,) = stack.livepatch.entries
    assert entry.ra == frames[2].pc
    assert entry.magic == ppc.STACK_END_MAGIC
    assert frames[2].toc == entry.toc
    if CALL_SITE[kind] in ("local", "local_other"):
        assert image.view.object_at(entry.ra).toc == entry.toc
    assert stack.problems == []
    # the walk reaches the write() system call's interrupt frame from user space
    assert frames[-1].kind == "interrupt"
    assert stack.walk.end.startswith(f"entered from user space (user pc {frames[-1].pc:#x}, sp 0x")
    assert stack.walk.complete
    assert any(f.function.startswith("run_calls") or f.function.startswith("call_kind") for f in frames)


def test_global_caller_saved_its_toc_in_its_frame():
    stack = StackImage("inside-c-global").decode()
    a = stack.walk.frames[2]
    # the module stub stored A's TOC at 24(A's sp): the TOC of klp_lab_caller
    assert a.toc_owner == "klp_lab_caller"
    # while the livepatch stack holds the TOC B's global entry computed (the target module's)
    assert stack.livepatch.entries[0].toc != a.toc_save


def test_asleep_in_c():
    image = StackImage("asleep-in-c-local")
    stack = image.decode()
    names = [f.function.split("+")[0].split(" ")[0] for f in stack.walk.frames]
    kinds = [f.kind for f in stack.walk.frames]
    assert "msleep" in names
    c = names.index("klp_lab_c_local")
    assert kinds[c + 1:c + 3] == ["trampoline", "livepatch-caller"]
    assert names[c + 2] == "klp_lab_a_local"
    assert stack.problems == []
    assert len(stack.livepatch.entries) == 1


def frame_sps(image):
    return [f.sp for f in image.decode().walk.frames if f.kind == "caller"]


def test_loop_in_the_back_chain_ends_the_walk():
    image = StackImage("inside-c-local")
    sp = frame_sps(image)[2]
    image.put_u64(sp, sp)  # points to itself
    walk = image.decode().walk
    assert walk.end == f"back chain at {sp:#x} does not rise ({sp:#x}): loop"


def test_misaligned_back_chain():
    image = StackImage("inside-c-local")
    sp = frame_sps(image)[1]
    image.put_u64(sp, image.u64(sp) + 8)
    assert image.decode().walk.end.startswith("misaligned stack pointer")


def test_back_chain_out_of_the_stack():
    image = StackImage("inside-c-local")
    sp = frame_sps(image)[1]
    image.put_u64(sp, image.base + image.view.thread_size + 0x100)
    assert "outside the task's stack" in image.decode().walk.end


def test_unreadable_frame():
    image = StackImage("inside-c-local")
    sp = frame_sps(image)[3]
    image.unreadable.append((sp, sp + 8))
    walk = image.decode().walk
    # the walk stops at the first frame whose header block (back chain to the
    # interrupt marker) reaches the unreadable bytes
    first = next(f for f in frame_sps(StackImage("inside-c-local")) if f + HEADER_AND_MARKER_BYTES > sp)
    assert walk.end.startswith(f"cannot read the frame at {first:#x}: cannot access memory")
    assert len(walk.frames) > 3 and all(f.sp < first for f in walk.frames)  # what came before is kept


def lp_entry(image):
    stack = image.decode()
    return stack.livepatch.entries[0]


def entry_problems(image):
    return image.decode().livepatch.entry_problems


def test_corrupted_magic():
    image = StackImage("inside-c-local")
    e = lp_entry(image)
    image.put_u64(e.address + 16, 0xDEADBEEF)
    assert entry_problems(image) == {e.address: [f"magic 0xdeadbeef instead of {ppc.STACK_END_MAGIC:#x}"]}


def test_wrong_saved_toc_for_a_local_caller():
    image = StackImage("inside-c-local")
    e = lp_entry(image)
    vmlinux_toc = image.view.objects[0].toc
    image.put_u64(e.address, vmlinux_toc)
    (problem,) = entry_problems(image)[e.address]
    assert problem.startswith(f"saved TOC {vmlinux_toc:#x} (vmlinux) is not the TOC of the local "
                              "caller's object klp_lab_target")


def test_saved_return_address_not_after_a_call():
    image = StackImage("inside-c-local")
    e = lp_entry(image)
    image.put_u64(e.address + 8, e.ra + 4)  # the instruction after the call site is no call
    (problem,) = entry_problems(image)[e.address]
    assert "does not follow a call" in problem


def test_livepatch_sp_above_the_stack_pointer():
    image = StackImage("inside-c-local")
    image.put_u64(image.livepatch_sp_slot, image.regs.sp + 0x100)
    stack = image.decode()
    assert stack.livepatch.problems[0].startswith("livepatch_sp ")
    assert "outside" in stack.livepatch.problems[0]


def test_livepatch_sp_unbalanced_leaves_a_trampoline_without_entry():
    image = StackImage("inside-c-local")
    image.put_u64(image.livepatch_sp_slot, image.u64(image.livepatch_sp_slot) - 24)
    stack = image.decode()
    assert stack.livepatch.entries == []
    assert any("returns into livepatch_handler but the livepatch stack has no entry" in p
               for p in stack.problems)


def test_stack_end_magic_overwritten():
    image = StackImage("inside-c-local")
    image.put_u64(image.base, 0)
    assert any(p.startswith("stack-end magic at") for p in image.decode().problems)


def test_text_rendering_names_frames_and_entries():
    text = StackImage("inside-c-global").decode().format_text(StackImage("inside-c-global").view)
    assert "livepatch-caller  [global]" in text
    assert "livepatch stack:" in text and "[0] at" in text
    assert text.rstrip().endswith("no problems")


def test_rfc_mini_frame_is_labelled():
    image = StackImage("inside-c-local")
    helper = image.view.livepatch.address - 0x100  # where an RFC kernel's KLP_return_helper would be
    image.view.klp_return_helper = helper
    sp = frame_sps(image)[1]
    image.put_u64(image.u64(sp) + 16, helper)  # the LR slot the walk reads next
    kinds = [f.kind for f in image.decode().walk.frames]
    assert "rfc-mini-frame" in kinds


def test_running_on_an_interrupt_stack_keeps_the_livepatch_stack_on_the_tasks_own():
    """r1 on another THREAD_SIZE-aligned stack (an IRQ stack): the frames are walked
    there, the livepatch stack is still read, and checked, at the task's own stack."""
    image = StackImage("inside-c-local")
    irq_stack = image.base + 16 * image.view.thread_size
    image.regs = dataclasses.replace(image.regs, sp=irq_stack + 0x3000)
    stack = image.decode()
    assert stack.stack_base == irq_stack
    assert stack.livepatch.base == image.base and len(stack.livepatch.entries) == 1
    assert not stack.livepatch.problems and not stack.livepatch.entry_problems


def test_balance_one_entry_per_redirection_in_flight():
    image = StackImage("asleep-in-c-local")
    stack = image.decode()
    assert check_balance(stack.livepatch.entries, stack.walk, "sample") == (None, set())
    # a second entry pushed and never popped: 2 entries, 1 trampoline frame
    slot = image.livepatch_sp_slot
    top = image.u64(slot)
    for offset in range(0, 24, 8):
        image.put_u64(top + offset, image.u64(top - 24 + offset))
    image.put_u64(slot, top + 24)
    stack = image.decode()
    violation, stale = check_balance(stack.livepatch.entries, stack.walk, "sample")
    assert (violation.invariant, violation.title) == (10, "livepatch stack unbalanced: pushed without pop "
                                                          "(seen by a sample)")
    assert stale == {top}
    # popped early: no entry for the trampoline frame
    image.put_u64(slot, top - 24)
    stack = image.decode()
    violation, stale = check_balance(stack.livepatch.entries, stack.walk, "sample")
    assert "popped early" in violation.title and stale == set()
