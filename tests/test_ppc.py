"""The instruction decoder (gdbklp.abi.ppc): forms, fields and predicates, on
real encodings (from the captured trampolines in tests/data and well-known
ones; each checked against a disassembler when written, shown in its comment)."""

import json
from pathlib import Path

import pytest

from gdbklp.abi import ppc

DATA = Path(__file__).parent / "data"


def captured(name: str) -> list[int]:
    return ppc.words(bytes.fromhex(json.loads((DATA / name).read_text())["code"]))


# ---- forms and fields --------------------------------------------------------

def test_dform_sign_extends_d_and_names_its_registers():
    assert ppc.dform(0x3821FFE0) == ppc.DForm(14, 1, 1, -32)       # addi r1,r1,-0x20
    ori = ppc.dform(0x618C6E9D)                                      # ori r12,r12,0x6e9d
    assert (ori.rs, ori.ra, ori.ui) == (12, 12, 0x6E9D)
    assert ppc.dform(0x3C60FFFF).disp == -1                          # lis r3,-1
    assert ppc.dform(0x3C60FFFF).ui == 0xFFFF


def test_dsform_drops_the_extended_opcode_from_the_displacement():
    assert ppc.dsform(ppc.LD_R2_24_R1) == ppc.DSForm(58, 2, 1, 24, 0)  # ld r2,0x18(r1)
    assert ppc.dsform(0xF821FE51) == ppc.DSForm(62, 1, 1, -0x1B0, 1)   # stdu r1,-0x1b0(r1)
    assert ppc.dsform(0xE84CFFF8).disp == -8                           # ld r2,-8(r12)


def test_xform_fields_and_the_compare_field():
    cmp = ppc.xform(0x7F832000)                                      # cmpw cr7,r3,r4
    assert (cmp.opcode, cmp.ra, cmp.rb, cmp.xo, cmp.rc, cmp.bf) == (31, 3, 4, 0, 0, 7)
    assert ppc.xform(0x7C0C5800).bf == 0                             # cmpw r12,r11
    assert ppc.xform(0x7C426215).rc == 1                             # add. r2,r2,r12
    assert ppc.xform(0x7F0C1088).to == ppc.TO_NE                     # tdne r12,r2


@pytest.mark.parametrize("word, rt, spr, xo", [
    (0x7D8903A6, 12, ppc.SPR_CTR, 467),  # mtctr r12
    (0x7C0802A6, 0, ppc.SPR_LR, 339),    # mflr r0
    (0x7C6102A6, 3, ppc.SPR_XER, 339),   # mfxer r3
    (0x7D8802A6, 12, ppc.SPR_LR, 339),   # mflr r12
])
def test_xfxform_puts_the_split_spr_field_back_together(word, rt, spr, xo):
    move = ppc.xfxform(word)
    assert (move.opcode, move.rt, move.spr, move.xo) == (31, rt, spr, xo)


def test_xlform_and_bform_conditions():
    beqctr = ppc.xlform(0x4D820420)                                  # beqctr
    assert (beqctr.bo, beqctr.bi, beqctr.xo, beqctr.lk) == (ppc.BO_IF_TRUE, ppc.CR_EQ, 528, 0)
    assert not beqctr.always and not beqctr.if_false
    assert ppc.xlform(ppc.BCTRL).always and ppc.xlform(ppc.BCTRL).lk == 1
    bne = ppc.bform(0x40C200F8)                                      # bne- .+0xf8 (BO 0b00110: a hint)
    assert (bne.bd, bne.aa, bne.lk, bne.cr_field, bne.cr_bit) == (0xF8, 0, 0, 0, ppc.CR_EQ)
    assert bne.if_false and not bne.always
    assert ppc.bform(0x4082FFF0).bd == -16                           # bne .-0x10
    assert not ppc.bform(0x41820010).if_false                        # beq .+0x10
    bdnz = ppc.bform(0x4200FFF0)                                     # bdnz: decrements CTR
    assert not bdnz.if_false and not bdnz.always


def test_iform_offset_is_signed():
    assert ppc.iform(0x4BFFFD6D) == ppc.IForm(18, -0x294, 0, 1)      # bl .-0x294
    assert ppc.iform(0x48000008) == ppc.IForm(18, 8, 0, 0)           # b .+8
    assert ppc.iform(0x48000003).aa == 1                             # bla 0


