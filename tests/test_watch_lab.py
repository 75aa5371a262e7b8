"""klp-watch on the real lab: a clean workload, every injected fault, batch use."""

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import time

import pytest

from helpers import (GDB, RECORDED, REPO, assert_counts_agree, assert_shows_the_readme_example, needs_parking,
                     recorder_for)
from gdbklp.abi.ppc import MSR_PR
from gdbklp.lab import LabError, workload
from gdbklp.lab import config as cfg
from gdbklp.lab.qemu import Guest, kernel_cmdline
from gdbklp.lab.session import WatchedGuest, attached, booted, watch_workload
from gdbklp.options import Mode, WatchOptions
from gdbklp.report import WatchReport

# each watches a QEMU guest; on each generation --kernels names
pytestmark = [pytest.mark.guest, pytest.mark.gdb, pytest.mark.generations]

pytest_plugins = ["gdbklp.testing"]


def assert_each_call_site_checked(report, counts):
    """Assert that the watch saw the call-site class of every kind the guest
    redirected (counted NEW results for: while the patch is cycled, a kind may
    have run only unpatched), nothing else, and checked each redirection it
    saw, with no violation."""
    redirected = {workload.CALLER_CALL_SITE[kind] for kind, c in counts.items() if c.new}
    assert redirected, "the guest redirected no call: nothing to check"
    assert {site: (t.checked == t.seen, t.violations) for site, t in report.by_call_site.items()} == \
        dict.fromkeys(redirected, (True, 0))


@pytest.mark.smoke
def test_clean_workload_with_migration_and_patch_cycling(guest, gdb):
    # 4 tasks, every kind 200 times, sleeping inside C, each task moved to the
    # other vCPU between its batches (left to the scheduler, all 4 once stayed put)
    report, counts = watch_workload(guest, gdb, "-t 4 -n 50 -b 10 -m -f sleep")
    WatchedGuest.assert_clean(report)
    assert_counts_agree(report, counts, minimum=200)
    assert len(report.tasks) == 4
    assert any(len(t.cpus) == 2 for t in report.tasks.values()), "no task migrated"
    assert_each_call_site_checked(report, counts)
    assert len(report.by_call_site) == 4  # each kind ran patched: every class of call site
    # the patch disabled, unloaded and loaded again twice while tasks call through
    # it, then more calls through the reloaded patch (the counters add up)
    watched = WatchedGuest(guest, gdb)
    report = watched.watch("klplab-run -r -t 4 -n 20 -b 2 -p 2 -f yield && klplab-run -t 2 -n 5")
    counts = watched.counts()
    WatchedGuest.assert_clean(report)
    assert_counts_agree(report, counts)
    assert sum(c.old for c in counts.values()) > 0


def p3_word(gdb) -> str:
    """The instruction word at livepatch_handler's return point, as the guest has it now."""
    return gdb.console("x/wx $klp_p3").split()[-1]


@pytest.mark.smoke
@needs_parking
def test_parking_checks_every_redirection_without_a_breakpoint_at_p3(guest, gdb, lab):
    gdb.interrupt()
    gdb.console("python gdb.set_convenience_variable('klp_p3', __import__('gdbklp.gdbext.inferior.kernel', "
                "fromlist=['kernel']).kernel().livepatch_layout().return_point)")
    original = p3_word(gdb)
    gdb.cont()
    watched = WatchedGuest(guest, gdb)
    # 4 tasks sleeping inside C (they move between the vCPUs), then the patch
    # cycled under tasks that call through it
    for command, minimum in (("klplab-run -r -t 4 -n 30 -f sleep", 120),
                             ("klplab-run -r -t 4 -n 20 -b 2 -p 2 -f yield", 0)):
        report = watched.watch(command, options=WatchOptions(park=True))
        counts = watched.counts()
        WatchedGuest.assert_clean(report)
        assert_counts_agree(report, counts, minimum=minimum)  # each redirection the guest made, checked once
        assert report.probe.startswith("parking") and report.pauses > 0
        assert_each_call_site_checked(report, counts)
    assert sum(c.old for c in counts.values()) > 0  # calls made while the patch was off
    gdb.interrupt()
    assert p3_word(gdb) == original  # each watch put P3's instruction back
    gdb.console("klp-watch start --quiet --park")
    assert p3_word(gdb) == "0x48000000"  # b . (a branch to itself)
    p3 = gdb.console("output/x $klp_p3").strip()
    assert p3 not in gdb.console("maint info breakpoints")  # and no breakpoint there
    gdb.console("klp-watch stop")  # the guest is stopped: the watch ends at once
    assert p3_word(gdb) == original
    gdb.cont()


