"""Exact encodings of the ppc64 instructions gdbklp reasons about.

Decisions are made on these encodings, never on disassembler text; capstone
(see disassemble()) is only used to show instructions to people.

Every instruction word is 32 bits. The Power ISA numbers its bits from 0,
the most significant: the primary opcode is bits 0-5, and the form it
selects lays out the rest. The forms decoded here, with their fields:

  D    opcode RT RA D                 addi addis ori oris lbz lhz lwz cmpi cmpli tdi
  DS   opcode RT RA DS XO(2)          ld std stdu
  X    opcode RT RA RB XO(10) Rc      or cmp cmpl td slw sld srawi mfcr mfmsr, and
                                      add (XO-form: OE, the top bit of XO here, is 0)
  M    opcode RS RA SH MB ME Rc       rlwinm (decoded as X-form: only rS and rA matter)
  XFX  opcode RT SPR XO(10)           mfspr mtspr
  XL   opcode BO BI BH XO(10) LK      bclr bcctr
  I    opcode LI AA LK                b bl
  B    opcode BO BI BD AA LK          bc

The field in bits 6-10 is named RT throughout; it is RS for a store or a
logical operation (rS is the source, rA the result), TO for a trap and
BF (with L) for a compare. Bit 31 is Rc in the arithmetic, logical,
shift and rotate instructions: set, the instruction is the "record" form
(add., or., ...) that also writes CR0, which nothing here models, so the
predicates match the plain forms only; in the other X-form and XFX-form
instructions bit 31 is reserved and must be 0.
"""

import functools
from dataclasses import dataclass

MASK64 = (1 << 64) - 1  # registers and addresses are 64 bits wide

NOP = 0x60000000            # ori r0,r0,0
LD_R2_24_R1 = 0xE8410018    # ld r2,24(r1): the TOC restore after a cross-object call
TOC_SAVE_SLOT = 24          # the ELFv2 frame header's TOC save slot: that ld's 24(r1)
BCTRL = 0x4E800421
BLRL = 0x4E800021
BLR = 0x4E800020
BCTR = 0x4E800420
BCL_NEXT = 0x429F0005       # bcl 20,31,$+4: LR = the next instruction's address
BRANCH_TO_SELF = 0x48000000  # b . (I-form, LI 0): a vCPU that reaches it stays there
MFLR_R0 = 0x7C0802A6
MTLR_R0 = 0x7C0803A6
STACK_END_MAGIC = 0x57AC6E9D
MSR_PR = 1 << 14  # problem state: the vCPU (or the interrupted context) runs user code

# ELFv2 register conventions: what a call may change and what it must keep
VOLATILE_GPRS = ("r0", *(f"r{n}" for n in range(3, 13)))
CALLEE_SAVED_GPRS = tuple(f"r{n}" for n in range(14, 32))  # r1, r2 and r13 have roles of their own

# special-purpose register numbers (the SPR field of mfspr and mtspr)
SPR_XER, SPR_LR, SPR_CTR = 1, 8, 9

# BO field values of conditional branches (the two low "at" hint bits zero)
BO_IF_FALSE = 0b00100   # branch if the CR bit BI is clear; CTR untouched
BO_IF_TRUE = 0b01100    # branch if the CR bit BI is set; CTR untouched
BO_ALWAYS = 0b10100     # branch whatever CR and CTR hold
# the bits of a CR field, as BI numbers them within it (cr0's bits are BI 0-3)
CR_LT, CR_GT, CR_EQ, CR_SO = range(4)
# TO bits of td and tdi: trap if a < b, a > b, a == b (signed), a < b, a > b (unsigned)
TO_LT, TO_GT, TO_EQ, TO_LTU, TO_GTU = 16, 8, 4, 2, 1
TO_NE = TO_LT | TO_GT   # tdne

