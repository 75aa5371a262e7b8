"""Design 1 (the 2015 RFC), pure: the lab kernel's redirect paths decoded from their
captured code, linted, and single redirections checked at P1 and at the helper."""

import json
import struct
from pathlib import Path

import pytest

from gdbklp.abi import ppc, rfc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.livepatch import LayoutError

DATA = Path(__file__).parent / "data"
CAPTURED = ("klp_rfc_redirect", "KLP_return_helper", "klp_rfc_fixed_redirect", "KLP_return_helper_fixed")
CMPW_R12_R3 = 0x7C0C1800
MULLW_R12_R12_R11 = 0x7D8C59D6

# a task's state at P1, as the lab shows it: A's sp in a kernel stack, RA in a module
A_SP = 0xC000000002B0BC70
RA = 0xC0080000000702A4
A_TOC = 0xC008000000078000      # the TOC of RA's module
B_TOC = 0xC008000000068000      # another module's TOC (what a stub left in r2)
C = 0xC008000000090394


def captured(name):
    data = json.loads((DATA / f"{name}.json").read_text())
    return data["address"], bytes.fromhex(data["code"])


def read_code(address, length):
    for name in CAPTURED:
        start, code = captured(name)
        if start <= address < start + len(code):
            return code[address - start:address - start + length]
    raise AssertionError(f"{address:#x} was not captured")


def decode(name, patch=None):
    address, code = captured(name)
    if patch:
        offset, word = patch
        code = code[:offset] + word.to_bytes(4, "little") + code[offset + 4:]
    return rfc.decode_rfc_trampoline(code, address, read_code)


@pytest.fixture(scope="module")
def posted():
    return decode("klp_rfc_redirect")


@pytest.fixture(scope="module")
def fixed():
    return decode("klp_rfc_fixed_redirect")


def test_posted_compares_with_0x18_built_by_li_over_lis(posted):
    entry = posted.address
    assert posted.constant == 0x18
    assert posted.constant_made_by == (entry + 12,)     # li r11,0x18
    assert posted.constant_overwrote == (entry + 8,)    # lis r11,0xe841, never read
    constant = rfc.lint(posted)[0]
    assert not constant.ok and constant.address == posted.compare_address == entry + 16
    assert "0x18" in constant.text and f"{entry + 8:#x}" in constant.text


def test_posted_helper_reads_the_return_address_from_the_mini_frame(posted):
    helper = posted.helper
    assert posted.mini_frame == 32 and helper.pop == 32
    assert helper.ra_offset == -16 and helper.toc_offset == 24   # 16(mini) before the pop
    assert rfc.RA not in posted.a_frame_stores.values()
    ra_finding = rfc.lint(posted)[1]
    assert not ra_finding.ok and ra_finding.address == helper.ra_load == helper.address
    assert "C's prologue stores LR = the helper" in ra_finding.text


def test_fixed_design_lints_clean(fixed):
    assert fixed.constant == rfc.TOC_RESTORE and fixed.constant_overwrote == ()
    assert fixed.helper.ra_offset == rfc.LR_SLOT and fixed.a_frame_stores[rfc.LR_SLOT] == rfc.RA
    assert fixed.a_frame_stores[rfc.TOC_SLOT] == rfc.TOC
    assert [f.ok for f in rfc.lint(fixed)] == [True] * 4


def test_a_shape_it_cannot_follow_names_the_instruction(fixed):
    compare = fixed.compare_address - fixed.address
    with pytest.raises(LayoutError, match=rf"{fixed.compare_address:#x}.*{MULLW_R12_R12_R11:#010x}"):
        decode("klp_rfc_fixed_redirect", (compare, MULLW_R12_R12_R11))
    # comparing with a register that holds no constant is refused too, not guessed
    with pytest.raises(LayoutError, match="compare"):
        decode("klp_rfc_fixed_redirect", (compare, CMPW_R12_R3))


def sample(insn_at_ra, toc, header):
    return rfc.RedirectSample(task=0xC000000002A80000, cpu=1, ra=RA, r0=RA, sp=A_SP, toc=toc, c=C,
                              insn_at_ra=insn_at_ra, a_header=header)


def a_header(lr_slot=0, toc_slot=0):
    return struct.pack("<4Q", A_SP + 0x90, 0x28000000, lr_slot, toc_slot)


