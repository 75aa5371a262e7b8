"""The guest's counts and their comparison with gdb's: a workload that gave no
counts, or counts without a kind, fails rather than passes with nothing compared."""

import json
import shlex
from collections import Counter

import pytest

from helpers import assert_counts_agree
from gdbklp.lab import LabError, workload
from gdbklp.lab.session import WatchedGuest, WorkloadError, watch_workload
from gdbklp.report import WatchReport

TABLE = ("klplab-run: 2 tasks\nklplab-counts-begin\nkind calls old new bad\n"
         + "".join(f"{kind} 10 0 10 0\n" for kind in workload.KINDS) + "klplab-counts-end\n")
EVERY_KIND_SEEN = Counter({workload.caller_of(kind): 10 for kind in workload.KINDS})


def report_seeing(by_caller: Counter) -> WatchReport:
    return WatchReport(by_caller=by_caller)


def test_the_table_is_read_by_kind():
    counts = workload.parse_counts(TABLE)
    assert counts == dict.fromkeys(workload.KINDS, workload.KindCounts(10, 0, 10, 0))


@pytest.mark.parametrize("output, why", [
    ("", "the workload printed no counts table (it printed nothing)"),
    ("klplab-run: /proc/klp_lab/run: No such file or directory\n",
     "the workload printed no counts table (its output ended: klplab-run: /proc/klp_lab/run: No such file or "
     "directory)"),
    ("klplab-counts-begin\nkind calls old new bad\nklplab-counts-end\n",
     "the workload's counts table is empty (its output ended: klplab-counts-begin | kind calls old new bad | "
     "klplab-counts-end)"),
])
def test_no_counts_is_an_error_that_quotes_the_output(output, why):
    with pytest.raises(LabError) as e:
        workload.parse_counts(output)
    assert str(e.value) == why


def test_compare_refuses_counts_without_a_kind():
    with pytest.raises(LabError, match=r"^the guest's counts have no local, local_other, .*sibling "
                                       r"\(they have no kind at all\)$"):
        workload.compare(EVERY_KIND_SEEN, {})
    some = {kind: c for kind, c in workload.parse_counts(TABLE).items() if kind != "global"}
    with pytest.raises(LabError, match=r"^the guest's counts have no global \(they have local, "):
        workload.compare(EVERY_KIND_SEEN, some, ("local", "global"))
    with pytest.raises(ValueError):
        workload.compare(EVERY_KIND_SEEN, some, ())  # nothing compared is no agreement


def test_compare_has_one_row_per_kind_asked_for_in_that_order():
    rows = workload.compare(EVERY_KIND_SEEN, workload.parse_counts(TABLE), ("global", "local"))
    assert [(r.kind, r.seen_by_gdb, r.guest_new, r.agrees) for r in rows] == [
        ("global", 10, 10, True), ("local", 10, 10, True)]


def test_counts_agree_when_gdb_saw_each_new_result():
    rows = assert_counts_agree(report_seeing(EVERY_KIND_SEEN), workload.parse_counts(TABLE), minimum=10)
    assert [r.kind for r in rows] == list(workload.KINDS)


def test_empty_counts_do_not_agree():
    with pytest.raises(LabError, match="the guest's counts have no local"):
        assert_counts_agree(report_seeing(EVERY_KIND_SEEN), {})


@pytest.mark.parametrize("table, seen, minimum, failure", [
    (TABLE.replace("local 10 0 10 0", "local 0 0 0 0"), Counter(), 0, "the guest made no local call"),
    (TABLE, EVERY_KIND_SEEN - Counter({workload.caller_of("indirect"): 1}), 0, "kind='indirect', seen_by_gdb=9,"),
    (TABLE.replace("global 10 0 10 0", "global 10 0 10 1"), EVERY_KIND_SEEN, 0, "kind='global',.* guest_bad=1"),
    (TABLE, EVERY_KIND_SEEN, 11, "kind='local', seen_by_gdb=10, guest_new=10,"),
])
def test_counts_that_disagree_fail(table, seen, minimum, failure):
    with pytest.raises(AssertionError, match=failure):
        assert_counts_agree(report_seeing(seen), workload.parse_counts(table), minimum=minimum)


class FakeGdb:
    """Enough of GdbSession for WatchedGuest.watch: klp-watch start notes where
    the report goes, klp-watch stop writes an empty one there."""

    def __init__(self):
        self.running = False
        self.report_path = None

    def console(self, command: str) -> str:
        words = shlex.split(command)
        if words[:2] == ["klp-watch", "start"]:
            self.report_path = words[words.index("--report") + 1]
        elif words[:2] == ["klp-watch", "status"]:
            return json.dumps({"mode": "breakpoint"})
        elif words[:2] == ["klp-watch", "stop"]:
            report = WatchReport()
            report.finish("klp-watch stop")
            report.write_json(self.report_path)
        return ""

    def cont(self):
        self.running = True

    def interrupt(self):
        self.running = False


class HungGuest:
    def run(self, command: str, timeout: float):
        raise LabError(f"no @@klplab-done within {timeout:.0f} s")


def test_a_workload_that_did_not_finish_fails_with_the_reason():
    gdb = FakeGdb()
    with pytest.raises(WorkloadError) as e:
        watch_workload(HungGuest(), gdb, "-t 1 -n 1", timeout=5)
    message = str(e.value)
    assert message.startswith("no counts from the guest: the workload printed no counts table (it printed nothing)\n")
    assert "note: guest command did not finish: no @@klplab-done within 5 s" in message
    assert "(ended: klp-watch stop)" in message
    assert e.value.report.notes == ["guest command did not finish: no @@klplab-done within 5 s"]
    assert not gdb.running  # stopped, as it was found


def test_counts_before_any_watch_are_an_error():
    with pytest.raises(LabError, match="no command watched yet"):
        WatchedGuest(HungGuest(), FakeGdb()).counts()
