"""The stack walker on a distribution kernel: Debian's own 6.12 (no live
patching), replayed from stack images captured in the lab's QEMU
(tests/data/distribution/capture.py).

- a task asleep in a system call ends at its entry from user space, with the
  user pc and sp of the pt_regs the kernel keeps for it (task->thread.regs);
  a back chain that does not rise inside the kernel is still a loop;
- a TOC save slot is a TOC only when it holds one or its frame's call site
  wrote it; else it is shown as unused, and is no problem;
- stopped at ftrace_caller's entry and inside it (function tracing on for
  vfs_read), the walk shows the traced function and its caller, from r0 and
  then from ftrace's frame, decoded from the kernel's own ftrace_caller.
"""

import dataclasses
from pathlib import Path

import pytest
from images import StackImage

from gdbklp.abi import elf, ppc
from gdbklp.abi.frames import from_user
from gdbklp.abi.kernel import PRE_6_2_INTERRUPT_FRAME, ObjectInfo

DATA = Path(__file__).parent / "data" / "distribution"
NIP, GPR1 = 256, 8  # pt_regs->nip and ->gpr[1] (struct user_pt_regs, a user-space ABI)


def distribution_image(name: str, code_edit=None) -> StackImage:
    """A captured task of the distribution kernel, with the kernel's code its
    view is decoded from (the system call entry, the ftrace trampolines)."""
    return StackImage(name, DATA, code_edit)


def names(stack):
    return [f.function.split("+")[0] for f in stack.walk.frames]


# ---- the entry from user space -------------------------------------------------------

def test_a_task_in_a_system_call_ends_at_its_entry_from_user_space():
    image = distribution_image("user-entry")
    stack = image.decode()
    user_regs = image.data["thread_regs"]  # task->thread.regs: the pt_regs of its user context
    assert stack.walk.end == from_user(image.u64(user_regs + NIP), image.u64(user_regs + GPR1))
    assert stack.walk.complete and "loop" not in stack.walk.end
    entry = stack.walk.frames[-1]
    assert entry.kind == "interrupt" and entry.function.startswith("user 0x")
    assert entry.sp + image.view.interrupt_frame.regs_offset == user_regs
    assert names(stack)[-2] == "system_call_exception"
    assert stack.problems == []


def test_the_interrupt_frame_layout_is_decoded_from_the_system_call_entry():
    image = distribution_image("user-entry")
    # 6.2 on: STACK_INT_FRAME_MARKER = STACK_FRAME_MIN_SIZE, STACK_INT_FRAME_REGS = it + 16
    assert (image.view.interrupt_frame.marker_offset, image.view.interrupt_frame.regs_offset) == (32, 48)


def test_the_system_call_entry_without_its_pt_regs_pointer_is_refused():
    def drop_regs_pointer(code):
        entry, data = code["system_call_common"]
        words = [ppc.NOP if ppc.is_addi(w, rt=3, ra=1) else w for w in ppc.words(data)]
        code["system_call_common"] = (entry, b"".join(w.to_bytes(4, "little") for w in words))

    with pytest.raises(ValueError, match=r"system_call_common \(0x[0-9a-f]+\) calls system_call_exception at"):
        distribution_image("user-entry", drop_regs_pointer)


def test_with_the_pre_6_2_layout_the_user_entry_is_a_false_loop():
    """What the walker did before it read the layout from the kernel: the
    marker is not where it looked, and the back chain into user space 'loops'."""
    image = distribution_image("user-entry")
    image.view.interrupt_frame = PRE_6_2_INTERRUPT_FRAME
    assert image.decode().walk.end.endswith(": loop")


def test_a_back_chain_that_does_not_rise_inside_the_kernel_is_still_a_loop():
    image = distribution_image("user-entry")
    kernel_frames = [f.sp for f in image.decode().walk.frames if f.kind == "caller"]
    sp = kernel_frames[3]
    image.put_u64(sp, kernel_frames[1])  # back to a frame below it
    assert image.decode().walk.end == f"back chain at {sp:#x} does not rise ({kernel_frames[1]:#x}): loop"
    image.put_u64(sp, sp)
    assert image.decode().walk.end == f"back chain at {sp:#x} does not rise ({sp:#x}): loop"


# ---- TOC save slots --------------------------------------------------------------------

def raw_toc_slot(image, frame) -> int:
    return image.u64(frame.sp + 24)


def test_toc_slots_are_a_toc_only_when_they_hold_one():
    image = distribution_image("user-entry")
    stack = image.decode()
    vmlinux_toc = image.view.objects[0].toc
    for f in stack.walk.frames:
        if f.kind != "caller":
            continue
        raw = raw_toc_slot(image, f)
        if raw == vmlinux_toc:
            assert (f.toc_save, f.toc_owner, f.toc_slot_unused) == (raw, "vmlinux", False)
        elif f.call_site in ("indirect", "global"):
            assert f.toc_save == raw  # the call site reloads r2 from it: the slot was written
        else:
            assert (f.toc_save, f.toc_slot_unused) == (None, True), f
    unused = [f for f in stack.walk.frames if f.toc_slot_unused]
    assert unused, "the image has frames whose slot was never written"
    text = stack.format_text(image.view)
    for f in unused:
        assert f"toc-save {raw_toc_slot(image, f):#x}" not in text
    assert "toc-slot unused" in text and "toc-save " in text
    assert stack.problems == []