@needs_parking
def test_a_park_left_by_a_gdb_that_died_holds_tasks_until_a_gdb_undoes_it(lab, tmp_path):
    with booted(lab, workdir=tmp_path) as guest:
        with attached(guest, lab.vmlinux) as gdb:
            gdb.console("klp-watch start --quiet --park")
            gdb.cont()
            gdb.ctrl.gdb_process.kill()  # gdb dies: nobody checks P3 or puts its instruction back
        start = guest.send("klplab-run -r -t 2 -n 3 -k local")
        with pytest.raises(LabError):
            guest.wait_done(start, timeout=10)  # the tasks wait at P3
        with attached(guest, lab.vmlinux) as gdb:
            assert "P3 was still parked by a watch whose gdb went away" in gdb.console("klp-watch stop")
            gdb.cont()
            status, output = guest.wait_done(start, timeout=60)
    assert status == 0
    assert workload.parse_counts(output)["local"].new == 6  # every call reached the new code


# fault flag -> (call kind, the invariant it breaks, whether the guest goes down)
FAULTS = {
    "fault-magic": ("local", 8, True),
    "fault-toc": ("local", 9, True),
    "fault-ra": ("local", 9, False),
    "fault-r1": ("local", 9, True),
    "fault-toc-slot": ("global", 3, False),
    "fault-unbalanced": ("local", 10, True),
}


# one fault per invariant family, on the generations other than the default
FAMILIES = ("fault-toc-slot", "fault-magic", "fault-ra", "fault-unbalanced")
OTHER_KERNELS = [name for name in cfg.KERNELS if name != cfg.DEFAULT_KERNEL]


@pytest.mark.smoke
@pytest.mark.parametrize("lab,fault,options",
                         [(cfg.DEFAULT_KERNEL, fault, WatchOptions()) for fault in FAULTS] +
                         [pytest.param(cfg.DEFAULT_KERNEL, fault, WatchOptions(park=True), marks=needs_parking)
                          for fault in ("fault-magic", "fault-toc-slot")] +
                         [(kernel, fault, WatchOptions()) for kernel in OTHER_KERNELS for fault in FAMILIES] +
                         [(cfg.DEFAULT_KERNEL, fault, RECORDED) for fault in FAULTS],
                         indirect=["lab"],
                         ids=lambda value: value.mode if isinstance(value, WatchOptions) else value)
def test_each_fault_is_reported_with_its_invariant(lab, tmp_path, fault, options):
    kind, invariant, goes_down = FAULTS[fault]
    options, socket = recorder_for(options, tmp_path)
    with booted(lab, workdir=tmp_path, plugin_socket=socket) as guest, attached(guest, lab.vmlinux) as gdb:
        gdb.cont()
        watched = WatchedGuest(guest, gdb)
        report = watched.watch(f"klplab-run -t 1 -n 5 -k {kind} && klplab-run -t 1 -n 1 -k {kind} -f {fault}",
                               options=options)
    faulty = [e for e in report.events if e.violations]
    assert len(faulty) == 1, report.format_text()
    assert faulty[0].seq == 5  # the five clean redirections before it have none
    assert [v.invariant for v in report.violations] == [invariant]
    v = report.violations[0]
    assert v.caller.startswith(workload.caller_of(kind) + "+")
    # a corrupted return address no longer follows the call site it came from
    assert v.call_site == ("not_a_call" if fault == "fault-ra" else workload.CALLER_CALL_SITE[kind])
    assert v.pid > 0 and v.comm == "klplab-run" and v.expected and v.found
    if goes_down:
        assert report.guest_events and report.guest_events[0].startswith("die(")
    else:
        assert not report.guest_events
    if fault == "fault-toc-slot" and options.mode is Mode.AUTO:  # as the README's demo watches
        assert_shows_the_readme_example("A violation, as gdb prints it", v.format_text())


