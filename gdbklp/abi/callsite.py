"""Classify a return address by the call instruction before it (ELFv2).

A return address RA is a call site if RA-4 holds a call (bl or bctrl). What
follows the call tells how the caller treats r2:
  local         bl B; nop            same TOC, r2 is not restored
  local_other   bl B; <other insn>   a static callee: no TOC slot at all
  global        bl B; ld r2,24(r1)   through a stub that saved r2 at 24(r1)
  indirect      bctrl; ld r2,24(r1)  function pointer, r2 saved by the caller
"""

import enum

from gdbklp.abi import ppc


class CallSite(enum.Enum):
    LOCAL = "local"
    LOCAL_OTHER = "local_other"
    GLOBAL = "global"
    INDIRECT = "indirect"
    INDIRECT_NO_TOC = "indirect_no_toc"  # bctrl/blrl without the r2 restore
    NOT_A_CALL = "not_a_call"

    @property
    def restores_toc(self) -> bool:
        """True if the caller itself reloads r2 from 24(r1) after the call."""
        return self in (CallSite.GLOBAL, CallSite.INDIRECT)

    @property
    def is_call(self) -> bool:
        return self is not CallSite.NOT_A_CALL


def classify(call_word: int, next_word: int) -> CallSite:
    """Class of the call site whose instruction at RA-4 is call_word and at RA is next_word."""
    if ppc.is_bl(call_word):
        if next_word == ppc.NOP:
            return CallSite.LOCAL
        if next_word == ppc.LD_R2_24_R1:
            return CallSite.GLOBAL
        return CallSite.LOCAL_OTHER
    if call_word in (ppc.BCTRL, ppc.BLRL):
        return CallSite.INDIRECT if next_word == ppc.LD_R2_24_R1 else CallSite.INDIRECT_NO_TOC
    return CallSite.NOT_A_CALL


def classify_bytes(window: bytes) -> CallSite:
    """Classify from the 8 bytes at RA-4 (little-endian)."""
    if len(window) < 8:
        return CallSite.NOT_A_CALL
    call_word, next_word = ppc.words(window[:8])
    return classify(call_word, next_word)
