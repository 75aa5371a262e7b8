"""Naming B and C of a redirection at P3 (gdbklp.abi.naming) and the CTR analysis
behind it, on the lab's captured objects and the real code of its replacements."""

import json
from pathlib import Path

import pytest

from gdbklp.abi import elf, naming, ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.invariants import CodeFacts
from gdbklp.abi.kernel import KernelView, ObjectInfo
from images import StackImage

DATA = Path(__file__).parent / "data"
# klp_lab_bad_r1_return (qemu-images/modules/klp_lab_patch.c), assembled:
# addis r12,r2,0; ld r12,0(r12); mtlr r12; addi r1,r1,16; blr
LEAF = [0x3D820000, 0xE98C0000, 0x7D8803A6, 0x38210010, ppc.BLR]
MTCTR_R12, BCTR, BCTRL = 0x7D8903A6, ppc.BCTR, ppc.BCTRL


def code(words: list[int]) -> bytes:
    return b"".join(w.to_bytes(4, "little") for w in words)


def replacement_code(name: str) -> bytes:
    return bytes.fromhex(json.loads((DATA / "replacements.json").read_text())["functions"][name])


class Lab:
    """The captured lab objects (real bases and TOCs) with three replacements in
    klp_lab_patch: a leaf (CTR untouched), klp_lab_c_local's real code (calls
    new_body), and a leaf that writes CTR; their Bs in klp_lab_target."""

    def __init__(self, leaf_words=LEAF):
        image = StackImage("inside-c-indirect")
        objects = {o.name: o for o in image.view.objects}
        patch, target = objects["klp_lab_patch"], objects["klp_lab_target"]
        self.code = {patch.base + 0x100: code(leaf_words), patch.base + 0x200: replacement_code("klp_lab_c_local"),
                     patch.base + 0x400: code([MTCTR_R12, ppc.BLR])}
        self.leaf, self.caller, self.ctr_writer = sorted(self.code)
        symbols = [elf.Symbol(f"c{i}", a, len(c), 2) for i, (a, c) in enumerate(sorted(self.code.items()))]
        patched = ObjectInfo(patch.name, patch.base, patch.size, elf.SymbolTable(symbols, patch.name), patch.toc)
        view = KernelView([patched if o is patch else o for o in image.view.objects], image.view.livepatch)
        self.facts = CodeFacts(view, self.read)
        self.b = {c: target.base + 0x80 * (i + 1) for i, c in enumerate(sorted(self.code))}
        self.patch_toc, self.target_toc, self.vmlinux_toc = patch.toc, target.toc, objects["vmlinux"].toc

    def read(self, address: int, length: int) -> bytes:
        for start, block in self.code.items():
            if start <= address and address + length <= start + len(block):
                return block[address - start:address - start + length]
        raise MemoryError(f"{address:#x}")

    def replacements(self, *cs: int) -> dict[int, int]:
        return {self.b[c]: c for c in cs}


def test_ctr_analysis_on_real_code():
    lab = Lab()
    assert lab.facts.leaves_ctr_alone(lab.leaf)
    assert not lab.facts.leaves_ctr_alone(lab.caller)      # bl new_body
    assert not lab.facts.leaves_ctr_alone(lab.ctr_writer)  # mtctr r12


@pytest.mark.parametrize("extra", [MTCTR_R12, BCTR, BCTRL, 0x48000001, 0x4BFFFF01])  # mtctr, bctr, bctrl, bl, bl back
def test_any_way_of_changing_ctr_makes_a_leaf_unsafe(extra):
    lab = Lab(LEAF[:-1] + [extra, ppc.BLR])
    assert not lab.facts.leaves_ctr_alone(lab.leaf)


def test_branches_inside_the_function_keep_it_a_leaf():
    lab = Lab(LEAF[:2] + [0x48000008, ppc.NOP] + LEAF[2:])  # b .+8 over a nop
    assert lab.facts.leaves_ctr_alone(lab.leaf)
    lab = Lab(LEAF[:2] + [0x48000400] + LEAF[2:])           # b far away: a tail call
    assert not lab.facts.leaves_ctr_alone(lab.leaf)


def test_direct_calls_are_named_by_their_call_site():
    lab = Lab()
    names = naming.name_redirection(CallSite.LOCAL, lab.b[lab.caller], None, lab.replacements(lab.caller), lab.facts)
    assert names == naming.Names(lab.b[lab.caller], lab.caller, naming.BY_CALL_SITE)


def test_p1_names_any_call():
    lab = Lab()
    reps = lab.replacements(lab.leaf, lab.caller)
    names = naming.name_redirection(CallSite.INDIRECT, None, None, reps, lab.facts, p1_replacement=lab.caller)
    assert names == naming.Names(lab.b[lab.caller], lab.caller, naming.BY_P1)


def test_ctr_at_p3_names_c_only_when_no_candidate_can_change_ctr():
    lab = Lab()
    regs = naming.ReturnRegisters(r2=lab.target_toc, ctr=lab.leaf, saved_toc=lab.target_toc)
    names = naming.name_redirection(CallSite.INDIRECT, None, regs, lab.replacements(lab.leaf), lab.facts)
    assert names == naming.Names(lab.b[lab.leaf], lab.leaf, naming.BY_CTR)
    # another replacement that calls out could have run and left the leaf in CTR
    reps = lab.replacements(lab.leaf, lab.caller)
    assert naming.name_redirection(CallSite.INDIRECT, None, regs, reps, lab.facts) == naming.Names()


def test_the_only_replacement_in_r2s_object():
    lab = Lab()
    # C set r2 to klp_lab_patch's TOC: C is in klp_lab_patch, the only one there
    regs = naming.ReturnRegisters(r2=lab.patch_toc, ctr=0, saved_toc=lab.vmlinux_toc)
    names = naming.name_redirection(CallSite.INDIRECT, None, regs, lab.replacements(lab.caller), lab.facts)
    assert names == naming.Names(lab.b[lab.caller], lab.caller, naming.BY_ONLY_CANDIDATE)
    # two replacements there: no name
    reps = lab.replacements(lab.caller, lab.ctr_writer)
    assert naming.name_redirection(CallSite.INDIRECT, None, regs, reps, lab.facts) == naming.Names()
    # r2 unchanged from A's: C may not have set it, so it tells nothing
    regs = naming.ReturnRegisters(r2=lab.vmlinux_toc, ctr=0, saved_toc=lab.vmlinux_toc)
    assert naming.name_redirection(CallSite.INDIRECT, None, regs, lab.replacements(lab.caller),
                                   lab.facts) == naming.Names()


def test_b_is_named_only_when_c_replaces_one_function():
    lab = Lab()
    reps = {lab.b[lab.leaf]: lab.caller, lab.b[lab.caller]: lab.caller}
    names = naming.name_redirection(CallSite.INDIRECT, None, None, reps, lab.facts, p1_replacement=lab.caller)
    assert names == naming.Names(None, lab.caller, naming.BY_P1)