def start_batch(lab, tmp_path, run_args: str):
    guest = Guest(lab.vmlinux, lab.initramfs, stopped=True, workdir=tmp_path,
                  append=kernel_cmdline(mode="run", run_args=run_args)).start()
    proc = subprocess.Popen(
        [GDB, "-nx", "-batch", "-x", str(REPO / "gdbinit.d" / "gdbklp.py"), "-ex", f"file {lab.vmlinux}",
         "-ex", f"target remote 127.0.0.1:{guest.gdb_port}", "-x", str(REPO / "gdbinit.d" / "watch-batch.gdb")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "KLP_REPORT_DIR": str(tmp_path)})
    return guest, proc


@pytest.mark.smoke
@pytest.mark.parametrize("run_args, status", [("-t 2 -n 10", 0), ("-t 1 -n 1 -k global -f fault-toc-slot", 1)])
def test_batch_script_exit_status_and_reports(lab, tmp_path, run_args, status):
    guest, proc = start_batch(lab, tmp_path, run_args)
    with guest:
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == status, output
    data = json.loads((tmp_path / "klp-watch.json").read_text())
    assert WatchReport.from_dict(data).to_dict() == data  # the JSON report round-trips
    report = WatchReport.from_dict(data)
    assert report.redirections == (140 if status == 0 else 1)
    assert report.end_reason == "the guest exited (status 0)"  # QEMU's report of the power-off
    junit = (tmp_path / "klp-watch.xml").read_text()
    assert junit.count("<failure") == len(report.violations) == (0 if status == 0 else 1)


def test_connection_drop_mid_watch_keeps_the_report(lab, tmp_path):
    guest, proc = start_batch(lab, tmp_path, "-t 2 -n 100000 -f yield")
    with guest:
        report_path = tmp_path / "klp-watch.json"
        guest.wait_ready(120)
        time.sleep(5)  # let it watch for a while
        guest.proc.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    reason = "the gdbstub connection dropped (the guest died or QEMU was killed)"
    assert f"klp-watch: {reason}" in output
    report = WatchReport.read_json(report_path)
    assert report.redirections > 0 and report.end_reason == reason
    assert proc.returncode == 0  # what it saw was clean


def test_fixture_for_kernel_developers(klp_watch):
    report = klp_watch.watch("klplab-run -t 2 -n 5 -k local,indirect")
    klp_watch.assert_clean(report)
    assert report.redirections == 20
    status, _ = klp_watch.run("true")
    assert status == 0


def watch_held_transition(guest, gdb, options: WatchOptions = WatchOptions()):
    """Watch two tasks calling the local and global kinds while a transition is held: clean."""
    assert guest.check("cat /sys/kernel/livepatch/klp_lab_patch/transition").strip() == "1"
    watched = WatchedGuest(guest, gdb)
    report = watched.watch("klplab-run -r -t 2 -n 5 -k local,global", options=options)
    WatchedGuest.assert_clean(report)
    return watched, report, watched.counts()


