"""The one-stop return checks (gdbklp.abi.invariants) on real lab states.

At the entry of C the livepatch stack, r1 and A's frame are exactly what P3
sees when C returns cleanly, so the stack images captured there (see
capture_gdb.py) replay the checks; each fault of the lab is then made by
changing one value, as the fault flags of klp_lab_patch.ko do in the guest.
"""

import pytest

from gdbklp.abi import ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.invariants import (KLP_PATCHED, KLP_UNDEFINED, KLP_UNPATCHED, ReturnSample, CodeFacts,
                                   check_consistency, check_return, check_switched_task, frame_size_from_prologue,
                                   module_stub_target, replaced_on_stack)
from gdbklp.lab.workload import CALLER_CALL_SITE, KINDS, caller_of
from images import StackImage


def sample_of(image, sp=None, livepatch_sp=None) -> ReturnSample:
    L = image.u64(image.livepatch_sp_slot) if livepatch_sp is None else livepatch_sp
    sp = image.regs.sp if sp is None else sp
    top = L + 24
    return ReturnSample(image.task, 0, sp, L, image.base, image.read(image.base, top - image.base), image.read(sp, 32))


def check(image, sp=None, livepatch_sp=None):
    return check_return(sample_of(image, sp, livepatch_sp), CodeFacts(image.view, image.read))


@pytest.mark.parametrize("kind", KINDS)
def test_clean_return_of_every_kind(kind):
    result = check(StackImage(f"inside-c-{kind}"))
    assert result.violations == []
    assert result.caller.startswith(caller_of(kind) + "+")
    assert result.call_site.value == CALLER_CALL_SITE[kind]
    assert result.depth == 1
    # B from the call instruction (through the module stub for a global call)
    assert (result.patched is None) == (kind == "indirect")


def invariants(result):
    return [v.invariant for v in result.violations]


def top_entry(image):
    return image.u64(image.livepatch_sp_slot) - 24


def test_magic_overwritten():
    image = StackImage("inside-c-local")
    image.put_u64(top_entry(image) + 16, 0xDEADBEEF)
    result = check(image)
    assert invariants(result) == [8]
    assert result.violations[0].found == "0xdeadbeef"


def test_saved_toc_not_the_callers():
    image = StackImage("inside-c-local")
    patch_toc = next(o.toc for o in image.view.objects if o.name == "klp_lab_patch")
    image.put_u64(top_entry(image), patch_toc)
    result = check(image)
    assert invariants(result) == [9]
    assert "(klp_lab_patch)" in result.violations[0].found


def test_saved_return_address_past_the_call():
    image = StackImage("inside-c-local")
    image.put_u64(top_entry(image) + 8, image.u64(top_entry(image) + 8) + 4)
    result = check(image)
    assert invariants(result) == [9]
    assert "does not follow a call" in result.violations[0].title


def test_wrong_r1():
    image = StackImage("inside-c-local")
    result = check(image, sp=image.regs.sp + 16)
    assert invariants(result) == [9]
    assert result.violations[0].title == "r1 at the return from C is not A's stack pointer"


@pytest.mark.parametrize("kind", ["global", "indirect"])
def test_callers_toc_slot_clobbered(kind):
    image = StackImage(f"inside-c-{kind}")
    patch_toc = next(o.toc for o in image.view.objects if o.name == "klp_lab_patch")
    image.put_u64(image.regs.sp + 24, patch_toc)
    assert invariants(check(image)) == [3]


