"""A fast subset of the mutation suite (bench/mutation.py runs all): each mutant
of the lab caught with its invariant, at its first redirection, before the
guest goes down, with the instruction or code point responsible."""

import dataclasses

import pytest

from helpers import RECORDED, needs_parking, recorder_for
from gdbklp.lab import build
from gdbklp.lab.mutants import MUTANTS, MutatedCode
from gdbklp.lab.session import WatchedGuest, attached, booted
from gdbklp.options import WatchOptions

FAST = ("pop-16-bytes", "push-no-magic", "c-clobbers-toc-slot")
# out-of-line ftrace stubs (7.3): invariant 14, by the hand-off probes or the stub check
OOL = ("ool-r15-clobbered", "ool-handler-ra-from-lr", "ool-stub-skips-an-instruction")
# caught at a guard point (the trampoline's exit for calls not redirected),
# which record mode records as it records P3
RECORDED_GUARDS = ("ftrace-no-redirect",)
# klp-lint proves these code points from the code: defective where a mutant edits them
STATICALLY_CHECKED = (MutatedCode.PUSH_HALF, MutatedCode.RETURN_HALF, MutatedCode.FTRACE_EXIT,
                      MutatedCode.FTRACE_STUBS, MutatedCode.FTRACE_DECISION)


@pytest.mark.smoke
@pytest.mark.guest
@pytest.mark.gdb
@pytest.mark.parametrize("name,options",
                         [(name, WatchOptions()) for name in FAST + OOL] +
                         [pytest.param(name, WatchOptions(park=True), marks=needs_parking) for name in FAST] +
                         [(name, RECORDED) for name in FAST + OOL + RECORDED_GUARDS],
                         ids=lambda value: value.mode if isinstance(value, WatchOptions) else value)
def test_mutant_is_caught_with_its_invariant(lab, tmp_path, name, options):
    mutant = MUTANTS[name]
    images = build.build_all(mutant)
    options, socket = recorder_for(dataclasses.replace(options, handoff=mutant.handoff), tmp_path)
    with booted(images, trampoline=mutant.trampoline, workdir=tmp_path, plugin_socket=socket) as guest, \
            attached(guest, images.vmlinux) as gdb:
        gdb.cont()
        report = WatchedGuest(guest, gdb).watch(f"klplab-run -r {mutant.run}", 120, options)
        gdb.interrupt()
        lint = gdb.console("klp-lint")
    assert lint.strip().endswith("klp-lint: " + ("defects found" if mutant.mutated in STATICALLY_CHECKED
                                                else "clean")), lint
    assert report.violations, f"{name} not detected:\n{report.format_text()}"
    first = report.violations[0]
    assert (first.invariant, first.seq) == (mutant.invariant, 0), report.format_text()
    # before the guest went down: a die() or panic() is a guest event, and the report
    # counts the violations it had reported by the first one
    if report.guest_events:
        assert report.violations_at_down is not None and report.violations_at_down > 0, report.format_text()
    else:
        assert report.violations_at_down is None, report.format_text()  # it did not go down
    if mutant.handoff:
        assert first.diagnosis.startswith("ftrace's hand-off"), first.format_text()
    elif mutant.mutated is MutatedCode.FTRACE_STUBS:
        assert first.diagnosis.startswith("the stub area"), first.format_text()
    elif mutant.mutated is MutatedCode.RETURN_HALF:
        assert first.diagnosis.startswith("in livepatch_handler's return half"), first.format_text()
    elif mutant.mutated is MutatedCode.PUSH_HALF:
        assert "livepatch_handler is defective (static model)" in first.diagnosis, first.format_text()
    elif mutant.mutated is MutatedCode.FTRACE_DECISION:  # at the trampoline's exit, a guard point
        assert first.diagnosis.startswith("the ftrace trampoline's redirect decision"), first.format_text()
        assert first.call_site == "not redirected", first.format_text()
    else:
        assert first.diagnosis.startswith("between P1 and P3, while C ran"), first.format_text()


def test_mutant_builds_reuse_the_lab_build_tree(lab):
    images = build.build_all(MUTANTS["pop-16-bytes"])
    log = (images.vmlinux.parent / "build.log").read_text()
    # only the trampoline's object is assembled again, then vmlinux is linked
    assert "AS      arch/powerpc/kernel/trace/ftrace_mprofile.o" in log
    assert "  CC  " not in log.replace("CC      init/version-timestamp.o", "")


@pytest.mark.guest
@pytest.mark.gdb
def test_an_entry_left_behind_is_found_at_the_next_redirection(lab, tmp_path):
    # pop-never: the return half forgets to store livepatch_sp back. The first
    # redirection's P4 is predicted wrong; the second finds the first's entry
    # still there with no redirection in flight for it (pushed without pop)
    mutant = MUTANTS["pop-never"]
    images = build.build_all(mutant)
    with booted(images, workdir=tmp_path) as guest, attached(guest, images.vmlinux) as gdb:
        gdb.cont()
        report = WatchedGuest(guest, gdb).watch(f"klplab-run -r {mutant.run}", 120)
    by_seq = {}
    for v in report.violations:
        by_seq.setdefault(v.seq, []).append(v)
    assert [v.invariant for v in by_seq[0]] == [9], report.format_text()
    balance = [v for v in by_seq[1] if v.invariant == 10]
    assert balance and balance[0].title == "livepatch stack unbalanced: pushed without pop (seen by a P3 check)"
    assert (balance[0].expected, balance[0].found) == (
        "one entry per redirection in flight: 0 (trampoline frames on its stack)", "1 entries")