def test_transition_held_back_by_a_task_asleep_in_the_old_function(lab, tmp_path):
    """Invariant 12: a task sleeping in B keeps the patch in transition; calls made
    meanwhile follow each task's patch_state, and klp-transition names the holder."""
    with booted(lab, workdir=tmp_path) as guest, attached(guest, lab.vmlinux) as gdb:
        gdb.cont()
        guest.check("echo 0 > /sys/kernel/livepatch/klp_lab_patch/enabled; "
                    "while [ -d /sys/kernel/livepatch/klp_lab_patch ]; do sleep 0.1; done; "
                    "rmmod klp_lab_patch; echo 8000 > /sys/module/klp_lab_target/parameters/hold_ms")
        guest.check("(klplab-run -t 1 -n 1 -k local -f hold > /dev/null &); sleep 0.5; "
                    "insmod /lib/modules/klp_lab_patch.ko")
        watched, report, counts = watch_held_transition(guest, gdb)
        assert_counts_agree(report, counts, ("local", "global"))
        gdb.interrupt()
        state = json.loads(gdb.console("klp-transition --json"))
        assert state["in_transition"] and state["patch"] == "klp_lab_patch"
        assert state["target_state"] == "KLP_PATCHED"
        (holder,) = [t for t in state["pending"] if t["held_by"]]
        assert holder["comm"] == "klplab-run" and holder["patch_state"] == "KLP_UNPATCHED"
        assert holder["held_by"][0].startswith("klp_lab_b_local+")
        assert state["switched_too_early"] == []
        gdb.cont()
        guest.check("while [ \"$(cat /sys/kernel/livepatch/klp_lab_patch/transition)\" = 1 ]; do sleep 0.2; done")
        gdb.interrupt()
        assert gdb.console("klp-transition").strip() == "klp-transition: no live-patch transition in progress"


@pytest.mark.parametrize("options", [WatchOptions(), RECORDED], ids=lambda options: options.mode)
def test_calls_not_redirected_while_a_disable_transition_is_held(lab, tmp_path, options):
    """Invariant 12 for the calls ftrace does not redirect. While the patch is being
    disabled, a task asleep in C holds the transition; the shell has switched to
    KLP_UNPATCHED, so its new tasks run B itself: each such call is seen at the
    trampoline's bctr (a breakpoint, or a point recorded) and agrees with the
    task's state."""
    options, socket = recorder_for(options, tmp_path)
    with booted(lab, workdir=tmp_path, plugin_socket=socket) as guest, attached(guest, lab.vmlinux) as gdb:
        gdb.cont()
        guest.check("echo 30000 > /sys/module/klp_lab_patch/parameters/nap_ms; "
                    "(klplab-run -t 1 -n 1 -k local -f nap > /dev/null &); sleep 0.5; "
                    "echo 0 > /sys/kernel/livepatch/klp_lab_patch/enabled")
        watched, report, counts = watch_held_transition(guest, gdb, options)
        assert report.redirections == 0
        assert sum(c.old for c in counts.values()) == 20 == sum(report.old_code_calls.values())
        assert set(report.old_code_calls) == {"klp_lab_b_local [klp_lab_target]",
                                              "klp_lab_b_global [klp_lab_target]"}
        gdb.interrupt()
        # the kernel's view broken on purpose: the transition looks finished while ftrace
        # still follows each task's state, so these calls of B contradict invariant 12
        transition_patch = gdb.console("printf \"%#lx\\n\", klp_transition_patch").strip()
        gdb.console("set var klp_transition_patch = 0")
        report = watched.watch("klplab-run -r -t 1 -n 3 -k local", options=options)
        gdb.interrupt()
        gdb.console(f"set var klp_transition_patch = (struct klp_patch *){transition_patch}")
        assert [v.invariant for v in report.violations] == [12, 12, 12]
        v = report.violations[0]
        assert v.call_site == "not redirected" and v.comm == "klplab-run" and v.caller.startswith("klp_lab_a_local")
        assert "no transition" in v.title and v.patched.startswith("klp_lab_b_local")
        assert "a call not redirected" in v.format_text()