def memory_at_helper(t, a_frame, mini_lr_slot):
    """The mini frame (back chain, CR, LR slot C's prologue wrote, TOC slot) and A's header above it."""
    return struct.pack("<4Q", A_SP, 0, mini_lr_slot, 0) + a_frame


def test_global_call_goes_the_mini_path_on_the_posted_design_only(posted, fixed):
    s = sample(ppc.LD_R2_24_R1, B_TOC, a_header(toc_slot=A_TOC))
    direct, violations = rfc.check_redirect(s, posted, CallSite.GLOBAL)
    assert not direct and [v.invariant for v in violations] == [2]
    assert f"{RA:#x}" in violations[0].expected and f"{posted.compare_address:#x}" in violations[0].found
    assert rfc.check_redirect(s, fixed, CallSite.GLOBAL) == (True, [])


def test_posted_helper_loses_ra_and_a_global_callers_toc(posted):
    s = sample(ppc.LD_R2_24_R1, B_TOC, a_header(toc_slot=A_TOC))
    pending = rfc.Pending(s, CallSite.GLOBAL, A_TOC)
    # the trampoline stored r2 (B's TOC) into A's TOC slot; C's prologue put LR = the helper in 16(mini)
    memory = memory_at_helper(posted, a_header(toc_slot=B_TOC), posted.helper.address)
    violations = rfc.check_helper(pending, A_SP - 32, memory, posted)
    assert [v.invariant for v in violations] == [5, 3]
    assert f"{RA:#x}" in violations[0].expected and f"{posted.helper.address:#x}" in violations[0].found


def test_fixed_local_redirection_is_clean(fixed):
    s = sample(ppc.NOP, A_TOC, a_header(lr_slot=0x1234))
    assert rfc.check_redirect(s, fixed, CallSite.LOCAL) == (False, [])
    memory = memory_at_helper(fixed, a_header(lr_slot=RA, toc_slot=A_TOC), fixed.helper.address)
    assert rfc.check_helper(rfc.Pending(s, CallSite.LOCAL, A_TOC), A_SP - 32, memory, fixed) == []


def test_varargs_homing_in_a_mini_frame_breaks_a(fixed):
    s = sample(ppc.NOP, A_TOC, a_header())
    # C homed r3..r6 at its caller's sp+32.. = A's sp+0..24: back chain, CR, RA, TOC gone
    memory = memory_at_helper(fixed, struct.pack("<4Q", 3, 4, 5, 6), fixed.helper.address)
    invariants = [v.invariant for v in rfc.check_helper(rfc.Pending(s, CallSite.LOCAL, A_TOC), A_SP - 32,
                                                          memory, fixed)]
    assert invariants == [5, 9, 6]


def test_helper_entered_without_its_mini_frame(fixed):
    state = rfc.RfcState()
    s = sample(ppc.NOP, A_TOC, a_header())
    state.push(s.task, rfc.Pending(s, CallSite.LOCAL, A_TOC))
    assert state.pop(s.task, A_SP, fixed.mini_frame) is None      # r1 already popped: not this frame
    assert state.pop(s.task, A_SP - 32, fixed.mini_frame).at_p1 is s
    assert state.pop(s.task, A_SP - 32, fixed.mini_frame) is None


def replacement(name):
    return bytes.fromhex(json.loads((DATA / "replacements.json").read_text())["functions"][name])


def test_stack_argument_accesses_of_the_lab_replacements():
    assert rfc.stack_argument_accesses(replacement("klp_lab_c_local")) == []
    assert sorted(rfc.stack_argument_accesses(replacement("klp_lab_c_many_args"))) == [(96, "load"), (104, "load")]
    varargs = rfc.stack_argument_accesses(replacement("klp_lab_c_varargs"))
    assert sorted(o for o, kind in varargs if kind == "store") == list(range(48, 96, 8))   # r5..r10 homed
    assert "over A's LR save slot (RA) and TOC save slot" in rfc.hazard_reason(varargs, 32)
    assert "more than 8" in rfc.hazard_reason(rfc.stack_argument_accesses(replacement("klp_lab_c_many_args")), 32)
    assert rfc.hazard_reason([], 32) is None
