"""klp-frames and the unwinder on the real lab: stopped inside each kind's C."""

import json
import time

import pytest

from gdbklp.lab import workload

# on each generation --kernels names (guest and gdb: from the fixtures)
pytestmark = pytest.mark.generations

CALL_SITE = workload.CALLER_CALL_SITE

# (pc, r1, r2) of every frame as gdb's own unwinding (plain `bt`) sees them
BT_SCRIPT = ("f = gdb.newest_frame()\n"
             "while f is not None:\n"
             "    print('frame', int(f.pc()), int(f.read_register('r1')), int(f.read_register('r2')))\n"
             "    f = f.older()\n")


def gdb_frames(gdb):
    text = gdb.console(f"python exec({BT_SCRIPT!r})")
    return [tuple(map(int, line.split()[1:])) for line in text.splitlines() if line.startswith("frame ")]


@pytest.fixture
def inside_c(guest, gdb, request):
    """Stop the guest at the entry of C for the requested kind; resume after the test."""
    kind = request.param
    if gdb.running:
        gdb.interrupt()
    gdb.console(f'break *$klp_addr("{workload.replacement_of(kind)}")')
    gdb.cont()
    start = guest.send(f"echo '{kind} 1 0' > /proc/klp_lab/run")
    gdb.wait_stopped(60)
    yield kind
    gdb.console("delete")
    gdb.console("klp-unwinder on")
    gdb.cont()
    guest.wait_done(start, 60)


@pytest.mark.parametrize("inside_c", list(CALL_SITE), indirect=True)
@pytest.mark.smoke
def test_klp_frames_inside_c(gdb, inside_c):
    kind = inside_c
    (stack,) = json.loads(gdb.console("klp-frames --json"))["stacks"]
    frames = stack["frames"]
    assert frames[0]["function"].startswith(f"klp_lab_c_{kind} [klp_lab_patch]")
    assert [f["kind"] for f in frames[:3]] == ["current", "trampoline", "livepatch-caller"]
    assert frames[2]["function"].startswith(workload.caller_of(kind) + "+")
    assert frames[2]["call_site"] == CALL_SITE[kind]
    (entry,) = stack["livepatch_stack"]["entries"]
    assert entry["ra"] == frames[2]["pc"] and entry["problems"] == []
    assert stack["problems"] == []
    assert (stack["pid"], stack["comm"]) == (1, "init")  # /init's shell writes (echo is a builtin)
    text = gdb.console("klp-frames")
    assert workload.caller_of(kind) + "+" in text and "no problems" in text


@pytest.mark.parametrize("inside_c", ["local", "global"], indirect=True)
def test_bt_shows_the_caller_only_with_the_unwinder(gdb, inside_c):
    (stack,) = json.loads(gdb.console("klp-frames --json"))["stacks"]
    a = stack["frames"][2]
    with_unwinder = gdb_frames(gdb)
    assert (a["pc"], a["sp"], a["toc"]) in with_unwinder
    gdb.console("klp-unwinder off")
    without = gdb_frames(gdb)
    assert a["pc"] not in [pc for pc, _, _ in without]
    assert with_unwinder[:2] == without[:2]  # C and the trampoline are the same either way


def test_klp_frames_all_lists_every_vcpu(guest, gdb):
    if gdb.running:
        gdb.interrupt()
    try:
        data = json.loads(gdb.console("klp-frames --all --json"))
        assert len(data["stacks"]) + len(data["notes"]) == 2  # -smp 2
        for stack in data["stacks"]:
            assert stack["frames"] and not stack["problems"]
    finally:
        gdb.cont()


def test_klp_frames_of_a_sleeping_task(guest, gdb):
    start = guest.send("echo 'local 1 8' > /proc/klp_lab/run & echo pid=$!; wait")
    pid = guest.wait_for(r"pid=(\d+)", 30, start.offset).group(1)
    time.sleep(0.3)
    gdb.interrupt()
    try:
        (stack,) = json.loads(gdb.console(f"klp-frames --task {pid} --json"))["stacks"]
        kinds = [f["kind"] for f in stack["frames"]]
        names = [f["function"] for f in stack["frames"]]
        i = kinds.index("trampoline")
        assert names[i - 1].startswith("klp_lab_c_local+")
        assert names[i + 1].startswith("klp_lab_a_local+")
        assert stack["pid"] == int(pid) and stack["problems"] == []
    finally:
        gdb.cont()
        guest.wait_done(start, 60)


def test_klp_frames_bad_task(gdb):
    if gdb.running:
        gdb.interrupt()
    try:
        with pytest.raises(Exception, match="klp-frames: no task with pid 999999"):
            gdb.console("klp-frames --task 999999")
    finally:
        gdb.cont()


# the address of a trampoline's first call (of the tracer: its frame is built by
# then), on a path from its entry: ftrace_call/ftrace_regs_call up to 6.12, a bctrl in 7.3
FIRST_CALL = ("from gdbklp.abi import ppc\n"
              "from gdbklp.gdbext.inferior.kernel import kernel\n"
              "k = kernel(); reached = k.traced_calls().states\n"
              "for name in ('ftrace_caller', 'ftrace_regs_caller'):\n"
              "    a = k.symbols.address(name)\n"
              "    print('call', next(a + 4 * i for i, w in enumerate(ppc.words(k.code(a, 1024)))\n"
              "                       if (ppc.is_bl(w) or w == ppc.BCTRL) and a + 4 * i in reached))\n")


def first_calls(gdb) -> list[int]:
    text = gdb.console(f"python exec({FIRST_CALL!r})")
    return [int(line.split()[1]) for line in text.splitlines() if line.startswith("call ")]


@pytest.mark.parametrize("trampoline", ["entry", "inside"])
def test_a_stop_in_ftrace_caller_shows_the_traced_functions_caller(guest, gdb, trampoline):
    """B = klp_lab_b_local is live-patched, so traced: stopped in the ftrace
    trampoline it calls (at its entry, or at its call of the tracer, its frame
    built), klp-frames and `bt` go on to A through r0 and ftrace's frame."""
    if gdb.running:
        gdb.interrupt()
    where = ("ftrace_caller", "ftrace_regs_caller") if trampoline == "entry" else map(hex, first_calls(gdb))
    for location in where:
        gdb.console(f"break *{location}")
    gdb.cont()
    start = guest.send("echo 'local 1 0' > /proc/klp_lab/run")
    gdb.wait_stopped(60)
    try:
        (stack,) = json.loads(gdb.console("klp-frames --json"))["stacks"]
        frames = stack["frames"]
        assert [f["kind"] for f in frames[:3]] == ["current", "traced", "caller"]
        assert "klp_lab_b_local" in frames[1]["function"]  # or its out-of-line stub (7.3)
        assert frames[2]["function"].startswith(workload.caller_of("local") + "+")
        if trampoline == "entry":
            assert frames[2]["pc"] == int(gdb.console("output/x $r0").strip(), 16)
        else:  # ftrace_caller has saved RA in A's own LR save slot
            assert frames[2]["pc"] == int(gdb.console(f"output/x *(long *){frames[2]['sp'] + 16:#x}").strip(), 16)
        assert stack["problems"] == []
        assert frames[2]["pc"] in [pc for pc, _, _ in gdb_frames(gdb)]  # bt reaches A
    finally:
        gdb.console("delete")
        gdb.cont()
        guest.wait_done(start, 60)