# primary opcodes
_TDI, _CMPLI, _CMPI, _ADDI, _ADDIS, _BC, _B, _XL, _RLWINM = 2, 10, 11, 14, 15, 16, 18, 19, 21
_ORI, _ORIS, _X, _LWZ, _LBZ, _LHZ, _LD, _STD = 24, 25, 31, 32, 34, 40, 58, 62
# extended opcodes of the XL-form (opcode 19) and X-form (opcode 31) instructions;
# add's is the XO-form's with OE 0 (no overflow recording)
_BCLR, _BCCTR = 16, 528
_CMP, _MFCR, _SLW, _SLD, _CMPL, _TD, _MFMSR, _ADD = 0, 19, 24, 27, 32, 68, 83, 266
_MFSPR, _OR, _MTSPR, _SRAWI = 339, 444, 467, 824
# DS-form extended opcodes: ld/std and their "with update" forms ldu/stdu
_DS_PLAIN, _DS_UPDATE = 0, 1


def _signed(value: int, bits: int) -> int:
    """value, a bits-wide two's complement field, as a Python int."""
    return value - (1 << bits) if value >> (bits - 1) & 1 else value


def _opcode(word: int) -> int:
    """The primary opcode, bits 0-5."""
    return word >> 26


def _rt(word: int) -> int:
    """Bits 6-10: RT, RS, TO, BO, or BF and L."""
    return (word >> 21) & 31


def _ra(word: int) -> int:
    """Bits 11-15: RA or BI (and the low half of an SPR number)."""
    return (word >> 16) & 31


def _rb(word: int) -> int:
    """Bits 16-20: RB (and the high half of an SPR number)."""
    return (word >> 11) & 31


def _xo10(word: int) -> int:
    """Bits 21-30: the extended opcode of the X, XL and XFX forms."""
    return (word >> 1) & 0x3FF


@dataclass(frozen=True)
class _Registers:
    """The fields in bits 6-10 (RT) and 11-15 (RA) that most forms share."""

    opcode: int
    rt: int
    ra: int

    @property
    def rs(self) -> int:
        """RT as the source of a store or a logical operation."""
        return self.rt

    @property
    def to(self) -> int:
        """RT as the TO field of a trap (td, tdi)."""
        return self.rt

    @property
    def bf(self) -> int:
        """The CR field a compare writes (bits 6-8; bit 10 is L, bit 9 reserved)."""
        return self.rt >> 2


@dataclass(frozen=True)
class DForm(_Registers):
    """D-form: opcode RT RA D, with D sign-extended."""

    disp: int

    @property
    def ui(self) -> int:
        """D as the unsigned immediate of ori and oris."""
        return self.disp & 0xFFFF


@dataclass(frozen=True)
class DSForm(_Registers):
    """DS-form: opcode RT RA DS XO; disp is DS || 0b00, sign-extended."""

    disp: int
    xo: int


@dataclass(frozen=True)
class XForm(_Registers):
    """X-form (and XO-form, whose OE bit is the top bit of xo): opcode RT RA RB XO Rc.

    rlwinm (M-form) keeps rS and rA in the same places and decodes as one too.
    """

    rb: int
    xo: int
    rc: int


@dataclass(frozen=True)
class XFXForm:
    """XFX-form move to or from a special-purpose register: opcode RT SPR XO."""

    opcode: int
    rt: int
    spr: int    # the SPR number, its two 5-bit halves put back in order
    xo: int

    @property
    def rs(self) -> int:
        """RT as the source of mtspr."""
        return self.rt


@dataclass(frozen=True)
class _Condition:
    """BO and BI, the condition of a conditional branch."""

    opcode: int
    bo: int
    bi: int

    @property
    def always(self) -> bool:
        """BO ignores CR (BO_0) and leaves CTR alone (BO_2): an unconditional branch."""
        return self.bo & BO_ALWAYS == BO_ALWAYS

    @property
    def if_false(self) -> bool:
        """Taken when CR bit BI is clear, CTR untouched (bne, bge, ble, ... with any hint)."""
        return self.bo & 0b11100 == BO_IF_FALSE

    @property
    def cr_field(self) -> int:
        """The CR field BI tests."""
        return self.bi >> 2

    @property
    def cr_bit(self) -> int:
        """The bit of that field BI tests: CR_LT, CR_GT, CR_EQ or CR_SO."""
        return self.bi & 3


@dataclass(frozen=True)
class XLForm(_Condition):
    """XL-form branch through LR or CTR: opcode BO BI BH XO LK."""

    bh: int
    xo: int
    lk: int


