"""Pure ABI knowledge: call-site classes, livepatch_handler decoding, ELF symbols."""

import json
from pathlib import Path

import pytest

from helpers import in_lab_root
from gdbklp.abi import callsite, elf, ppc
from gdbklp.abi.callsite import CallSite
from gdbklp.abi.livepatch import (LayoutError, decode_livepatch_handler, entries, find_unredirected_exits,
                                  paca_load_target)

DATA = Path(__file__).parent / "data"

# Exact encodings (Power ISA I-form bl, the lab modules' instruction after
# the local_other call as objdump shows it).
BL_BACKWARD = 0x4BFFFD6D  # bl .-0x294
BL_FORWARD = 0x48000235   # bl .+0x234
ADDI_R1_32 = 0x38210020   # addi r1,r1,32


def le(*words):
    return b"".join(w.to_bytes(4, "little") for w in words)


@pytest.mark.parametrize("call, following, expected", [
    (BL_BACKWARD, ppc.NOP, CallSite.LOCAL),
    (BL_FORWARD, ADDI_R1_32, CallSite.LOCAL_OTHER),
    (BL_FORWARD, ppc.LD_R2_24_R1, CallSite.GLOBAL),
    (ppc.BCTRL, ppc.LD_R2_24_R1, CallSite.INDIRECT),
    (ppc.BCTRL, ADDI_R1_32, CallSite.INDIRECT_NO_TOC),
    (ppc.NOP, ppc.NOP, CallSite.NOT_A_CALL),
    (0x48000234, ppc.NOP, CallSite.NOT_A_CALL),  # b (no link) is not a call
    (0x4BFFFD6F, ppc.NOP, CallSite.NOT_A_CALL),  # bla: absolute, never emitted
])
def test_classify(call, following, expected):
    assert callsite.classify(call, following) is expected
    assert callsite.classify_bytes(le(call, following)) is expected


def test_classify_short_window_is_not_a_call():
    assert callsite.classify_bytes(le(ppc.BCTRL)) is CallSite.NOT_A_CALL


def test_restores_toc_only_for_global_and_indirect():
    assert {c for c in CallSite if c.restores_toc} == {CallSite.GLOBAL, CallSite.INDIRECT}


def test_branch_target_sign_extends():
    assert ppc.branch_target(0x48000235, 0x1000) == 0x1234
    assert ppc.branch_target(0x4BFFFFFD, 0x1000) == 0x0FFC


def code_capture(name="livepatch_handler"):
    data = json.loads((DATA / f"{name}.json").read_text())
    return bytes.fromhex(data["code"]), data["address"]


def handler_capture():
    return code_capture()


def test_conditional_branch_target():
    assert ppc.conditional_branch_target(0x40C200F8, 0x1000) == 0x10F8     # bne- .+0xf8
    assert ppc.conditional_branch_target(0x4082FFF0, 0x1000) == 0x0FF0     # bne .-0x10
    assert ppc.conditional_branch_target(0x40C200F9, 0x1000) is None       # bnel: a call, not a branch
    assert ppc.conditional_branch_target(ppc.BCTR, 0x1000) is None


@pytest.mark.parametrize("name, exit_offset", [("ftrace_caller", 0xD0), ("ftrace_regs_caller", 0x190)])
def test_unredirected_exit_of_each_ftrace_trampoline(name, exit_offset):
    """Each trampoline ends with `bne- livepatch_handler; bctr` (objdump of the lab vmlinux)."""
    _, handler = handler_capture()
    code, address = code_capture(name)
    assert find_unredirected_exits(code, address, handler) == [address + exit_offset]
    assert int.from_bytes(code[exit_offset:][:4], "little") == ppc.BCTR
    assert find_unredirected_exits(code, address, handler + 4) == []  # a branch elsewhere is not one


def test_decode_livepatch_handler_from_lab_kernel():
    code, address = handler_capture()
    layout = decode_livepatch_handler(code, address)
    # 6.1: PACA_THREAD_INFO = offsetof(paca_struct, __current), TI_livepatch_sp
    assert layout.paca_thread_info == 296
    assert layout.ti_livepatch_sp == 16
    assert (layout.entry_size, layout.toc_slot, layout.ra_slot, layout.magic_slot) == (24, -24, -16, -8)
    assert layout.magic == ppc.STACK_END_MAGIC
    assert layout.call_to_c == address + 11 * 4
    assert int.from_bytes(code[(layout.call_to_c - address):][:4], "little") == ppc.BCTRL


