"""On the real lab: vCPUs that run user code, or enter the kernel from it.

- At the first instructions of an interrupt from user space the kernel still
  runs on the user's r1 (and, before it swaps it with an SPRG, the user's
  r13). gdb's interrupts land there about once in 15 while shells start
  tasks (their pages fault in); klp-frames once read the user's r1 as a
  kernel stack pointer there and failed ("Cannot access memory"),
  test_identity_lab's pid test with it.
- QEMU's gdbstub reads and writes through the selected vCPU's MMU, and one
  that runs user code cannot reach kernel text: a parked watch once put P3
  back through the last vCPU its pause had looked at, failed when that one
  ran user code, and never ended (13 of 20 rounds with a busy loop in user
  space on the previous main).
"""

import json

import pytest

from helpers import needs_parking
from gdbklp.abi.kernel import KERNEL_BASE
from gdbklp.gdbmi import GdbCommandError
from gdbklp.lab.session import end_watch_running

# the data storage interrupt's relocation-on vector (6.1): +0 still has the
# user's r13 (mfsprg r13,1 follows), +20 the PACA in r13 but the user's r1
VECTOR = "exc_virt_0x4300_data_access"
FAULTING_WORKLOAD = "for i in $(seq 20); do sleep 0; done"  # new processes fault their pages in


def register(gdb, name: str) -> int:
    return int(gdb.console(f"output/x ${name}").strip(), 16)


def stop_entering_from_user_space(guest, gdb, offset: int, tries: int = 200) -> int:
    """Continue to the vector + offset until a stop there came from user space; its pc."""
    for _ in range(tries):
        gdb.cont()
        gdb.wait_stopped(60)
        if register(gdb, "r1") < KERNEL_BASE:
            return register(gdb, "pc")
    pytest.fail(f"no interrupt from user space reached {VECTOR}+{offset} in {tries} stops")


@pytest.mark.parametrize("offset", [0, 20])
def test_a_vcpu_entering_the_kernel_from_user_space_has_no_kernel_stack_yet(guest, gdb, offset):
    if gdb.running:
        gdb.interrupt()
    gdb.console(f"break *({VECTOR} + {offset})")
    sent = guest.send(FAULTING_WORKLOAD)
    try:
        pc = stop_entering_from_user_space(guest, gdb, offset)
        entering = f"entering the kernel from user space at {pc:#x}"
        assert entering in gdb.console("klp-frames --all")
        with pytest.raises(GdbCommandError, match=f"klp-frames: vCPU [0-9]+ is {entering}"):
            gdb.console("klp-frames")
        if offset == 20:  # r13 is the PACA: the task is known, and said to be entering (its stack is stale)
            pid = int(gdb.console("output ((struct paca_struct *)$r13)->__current->pid").strip())
            with pytest.raises(GdbCommandError, match=f"klp-frames: pid {pid} [^:]+: on vCPU [0-9]+, {entering} "):
                gdb.console(f"klp-frames --task {pid}")
    finally:
        gdb.console("delete")
        gdb.cont()
        guest.wait_done(sent, timeout=60)


@needs_parking
def test_a_parked_watch_ends_while_a_vcpu_runs_user_code(guest, gdb):
    busy = guest.check("(while :; do :; done) > /dev/null 2>&1 & echo $!").strip()  # one vCPU in user space
    try:
        for _ in range(5):
            if gdb.running:
                gdb.interrupt()
            gdb.console("klp-watch start --quiet --park --background")
            gdb.cont()
            guest.check("klplab-run -t 2 -n 4 -k local > /dev/null")
            end_watch_running(gdb, timeout=10)  # klp-watch stop: ended within 10 s, or LabError
            assert "0 violations" in gdb.console("klp-watch status")
    finally:
        guest.check(f"kill {busy}")


def test_a_task_running_user_code_is_said_to_be_there_not_walked_from_its_stale_stack(guest, gdb):
    # two busy loops in user space, one per vCPU: at the interrupt at least one
    # vCPU runs one of them. What _switch left on that task's stack is stale (it
    # has returned to user space since): walking it once gave "loop" endings
    if gdb.running:
        gdb.interrupt()
    gdb.cont()
    pids = [int(guest.check("(while :; do :; done) > /dev/null 2>&1 & echo $!").strip()) for _ in range(2)]
    try:
        # not each interrupt finds a busy loop in user space: a vCPU may run the
        # kernel, or init (the console's shell, in user space between commands;
        # CI met that once): interrupts until one shows a busy loop there
        for _ in range(20):
            gdb.interrupt()
            users = [line for line in gdb.console("klp-frames --all").splitlines() if "in user space at" in line]
            notes = json.loads(gdb.console("klp-frames --all-tasks --json"))["notes"]
            in_user = [n for n in notes if "(no kernel stack in use)" in n]
            assert len(in_user) >= len(users) and all(n.split(":")[0].split()[1].isdigit() for n in in_user), notes
            busy = [n for n in in_user if int(n.split()[1].rstrip(":")) in pids]
            if busy:
                break
            gdb.cont()
        else:
            pytest.fail("no vCPU ran a busy loop in user space at 20 interrupts with two of them")
        pid = int(busy[0].split()[1].rstrip(":"))
        # the interrupt may also land where it enters the kernel (a timer tick): no kernel stack either
        with pytest.raises(GdbCommandError, match=f"klp-frames: pid {pid} .*: on vCPU [0-9], "
                                                  "(in user space|entering the kernel from user space) at"):
            gdb.console(f"klp-frames --task {pid}")
    finally:
        gdb.cont()
        guest.check(f"kill {' '.join(map(str, pids))}")
