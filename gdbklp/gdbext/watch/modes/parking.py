"""klp-watch start --park: every redirection checked at P3, without a breakpoint stop.

On a QEMU older than 10.2 every breakpoint stop flushes the whole translation cache, and
the guest then re-translates its working set: that, not gdb, is most of what
a breakpoint per redirection costs. A pause by interrupt flushes nothing.
So parking writes a branch to itself (`b .`) over P3's instruction: a vCPU
whose C has returned into livepatch_handler waits at P3 with everything the
redirection did still in place, exactly as at the breakpoint. klp-watch
pauses the guest by interrupt, checks each vCPU waiting there as the
breakpoint probe would (the model's P3 point), executes P3's instruction for it
(`ld rT, OFF(r13)`: rT = the task, pc past it) and resumes. No task gets past
P3 unchecked, so no redirection is missed.

What it costs: a task waits at P3 until the next pause. Pauses follow each
other quickly while tasks keep arriving, and back off while none do (a pause
costs the guest the same whatever it finds).

What it risks: the branch is in the guest's memory, not in QEMU's breakpoint
list. The watch puts the instruction back when it ends (klp-watch stop
while the guest runs ends it at the next pause), through a vCPU that runs
kernel code: QEMU's gdbstub writes through the selected vCPU's MMU, and a
vCPU in user mode cannot reach kernel text. If gdb dies first,
tasks that reach P3 wait there until a gdb attaches and runs klp-watch start
or stop, which put the instruction back from the vmlinux file.
"""

import gdb

from gdbklp.abi import ppc
from gdbklp.errors import GdbklpError
from gdbklp.gdbext.inferior import target, vcpus
from gdbklp.gdbext.inferior.kernel import Kernel
from gdbklp.gdbext.watch.modes.pauses import PeriodicPauses
from gdbklp.gdbext.watch.probes import Probes, describe_points
from gdbklp.options import Mode

FASTEST = 0.0005  # seconds the guest runs between pauses while tasks keep arriving at P3
SLOWEST = 0.008   # ... after pauses that found none: the longest a task can wait at P3
PARKED = ppc.BRANCH_TO_SELF.to_bytes(4, "little")


def guest_stopped() -> bool:
    thread = gdb.selected_thread()
    return thread is not None and thread.is_valid() and not thread.is_running()


def parking_points(kernel: Kernel) -> list[int]:
    """Where a park watch may hold tasks: P3, and P1 (the bctrl into C) with --resolve-indirect."""
    layout = kernel.livepatch_layout()
    return [layout.return_point, layout.call_to_c]


def unpark_leftover(kernel: Kernel) -> bool:
    """Put the instructions back where an earlier park watch left them parked (its
    gdb went away); the originals come from the vmlinux file. True if it did."""
    if kernel.symbols.address("livepatch_handler") is None:
        return False
    vcpus.select_kernel_vcpu()  # P3 is read and written through the selected vCPU's MMU
    unparked = False
    for address in parking_points(kernel):
        if target.read_memory(address, 4) == PARKED:
            target.write_memory(address, kernel.code(address, 4))
            unparked = True
    return unparked


class Parking(PeriodicPauses):
    """The park mode of a watch (see the module's docstring)."""

    mode = Mode.PARK

    def __init__(self, watch):
        super().__init__(watch, FASTEST)
        # P3, where each redirection is checked; P1 too where C is taken from CTR
        self.points = {point.address: point for point in watch.design_points()}
        unreleased = [p for p in self.points.values() if p.release is None]
        if unreleased:
            raise GdbklpError(f"--park: klp-watch cannot execute the instruction at {unreleased[0].label} "
                              f"({unreleased[0].address:#x}) for the guest, so it cannot park there")
        self.originals: dict[int, bytes] = {}
        self.guards: Probes | None = None
        self.in_pause = False
        self.end_reason: str | None = None  # the watch ends at the next pause (asked while the guest ran)

    def arm(self) -> str:
        # a breakpoint taken out at each pause would be put back (and QEMU's
        # translation cache flushed) at each resume: keep the probes inserted
        self.always_inserted = gdb.parameter("breakpoint always-inserted")
        gdb.execute("set breakpoint always-inserted on")
        self.guards = Probes(self.watch.guard_points(), self.watch.record_error)
        self.originals = {address: target.read_memory(address, 4) for address in self.points}
        for address in self.points:
            target.write_memory(address, PARKED)
        self.start_pauses()
        return f"parking at {describe_points(list(self.points.values()))} (pauses by interrupt, no breakpoint there)"

    @property
    def breakpoints(self) -> int:
        return len(self.guards) if self.guards else 0

    def can_end_now(self) -> bool:
        """Not while the guest runs: a parked vCPU must be released, and P3's
        instruction put back, while the guest is held."""
        return self.watch.report.ended is not None or guest_stopped()

    def end_when_possible(self, reason: str) -> None:
        """End the watch from the next pause (soon: the guest runs): an
        interrupt from outside could land in one of our pauses and be lost
        when it resumes."""
        self.end_reason = reason
        self.period = FASTEST

    def on_pause(self) -> bool:
        self.in_pause = True
        try:
            stop = self.check_parked()
            # P3 is put back through a vCPU that runs kernel code; while none
            # does (the last one checked may run user code), a later pause ends the watch
            if self.end_reason and not stop and vcpus.found_kernel_vcpu():
                self.watch.finish(self.end_reason)
            return stop
        finally:
            self.in_pause = False

    def check_parked(self) -> bool:
        """Handle each vCPU waiting at a parking point and let it go on; True when
        the watch wants the guest stopped (that vCPU then stays where it waits)."""
        released = 0
        for _ in vcpus.select_each(self.vcpus):
            point = self.points.get(target.register("pc"))
            if point is not None:
                if point.handle():
                    return True
                released += 1
        # tasks arrive at P3 about as often as before: home in on that interval
        self.period = max(self.period / 2, FASTEST) if released else min(2 * self.period, SLOWEST)
        return False

    def close(self) -> None:
        """End the pauses; release the vCPUs waiting and put the instructions back."""
        if self.stopping.is_set() or self.thread is None:
            return
        if guest_stopped() and not self.in_pause:
            vcpus.select_kernel_vcpu()  # none: refused before anything is undone, the watch goes on
        super().close()
        gdb.execute(f"set breakpoint always-inserted {'on' if self.always_inserted else 'off'}")
        self.guards.remove()
        if not guest_stopped():
            if gdb.selected_thread() is not None:  # running (gdb is going away): nobody can unpark now
                gdb.write("klp-watch: P3 stays parked while the guest runs: tasks that reach it wait "
                          "until a gdb attaches and runs klp-watch stop\n")
            return
        if not self.in_pause:
            self.check_parked()
        # QEMU writes through the selected vCPU's MMU: not through the last one
        # check_parked looked at, which may run user code (it cannot reach P3)
        vcpus.select_kernel_vcpu()
        for address, original in self.originals.items():
            target.write_memory(address, original)
