"""A gdb unwinder for live-patch trampolines, so that plain `bt` shows the caller A.

While C runs, the return address into A is only on the task's livepatch
stack: gdb's own unwinder finds livepatch_handler's return point in the LR
slot, cannot unwind it, and A vanishes. This unwinder decodes the stack with
gdbklp's walker when gdb asks for the innermost frame, and for each
trampoline frame gives gdb the caller: pc = RA and r2 = the saved TOC from
the matching livepatch-stack entry, r1 unchanged (livepatch_handler has no
frame of its own).

A second one unwinds the ftrace trampolines (ftrace_caller, ftrace_regs_caller):
entered at B's first instructions, before B has a frame, they keep the
return address into A in r0 and then in their own frame
(gdbklp.abi.ftrace.decode_traced_calls), where gdb's own unwinders do not
look ("frame did not save the PC"). Its caller is B at the site, with LR =
the return address into A, as B had them when it called the trampoline.

A third unwinder serves gdbklp's own stops (probes, pauses): while one is
handled, the innermost frame is made from registers alone (see
StopHandlingUnwinder); handling_stop() switches it on for that time.
"""

import gdb
from gdb.unwinder import Unwinder, register_unwinder

from gdbklp.abi import ppc
from gdbklp.abi.frames import traced_call
from gdbklp.gdbext.inferior import stacks, target, vcpus
from gdbklp.gdbext.inferior.kernel import kernel as current_kernel

NAME = "gdbklp-livepatch"
CALL_PRESERVED_REGISTERS = ("r13", *(f"r{n}" for n in range(14, 32)), "cr")


class FrameId:
    """gdb wants gdb.Values here: plain ints above 2**63 (kernel addresses) are refused."""

    def __init__(self, sp: gdb.Value, pc: gdb.Value):
        self.sp = sp
        self.pc = pc


class SafeUnwinder(Unwinder):
    """An unwinder whose failure is kept in last_error, never raised: an
    unwinder must never break `bt`, gdb's own take over."""

    def __init__(self, name: str):
        super().__init__(name)
        self.last_error = ""

    def __call__(self, pending_frame):
        try:
            return self._unwind(pending_frame)
        except Exception as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return None

    def _unwind(self, pending_frame):
        raise NotImplementedError


class LivepatchUnwinder(SafeUnwinder):
    def __init__(self):
        super().__init__(NAME)
        self.innermost: dict[str, int] | None = None
        self.callers: dict[int, tuple[int, int]] | None = None  # trampoline sp -> (RA, saved TOC)

    def _unwind(self, pending_frame):
        kernel = current_kernel()
        view = kernel.view(read_modules=False)
        if view.livepatch is None:
            return None
        if pending_frame.level() == 0:
            # a new backtrace: remember the innermost registers, decode only if needed
            self.innermost = {name: int(pending_frame.read_register(name))
                              for name in vcpus.STATE_REGISTERS}
            self.callers = None
        pc = int(pending_frame.read_register("pc"))
        if not view.is_livepatch_return(pc):
            return None
        if self.callers is None:
            self.callers = self._decode(view)
        sp = int(pending_frame.read_register("r1"))
        if sp not in self.callers:
            return None
        ra, toc = self.callers[sp]
        reg_type = pending_frame.read_register("pc").type
        value = lambda number: gdb.Value(number).cast(reg_type)
        info = pending_frame.create_unwind_info(FrameId(value(sp), value(view.livepatch.address)))
        info.add_saved_register("pc", value(ra))
        info.add_saved_register("lr", value(ra))  # the handler's mtlr before its blr
        info.add_saved_register("r1", value(sp))
        info.add_saved_register("r2", value(toc))
        # C preserved the non-volatile registers and the handler does not touch them
        for name in CALL_PRESERVED_REGISTERS:
            info.add_saved_register(name, pending_frame.read_register(name))
        return info

    def _decode(self, view) -> dict[int, tuple[int, int]]:
        """Walk the innermost frame's stack; each trampoline's sp -> (RA, saved TOC)."""
        regs = self.innermost
        if regs is None or vcpus.in_user_mode(regs):
            return {}  # user mode: no kernel stack
        walked = stacks.decode_running(current_kernel(), regs, view).walk.frames
        return {t.sp: (c.pc, c.toc) for t, c in zip(walked, walked[1:])
                if t.kind == "trampoline" and c.kind == "livepatch-caller"}