def test_sampling_finds_a_corrupted_entry_of_a_sleeping_task(lab, tmp_path):
    """--sample: no breakpoints; a task asleep inside C whose livepatch-stack magic was
    overwritten is found by a pause (invariant 8) before it wakes up; clean otherwise."""
    with booted(lab, workdir=tmp_path) as guest, attached(guest, lab.vmlinux) as gdb:
        watched = WatchedGuest(guest, gdb)
        gdb.cont()
        report = watched.watch("klplab-run -r -t 2 -n 20000 > /dev/null", options=WatchOptions(sample=20))
        assert report.samples > 0 and not report.violations and not report.errors, report.format_text()
        assert report.redirections == 0 and "no breakpoints" in report.probe
        # a task asleep in C for 20 s, its entry's magic overwritten, restored before it wakes
        start = guest.send("echo 20000 > /sys/module/klp_lab_patch/parameters/nap_ms; "
                           "echo 'local 1 8' > /proc/klp_lab/run & echo pid=$!; wait")  # 8: nap
        pid = guest.wait_for(r"pid=(\d+)", 30, start.offset).group(1)
        time.sleep(1)
        gdb.interrupt()
        (stack,) = json.loads(gdb.console(f"klp-frames --task {pid} --json"))["stacks"]
        (entry,) = stack["livepatch_stack"]["entries"]
        magic = entry["address"] + 16
        gdb.console(f"set var *(unsigned long *){magic:#x} = 0")
        path = tmp_path / "sampled.json"
        gdb.console(f"klp-watch start --quiet --sample 20 --report {path}")
        gdb.cont()
        deadline = time.monotonic() + 15
        while True:  # the report can be read while the guest runs
            time.sleep(1)
            gdb.console(f"klp-watch report --report {path}")
            if WatchReport.read_json(path).violations or time.monotonic() > deadline:
                break
        gdb.console("klp-watch stop")
        printed = json.loads(gdb.console("klp-watch report --json"))  # the same report, printed
        gdb.console(f"klp-watch report --report {path}")
        assert printed == json.loads(path.read_text()) and printed["violations"]
        time.sleep(0.5)
        gdb.interrupt()
        gdb.console(f"set var *(unsigned long *){magic:#x} = {0x57AC6E9D:#x}")
        gdb.cont()
        report = WatchReport.read_json(path)
        v = report.violations[0]
        assert v.invariant == 8 and v.call_site == "sample" and v.pid == int(pid)
        assert f"{entry['address']:#x}" in v.expected and "magic 0x0" in v.found
        guest.wait_done(start, 60)  # it woke up with the magic back: no BUG


def test_sampling_finds_a_task_switched_while_the_old_function_is_on_its_stack(lab, tmp_path):
    """--sample and invariant 12's stack rule: a task asleep in B holds the patch in
    transition; the switched tasks pass the rule. Then gdb marks the sleeper
    KLP_PATCHED, as a failed stack check would: the kernel completes the transition
    with B still on its stack, and a sample finds B there (during the transition or
    after it, whichever it sees first)."""
    with booted(lab, workdir=tmp_path) as guest, attached(guest, lab.vmlinux) as gdb:
        gdb.cont()
        guest.check("echo 0 > /sys/kernel/livepatch/klp_lab_patch/enabled; "
                    "while [ -d /sys/kernel/livepatch/klp_lab_patch ]; do sleep 0.1; done; "
                    "rmmod klp_lab_patch; echo 30000 > /sys/module/klp_lab_target/parameters/hold_ms")
        guest.check("(echo 'local 1 4' > /proc/klp_lab/run &); sleep 0.5; "  # 4: hold, asleep in B
                    "insmod /lib/modules/klp_lab_patch.ko")
        watched = WatchedGuest(guest, gdb)
        report = watched.watch("sleep 4", options=WatchOptions(sample=20))
        assert report.samples > 20 and not report.violations and not report.errors, report.format_text()
        tasks = int(guest.check("ls -d /proc/[0-9]* | wc -l"))
        gdb.interrupt()
        (holder,) = [t for t in json.loads(gdb.console("klp-transition --json"))["pending"] if t["held_by"]]
        assert holder["patch_state"] == "KLP_UNPATCHED"
        gdb.console(f"set var ((struct task_struct *){holder['task']:#x})->patch_state = 1")  # KLP_PATCHED
        # long enough for the samples to visit every task (a few a second: sampler.SLEEPER_SHARE)
        report = watched.watch(f"sleep {max(8, tasks // 3)}", options=WatchOptions(sample=20))
        assert guest.check("cat /sys/kernel/livepatch/klp_lab_patch/transition").strip() == "0"
        assert {v.invariant for v in report.violations} == {12} and not report.errors, report.format_text()
        v = report.violations[0]
        assert v.call_site == "sample" and v.pid == holder["pid"] and v.found.startswith("klp_lab_b_local+")


