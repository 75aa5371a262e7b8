"""Debian's own ppc64el kernel (6.12, distribution config, no live patching)
booted in the lab's QEMU with the lab's initramfs, gdb attached with its
-dbg vmlinux: gdbklp must be right on it.

- klp-frames on every task: no PROBLEM, no false loop, and each task that
  entered the kernel from user space ends as such, with the user pc and sp;
- the commands that need live patching refuse in one line naming what is missing;
- stopped at ftrace_caller with function tracing on (for vfs_read only),
  klp-frames and gdb's `bt` reach the traced function's caller, checked
  against gdb's own reading of the code: the return address (r0 at the
  entry) follows a `bl` to the traced function.
"""

import json
import re

import pytest

from gdbklp.abi import ppc
from gdbklp.gdbmi import GdbCommandError
from gdbklp.lab import session

pytestmark = [pytest.mark.guest, pytest.mark.gdb, pytest.mark.distribution]

TRACING = "/sys/kernel/tracing"
TRACED, CALLER = "vfs_read", "ksys_read"  # every read(2) calls B = vfs_read from A = ksys_read


@pytest.fixture(scope="module")
def deb_guest(distribution_kernel, tmp_path_factory):
    with session.booted(distribution_kernel, patch=False, workdir=tmp_path_factory.mktemp("guest")) as guest:
        yield guest


@pytest.fixture(scope="module")
def deb_gdb(deb_guest, distribution_kernel):
    with session.attached(deb_guest, distribution_kernel.symbols) as gdb:
        yield gdb  # stopped


@pytest.fixture
def stopped(deb_gdb):
    """gdb with the guest stopped for the test; running again after it."""
    if deb_gdb.running:
        deb_gdb.interrupt()
    yield deb_gdb
    deb_gdb.console("delete")
    deb_gdb.cont()


def register(gdb, name: str) -> int:
    return int(gdb.console(f"output/x ${name}").strip(), 16)


def test_every_task_decodes_without_problems_or_false_loops(deb_guest, deb_gdb):
    if deb_gdb.running:
        deb_gdb.interrupt()
    deb_gdb.cont()
    # a task asleep in the kernel, entered from user space: the shell's child
    # runs until sleep(1) sleeps (both may be on the vCPUs at an interrupt made
    # at once, with no task entered from user space)
    sleeper = int(deb_guest.check("sleep 1000 > /dev/null 2>&1 & p=$!; "
                                  "until grep -q '^State:[[:space:]]*S' /proc/$p/status; do :; done; echo $p")
                  .strip())
    deb_gdb.interrupt()
    try:
        data = json.loads(deb_gdb.console("klp-frames --all-tasks --json"))
        stacks = data["stacks"]
        assert len(stacks) > 20
        # a note only for a task that runs user code on a vCPU: no kernel stack of it is in use
        assert all(re.fullmatch(r"pid \d+ \S+: on vCPU \d, (in user space|entering the kernel from user space) "
                                r"at 0x[0-9a-f]+.*\(no kernel stack in use\)", n) for n in data["notes"]), data["notes"]
        for stack in stacks:
            assert stack["problems"] == [], stack
            assert "loop" not in stack["end"], (stack["label"], stack["comm"], stack["end"])
            assert stack["end"] == "end of the back chain" or stack["end"].startswith("entered from user space"), stack
        users = [s for s in stacks if s["end"].startswith("entered from user space")]
        assert users, "no task entered the kernel from user space"
        for stack in users:  # the user context is the pt_regs of the interrupt frame it ends at
            entry = stack["frames"][-1]
            assert entry["kind"] == "interrupt" and entry["function"] == f"user {entry['pc']:#x}"
            assert stack["end"].startswith(f"entered from user space (user pc {entry['pc']:#x}, sp 0x")
        (sleeping,) = [s for s in stacks if s["pid"] == sleeper]
        assert sleeping["end"].startswith("entered from user space")
        nip = int(deb_gdb.console(f"output/x ((struct task_struct *){sleeping['task']:#x})->thread.regs->nip")
                  .strip(), 16)
        assert sleeping["frames"][-1]["pc"] == nip
        text = deb_gdb.console("klp-frames --all")
        assert "PROBLEM" not in text and ": loop" not in text
    finally:
        deb_gdb.cont()
        deb_guest.check(f"kill {sleeper}")