@dataclass(frozen=True)
class BForm(_Condition):
    """B-form conditional branch: opcode BO BI BD AA LK; bd is the signed byte offset."""

    bd: int
    aa: int
    lk: int


@dataclass(frozen=True)
class IForm:
    """I-form branch: opcode LI AA LK; offset is LI || 0b00, the signed byte offset."""

    opcode: int
    offset: int
    aa: int
    lk: int


# Decoding is memoized by word: a check runs the same few dozen instructions
# (livepatch_handler's return half, call sites) for every redirection, and a
# recorded watch checks tens of thousands a second.
DECODED_WORDS = 4096


@functools.lru_cache(maxsize=DECODED_WORDS)
def dform(word: int) -> DForm:
    """word's fields as a D-form instruction."""
    return DForm(_opcode(word), _rt(word), _ra(word), _signed(word & 0xFFFF, 16))


@functools.lru_cache(maxsize=DECODED_WORDS)
def dsform(word: int) -> DSForm:
    """word's fields as a DS-form instruction."""
    return DSForm(_opcode(word), _rt(word), _ra(word), _signed(word & 0xFFFC, 16), word & 3)


@functools.lru_cache(maxsize=DECODED_WORDS)
def xform(word: int) -> XForm:
    """word's fields as an X-form (or XO-form, or M-form) instruction."""
    return XForm(_opcode(word), _rt(word), _ra(word), _rb(word), _xo10(word), word & 1)


@functools.lru_cache(maxsize=DECODED_WORDS)
def xfxform(word: int) -> XFXForm:
    """word's fields as an XFX-form instruction (mfspr, mtspr)."""
    return XFXForm(_opcode(word), _rt(word), _ra(word) | _rb(word) << 5, _xo10(word))


@functools.lru_cache(maxsize=DECODED_WORDS)
def xlform(word: int) -> XLForm:
    """word's fields as an XL-form branch (bclr, bcctr)."""
    return XLForm(_opcode(word), _rt(word), _ra(word), (word >> 11) & 3, _xo10(word), word & 1)


@functools.lru_cache(maxsize=DECODED_WORDS)
def bform(word: int) -> BForm:
    """word's fields as a B-form branch (bc)."""
    return BForm(_opcode(word), _rt(word), _ra(word), _signed(word & 0xFFFC, 16), (word >> 1) & 1, word & 1)


@functools.lru_cache(maxsize=DECODED_WORDS)
def iform(word: int) -> IForm:
    """word's fields as an I-form branch (b, bl)."""
    return IForm(_opcode(word), _signed(word & 0x03FFFFFC, 26), (word >> 1) & 1, word & 1)


def _fields_match(decode, word: int, **wanted) -> bool:
    """Does every field given (not None) of decode(word) have the wanted value?"""
    wanted = {name: value for name, value in wanted.items() if value is not None}
    if not wanted:
        return True
    form = decode(word)
    return all(getattr(form, name) == value for name, value in wanted.items())


# ---- loads and stores --------------------------------------------------------

@functools.lru_cache(maxsize=DECODED_WORDS)
def _is_ds(word: int, op: int, xo: int, rt: int | None, ra: int | None, disp: int | None) -> bool:
    """A DS-form instruction of this opcode and extended opcode, with these fields."""
    return _opcode(word) == op and word & 3 == xo and _fields_match(dsform, word, rt=rt, ra=ra, disp=disp)


def is_ld(word: int, rt: int | None = None, ra: int | None = None, disp: int | None = None) -> bool:
    """ld rT,disp(rA)."""
    return _is_ds(word, _LD, _DS_PLAIN, rt, ra, disp)


def is_std(word: int, rs: int | None = None, ra: int | None = None, disp: int | None = None) -> bool:
    """std rS,disp(rA)."""
    return _is_ds(word, _STD, _DS_PLAIN, rs, ra, disp)


def is_stdu(word: int, rs: int | None = None, ra: int | None = None, disp: int | None = None) -> bool:
    """stdu rS,disp(rA): the store, then rA += disp (stdu r1,-N(r1) opens a frame)."""
    return _is_ds(word, _STD, _DS_UPDATE, rs, ra, disp)