# ---- predicates and their operand filters ------------------------------------

def test_ld_std_stdu_and_their_filters():
    assert ppc.is_ld(ppc.LD_R2_24_R1, rt=2, ra=1, disp=24)
    assert not ppc.is_ld(ppc.LD_R2_24_R1, rt=3)
    assert not ppc.is_ld(ppc.LD_R2_24_R1, disp=16)
    assert not ppc.is_ld(0xE8410019)                                 # ldu r2,0x18(r1)
    assert not ppc.is_std(ppc.LD_R2_24_R1)
    assert ppc.is_std(0xF8410018, rs=2, ra=1, disp=24)               # std r2,0x18(r1)
    assert not ppc.is_std(0xF821FFE1)                                # stdu r1,-0x20(r1)
    assert ppc.is_stdu(0xF821FFE1, rs=1, ra=1, disp=-32)
    assert not ppc.is_stdu(0xF8010010)                               # std r0,0x10(r1)
    assert not ppc.is_stdu(0xF821FFE1, rs=0)


def test_narrow_loads():
    assert ppc.is_lwz(0x818C0000, rt=12, ra=12, disp=0)              # lwz r12,0(r12)
    assert not ppc.is_lwz(0x81830008, disp=0)                        # lwz r12,8(r3)
    assert all(ppc.is_load_and_zero(w) for w in (0x818C0000, 0x88630000, 0xA0630000))  # lwz, lbz, lhz
    assert not ppc.is_load_and_zero(ppc.LD_R2_24_R1)


def test_add_immediates():
    assert ppc.is_addi(0x38600005, rt=3, ra=0)                       # li r3,5
    assert not ppc.is_addi(0x3D8057AC)                               # lis r12,0x57ac
    assert ppc.is_addis(0x3D8057AC, rt=12, ra=0)
    assert not ppc.is_addis(0x3D82FFFF, ra=0)                        # addis r12,r2,-1
    assert ppc.add_immediate(0x3D8057AC) == 0x57AC0000
    assert ppc.add_immediate(0x3D60E841) == -0x17BF0000              # lis r11,-0x17bf (0xe841)
    assert ppc.add_immediate(0x396BFFE8) == -0x18                    # addi r11,r11,-0x18


def test_or_immediates():
    assert ppc.is_ori(ppc.NOP) and ppc.is_ori(0x618C6E9D)
    assert not ppc.is_oris(0x618C6E9D)
    assert ppc.is_oris(0x64630001)                                   # oris r3,r3,1
    assert ppc.or_immediate(0x64630001) == 0x10000
    assert ppc.or_immediate(0x616B0018) == 0x18                      # ori r11,r11,0x18


def test_register_operations_match_only_their_plain_forms():
    assert ppc.is_add(0x7C426214, rt=2, ra=2, rb=12)                 # add r2,r2,r12
    assert not ppc.is_add(0x7C426214, rb=2)
    assert not ppc.is_add(0x7C426215)                                # add. (writes CR0 too)
    assert not ppc.is_add(0x7C426614)                                # addo (OE set)
    assert ppc.is_mr(0x7C832378)                                     # mr r3,r4
    assert not ppc.is_mr(0x7C832B78)                                 # or r3,r4,r5
    assert not ppc.is_mr(0x7C832379)                                 # or. r3,r4,r4
    shifts = (0x5463103A, 0x7C631670, 0x7C632036, 0x7C632030)        # slwi (rlwinm), srawi, sld, slw
    assert all(ppc.is_shift_or_rotate(w) for w in shifts)
    assert not ppc.is_shift_or_rotate(0x5463103B)                    # rlwinm.
    assert not ppc.is_shift_or_rotate(0x7C6321D6)                    # mullw r3,r3,r4
    assert ppc.is_mfcr(0x7C600026) and not ppc.is_mfmsr(0x7C600026)  # mfcr r3
    assert ppc.is_mfmsr(0x7C6000A6) and not ppc.is_mfcr(0x7C6000A6)  # mfmsr r3