@pytest.mark.parametrize("command, missing", [
    ("klp-transition", "klp_transition_patch"),
    ("klp-lint", "livepatch_handler"),
    ("klp-watch start", "livepatch_handler"),
])
def test_commands_needing_live_patching_refuse_in_one_line(stopped, distribution_kernel, command, missing):
    with pytest.raises(GdbCommandError) as refused:
        stopped.console(command)
    message = str(refused.value).strip()
    name = command.split()[0]
    assert message == f"{name}: kernel without live patching: no {missing} in {distribution_kernel.symbols}"
    assert "\n" not in message and "Traceback" not in message and "No symbol" not in message


@pytest.fixture
def tracing(deb_guest, deb_gdb):
    """Function tracing on for vfs_read only; off again after the test."""
    if deb_gdb.running:
        deb_gdb.interrupt()
    deb_gdb.cont()
    deb_guest.check(f"mount -t tracefs nodev {TRACING} 2>/dev/null; echo {TRACED} > {TRACING}/set_ftrace_filter; "
                    f"echo function > {TRACING}/current_tracer")
    yield deb_gdb
    if deb_gdb.running:
        deb_gdb.interrupt()
    deb_gdb.console("delete")
    deb_gdb.cont()
    deb_guest.check(f"echo nop > {TRACING}/current_tracer; echo > {TRACING}/set_ftrace_filter")


def stop_at(gdb, guest, location: str) -> None:
    gdb.interrupt()
    gdb.console(f"break *{location}")
    gdb.cont()
    guest.send("cat /proc/cmdline > /dev/null")  # its read(2) and the shell's call vfs_read
    gdb.wait_stopped(60)


def function_at(gdb, address: int) -> str:
    """gdb's own name of the function containing address (its symbols, not gdbklp's)."""
    return gdb.console(f"info symbol {address:#x}").split()[0]


def calls_before(gdb, ra: int) -> int | None:
    """The target of the `bl` just before ra, read by gdb from guest memory; None if it is no bl."""
    word = int(gdb.console(f"output/x *(unsigned int *){ra - 4:#x}").strip(), 16)
    return ppc.branch_target(word, ra - 4) if ppc.is_bl(word) else None


def assert_reaches_the_caller(gdb, ra: int) -> None:
    traced = int(gdb.console(f"output/x (unsigned long)&{TRACED}").strip(), 16)
    assert calls_before(gdb, ra) in (traced, traced + 8)  # a local call enters after the global entry
    assert function_at(gdb, ra) == CALLER
    (stack,) = json.loads(gdb.console("klp-frames --json"))["stacks"]
    frames = stack["frames"]
    assert [f["kind"] for f in frames[:3]] == ["current", "traced", "caller"]
    assert frames[1]["function"].startswith(TRACED + "+")
    assert frames[2]["pc"] == ra and frames[2]["function"].startswith(CALLER + "+")
    assert stack["problems"] == [] and "loop" not in stack["end"]
    bt = gdb.console("bt 8")
    assert f" in {TRACED} (" in bt and f" in {CALLER} (" in bt
    assert "frame did not save the PC" not in bt


def test_a_stop_at_ftrace_callers_entry_reaches_the_traced_functions_caller(deb_guest, tracing):
    stop_at(tracing, deb_guest, "ftrace_caller")
    assert_reaches_the_caller(tracing, ra=register(tracing, "r0"))  # r0: mflr r0 before the bl


def test_a_stop_inside_ftrace_caller_reaches_the_traced_functions_caller(deb_guest, tracing):
    stop_at(tracing, deb_guest, "ftrace_call")  # the frame is built, RA saved in it
    (stack,) = json.loads(tracing.console("klp-frames --json"))["stacks"]
    a_sp = stack["frames"][2]["sp"]
    assert a_sp > register(tracing, "r1")
    ra = int(tracing.console(f"output/x *(unsigned long *){a_sp + 16:#x}").strip(), 16)  # A's LR save slot
    assert_reaches_the_caller(tracing, ra)