def is_lwz(word: int, rt: int | None = None, ra: int | None = None, disp: int | None = None) -> bool:
    """lwz rT,disp(rA)."""
    return _opcode(word) == _LWZ and _fields_match(dform, word, rt=rt, ra=ra, disp=disp)


def is_load_and_zero(word: int) -> bool:
    """lbz, lhz or lwz: a byte, halfword or word loaded into rT, zero-extended."""
    return _opcode(word) in (_LBZ, _LHZ, _LWZ)


# ---- arithmetic and logical operations ---------------------------------------

def is_addi(word: int, rt: int | None = None, ra: int | None = None) -> bool:
    """addi rT,rA,SI; li rT,SI when rA is 0 (which then reads as 0, not r0)."""
    return _opcode(word) == _ADDI and _fields_match(dform, word, rt=rt, ra=ra)


def is_addis(word: int, rt: int | None = None, ra: int | None = None) -> bool:
    """addis rT,rA,SI; lis rT,SI when rA is 0."""
    return _opcode(word) == _ADDIS and _fields_match(dform, word, rt=rt, ra=ra)


def add_immediate(word: int) -> int:
    """What addi or addis adds to rA (or to 0): SI, or SI shifted up 16 bits; signed."""
    disp = dform(word).disp
    return disp << 16 if _opcode(word) == _ADDIS else disp


def is_ori(word: int) -> bool:
    """ori rA,rS,UI (nop is ori r0,r0,0)."""
    return _opcode(word) == _ORI


def is_oris(word: int) -> bool:
    """oris rA,rS,UI."""
    return _opcode(word) == _ORIS


def or_immediate(word: int) -> int:
    """What ori or oris ORs into rS: UI, or UI shifted up 16 bits."""
    ui = dform(word).ui
    return ui << 16 if _opcode(word) == _ORIS else ui


@functools.lru_cache(maxsize=DECODED_WORDS)
def _is_x(word: int, *xos: int) -> bool:
    """An opcode-31 instruction with one of these extended opcodes and bit 31 clear."""
    return _opcode(word) == _X and _xo10(word) in xos and not word & 1


def is_add(word: int, rt: int | None = None, ra: int | None = None, rb: int | None = None) -> bool:
    """add rT,rA,rB."""
    return _is_x(word, _ADD) and _fields_match(xform, word, rt=rt, ra=ra, rb=rb)


def is_mr(word: int) -> bool:
    """mr rA,rS: or rA,rS,rS."""
    return _is_x(word, _OR) and _rt(word) == _rb(word)


def is_shift_or_rotate(word: int) -> bool:
    """rlwinm, slw, sld or srawi: rA from rS shifted or rotated (and masked)."""
    return (_opcode(word) == _RLWINM and not word & 1) or _is_x(word, _SLW, _SLD, _SRAWI)


def is_mfcr(word: int) -> bool:
    """mfcr rT (or mfocrf rT, which copies one field of CR)."""
    return _is_x(word, _MFCR)


def is_mfmsr(word: int) -> bool:
    """mfmsr rT."""
    return _is_x(word, _MFMSR)


# ---- compares and traps ------------------------------------------------------

def is_compare(word: int, bf: int | None = None) -> bool:
    """cmp or cmpl (cmpd, cmpw, cmpld, cmplw): rA against rB into CR field bf."""
    return _is_x(word, _CMP, _CMPL) and _fields_match(xform, word, bf=bf)


def is_compare_immediate(word: int) -> bool:
    """cmpi or cmpli (cmpdi, cmpwi, cmpldi, cmplwi): rA against an immediate."""
    return _opcode(word) in (_CMPI, _CMPLI)


def is_td(word: int) -> bool:
    """td TO,rA,rB: trap if rA and rB compare as TO says (tdne: TO_NE)."""
    return _is_x(word, _TD)


def is_tdi(word: int) -> bool:
    """tdi TO,rA,SI."""
    return _opcode(word) == _TDI


# ---- moves to and from LR, CTR and XER ---------------------------------------

