"""Exact encodings of the ppc64 instructions gdbklp reasons about.

Decisions are made on these encodings, never on disassembler text; capstone
(see disassemble()) is only used to show instructions to people.
"""

from dataclasses import dataclass

NOP = 0x60000000            # ori r0,r0,0
LD_R2_24_R1 = 0xE8410018    # ld r2,24(r1): the TOC restore after a cross-object call
BCTRL = 0x4E800421
BLRL = 0x4E800021
BLR = 0x4E800020
BCTR = 0x4E800420
BRANCH_TO_SELF = 0x48000000  # b . (I-form, LI 0): a vCPU that reaches it stays there
MFLR_R0 = 0x7C0802A6
MTLR_R0 = 0x7C0803A6
STACK_END_MAGIC = 0x57AC6E9D
MSR_PR = 1 << 14  # problem state: the vCPU (or the interrupted context) runs user code


def is_bl(word: int) -> bool:
    """bl target (I-form, opcode 18, AA=0, LK=1)."""
    return word & 0xFC000003 == 0x48000001


def branch_target(word: int, address: int) -> int:
    """Target of an I-form branch (b/bl) at address."""
    offset = word & 0x03FFFFFC
    if offset & 0x02000000:
        offset -= 0x04000000
    return (address + offset) & 0xFFFFFFFFFFFFFFFF


def conditional_branch_target(word: int, address: int) -> int | None:
    """Target of a B-form conditional branch (bc, opcode 16, AA=0, LK=0), else None."""
    if word & 0xFC000003 != 0x40000000:
        return None
    offset = word & 0xFFFC
    if offset & 0x8000:
        offset -= 0x10000
    return (address + offset) & 0xFFFFFFFFFFFFFFFF


def is_mtctr(word: int) -> bool:
    """mtctr rS (mtspr 9, rS)."""
    return word & 0xFC1FFFFF == 0x7C0903A6


def is_conditional_bcctr(word: int) -> bool:
    """bcctr with a condition (bnectr crN and its kin), no link."""
    return word & 0xFC0007FF == 0x4C000420 and (word >> 21) & 0x14 != 0x14


def may_change_ctr(word: int, address: int, start: int, end: int) -> bool:
    """Can executing word at address, in a function occupying [start, end),
    leave CTR changed when the function returns? True for mtctr, for any
    call (bl, bcl, bctrl, blrl: the callee may write CTR), for a branch out of
    the function (a tail call) and for a branch through CTR (bctr, whose
    target is not known from the code)."""
    opcode = word >> 26
    if is_mtctr(word):
        return True
    if opcode == 18:  # b, bl, ba, bla
        return bool(word & 3) or not start <= branch_target(word, address) < end
    if opcode == 16:  # bc, bcl, bca, bcla
        target = conditional_branch_target(word, address)
        return target is None or not start <= target < end
    if opcode == 19:
        xo = (word >> 1) & 0x3FF
        return xo == 528 or (xo == 16 and bool(word & 1))  # bcctr[l], bclrl
    return False


@dataclass(frozen=True)
class DForm:
    """A D/DS-form load or store: opcode rt, disp(ra)."""

    opcode: int
    rt: int
    ra: int
    disp: int


def decode_dform(word: int) -> DForm:
    opcode = word >> 26
    rt = (word >> 21) & 31
    ra = (word >> 16) & 31
    disp = word & 0xFFFF
    if opcode in (58, 62):  # DS-form: ld/std; the low two bits select the variant
        disp &= 0xFFFC
    if disp & 0x8000:
        disp -= 0x10000
    return DForm(opcode, rt, ra, disp)


def is_ld(word: int) -> bool:
    return word >> 26 == 58 and word & 3 == 0


def is_std(word: int) -> bool:
    return word >> 26 == 62 and word & 3 == 0


def is_addi(word: int) -> bool:
    return word >> 26 == 14


def words(data: bytes) -> list[int]:
    """Little-endian 32-bit instruction words of data."""
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data) - 3, 4)]


def disassemble(data: bytes, address: int) -> list[tuple[int, str]]:
    """(address, "mnemonic operands") for each instruction, or .long for undecodable ones."""
    try:
        import capstone
    except ImportError:  # display only: decisions never depend on capstone
        return [(address + 4 * i, f".long {w:#010x}") for i, w in enumerate(words(data))]
    md = capstone.Cs(capstone.CS_ARCH_PPC, capstone.CS_MODE_64 | capstone.CS_MODE_LITTLE_ENDIAN)
    out = []
    for i, word in enumerate(words(data)):
        insn = next(md.disasm(word.to_bytes(4, "little"), address + 4 * i), None)
        text = f"{insn.mnemonic} {insn.op_str}".strip() if insn else f".long {word:#010x}"
        out.append((address + 4 * i, text))
    return out