def test_a_handler_without_the_magic_store_is_decoded_from_its_check():
    # the push stores no magic (a defect klp-watch must see at P3 as invariant 8):
    # the slot and value are those its return half checks
    code, address = handler_capture()
    words = ppc.words(code)
    words[9] = ppc.NOP  # std r12,-8(r11): the magic store
    layout = decode_livepatch_handler(le(*words), address)
    assert (layout.magic_slot, layout.magic) == (-8, ppc.STACK_END_MAGIC)
    words[17] = ppc.NOP  # tdne r12,r2: nor any check
    with pytest.raises(LayoutError, match=r"no std of the magic slot before the bctrl at 0x"):
        decode_livepatch_handler(le(*words), address)


def test_decode_refuses_code_without_bctrl():
    with pytest.raises(LayoutError, match="no bctrl"):
        decode_livepatch_handler(le(*[ppc.NOP] * 24), 0xC000000000001000)


def test_livepatch_entries_oldest_first():
    code, address = handler_capture()
    layout = decode_livepatch_handler(code, address)
    base = 0xC000000002B44008
    words = [0xAAAA, 0x1111, ppc.STACK_END_MAGIC, 0xBBBB, 0x2222, ppc.STACK_END_MAGIC]
    stack = b"".join(w.to_bytes(8, "little") for w in words)
    got = entries(stack, base, base + 48, layout)
    assert [(e.address - base, e.toc, e.ra, e.magic) for e in got] == [
        (0, 0xAAAA, 0x1111, ppc.STACK_END_MAGIC), (24, 0xBBBB, 0x2222, ppc.STACK_END_MAGIC)]


def test_read_elf_symbols_rejects_non_elf(tmp_path):
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"not an elf at all")
    with pytest.raises(elf.ElfError, match="is not an ELF file"):
        elf.read_elf_symbols(bogus)


def test_read_elf_symbols_rejects_other_architectures():
    with pytest.raises(elf.ElfError, match="not a ppc64 ELF file"):
        elf.read_elf_symbols(Path("/usr/bin/true"))


@pytest.mark.toolchain  # the lab root's cross toolchain
def test_read_elf_symbols_rejects_stripped(tmp_path):
    src = tmp_path / "f.c"
    src.write_text("int f(void) { return 1; }\n")
    obj = tmp_path / "f.o"
    in_lab_root("powerpc64le-linux-gnu-gcc", "-c", "-o", obj, src, where=tmp_path)
    in_lab_root("powerpc64le-linux-gnu-strip", obj, where=tmp_path)
    with pytest.raises(elf.ElfError, match="has no symbol table"):
        elf.read_elf_symbols(obj)


def test_symbol_table_lookup():
    table = elf.SymbolTable([
        elf.Symbol("a", 0x1000, 0x20), elf.Symbol("data", 0x1020, 8, elf.STT_OBJECT),
        elf.Symbol("b", 0x1100, 0), elf.Symbol("b_section_start", 0x1100, 0, elf.STT_NOTYPE)])
    assert table.describe(0x1008) == "a+0x8"
    assert table.describe(0x1000) == "a"
    assert table.describe(0x1024) == "0x1024"   # past a's end, inside data: no function
    assert table.describe(0x1180) == "b+0x80"   # size 0: open-ended; the typed function wins
    assert table.lookup(0xFFF) is None
    assert table.address("b") == 0x1100


def test_paca_load_at_the_return_point():
    """P3 begins with the handler's first instruction again, `ld r12,296(r13)`
    (objdump of the lab vmlinux): klp-watch executes it for the guest."""
    code, _ = handler_capture()
    first, second = ppc.words(code)[:2]
    assert paca_load_target(first, 296) == 12
    assert paca_load_target(first, 288) is None         # another PACA slot: not the thread_info load
    assert paca_load_target(second, 16) is None         # ld r11,16(r12): not from the PACA
    assert paca_load_target(ppc.BCTR, 296) is None
