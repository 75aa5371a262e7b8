"""The 2015 RFC's design in the lab kernel (klp_trampoline=): klp-lint and klp-watch."""

import json

import pytest

from helpers import RECORDED, assert_counts_agree, recorder_for
from gdbklp.abi.designs import Design
from gdbklp.lab import workload
from gdbklp.gdbmi import GdbCommandError
from gdbklp.lab.config import KERNELS, TRAMPOLINES
from gdbklp.lab.session import WatchedGuest, attached, booted
from gdbklp.options import WatchOptions

pytestmark = [pytest.mark.guest, pytest.mark.gdb]  # each watches a QEMU guest

HAZARDOUS = ("many_args", "varargs")
# the generations whose lab kernel has the RFC trampolines
RFC_KERNELS = [k.name for k in KERNELS.values() if "rfc" in k.trampolines]
MULLW = 0x7D8C59D6  # mullw r12,r12,r11: no step of a redirect path


def lint(gdb) -> dict:
    if gdb.running:
        gdb.interrupt()
    return json.loads(gdb.console("klp-lint --json"))


def test_merged_design_lints_clean(gdb):
    result = lint(gdb)
    assert result["verdict"] == "clean", result
    texts = " | ".join(f["text"] for f in result["findings"])
    assert "go to livepatch_handler" in texts and "DWARF says 296" in texts and "DWARF says 16" in texts
    assert "KLP_return_helper is present but not in use" in texts
    # a path klp-lint cannot follow: it names the instruction
    bad = json.loads(gdb.console("klp-lint --json --rfc livepatch_handler"))
    assert bad["verdict"] == "defects found"
    assert "cannot interpret `ld r12, 0x128(r13)`" in bad["findings"][-1]["text"]


@pytest.mark.parametrize("lab", RFC_KERNELS, indirect=True)
def test_rfc_fixed_clean_workload_and_hazards(lab, tmp_path):
    """rfc-fixed: every kind the design supports redirects cleanly under watch; the
    replacements with stack-passed arguments are reported as hazards with the reason."""
    kinds = TRAMPOLINES["rfc-fixed"].kinds
    assert set(workload.KINDS) - set(kinds) == set(HAZARDOUS)
    with booted(lab, workdir=tmp_path, trampoline="rfc-fixed") as guest, attached(guest, lab.vmlinux) as gdb:
        result = lint(gdb)
        assert result["verdict"] == "clean", result
        assert "RFC mini-frame path" in " ".join(f["text"] for f in result["findings"])
        watched = WatchedGuest(guest, gdb)
        report = watched.watch(f"klplab-run -r -t 2 -n 10 -k {','.join(kinds)} -f sleep")
        WatchedGuest.assert_clean(report)
        assert report.design == Design.RFC
        rows = assert_counts_agree(report, watched.counts(), kinds)
        assert [r.guest_new for r in rows] == [20] * len(kinds)
        hazards = {h.split(" ")[0]: h for h in report.hazards}
        assert set(hazards) == {workload.replacement_of(k) for k in HAZARDOUS}
        assert "more than 8 arguments" in hazards["klp_lab_c_many_args"]
        assert "varargs" in hazards["klp_lab_c_varargs"]
        # local calls took the mini frame, global and indirect ones the direct path
        assert report.by_call_site["local"].checked == report.by_call_site["local"].seen > 0
        assert report.by_call_site["global"].seen == report.by_call_site["indirect"].seen == 20
        # a redirect path klp-watch cannot follow: it refuses the model, naming the instruction
        gdb.interrupt()
        compare = int(gdb.console('printf "%lu\\n", &klp_rfc_fixed_redirect').strip()) + 16
        gdb.console(f"set var *(unsigned int *){compare} = {MULLW:#x}")
        with pytest.raises(GdbCommandError, match=rf"refusing the RFC model: cannot interpret `mullw[^`]*` at {compare:#x}"):
            gdb.console("klp-watch start")


@pytest.mark.parametrize("lab", RFC_KERNELS, indirect=True)
def test_rfc_fixed_clean_workload_recorded(lab, tmp_path):
    """rfc-fixed in record mode: the redirect path (P1) and the helper (P3) from
    records, every redirection counted as the guest counted it."""
    kinds = TRAMPOLINES["rfc-fixed"].kinds
    options, socket = recorder_for(RECORDED, tmp_path)
    with booted(lab, workdir=tmp_path, trampoline="rfc-fixed", plugin_socket=socket) as guest, \
            attached(guest, lab.vmlinux) as gdb:
        watched = WatchedGuest(guest, gdb)
        report = watched.watch(f"klplab-run -r -t 2 -n 10 -k {','.join(kinds)}", options=options)
        WatchedGuest.assert_clean(report)
        assert report.design == Design.RFC and report.mode == "record" and not report.errors, report.format_text()
        rows = assert_counts_agree(report, watched.counts(), kinds)
        assert [r.guest_new for r in rows] == [20] * len(kinds)


@pytest.mark.parametrize("options", [WatchOptions(), RECORDED], ids=lambda o: o.mode)
@pytest.mark.parametrize("lab", RFC_KERNELS, indirect=True)
def test_rfc_as_posted_fails_at_the_first_redirection(lab, tmp_path, options):
    """rfc: klp-lint finds the 0x18 constant and the lost return address; klp-watch
    reports the misrouted global call and the lost return address at the first
    redirection, with the addresses, and records what the guest does next; in
    record mode too."""
    options, socket = recorder_for(options, tmp_path)
    with booted(lab, workdir=tmp_path, trampoline="rfc", plugin_socket=socket) as guest, \
            attached(guest, lab.vmlinux) as gdb:
        result = lint(gdb)
        assert result["verdict"] == "defects found"
        errors = [f for f in result["findings"] if not f["ok"]]
        assert "compared with 0x18, not 0xe8410018" in errors[0]["text"]
        assert errors[0]["where"].startswith("klp_rfc_redirect+")
        assert "return address" in errors[1]["text"] and errors[1]["where"] == "KLP_return_helper"
        report = WatchedGuest(guest, gdb).watch("klplab-run -r -t 1 -n 1 -k global", timeout=60, options=options)
        first = [v for v in report.violations if v.seq == 0]
        assert {v.invariant for v in first} >= {2, 5}
        misrouted = next(v for v in first if v.invariant == 2)
        assert misrouted.caller.startswith("klp_lab_a_global") and misrouted.call_site == "global"
        assert "0xe8410018" in misrouted.expected and "0x18" in misrouted.found
        lost = next(v for v in first if v.invariant == 5)
        assert f"{report.events[0].return_address:#x}" in lost.expected
        assert report.guest_events, report.format_text()