def test_a_slot_holding_a_modules_toc_is_that_modules():
    image = distribution_image("user-entry")
    frame = next(f for f in image.decode().walk.frames if f.toc_slot_unused)
    value = raw_toc_slot(image, frame)
    image.view.objects.append(ObjectInfo("some_module", 0xC008000000000000, 0x10000, elf.SymbolTable([], "m"), value))
    again = image.decode().walk.frames[frame.index]
    assert (again.toc_save, again.toc_owner, again.toc_slot_unused) == (value, "some_module", False)


def test_a_slot_written_by_an_indirect_call_site_is_a_toc_whatever_it_holds():
    image = distribution_image("user-entry")
    frame = next(f for f in image.decode().walk.frames if f.call_site == "indirect")
    image.put_u64(frame.sp + 24, 0x1234)
    again = image.decode().walk.frames[frame.index]
    assert (again.toc_save, again.toc_owner, again.toc_slot_unused) == (0x1234, None, False)


# ---- ftrace_caller -----------------------------------------------------------------------

def bl_target_before(image, ra: int) -> int | None:
    word = int.from_bytes(image.read(ra - 4, 4), "little")
    return ppc.branch_target(word, ra - 4) if ppc.is_bl(word) else None


def assert_traced_call(image, stack, a_sp: int, ra: int):
    frames = stack.walk.frames
    assert frames[0].function.startswith("ftrace_call")
    assert [f.kind for f in frames[1:3]] == ["traced", "caller"]
    traced, caller = frames[1], frames[2]
    assert traced.function.startswith("vfs_read+") and caller.function.startswith("ksys_read+")
    assert (caller.pc, caller.sp) == (ra, a_sp)
    # A's code calls B just before the return address (a local call enters after B's global entry)
    b = image.view.function_start(traced.pc)
    assert bl_target_before(image, caller.pc) in (b, b + 8)
    assert stack.walk.end.startswith("entered from user space") and stack.problems == []


def test_at_ftrace_callers_entry_the_caller_comes_from_r0():
    image = distribution_image("ftrace-entry")
    stack = image.decode()
    assert stack.walk.frames[1].pc == image.regs.lr  # the site in B
    assert_traced_call(image, stack, a_sp=image.regs.sp, ra=image.regs.r0)
    assert "return address from r0" in stack.walk.frames[2].notes[0]


def test_without_the_trampolines_model_the_caller_is_missing():
    image = distribution_image("ftrace-entry")
    image.view.traced_calls = None
    assert image.regs.r0 not in [f.pc for f in image.decode().walk.frames]


def test_inside_ftrace_caller_the_caller_comes_from_its_frame():
    image = distribution_image("ftrace-inside")
    state = image.view.traced_calls.at(image.regs.pc)
    a_sp = image.regs.sp - state.frame
    assert state.frame < 0 and state.ra_slots  # the frame is built and RA saved in it
    ra = image.u64(a_sp + 16)  # A's own LR save slot, where ftrace_caller put RA
    assert_traced_call(image, image.decode(), a_sp=a_sp, ra=ra)
    # without r0 and LR (an outer frame's registers): the same, from ftrace's frame alone
    image.regs = dataclasses.replace(image.regs, r0=None, lr=None)
    stack = image.decode()
    assert_traced_call(image, stack, a_sp=a_sp, ra=ra)
    assert "the trampoline's frame at" in stack.walk.frames[2].notes[0]


def test_ftrace_slots_that_disagree_are_refused_not_guessed():
    image = distribution_image("ftrace-inside")
    state = image.view.traced_calls.at(image.regs.pc)
    a_sp = image.regs.sp - state.frame
    image.put_u64(a_sp + 16, 0xC000000000000BAD)  # one copy of RA changed (as a tracer may)
    walk = image.decode().walk
    assert walk.end.startswith(f"ftrace_caller at {image.regs.pc:#x}: the return address into the traced "
                               "function's caller differs between ")
    assert "0xc000000000000bad" in walk.end


def test_ftrace_code_the_decoder_does_not_model_is_refused_with_its_address():
    sync = 0x7C0004AC  # hwsync: nothing the walk models

    def unmodelled_second_instruction(code):
        address, data = code["ftrace_caller"]
        code["ftrace_caller"] = (address, data[:4] + sync.to_bytes(4, "little") + data[8:])

    image = distribution_image("ftrace-inside", unmodelled_second_instruction)
    entry = image.code["ftrace_caller"][0]
    walk = image.decode().walk
    assert walk.end == f"ftrace_caller: cannot model `sync` ({sync:#010x}) at {entry + 4:#x}"
    assert image.view.traced_calls.at(entry) is not None and not isinstance(image.view.traced_calls.at(entry), str)


def test_stopped_in_the_entry_code_on_the_interrupt_frame_itself():
    """A vCPU in system_call_vectored_common after its r1 moved to the kernel
    stack: the current frame is the interrupt frame, whose back chain is the
    user's r1."""
    image = distribution_image("user-entry")
    entry = image.decode().walk.frames[-1]
    image.regs = dataclasses.replace(image.regs, sp=entry.sp)
    stack = image.decode()
    user_regs = image.data["thread_regs"]
    assert [f.kind for f in stack.walk.frames] == ["current", "interrupt"]
    assert stack.walk.end == from_user(image.u64(user_regs + NIP), image.u64(user_regs + GPR1))
