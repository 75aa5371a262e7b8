"""The vocabulary every part of gdbklp shares for the trampoline designs and
the points of a redirection where they are checked (options, reports,
the lab, the bench and the docs use these values as they are)."""

from enum import StrEnum


class Design(StrEnum):
    """A live-patch trampoline design on ppc64le ELFv2."""

    LIVEPATCH_STACK = "livepatch-stack"  # merged (v4.7-6.x): livepatch_handler, the per-task livepatch stack
    RFC = "rfc"                          # the 2015 RFC: a 32-byte mini frame, KLP_return_helper


class CodePoint(StrEnum):
    """A point of one redirection (A calls B, ftrace sends it to C), and the
    other places a watch stops at."""

    P0 = "P0"  # an ftrace trampoline's entry: r0 = RA, r1 = A's sp
    P1 = "P1"  # the branch into C (livepatch_handler's bctrl; the RFC's redirect path)
    P2 = "P2"  # C's global entry
    P3 = "P3"  # C returning into the trampoline
    P4 = "P4"  # back in A, at RA
    HANDLER_ENTRY = "livepatch_handler's entry"   # where ftrace hands a redirected call over
    FTRACE_EXIT = "ftrace exit"                   # a trampoline going on into B: a call not redirected
    GUEST_DOWN = "guest down"                     # die(), panic()
    MODULES = "module list change"                # a module comes or goes, a patch starts its transition