def test_compares_and_traps():
    assert ppc.is_compare(0x7C0C5800, bf=0)                          # cmpw r12,r11
    assert ppc.is_compare(0x7C232040)                                # cmpld r3,r4
    assert not ppc.is_compare(0x7F832000, bf=0)                      # cmpw cr7,r3,r4
    assert not ppc.is_compare(0x7C0C1801)                            # reserved bit 31 set
    assert ppc.is_compare_immediate(0x2C230000) and ppc.is_compare_immediate(0x28230000)  # cmpdi, cmpldi
    assert not ppc.is_compare_immediate(0x7C0C5800)
    assert ppc.is_td(0x7F0C1088) and not ppc.is_tdi(0x7F0C1088)      # tdne r12,r2
    assert not ppc.is_td(0x7F0C5889)                                 # reserved bit 31 set
    assert ppc.is_tdi(0x0B0C0000) and ppc.dform(0x0B0C0000).to == ppc.TO_NE  # tdnei r12,0


@pytest.mark.parametrize("word, mflr, mtlr, mfctr, mtctr", [
    (ppc.MFLR_R0, True, False, False, False),
    (ppc.MTLR_R0, False, True, False, False),
    (0x7C0902A6, False, False, True, False),   # mfctr r0
    (0x7D8903A6, False, False, False, True),   # mtctr r12
    (0x7D8903A7, False, False, False, False),  # mtctr r12 with the reserved bit set
    (0x7C6102A6, False, False, False, False),  # mfxer r3
])
def test_moves_to_and_from_lr_and_ctr(word, mflr, mtlr, mfctr, mtctr):
    assert (ppc.is_mflr(word), ppc.is_mtlr(word), ppc.is_mfctr(word), ppc.is_mtctr(word)) == (mflr, mtlr, mfctr, mtctr)


def test_spr_move_filters():
    assert ppc.is_mflr(0x7D8802A6, rt=12) and not ppc.is_mflr(0x7D8802A6, rt=0)   # mflr r12
    assert ppc.is_mtctr(0x7D8903A6, rs=12) and not ppc.is_mtctr(0x7D8903A6, rs=11)
    assert ppc.is_mfspr(0x7C6102A6, spr=ppc.SPR_XER, rt=3)
    assert ppc.is_mtspr(0x7C6103A6, spr=ppc.SPR_XER) and not ppc.is_mfspr(0x7C6103A6)  # mtxer r3


@pytest.mark.parametrize("word, b, bl, bc", [
    (0x48000008, True, False, False),   # b .+8
    (0x48000001, False, True, False),   # bl .
    (0x48000002, False, False, False),  # ba 0
    (0x48000003, False, False, False),  # bla 0
    (0x40820010, False, False, True),   # bne .+0x10
    (0x40820011, False, False, False),  # bnel
    (0x40820012, False, False, False),  # bnea
    (ppc.BCL_NEXT, False, False, False),
    (ppc.BCTR, False, False, False),
])
def test_relative_branches(word, b, bl, bc):
    assert (ppc.is_b(word), ppc.is_bl(word), ppc.is_bc(word)) == (b, bl, bc)


def test_branches_through_ctr_and_lr():
    assert ppc.is_bcctr(ppc.BCTR, bo=ppc.BO_ALWAYS, lk=0)
    assert ppc.is_bcctr(ppc.BCTRL) and not ppc.is_bcctr(ppc.BCTRL, lk=0)
    assert ppc.is_bcctr(0x4D820420, bo=ppc.BO_IF_TRUE, bi=ppc.CR_EQ, lk=0)   # beqctr
    assert not ppc.is_bcctr(0x4C820420, bo=ppc.BO_IF_TRUE)                  # bnectr
    assert ppc.is_bclr(ppc.BLR) and not ppc.is_bcctr(ppc.BLR)
    assert ppc.is_bclr(ppc.BLRL, lk=1) and not ppc.is_bclr(ppc.BLR, lk=1)


@pytest.mark.parametrize("word, bcctr, bclr", [
    (0x4C820420, True, False),    # bnectr
    (0x4C820020, False, True),    # bnelr
    (0x4C820421, False, False),   # bnectrl: a call
    (ppc.BCTR, False, False),
    (ppc.BLR, False, False),
    (0x40820010, False, False),   # bne .+0x10
])
def test_conditional_branches_through_ctr_and_lr(word, bcctr, bclr):
    assert (ppc.is_conditional_bcctr(word), ppc.is_conditional_bclr(word)) == (bcctr, bclr)