unwinder = LivepatchUnwinder()
register_unwinder(None, unwinder, replace=True)


class TracedCallUnwinder(SafeUnwinder):
    """The caller of an ftrace trampoline's frame: the traced function B at its
    site (LR at the trampoline's entry) with LR = RA, or A itself (pc = RA)
    where the site is no longer known; r1 is A's stack pointer either way."""

    def __init__(self):
        super().__init__("gdbklp-ftrace")

    def _unwind(self, pending_frame):
        view = current_kernel().view(read_modules=False)
        pc = int(pending_frame.read_register("pc")) & ppc.MASK64
        state = view.traced_calls.at(pc) if view.traced_calls else None
        if state is None:
            return None
        if isinstance(state, str):
            self.last_error = state  # the decoder's refusal, naming the address
            return None
        wanted = {*state.ra_registers, *state.site_registers, *(r for r, where in state.kept if where == r)}
        registers = {name: _register(pending_frame, name) for name in wanted}
        sp = int(pending_frame.read_register("r1")) & ppc.MASK64
        found = traced_call(state, sp, registers, target.read_memory)
        if isinstance(found, str):
            self.last_error = f"{state.trampoline} at {pc:#x}: {found}"
            return None
        reg_type = pending_frame.read_register("pc").type
        value = lambda number: gdb.Value(number).cast(reg_type)
        info = pending_frame.create_unwind_info(FrameId(value(sp), value(state.entry)))
        ra = found.ra[0]
        info.add_saved_register("pc", value(found.site[0] if found.site else ra))
        info.add_saved_register("r1", value(found.a_sp))
        if found.site:  # B at its site has RA in LR and r0 (its mflr r0)
            info.add_saved_register("lr", value(ra))
            info.add_saved_register("r0", value(ra))
        for name, where in state.kept:  # r2 and the non-volatile registers, where they still are
            kept = registers.get(name) if where == name else target.read_u64(found.a_sp + where)
            if kept is not None:
                info.add_saved_register(name, value(kept))
        return info


def _register(pending_frame, name: str) -> int | None:
    """A register of the frame being unwound, or None where gdb does not know it."""
    try:
        found = pending_frame.read_register(name)
        return None if found.is_optimized_out else int(found) & ppc.MASK64
    except (gdb.error, ValueError):
        return None


traced_call_unwinder = TracedCallUnwinder()
register_unwinder(None, traced_call_unwinder, replace=True)


class StopHandlingUnwinder(Unwinder):
    """The innermost frame from registers alone, while gdbklp handles a stop itself.

    gdb computes the innermost frame's id at each stop, whenever a handler
    selects a vCPU and reads a register, and when it writes one; its own
    unwinders then analyse the function's prologue, some twenty 4-byte reads
    of code per frame, most of a stop's packets. klp-watch's probes and
    samples never unwind, so the id is made of r1 alone and the caller is left
    unknown. Enabled only while a handler runs; the frames are forgotten
    when the guest resumes (or by the handler, if it leaves the guest
    stopped for the user).
    """

    def __init__(self):
        super().__init__("gdbklp-stop-handling")
        self.enabled = False

    def __call__(self, pending_frame):
        if pending_frame.level() != 0:
            return None
        sp = pending_frame.read_register("r1")
        # not (sp, pc): a probe moves pc past an instruction it executed for the
        # guest, and gdb finds its selected frame again by id afterwards
        return pending_frame.create_unwind_info(FrameId(sp, sp))


_stop_unwinder = StopHandlingUnwinder()
register_unwinder(None, _stop_unwinder, replace=True)  # gdb puts it first in line, before the one above


def handle_stops(enabled: bool) -> None:
    """Make the innermost frame from registers alone (True) while gdbklp
    handles a stop of its own, or give frames back to gdb's unwinders (False)."""
    _stop_unwinder.enabled = enabled


def livepatch_unwinder(enabled: bool | None = None) -> LivepatchUnwinder:
    """The trampoline unwinder, switched on or off, with the ftrace one, if
    enabled is given (gdb's cached frames are then forgotten)."""
    if enabled is not None:
        unwinder.enabled = traced_call_unwinder.enabled = enabled
        gdb.invalidate_cached_frames()
    return unwinder
