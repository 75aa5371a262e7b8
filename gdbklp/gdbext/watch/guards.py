"""A watch's guard points: breakpoints that cost nothing while all is well.

- each ftrace trampoline's exit into B, for calls it did not redirect: a
  live-patched B may run its own code only as the consistency model allows
  (invariant 12), and C must never be entered from there, past
  livepatch_handler (invariant 7);
- die() and panic(): what the guest did as it went down, with the report
  written at once (the guest may not live to the end of the watch).
"""

import gdb

from gdbklp.abi import ppc
from gdbklp.abi.designs import CodePoint
from gdbklp.abi.ftrace import decode_ool_stub
from gdbklp.abi.invariants import NOT_REDIRECTED, Violation, stamp
from gdbklp.abi.kernel import local_entry
from gdbklp.abi.naming import patched_by
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import patches, target, tasks, vcpus
from gdbklp.gdbext.inferior.trampolines import TRACE_TRAMPOLINES, unredirected_exits
from gdbklp.gdbext.watch.probes import ProbePoint

GUEST_DOWN = ("die", "panic")
# where each one finds the pc the guest went down at: die(str, regs, err) has regs in r4
PC_OF_GUEST_DOWN = {"die": "r4", "panic": None}
PT_REGS_NIP = 256  # offsetof(struct pt_regs, nip) on ppc64
# what is read of the message die() or panic() was given (at most to the end
# of its page; the recorder reads it all, and a failed read leaves the name alone)
MESSAGE_BYTES = 128
SMALLEST_PAGE = 4096


class Guards:
    """The guard points of one watch (its model gives the consistency check
    and the flush of redirections in flight)."""

    def __init__(self, watch):
        self.watch = watch
        self.kernel = watch.kernel
        self.reporter = watch.reporter

    def points(self) -> list[ProbePoint]:
        points = self.exit_points() if self.watch.consistency else []
        for name in GUEST_DOWN:
            address = self.kernel.symbols.address(name)
            if address is not None:
                address = local_entry(self.kernel.code(address - 8, 16), address)
                points.append(ProbePoint(CodePoint.GUEST_DOWN, address, name,
                                         lambda _state, name=name: self.on_guest_down(name)))
        return points

    def exit_points(self) -> list[ProbePoint]:
        exits, notes = unredirected_exits(self.kernel, self.watch.layout.address)
        for note in notes:
            self.reporter.note(note)
        if not exits:
            self.reporter.note("calls that are not redirected are not checked: no exit "
                               f"(bctr or blr) found in {' or '.join(TRACE_TRAMPOLINES)}")
        points = []
        for address in exits:
            through_stub = self.kernel.code(address, 4) == ppc.BLR.to_bytes(4, "little")
            points.append(ProbePoint(CodePoint.FTRACE_EXIT, address, "an ftrace exit into B",
                                     lambda _state, stub=through_stub: self.on_unredirected(stub)))
        return points

    # ---- calls that ftrace did not redirect ----------------------------------

    def unredirected_call(self, through_stub: bool) -> tuple[int, int]:
        """(where the call goes on, RA) at a trampoline's exit for a call it did not
        redirect: at a bctr, CTR and LR; at a blr (out-of-line stubs), LR is the
        stub's `mtlr r0`, so RA is in r0, and the stub's branch goes into B."""
        if not through_stub:
            return target.register("ctr"), target.register("lr")
        lr = target.register("lr")
        stub = decode_ool_stub(target.read_memory(lr - 8, 16), lr - 8)
        if stub is None:
            raise GdbklpError(f"the ftrace exit at {target.register('pc'):#x} returns to {lr:#x}, "
                              "which is not in an out-of-line ftrace stub (mflr r0; bl; mtlr r0; b)")
        return stub.returns_to, target.register("r0")

    def on_unredirected(self, through_stub: bool) -> bool:
        """At a trampoline's exit into B: a live-patched B running its own code must
        be right, and a replacement C must never be entered from here, past
        livepatch_handler (nothing would save A's TOC and return address)."""
        going_to, ra = self.unredirected_call(through_stub)
        target_function = self.kernel.function_start(going_to)
        if target_function in set(patches.replacements(self.kernel).values()):
            return self.on_replacement_without_handler(target_function, ra)
        patched = target_function
        replacement = patches.replacement_of(self.kernel, patched)
        if replacement is None or replacement == patched:  # not live-patched, or an atomic-replace nop
            return False
        task = tasks.current_task(self.kernel)
        v = self.watch.consistency_violation(task, False, patched, replacement)
        violations = [v] if v else []
        who = tasks.identity(task)
        describe = self.watch.describe
        stamp(violations, self.reporter.context(who, vcpus.current_cpu(), call_site=NOT_REDIRECTED,
                                                caller=self.kernel.describe(ra), patched=describe(patched),
                                                replacement=describe(replacement)))
        self.reporter.report.old_code_calls[describe(patched)] += 1
        return self.reporter.violations(who, violations)

    def on_replacement_without_handler(self, replacement: int, ra: int) -> bool:
        """ftrace's exit for calls it did not redirect branches into C itself."""
        exit_ = target.register("pc")
        who = tasks.identity(tasks.current_task(self.kernel))
        describe = self.watch.describe
        patched = patched_by(replacement, patches.replacements(self.kernel))
        v = Violation(7, "C entered from ftrace without livepatch_handler: nothing saves A's TOC and RA",
                      f"a redirection to {describe(replacement)} through livepatch_handler (its push, P1)",
                      f"the trampoline's exit at {self.kernel.describe(exit_)} ({exit_:#x}) branches to C directly",
                      diagnosis=f"the ftrace trampoline's redirect decision, before P1 ({self.kernel.describe(exit_)})")
        violations = stamp([v], self.reporter.context(who, vcpus.current_cpu(), call_site=NOT_REDIRECTED,
                                                      caller=self.kernel.describe(ra), patched=describe(patched),
                                                      replacement=describe(replacement)))
        return self.reporter.violations(who, violations)

    # ---- the guest going down ----------------------------------------------

    def what_went_down(self, name: str) -> str:
        """die("message") at the pc it names, or panic("message"), as far as the
        guest's memory (or the recording) tells."""
        what = name
        try:
            address = target.register("r3")
            # not past the message's page: the next one may not be mapped
            length = min(MESSAGE_BYTES, SMALLEST_PAGE - address % SMALLEST_PAGE)
            message = target.read_memory(address, length).split(b"\0", 1)[0]
            what = f"{name}(\"{message.decode(errors='replace').strip()[:120]}\")"
            if PC_OF_GUEST_DOWN[name]:
                nip = target.read_u64(target.register(PC_OF_GUEST_DOWN[name]) + PT_REGS_NIP)
                what += f" at {self.kernel.describe(nip)}"
        except (gdb.error, gdb.MemoryError, GdbklpError):  # GdbklpError: not recorded
            pass
        return what

    def on_guest_down(self, name: str) -> bool:
        self.watch.mode.catch_up()  # what was recorded before the guest went down counts
        who = tasks.identity(tasks.current_task(self.kernel))
        self.reporter.guest_going_down(f"{self.what_went_down(name)} in {who} on CPU {vcpus.current_cpu()}, "
                                       f"after {self.reporter.report.redirections} redirections")
        self.watch.flush()
        self.reporter.write_files(junit=False)
        return False
