"""On the real lab: who a task is at each event (pid reuse, exec), and B and C
named for every redirection, indirect calls included."""

import json
import re
import shlex

import pytest

from helpers import needs_parking
from gdbklp.abi import naming
from gdbklp.abi.kernel import function_of_label
from gdbklp.gdbmi import GdbCommandError
from gdbklp.lab.session import WatchedGuest
from gdbklp.options import WatchOptions

# on each generation --kernels names (guest and gdb: from the fixtures)
pytestmark = pytest.mark.generations


def frames_of(gdb, pid: int) -> dict:
    """klp-frames --task PID as JSON (the guest stopped)."""
    return json.loads(gdb.console(f"klp-frames --json --task {pid}"))["stacks"][0]


def start_sleepers(guest, count: int = 1, command: str = "sleep 1000", comm: str = "sleep") -> list[int]:
    """Start command count times in the background; their pids, once each
    task's comm is comm (shell builtins only: no other task takes a
    task_struct meanwhile)."""
    pids = guest.check(f"for i in $(seq {count}); do {command} > /dev/null 2>&1 & echo $!; done")
    pids = [int(p) for p in pids.split()]
    guest.check(" ".join(f"c=; while [ \"$c\" != {comm} ]; do read c < /proc/{p}/comm; done;" for p in pids))
    return pids


def test_klp_frames_finds_the_task_that_has_the_pid_now(guest, gdb):
    # sleepers killed, then as many new ones: some get a freed task_struct.
    # Not each time: 6.1's tinyconfig allocator (SLOB) fits next, not last
    # freed first; with 8 sleepers a round reused 0 to 2 (0 in 2 rounds of 6,
    # and in all 8 rounds of one CI run), with 24 it reused 0 to 4 (0 in 1 of 8)
    reused = 0
    for _ in range(8):
        old_pids = start_sleepers(guest, 24)
        gdb.interrupt()
        old = {frames_of(gdb, pid)["task"]: pid for pid in old_pids}
        gdb.cont()
        guest.check(f"kill {' '.join(map(str, old_pids))}; wait; sleep 1")
        new_pids = start_sleepers(guest, 24)
        gdb.interrupt()
        for pid in new_pids:
            new = frames_of(gdb, pid)
            assert (new["pid"], new["comm"]) == (pid, "sleep")
            if new["task"] in old:
                reused += 1
                with pytest.raises(GdbCommandError, match=f"klp-frames: no task with pid {old[new['task']]}$"):
                    gdb.console(f"klp-frames --task {old[new['task']]}")
        gdb.cont()
        guest.check(f"kill {' '.join(map(str, new_pids))}; wait")
        if reused:
            break
    assert reused, "no new task reused a freed task_struct: the test proves nothing"


def test_klp_frames_sees_the_comm_after_exec(guest, gdb):
    (pid,) = start_sleepers(guest, command="sh -c 'sleep 3; exec sleep 1000'", comm="sh")
    gdb.interrupt()
    assert frames_of(gdb, pid)["comm"] == "sh"
    gdb.cont()
    guest.check("sleep 4")
    gdb.interrupt()
    assert frames_of(gdb, pid)["comm"] == "sleep"
    gdb.cont()
    guest.check(f"kill {pid}; wait {pid}; true")


def test_watch_table_has_one_row_per_task_incarnation(guest, gdb):
    # short-lived shells that each make 2 redirections, then one that makes
    # 3, execs, and makes 4 more.  The shells run on one vCPU with a pause
    # between them, so that the freed task_struct (freed after an RCU grace
    # period, into that CPU's slab) is the next fork's: the pid-reuse case.
    shells = ("for i in 1 2 3 4 5 6; do sh -c 'echo pid $$; echo local 2 > /proc/klp_lab/run'; usleep 200000; done; "
              "sh -c 'echo pid $$; echo local 3 > /proc/klp_lab/run; "
              "exec busybox sh -c \"echo local 4 > /proc/klp_lab/run\"'")
    script = f"busybox taskset 1 sh -c {shlex.quote(shells)}"
    watched = WatchedGuest(guest, gdb)
    report = watched.watch(script)
    WatchedGuest.assert_clean(report)
    pids = [int(p) for p in re.findall(r"pid (\d+)", watched.last_output)]
    rows = sorted((t.pid, t.comm, t.redirections) for t in report.tasks.values())
    assert rows == sorted([(pid, "sh", 2) for pid in pids[:6]] + [(pids[6], "sh", 3), (pids[6], "busybox", 4)])
    execed = [t for t in report.tasks.values() if t.pid == pids[6]]
    assert execed[0].task == execed[1].task and execed[0].exec_id != execed[1].exec_id
    addresses = [t.task for t in report.tasks.values() if t.pid in pids[:6]]
    assert len(set(addresses)) < len(addresses), "no task_struct reused: the pid-reuse case is not exercised"


def by_kind(report, kind: str):
    return [e for e in report.events if function_of_label(e.caller) == f"klp_lab_a_{kind}"]


@pytest.mark.parametrize("options", [WatchOptions(resolve_indirect=True),
                                     pytest.param(WatchOptions(resolve_indirect=True, park=True), marks=needs_parking)],
                         ids=["breakpoint", "park"])
def test_indirect_calls_name_b_and_c_from_p1(guest, gdb, options):
    watched = WatchedGuest(guest, gdb)
    report = watched.watch("klplab-run -r -t 2 -n 10 -k indirect,local,global", options=options)
    WatchedGuest.assert_clean(report)
    for kind in ("indirect", "local", "global"):
        events = by_kind(report, kind)
        assert len(events) == 20, kind
        for e in events:
            assert function_of_label(e.patched) == f"klp_lab_b_{kind}", e
            assert function_of_label(e.replacement) == f"klp_lab_c_{kind}", e
            assert e.named_by == naming.BY_P1, e
    assert "P1" in report.probe


def test_indirect_calls_without_p1_are_named_only_where_certain(guest, gdb):
    watched = WatchedGuest(guest, gdb)
    report = watched.watch("klplab-run -r -t 1 -n 5 -k indirect,local")
    WatchedGuest.assert_clean(report)
    # every replacement in klp_lab_patch calls out (new_body): CTR tells nothing,
    # and that module holds seven replacements
    assert {(e.patched, e.replacement, e.named_by) for e in by_kind(report, "indirect")} == {("?", "?", "")}
    assert {e.named_by for e in by_kind(report, "local")} == {naming.BY_CALL_SITE}
    assert {function_of_label(e.replacement) for e in by_kind(report, "local")} == {"klp_lab_c_local"}


def test_the_kernels_livepatch_sample_is_named_at_no_extra_stop(guest, gdb):
    # cmdline_proc_show is reached through seq_file's show pointer; its
    # replacement is the only one in livepatch_sample, and it sets r2
    guest.check("insmod /lib/modules/livepatch-sample.ko && sleep 2")
    try:
        watched = WatchedGuest(guest, gdb)
        report = watched.watch("cat /proc/cmdline")
        assert "this has been live patched" in watched.last_output
        WatchedGuest.assert_clean(report)
        (event,) = [e for e in report.events if function_of_label(e.patched) == "cmdline_proc_show"]
        assert event.call_site == "indirect"
        assert function_of_label(event.patched) == "cmdline_proc_show"
        assert event.named_by == naming.BY_ONLY_CANDIDATE
    finally:
        guest.check("echo 0 > /sys/kernel/livepatch/livepatch_sample/enabled; sleep 2; "
                    "rmmod livepatch_sample; true")
