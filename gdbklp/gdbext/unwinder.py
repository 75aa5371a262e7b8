"""A gdb unwinder for live-patch trampolines, so that plain `bt` shows the caller A.

While C runs, the return address into A is only on the task's livepatch
stack: gdb's own unwinder finds livepatch_handler's return point in the LR
slot, cannot unwind it, and A vanishes. This unwinder decodes the stack with
gdbklp's walker when gdb asks for the innermost frame, and for each
trampoline frame gives gdb the caller: pc = RA and r2 = the saved TOC from
the matching livepatch-stack entry, r1 unchanged (livepatch_handler has no
frame of its own).

    klp-unwinder on|off|status
"""

import argparse

import gdb
from gdb.unwinder import Unwinder, register_unwinder

from gdbklp.abi.frames import Registers
from gdbklp.gdbext import target
from gdbklp.gdbext.commands import Command

NAME = "gdbklp-livepatch"


class _FrameId:
    def __init__(self, sp: int, pc: int):
        self.sp = sp
        self.pc = pc


class LivepatchUnwinder(Unwinder):
    def __init__(self):
        super().__init__(NAME)
        self.callers: dict[int, tuple[int, int]] = {}  # trampoline sp -> (RA, saved TOC)

    def __call__(self, pending_frame):
        try:
            return self._unwind(pending_frame)
        except Exception:  # an unwinder must never break `bt`; gdb's own takes over
            return None

    def _unwind(self, pending_frame):
        kernel = target.kernel()
        view = kernel.view(read_modules=False)
        if view.livepatch is None:
            return None
        pc = int(pending_frame.read_register("pc"))
        sp = int(pending_frame.read_register("r1"))
        if pending_frame.level() == 0:
            self._decode(kernel, view, pending_frame, pc, sp)
        if not view.is_livepatch_return(pc) or sp not in self.callers:
            return None
        ra, toc = self.callers[sp]
        info = pending_frame.create_unwind_info(_FrameId(sp, view.livepatch.address))
        reg_type = pending_frame.read_register("pc").type
        info.add_saved_register("pc", gdb.Value(ra).cast(reg_type))
        info.add_saved_register("r1", gdb.Value(sp).cast(reg_type))
        info.add_saved_register("r2", gdb.Value(toc).cast(reg_type))
        return info

    def _decode(self, kernel, view, pending_frame, pc: int, sp: int) -> None:
        """Walk the innermost frame's stack once; remember each trampoline's caller."""
        from gdbklp.abi.taskstack import decode_task_stack

        self.callers = {}
        regs = Registers(pc=pc, sp=sp, lr=int(pending_frame.read_register("lr")),
                         toc=int(pending_frame.read_register("r2")))
        if int(pending_frame.read_register("msr")) & (1 << 14):
            return  # user mode: no kernel stack
        task = target.read_u64(int(pending_frame.read_register("r13")) + view.livepatch.paca_thread_info)
        stack = decode_task_stack("", regs, task, target.read_memory, view)
        frames = stack.walk.frames
        for trampoline, caller in zip(frames, frames[1:]):
            if trampoline.kind == "trampoline" and caller.kind == "livepatch-caller":
                self.callers[trampoline.sp] = (caller.pc, caller.toc)


unwinder = LivepatchUnwinder()
register_unwinder(None, unwinder, replace=True)


class KlpUnwinder(Command):
    """Switch gdbklp's live-patch trampoline unwinder: on | off | status."""

    name = "klp-unwinder"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("state", choices=("on", "off", "status"))

    def run(self, args: argparse.Namespace) -> None:
        if args.state != "status":
            unwinder.enabled = args.state == "on"
            gdb.invalidate_cached_frames()
        gdb.write(f"klp-unwinder: {'on' if unwinder.enabled else 'off'}\n")


KlpUnwinder()