def test_a_recorded_watch_leaves_gdb_usable(lab, tmp_path):
    """interrupt, klp-frames and continue in the middle of a recorded watch;
    every redirection before, during and after is checked once."""
    socket = tmp_path / "recorder.sock"
    with booted(lab, workdir=tmp_path, plugin_socket=socket) as guest, attached(guest, lab.vmlinux) as gdb:
        started = gdb.console(f"klp-watch start --record {socket} --report {tmp_path / 'report.json'}")
        # the guards and the module changes are recorded too: a gdb breakpoint
        # would cost the guest at every translated block it looks up
        assert "guard points" in started and "; 0 breakpoints in all;" in started, started
        gdb.cont()
        start = guest.send("klplab-run -r -t 2 -n 60 -k local,global -f sleep")
        time.sleep(1.5)
        gdb.interrupt()
        assert "klp-watch: running" in gdb.console("klp-watch status")
        frames = gdb.console("klp-frames --all")
        assert "vCPU 0" in frames and "vCPU 1" in frames and "PROBLEM" not in frames
        gdb.cont()
        status, output = guest.wait_done(start, timeout=120)
        gdb.interrupt()
        gdb.console("klp-watch stop")
        report = WatchReport.read_json(tmp_path / "report.json")
    assert status == 0
    counts = workload.parse_counts(output)
    WatchedGuest.assert_clean(report)
    assert report.mode == "record" and report.redirections == 240
    assert_counts_agree(report, counts, kinds=("local", "global"), minimum=120)


@contextlib.contextmanager
def recording_guest(lab, tmp_path):
    """A lab guest booted with the recorder plugin, gdb attached, running:
    (WatchedGuest, the options of a watch recorded through that plugin)."""
    socket = tmp_path / "recorder.sock"
    with booted(lab, workdir=tmp_path, plugin_socket=socket) as guest, attached(guest, lab.vmlinux) as gdb:
        gdb.cont()
        yield WatchedGuest(guest, gdb), WatchOptions(record=str(socket))


def test_a_recorded_watch_follows_the_patch_cycled(lab, tmp_path):
    """The patch disabled, unloaded and loaded again twice while tasks call
    through it, then calls through the reloaded patch, recorded: each
    redirection checked once, none judged against a module list it was not
    made under (a false violation would fail assert_clean)."""
    with recording_guest(lab, tmp_path) as (watched, recorded):
        report = watched.watch("klplab-run -r -t 4 -n 20 -b 2 -p 2 -f yield && klplab-run -t 2 -n 5",
                               options=recorded)
        counts = watched.counts()
    WatchedGuest.assert_clean(report)
    assert report.mode == "record"
    assert_counts_agree(report, counts, minimum=10)
    assert sum(c.old for c in counts.values()) > 0


BUSY_LOOPS = "(while :; do :; done) > /dev/null 2>&1 & (while :; do :; done) > /dev/null 2>&1 &"


