"""klp-watch start's options as data, and the report's per-task rows."""

import argparse
import dataclasses
import shlex

import pytest

from gdbklp.abi.invariants import EventContext, Violation, stamp
from gdbklp.abi.kernel import TaskIdentity
from gdbklp.options import WatchOptions, add_start_arguments
from gdbklp.report import Redirection, WatchReport


def parse(command: str) -> WatchOptions:
    words = shlex.split(command)
    assert words[:2] == ["klp-watch", "start"]
    parser = argparse.ArgumentParser()
    add_start_arguments(parser)
    return WatchOptions.from_args(parser.parse_args(words[2:]))


@pytest.mark.parametrize("options", [
    WatchOptions(),
    WatchOptions(quiet=True, report="/tmp/a b/report.json", park=True, resolve_indirect=True),
    WatchOptions(sample=12.5, max_events=3, fail_fast=True, design="rfc", junit="x.xml", batch=True),
    WatchOptions(breakpoint=True, background=True),
])
def test_the_command_line_gives_back_the_options(options):
    assert parse(options.command()) == options


def test_contradictions_are_one_line():
    assert WatchOptions(park=True, sample=10).problem() == "--sample and --park are two ways of watching: choose one"
    assert WatchOptions(park=True, breakpoint=True, sample=10).problem() == \
        "--sample and --park and --breakpoint are three ways of watching: choose one"
    assert WatchOptions(park=True, resolve_indirect=True).problem() is None


QEMU_7_2, QEMU_10_0, QEMU_10_2, QEMU_11_1 = (7, 2, 22), (10, 0, 13), (10, 2, 0), (11, 1, 3)


@pytest.mark.parametrize("options, qemu, can_park, mode", [
    # a QEMU that flushes at every stop: parked, when gdb runs the guest in the background
    (WatchOptions(background=True), QEMU_7_2, True, "park"),
    (WatchOptions(background=True), QEMU_10_0, True, "park"),
    (WatchOptions(), QEMU_7_2, True, "breakpoint"),                 # a CLI `continue` would hold parked tasks
    (WatchOptions(background=True), QEMU_7_2, False, "breakpoint"),  # the RFC design has no P3 to park at
    # one that does not flush: the breakpoint probe is the faster
    (WatchOptions(background=True), QEMU_10_2, True, "breakpoint"),
    (WatchOptions(background=True), QEMU_11_1, True, "breakpoint"),
    (WatchOptions(background=True), None, True, "breakpoint"),       # not QEMU, or it would not say
    # a mode asked for is kept
    (WatchOptions(background=True, breakpoint=True), QEMU_7_2, True, "breakpoint"),
    (WatchOptions(park=True), QEMU_11_1, True, "park"),
    (WatchOptions(sample=10, background=True), QEMU_7_2, True, "sample"),
])
def test_the_default_mode_is_the_one_measured_fastest_on_the_qemu(options, qemu, can_park, mode):
    assert options.mode in ("auto", mode)
    assert options.resolved(qemu, can_park).mode == mode


def redirection(seq: int, who: TaskIdentity) -> Redirection:
    return Redirection(seq=seq, who=who, cpu=seq % 2,
                       return_address=0x1000, caller="klp_lab_a_local+0x1c [klp_lab_target]", call_site="local",
                       patched="klp_lab_b_local [klp_lab_target]", replacement="klp_lab_c_local [klp_lab_patch]",
                       toc=0x2000, sp=0x3000, depth=1, named_by="call site")


def test_one_row_per_task_incarnation_and_json_round_trip():
    task = 0xC000000002A10000
    first, reused, execed = TaskIdentity(task, 72, "sleep", 1), TaskIdentity(task, 74, "sh", 1), \
        TaskIdentity(task, 74, "busybox", 2)
    report = WatchReport()
    for seq, who in enumerate([first, first, reused, execed, execed, execed]):
        v = stamp([Violation(9, "t", "e", "f")], EventContext(seq, who, 0)) if seq == 5 else []
        report.add(redirection(seq, who), v, checked=True)
    rows = sorted((t.pid, t.comm, t.exec_id, t.redirections, t.violations) for t in report.tasks.values())
    assert rows == [(72, "sleep", 1, 2, 0), (74, "busybox", 2, 3, 1), (74, "sh", 1, 1, 0)]
    assert (report.violations[0].pid, report.violations[0].comm, report.violations[0].seq) == (74, "busybox", 5)
    assert report.by_redirect == {"local: klp_lab_b_local [klp_lab_target] -> klp_lab_c_local [klp_lab_patch] "
                                  "(call site)": 6}
    data = report.to_dict()
    assert WatchReport.from_dict(data) == report
    assert WatchReport.from_dict(data).to_dict() == data
    assert [t["pid"] for t in report.summary()["tasks"]] == [72, 74, 74]


def test_redirections_alike_tally_as_one_by_one():
    """add_alike(r, [], checked, n): what n add() calls with r's fields and
    seqs from r's on give; the event list keeps those it has room for."""
    who = TaskIdentity(0xC000000002A10000, 72, "klplab-run", 1)
    one_by_one, alike = WatchReport(keep_events=5), WatchReport(keep_events=5)
    alike.started = one_by_one.started
    for seq in range(3):
        one_by_one.add(redirection(seq, who), [], checked=True)
        alike.add(redirection(seq, who), [], checked=True)
    for seq in range(3, 9):
        one_by_one.add(dataclasses.replace(redirection(3, who), seq=seq), [], checked=True)
    alike.add_alike(redirection(3, who), [], True, 6)
    assert alike.to_dict() == one_by_one.to_dict()
    assert [r.seq for r in alike.events] == [0, 1, 2, 3, 4]
    assert alike.redirections == 9 and alike.by_call_site["local"].checked == 9
