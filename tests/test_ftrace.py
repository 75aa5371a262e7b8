"""ftrace's hand-off to livepatch_handler and the out-of-line stubs
(gdbklp.abi.ftrace, gdbklp.abi.handoff), on code captured from each lab
generation (tests/capture.py --kernel) and on mutants of it."""

import json
from pathlib import Path

import pytest

from gdbklp.abi import ppc
from gdbklp.abi.ftrace import FtraceCodeError, decode_handler_entry, decode_ool_stub, ool_stub_label
from gdbklp.abi.handoff import FtraceEntry, check_handoff, check_ool_stub, traced_function_site
from gdbklp.abi.livepatch import find_unredirected_exits
from gdbklp.abi.trampoline import decode_layout, lint_handler_entry, lint_livepatch_handler

DATA = Path(__file__).parent / "data"
GENERATIONS = {"6.1": DATA, "6.12": DATA / "6.12", "7.3": DATA / "7.3"}
# where each generation's ftrace trampolines leave RA and C for livepatch_handler
HANDOFF = {"6.1": (("lr", "r0"), ("ctr",)), "6.12": (("lr", "r0"), ("ctr",)), "7.3": (("r0",), ("lr",))}
TAKES = {"6.1": ("lr", "ctr"), "6.12": ("lr", "ctr"), "7.3": ("r0", "lr")}
TRAMPOLINES = ("ftrace_caller", "ftrace_regs_caller")
MTLR_R3, LD_R15 = 0x7C6803A6, (58, 15)


def load(generation: str, name: str) -> tuple[bytes, int]:
    data = json.loads((GENERATIONS[generation] / f"{name}.json").read_text())
    return bytes.fromhex(data["code"]), data["address"]


def handler_address(generation: str) -> int:
    return load(generation, "livepatch_handler")[1]


def replace_words(code: bytes, match, word: int) -> bytes:
    """code with every instruction for which match(word) holds replaced by word."""
    words = [word if match(w) else w for w in ppc.words(code)]
    assert words != ppc.words(code), "the mutant changes nothing"
    return b"".join(w.to_bytes(4, "little") for w in words)


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("trampoline", TRAMPOLINES)
def test_each_generation_hands_ra_and_c_over_where_its_handler_takes_them(generation, trampoline):
    code, address = load(generation, trampoline)
    entry = decode_handler_entry(code, address, handler_address(generation), trampoline)
    assert (entry.ra_registers, entry.c_registers) == HANDOFF[generation]
    assert entry.frame_popped and entry.toc_restored and entry.clobbered == ()
    layout = decode_layout(*load(generation, "livepatch_handler"))
    assert (layout.ra_register, layout.c_register) == TAKES[generation]
    # RA, C, A's r1 and r2, the non-volatile registers: each handed over as the handler takes it
    handoff = lint_handler_entry(trampoline, entry, layout)
    assert [f.ok for f in handoff] == [True] * 4, [f.text for f in handoff]
    findings = lint_livepatch_handler(*load(generation, "livepatch_handler"), layout.ra_register, layout.c_register)
    assert [f.ok for f in findings] == [True] * 8, [f.text for f in findings]


def test_ool_exit_that_forgets_r15_is_caught():
    # ftrace_caller keeps its return address (into the stub) in r15: without its
    # REST_GPR(15) on the way out, A's r15 is lost (the 2024 fix)
    code, address = load("7.3", "ftrace_caller")
    mutant = replace_words(code, lambda w: ppc.is_ld(w) and (w >> 26, (w >> 21) & 31) == LD_R15
                           and (w >> 16) & 31 == 1, ppc.NOP)
    entry = decode_handler_entry(mutant, address, handler_address("7.3"))
    assert entry.clobbered == ("r15",)
    layout = decode_layout(*load("7.3", "livepatch_handler"))
    failed = [f for f in lint_handler_entry("ftrace_caller", entry, layout) if not f.ok]
    assert [f.text for f in failed] == ["ftrace_caller restores the non-volatile registers on the way to "
                                        "livepatch_handler: not r15"]


def test_ool_exit_that_does_not_put_c_in_lr_is_caught():
    code, address = load("7.3", "ftrace_caller")
    entry = decode_handler_entry(replace_words(code, lambda w: w == MTLR_R3, ppc.NOP), address,
                                 handler_address("7.3"))
    assert entry.c_registers == ()
    layout = decode_layout(*load("7.3", "livepatch_handler"))
    failed = [f.text for f in lint_handler_entry("ftrace_caller", entry, layout) if not f.ok]
    assert failed == ["ftrace_caller leaves C in no register; livepatch_handler takes it from lr"]


def test_a_handler_that_takes_ra_from_lr_under_ool_is_caught():
    # the pre-OOL push (mflr r12; std r12,-16(r11)) on a kernel whose ftrace_caller leaves C in LR
    code, address = load("7.3", "livepatch_handler")
    words = ppc.words(code)
    i = words.index(0xF80BFFF0)  # std r0,-16(r11)
    assert words[i + 1] == 0x7D8802A6  # mflr r12
    words[i], words[i + 1] = 0x7D8802A6, 0xF98BFFF0  # mflr r12; std r12,-16(r11)
    mutant = b"".join(w.to_bytes(4, "little") for w in words)
    layout = decode_layout(mutant, address)
    assert layout.ra_register == "lr"
    entry = decode_handler_entry(*load("7.3", "ftrace_caller"), handler_address("7.3"))
    failed = [f.text for f in lint_handler_entry("ftrace_caller", entry, layout) if not f.ok]
    assert failed == ["ftrace_caller leaves RA in r0; livepatch_handler takes it from lr"]