def test_a_recorded_watch_stopped_in_user_code_reads_modules_through_a_kernel_vcpu(lab, tmp_path):
    """Stops while both vCPUs mostly run user code (two busy loops): the look-up
    at each stop reads the modules' text through a vCPU in the kernel (one in
    user code cannot reach it: a MemoryError at the module's text before), and
    the thread gdb stopped on stays selected."""
    with recording_guest(lab, tmp_path) as (watched, recorded):
        gdb = watched.gdb
        watched.guest.check(BUSY_LOOPS)
        gdb.interrupt()
        gdb.console(dataclasses.replace(recorded, report=str(tmp_path / "report.json"), background=True).command())
        in_user = 0
        for _ in range(12):
            gdb.cont()
            time.sleep(0.5)
            stopped_on = gdb.interrupt()["thread-id"]
            assert gdb.console("thread").startswith(f"[Current thread is {stopped_on} ")
            in_user += bool(int(gdb.console("output/x $msr").strip(), 16) & MSR_PR)
        gdb.console("klp-watch stop")
        report = WatchReport.read_json(tmp_path / "report.json")
    assert in_user > 0, "no stop in user code: nothing tested"
    assert report.errors == []


PATCH_TEXT = "grep '^klp_lab_patch ' /proc/modules"  # its 6th field: where its code is


def test_a_recorded_watch_reads_modules_loaded_since_its_last_stop(lab, tmp_path):
    """The patch unloaded, another module loaded into its place, the patch
    loaded again elsewhere, then calls through it, recorded with no stop in
    between: each module change reads the module list as it is then (not as
    of the last stop: the freed patch's code, no reloaded patch)."""
    with recording_guest(lab, tmp_path) as (watched, recorded):
        before = watched.guest.check(PATCH_TEXT).split()[5]
        report = watched.watch("echo 0 > /sys/kernel/livepatch/klp_lab_patch/enabled && sleep 2 && "
                               "rmmod klp_lab_patch && insmod /lib/modules/livepatch-sample.ko && "
                               "while grep -q 1 /sys/kernel/livepatch/livepatch_sample/transition; do sleep 1; done && "
                               "insmod /lib/modules/klp_lab_patch.ko && klplab-run -r -t 2 -n 5",
                               options=recorded)
        counts = watched.counts()
        after = watched.guest.check(PATCH_TEXT).split()[5]
    assert after != before, "the patch came back where it was: nothing read stale would show"
    WatchedGuest.assert_clean(report)
    assert_counts_agree(report, counts, minimum=10)
    assert all(c.new == c.calls for c in counts.values())  # every call went through the reloaded patch


def test_a_recorded_hot_function_is_checked_call_by_call(lab, tmp_path):
    """A patched function called as fast as 2 tasks can, recorded: past the
    report's event list, remembered clean verdicts are tallied per batch of
    records, and still every redirection counts once, per task and caller."""
    with recording_guest(lab, tmp_path) as (watched, recorded):
        report = watched.watch("klplab-run -r -t 2 -n 8000 -k local -b 1000 -w 0", options=recorded)
        counts = watched.counts()
    WatchedGuest.assert_clean(report)
    (row,) = assert_counts_agree(report, counts, kinds=("local",), minimum=16000)
    assert len(report.events) == report.keep_events < report.redirections == row.guest_new
    assert {site: (t.seen, t.checked) for site, t in report.by_call_site.items()} == {"local": (16000, 16000)}
    assert sorted(t.redirections for t in report.tasks.values() if t.comm == "klplab-run") == [8000, 8000]
    # and the reading thread knew most of them by their bytes, not only the memo in gdb's thread
    (note,) = [n for n in report.notes if n.startswith("recorder: ")]
    sieved = re.search(r"\((\d+) known clean before decoding\)", note)
    assert sieved and int(sieved.group(1)) >= 8000, note  # those in flight while it learns go to gdb's memo
