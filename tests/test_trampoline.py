"""livepatch_handler as a machine (gdbklp.abi.trampoline), on the lab's captured
code and on mutants of it: each defect named at its instruction."""

import json
from pathlib import Path

import pytest

from gdbklp.abi import ppc
from gdbklp.abi.trampoline import TrampolineError, decode_layout, lint_livepatch_handler, predict_return

DATA = Path(__file__).parent / "data"
HANDLER = json.loads((DATA / "livepatch_handler.json").read_text())
ADDRESS = HANDLER["address"]
P3 = ADDRESS + 12 * 4
# instruction indexes in the lab's handler (Linux 6.1): see the kernel's ftrace_mprofile.S
POP_MAGIC_ORI, POP_MAGIC_LOAD, POP_TDNE, POP_RA_LOAD, POP_TOC_LOAD, POP_SUBI = 15, 16, 17, 18, 20, 22


def code(**replace: int) -> bytes:
    words = ppc.words(bytes.fromhex(HANDLER["code"]))
    for index, word in replace.items():
        words[int(index[1:])] = word
    return b"".join(w.to_bytes(4, "little") for w in words)


def failures(data: bytes) -> list[tuple[int, str]]:
    return [((f.address - ADDRESS) // 4, f.text) for f in lint_livepatch_handler(data, ADDRESS) if not f.ok]


def test_the_lab_handler_pops_what_it_pushed():
    findings = lint_livepatch_handler(code(), ADDRESS)
    assert all(f.ok for f in findings), [f.text for f in findings if not f.ok]
    assert len(findings) == 8


@pytest.mark.parametrize("mutant, index, words", [
    # LR from the TOC slot: ld r12,-24(r11)
    ({f"i{POP_RA_LOAD}": 0xE98BFFE8}, POP_RA_LOAD, "the return goes to RA"),
    # r2 not restored: nop
    ({f"i{POP_TOC_LOAD}": ppc.NOP}, POP_MAGIC_ORI, "r2 is A's again"),  # r2 keeps the magic
    # r2 from the RA slot: ld r2,-16(r11)
    ({f"i{POP_TOC_LOAD}": 0xE84BFFF0}, POP_TOC_LOAD, "r2 is A's again"),
    # pops 16 bytes: subi r11,r11,16
    ({f"i{POP_SUBI}": 0x396BFFF0}, POP_SUBI, "livepatch_sp"),
    # compares against another constant: ori r2,r2,0x6e9e
    ({f"i{POP_MAGIC_ORI}": 0x60426E9E}, POP_TDNE, "magic check"),
    # compares the RA slot: ld r12,-16(r11)
    ({f"i{POP_MAGIC_LOAD}": 0xE98BFFF0}, POP_TDNE, "magic check"),
    # tdeq instead of tdne
    ({f"i{POP_TDNE}": 0x7C8C1088}, POP_TDNE, "magic check"),
    # r1 moved by the pop: addi r1,r1,16 instead of the second PACA load
    ({"i21": 0x38210010}, 21, "r1 untouched"),
])
def test_each_pop_defect_is_named_at_its_instruction(mutant, index, words):
    found = failures(code(**mutant))
    assert any(at == index and words in text for at, text in found), found


def test_an_instruction_the_machine_does_not_model_is_refused_by_address():
    with pytest.raises(TrampolineError, match=rf"cannot model `mulld r11, r11, r12` \(0x7d6b61d2\) at "
                                              rf"{ADDRESS + 4 * POP_SUBI:#x}"):
        lint_livepatch_handler(code(**{f"i{POP_SUBI}": 0x7D6B61D2}), ADDRESS)


class P3State:
    """A task at P3 as the lab has it: r13 the PACA, the task, its livepatch_sp
    one entry above its base, the entry [TOC, RA, magic] of the redirection."""

    PACA, TASK, BASE = 0xC000000003FF0000, 0xC000000002A10000, 0xC000000002A8C000
    TOC, RA, SP = 0xC000000001DB2100, 0xC0080000000A1234, 0xC000000002A8FD00

    def __init__(self, magic=ppc.STACK_END_MAGIC):
        self.memory = {self.PACA + 296: self.TASK, self.TASK + 16: self.BASE + 8 + 24,
                       self.BASE + 8: self.TOC, self.BASE + 16: self.RA, self.BASE + 24: magic}
        self.loaded = []

    def register(self, name):
        return {"r13": self.PACA, "r1": self.SP, "r2": 0xC0080000000B8000}[name]

    def load(self, address):
        self.loaded.append(address)
        return self.memory[address]


def test_p4_predicted_from_the_words_p3_reads():
    state = P3State()
    p = predict_return(code(), ADDRESS, P3, state.register, state.load)
    assert (p.pc, p.r1, p.r2, p.trap_at) == (state.RA, state.SP, state.TOC, None)
    assert p.livepatch_sp == {state.TASK + 16: state.BASE + 8}
    assert sorted(set(state.loaded)) == sorted(state.memory)  # nothing else loaded


def test_p4_predicts_the_trap_and_a_wrong_restore():
    state = P3State(magic=0xDEADBEEF)
    assert predict_return(code(), ADDRESS, P3, state.register, state.load).trap_at == ADDRESS + 4 * POP_TDNE
    state = P3State()
    p = predict_return(code(**{f"i{POP_TOC_LOAD}": 0xE84BFFF0}), ADDRESS, P3, state.register, state.load)
    assert p.r2 == state.RA and p.writer["r2"] == ADDRESS + 4 * POP_TOC_LOAD


def test_the_layout_expects_the_magic_the_push_really_stores():
    # lis r12,0x57ac; addi r12,r12,0x6e9d: the same magic, not built by ori
    layout = decode_layout(code(i8=0x398C6E9D), ADDRESS)
    assert layout.magic == ppc.STACK_END_MAGIC
    # ... and built wrong: addi r12,r12,0x6e9e
    assert decode_layout(code(i8=0x398C6E9E), ADDRESS).magic == ppc.STACK_END_MAGIC + 1


def test_the_layout_refuses_a_push_it_cannot_model():
    with pytest.raises(TrampolineError, match=rf"cannot model `mulli r12, r12, 3` \(0x1d8c0003\) at {ADDRESS + 32:#x}"):
        decode_layout(code(i8=0x1D8C0003), ADDRESS)