def test_an_instruction_the_walk_does_not_know_is_refused_by_address():
    code, address = load("7.3", "ftrace_caller")
    words = ppc.words(code)
    words[3] = 0x7C6321D6  # mullw r3,r3,r4
    refusal = rf"ftrace_caller: cannot model `mullw r3, r3, r4` .* at {address + 12:#x}"
    with pytest.raises(FtraceCodeError, match=refusal):
        decode_handler_entry(b"".join(w.to_bytes(4, "little") for w in words), address, handler_address("7.3"))


@pytest.mark.parametrize("generation, exit_word", [("6.1", ppc.BCTR), ("6.12", ppc.BCTR), ("7.3", ppc.BLR)])
def test_the_exit_for_calls_not_redirected(generation, exit_word):
    code, address = load(generation, "ftrace_caller")
    exits = find_unredirected_exits(code, address, handler_address(generation))
    assert len(exits) == 1
    assert ppc.words(code)[(exits[0] - address) // 4] == exit_word


# ---- out-of-line stubs ----------------------------------------------------------

STUB = json.loads((DATA / "7.3" / "ool_stub.json").read_text())


def memory(extra: dict[int, bytes]):
    def read(address: int, length: int) -> bytes:
        for start, data in extra.items():
            if start <= address and address + length <= start + len(data):
                return data[address - start:address - start + length]
        raise AssertionError(f"unexpected read at {address:#x}")
    return read


def test_a_captured_stub_decodes_and_is_sound():
    stub = decode_ool_stub(bytes.fromhex(STUB["code"]), STUB["address"])
    assert stub is not None and stub.calls is not None
    assert stub.returns_to == STUB["site"] + 4
    read = memory({STUB["site"]: bytes.fromhex(STUB["site_word"]), STUB["address"]: bytes.fromhex(STUB["code"])})
    assert check_ool_stub(STUB["address"], bytes.fromhex(STUB["code"]), read, hex) is None
    # at P0 LR is the stub's mtlr r0: the traced site is the function's
    assert traced_function_site(STUB["address"] + 8, read) == STUB["site"]


@pytest.mark.parametrize("index, word, title", [
    (3, None, "out-of-line ftrace stub returns to a site that does not lead to it"),  # b site+8
    (2, ppc.NOP, "out-of-line ftrace stub corrupted"),  # mtlr r0 gone
])
def test_a_corrupted_stub_is_caught(index, word, title):
    words = ppc.words(bytes.fromhex(STUB["code"]))
    words[index] = words[index] + 4 if word is None else word
    code = b"".join(w.to_bytes(4, "little") for w in words)
    read = memory({STUB["site"]: bytes.fromhex(STUB["site_word"]), STUB["site"] + 4: b"\0" * 4})
    violation = check_ool_stub(STUB["address"], code, read, hex)
    assert violation is not None and (violation.invariant, violation.title) == (14, title)


# ---- the hand-off, live: P0 against livepatch_handler's entry --------------------

def p0_registers() -> dict[int, int]:
    regs = {name: 0x1000 + i for i, name in enumerate(ppc.CALLEE_SAVED_GPRS)}
    return {**regs, "r0": 0xC000000000100004, "r1": 0xC000000002A0FD00, "r2": 0xC000000001A00000,
            "lr": STUB["address"] + 8, "ctr": 0}


@pytest.mark.parametrize("change, violated", [
    ({}, []),
    ({"r15": STUB["address"] + 8}, ["r15 not A's again at livepatch_handler's entry"]),
    ({"r0": 0xC000000000200000}, ["RA is not in r0 at livepatch_handler's entry"]),
    ({"lr": 0xC000000000300000}, ["C is not in lr at livepatch_handler's entry"]),
])
def test_handoff_under_ool(change, violated):
    p0 = FtraceEntry(p0_registers())
    c = 0xC008000000400000
    at_handler = {**p0.registers, "lr": c, "ctr": 0, **change}
    found = check_handoff(p0, at_handler, "r0", "lr", c, hex)
    assert [(v.invariant, v.title) for v in found] == [(14, title) for title in violated]


def test_handoff_without_a_p0_at_this_sp():
    found = check_handoff(None, p0_registers(), "lr", "ctr", None, hex)
    assert [v.invariant for v in found] == [14] and "without an ftrace trampoline entry" in found[0].title


@pytest.mark.parametrize("offset", [0, 4, 8, 12])
def test_a_pc_in_a_stub_is_labelled_with_its_function(offset):
    code = bytes.fromhex(STUB["code"])
    read = memory({STUB["address"] - 12: b"\0" * 12 + code + b"\0" * 28})
    label = ool_stub_label(STUB["address"] + offset, read, lambda a: f"B+{a - STUB['function']:#x}")
    assert label == f"out-of-line ftrace stub of B+{STUB['site'] - STUB['function']:#x}"
    assert ool_stub_label(STUB["address"] + 16, read, hex) is None  # past the stub