def is_mfspr(word: int, spr: int | None = None, rt: int | None = None) -> bool:
    """mfspr rT,SPR (mflr, mfctr, mfxer, ...)."""
    return _is_x(word, _MFSPR) and _fields_match(xfxform, word, spr=spr, rt=rt)


def is_mtspr(word: int, spr: int | None = None, rs: int | None = None) -> bool:
    """mtspr SPR,rS (mtlr, mtctr, mtxer, ...)."""
    return _is_x(word, _MTSPR) and _fields_match(xfxform, word, spr=spr, rs=rs)


def is_mflr(word: int, rt: int | None = None) -> bool:
    """mflr rT."""
    return is_mfspr(word, SPR_LR, rt)


def is_mtlr(word: int, rs: int | None = None) -> bool:
    """mtlr rS."""
    return is_mtspr(word, SPR_LR, rs)


def is_mfctr(word: int, rt: int | None = None) -> bool:
    """mfctr rT."""
    return is_mfspr(word, SPR_CTR, rt)


def is_mtctr(word: int, rs: int | None = None) -> bool:
    """mtctr rS."""
    return is_mtspr(word, SPR_CTR, rs)


# ---- branches ----------------------------------------------------------------

def is_b(word: int) -> bool:
    """b target (I-form, relative, no link)."""
    return _opcode(word) == _B and word & 3 == 0


def is_bl(word: int) -> bool:
    """bl target (I-form, relative, LK=1)."""
    return _opcode(word) == _B and word & 3 == 1


def is_bc(word: int) -> bool:
    """bc BO,BI,target (B-form, relative, no link): bne, beq, bdnz, ..."""
    return _opcode(word) == _BC and word & 3 == 0


@functools.lru_cache(maxsize=DECODED_WORDS)
def _is_xl(word: int, xo: int, bo: int | None, bi: int | None, lk: int | None) -> bool:
    """An XL-form branch of this extended opcode, with these fields."""
    return _opcode(word) == _XL and _xo10(word) == xo and _fields_match(xlform, word, bo=bo, bi=bi, lk=lk)


def is_bcctr(word: int, bo: int | None = None, bi: int | None = None, lk: int | None = None) -> bool:
    """bcctr or bcctrl BO,BI: a branch to CTR (bctr is BO_ALWAYS, lk 0)."""
    return _is_xl(word, _BCCTR, bo, bi, lk)


def is_bclr(word: int, bo: int | None = None, bi: int | None = None, lk: int | None = None) -> bool:
    """bclr or bclrl BO,BI: a branch to LR (blr is BO_ALWAYS, lk 0)."""
    return _is_xl(word, _BCLR, bo, bi, lk)


def is_conditional_bcctr(word: int) -> bool:
    """bcctr with a condition (bnectr crN and its kin), no link."""
    return is_bcctr(word, lk=0) and not xlform(word).always


def is_conditional_bclr(word: int) -> bool:
    """bclr with a condition (bnelr crN and its kin), no link."""
    return is_bclr(word, lk=0) and not xlform(word).always


def branch_target(word: int, address: int) -> int:
    """Target of an I-form branch (b/bl) at address."""
    return (address + iform(word).offset) & MASK64


def conditional_branch_target(word: int, address: int) -> int | None:
    """Target of a B-form conditional branch (bc, opcode 16, AA=0, LK=0), else None."""
    if not is_bc(word):
        return None
    return (address + bform(word).bd) & MASK64


def may_change_ctr(word: int, address: int, start: int, end: int) -> bool:
    """Can executing word at address, in a function occupying [start, end),
    leave CTR changed when the function returns? True for mtctr, for any
    call (bl, bcl, bctrl, blrl: the callee may write CTR), for a branch out of
    the function (a tail call) and for a branch through CTR (bctr, whose
    target is not known from the code)."""
    if is_mtctr(word):
        return True
    if _opcode(word) == _B:  # b, bl, ba, bla
        return not is_b(word) or not start <= branch_target(word, address) < end
    if _opcode(word) == _BC:  # bc, bcl, bca, bcla
        target = conditional_branch_target(word, address)
        return target is None or not start <= target < end
    return is_bcctr(word) or is_bclr(word, lk=1)


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