def test_branch_targets():
    assert ppc.branch_target(0x4BFFFD6D, 0x1000) == 0x1000 - 0x294
    assert ppc.branch_target(0x4BFFFFFC, 0) == ppc.MASK64 - 3             # b .-4 at 0 wraps
    assert ppc.conditional_branch_target(0x4082FFF0, 0x1000) == 0x0FF0
    assert ppc.conditional_branch_target(0x40820012, 0x1000) is None      # bnea: absolute
    assert ppc.conditional_branch_target(0x48000008, 0x1000) is None      # b: not conditional


@pytest.mark.parametrize("word, changes", [
    (0x7D8903A6, True),    # mtctr r12
    (0x48000008, False),   # b .+8, inside
    (0x48000400, True),    # b .+0x400, out of the function: a tail call
    (0x48000001, True),    # bl: the callee may
    (0x40820010, False),   # bne .+0x10, inside
    (0x40820011, True),    # bnel
    (ppc.BCTR, True),      # to where CTR says
    (ppc.BLRL, True),
    (ppc.BLR, False),
    (ppc.NOP, False),
    (0x7D8802A6, False),   # mflr r12
])
def test_may_change_ctr(word, changes):
    assert ppc.may_change_ctr(word, 0x1000, 0x0F00, 0x1100) is changes


# ---- on captured code --------------------------------------------------------

def test_the_7_3_push_half_decodes_instruction_by_instruction():
    words = captured("7.3/livepatch_handler.json")
    assert ppc.is_ld(words[0], rt=12, ra=13, disp=0x128)      # ld r12,0x128(r13): thread_info from the PACA
    assert ppc.is_ld(words[1], rt=11, ra=12, disp=0x20)       # ld r11,0x20(r12): livepatch_sp
    assert ppc.is_addi(words[2], rt=11, ra=11)                # addi r11,r11,0x18
    assert ppc.dform(words[2]).disp == 24
    assert ppc.is_std(words[3], rs=11, ra=12, disp=0x20)      # std r11,0x20(r12)
    assert ppc.is_addis(words[4], rt=12, ra=0) and ppc.is_ori(words[5])  # lis r12,0x57ac; ori r12,r12,0x6e9d
    assert ppc.add_immediate(words[4]) | ppc.or_immediate(words[5]) == ppc.STACK_END_MAGIC
    assert ppc.is_std(words[7], rs=2, ra=11, disp=-24)        # std r2,-0x18(r11)
    assert ppc.is_mflr(words[9], rt=12) and ppc.is_mtctr(words[10], rs=12)
    assert words[11] == ppc.BCTRL
    assert ppc.is_td(words[17]) and ppc.xform(words[17]).to == ppc.TO_NE  # tdne r12,r2
    assert ppc.is_mtlr(words[19], rs=12)
    assert words[24] == ppc.BLR


def test_the_rfc_redirect_path_decodes_instruction_by_instruction():
    words = captured("klp_rfc_redirect.json")
    assert ppc.is_mflr(words[0], rt=12) and ppc.is_lwz(words[1], rt=12, ra=12, disp=0)
    assert ppc.is_addis(words[2], rt=11, ra=0) and ppc.is_addi(words[3], rt=11, ra=0)  # lis r11; li r11,0x18
    assert ppc.is_compare(words[4], bf=0) and ppc.is_mfctr(words[5], rt=12)
    assert ppc.is_bcctr(words[6], bo=ppc.BO_IF_TRUE, bi=ppc.CR_EQ, lk=0)              # beqctr
    assert ppc.is_std(words[7], rs=2, ra=1, disp=24) and ppc.is_stdu(words[8], rs=1, ra=1, disp=-32)
    assert words[9] == ppc.BCL_NEXT and words[14] == ppc.BCTR


def test_an_out_of_line_stub():
    words = captured("7.3/ool_stub.json")
    assert words[0] == ppc.MFLR_R0 and words[2] == ppc.MTLR_R0
    assert ppc.is_bl(words[1]) and not ppc.is_b(words[1])
    assert ppc.is_b(words[3]) and ppc.iform(words[3]).offset == -0x794