def test_toc_slot_of_a_local_caller_is_not_checked():
    image = StackImage("inside-c-local")  # a local caller never reloads r2 from 24(r1)
    image.put_u64(image.regs.sp + 24, 0x1234)
    assert invariants(check(image)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_checks_read_of_the_frame_header_only_the_back_chain_and_a_reloaded_toc_slot(kind):
    # and record mode's verdict memo keys on exactly these bytes (HEADER_ALWAYS_READ, toc_slot_read)
    clean = StackImage(f"inside-c-{kind}")
    site = CallSite(CALLER_CALL_SITE[kind])
    read = list(range(8)) + (list(range(24, 32)) if site.restores_toc else [])
    for offset in range(32):
        image = StackImage(f"inside-c-{kind}")
        word = image.regs.sp + offset // 8 * 8
        image.put_u64(word, image.u64(word) ^ 0x40 << 8 * (offset % 8))  # one bit of that byte
        changed = check(image)
        assert (changed.violations != check(clean).violations) == (offset in read), offset
        key = lambda img: (sample_of(img).frame_header[:ReturnSample.HEADER_ALWAYS_READ],
                           sample_of(img).toc_slot_read(site))
        assert (key(image) != key(clean)) == (offset in read), offset


def test_livepatch_sp_pushed_without_pop():
    image = StackImage("inside-c-local")
    result = check(image, livepatch_sp=image.u64(image.livepatch_sp_slot) + 24)
    assert invariants(result) == [10]
    assert "24 bytes above" in result.violations[0].title
    assert result.caller.startswith("klp_lab_a_local+")  # the real entry is found below


def test_livepatch_sp_popped_early():
    image = StackImage("inside-c-local")
    result = check(image, livepatch_sp=image.u64(image.livepatch_sp_slot) - 24)
    assert 10 in invariants(result)
    assert any("popped early" in v.title for v in result.violations)


def test_frame_size_from_prologue():
    words = [0x7C0802A6, 0xF8010010, 0xF821FFE1, ppc.BLR]  # mflr r0; std r0,16(r1); stdu r1,-32(r1)
    assert frame_size_from_prologue(b"".join(w.to_bytes(4, "little") for w in words)) == 32
    assert frame_size_from_prologue(ppc.BLR.to_bytes(4, "little")) is None  # a leaf: no frame


def test_module_stub_target_needs_the_exact_stub():
    stub = [0x3D62FFFF, 0x396B7F18, 0xF8410018, 0xE98B0020, 0x7D8903A6, 0x4E800420, 0, 0]
    code = b"".join(w.to_bytes(4, "little") for w in stub) + (0xC008000000077100).to_bytes(8, "little")
    assert module_stub_target(code) == 0xC008000000077100
    assert module_stub_target(code[:4] + b"\0\0\0\0" + code[8:]) is None


def test_bad_return_address_shows_the_instruction_before_it():
    image = StackImage("inside-c-local")
    image.put_u64(top_entry(image) + 8, image.u64(top_entry(image) + 8) + 4)
    (v,) = check(image).violations
    assert "preceded by `nop`, not a call" in v.found  # bl B; nop: RA+4 follows the nop


@pytest.mark.parametrize("redirected, in_transition, state, violated", [
    (True, True, KLP_PATCHED, False),
    (True, True, KLP_UNPATCHED, True),     # sent to C although the task still runs the old code
    (True, True, KLP_UNDEFINED, False),    # the transition is starting or completing: not judged
    (False, True, KLP_UNPATCHED, False),
    (False, True, KLP_PATCHED, True),      # kept on B although the task is switched
    (False, True, KLP_UNDEFINED, False),
    (True, False, KLP_UNDEFINED, False),
    (False, False, KLP_UNDEFINED, True),   # B ran while its replacement is enabled, no transition
])
def test_consistency_model(redirected, in_transition, state, violated):
    v = check_consistency(redirected, in_transition, state, "klp_lab_b_local", "klp_lab_c_local")
    assert (v is not None) == violated
    if v:
        assert v.invariant == 12
        assert ("klp_lab_c_local" in v.found) == redirected and ("klp_lab_b_local" in v.found) != redirected


def test_switched_task_with_a_replaced_function_on_its_stack():
    """Invariant 12's stack rule on a task captured asleep in C (entered from klp_lab_a_local)."""
    functions = [f.function for f in StackImage("asleep-in-c-local").decode().walk.frames]
    # disabling the patch: the new functions must leave the stacks
    holders = replaced_on_stack(functions, {"klp_lab_c_local", "klp_lab_c_global"})
    assert holders == ["klp_lab_c_local+0x2c [klp_lab_patch]"]
    v = check_switched_task(KLP_UNPATCHED, KLP_UNPATCHED, holders)
    assert v.invariant == 12 and "klp_lab_c_local+0x2c" in v.found and "KLP_UNPATCHED task" in v.expected
    assert check_switched_task(KLP_PATCHED, KLP_UNPATCHED, holders) is None  # not switched yet: pending
    # enabling it: the old functions must leave; the caller klp_lab_a_local is not one of them
    assert replaced_on_stack(functions, {"klp_lab_b_local", "klp_lab_a"}) == []
    assert check_switched_task(KLP_PATCHED, KLP_PATCHED, []) is None
