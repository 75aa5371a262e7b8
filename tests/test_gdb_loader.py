"""gdbklp inside the real gdb-multiarch: loading, and one clear line for bad input."""


import pytest

from helpers import REPO, in_lab_root, run_gdb_batch

pytestmark = [pytest.mark.gdb, pytest.mark.smoke]  # gdb-multiarch (no guest)


def assert_no_traceback(proc):
    for text in (proc.stdout, proc.stderr):
        assert "Traceback" not in text and "Python Exception" not in text, text


def test_loads_and_registers_commands():
    proc = run_gdb_batch("help klp-watch")
    assert_no_traceback(proc)
    assert "Watch live-patch redirections per task" in proc.stdout


def test_bad_arguments_are_one_line():
    proc = run_gdb_batch("klp-watch frobnicate")
    assert_no_traceback(proc)
    # Python 3.13's argparse lists the choices without quotes
    assert [line.replace("'", "") for line in proc.stderr.strip().splitlines()] == [
        "klp-watch: argument action: invalid choice: frobnicate "
        "(choose from start, stop, status, report, finish)"]


@pytest.mark.parametrize("command", ["status", "stop"])
def test_without_a_watch(command):
    proc = run_gdb_batch(f"klp-watch {command}")
    assert proc.stderr.strip() == "klp-watch: no watch: use 'klp-watch start'"


def test_sampling_and_parking_exclude_each_other():
    proc = run_gdb_batch("klp-watch start --park --sample 10")
    assert proc.stderr.strip() == "klp-watch: --sample and --park are two ways of watching: choose one"


def test_no_vmlinux():
    proc = run_gdb_batch("klp-watch start")
    assert_no_traceback(proc)
    assert proc.stderr.strip() == "klp-watch: no vmlinux loaded: use 'file vmlinux' first"


@pytest.mark.parametrize("command", ["klp-watch start", "klp-frames", "klp-frames --all"])
def test_not_ppc64(command):
    proc = run_gdb_batch("file /usr/bin/true", command)
    assert_no_traceback(proc)
    name = command.split()[0]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{name}: /usr/bin/true is not a ppc64 ELF file (e_machine 62)")


def cross_object(tmp_path, source, strip=False):
    """A ppc64le executable of source, built with the lab root's cross compiler
    (a test that uses it is marked `toolchain`)."""
    src = tmp_path / "k.c"
    src.write_text(source)
    obj = tmp_path / "vmlinux"
    in_lab_root("powerpc64le-linux-gnu-gcc", "-nostdlib", "-static", "-o", obj, src, where=tmp_path)
    if strip:
        in_lab_root("powerpc64le-linux-gnu-strip", obj, where=tmp_path)
    return obj


@pytest.mark.toolchain
@pytest.mark.parametrize("command", ["klp-watch start", "klp-frames"])
def test_vmlinux_without_symbols(tmp_path, command):
    obj = cross_object(tmp_path, "void _start(void) {}\n", strip=True)
    proc = run_gdb_batch(f"file {obj}", command)
    assert_no_traceback(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{command.split()[0]}: {obj} has no symbol table (stripped?)")


@pytest.mark.toolchain
def test_not_a_kernel(tmp_path):
    obj = cross_object(tmp_path, "void _start(void) {}\n")
    proc = run_gdb_batch(f"file {obj}", "klp-watch start")
    assert proc.stderr.strip().splitlines()[-1] == (
        f"klp-watch: {obj} has no kernel symbols (_stext not found)")


@pytest.mark.toolchain
def test_kernel_without_live_patching(tmp_path):
    obj = cross_object(tmp_path, "void _start(void) {}\nvoid _stext(void) {}\n")
    proc = run_gdb_batch(f"file {obj}", "klp-watch start")
    assert_no_traceback(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"klp-watch: kernel without live patching: no livepatch_handler in {obj}")


@pytest.mark.toolchain
@pytest.mark.parametrize("command", ["klp-watch start", "klp-frames"])
def test_commands_without_a_target(tmp_path, command):
    obj = cross_object(tmp_path, "void _start(void) {}\nvoid _stext(void) {}\nvoid livepatch_handler(void) {}\n")
    proc = run_gdb_batch(f"file {obj}", command)
    assert_no_traceback(proc)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"{command.split()[0]}: no target: connect to the guest's gdbstub first "
        "(target remote 127.0.0.1:PORT)")


def test_a_broken_part_does_not_stop_the_rest():
    proc = run_gdb_batch("python import gdbklp.gdbext as g; g.load(('commands.watch', 'commands.no_such_part'))",
                         "help klp-watch")
    assert_no_traceback(proc)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("gdbklp:")]
    assert lines == ["gdbklp: part 'commands.no_such_part' not loaded: "
                     "ModuleNotFoundError: No module named 'gdbklp.gdbext.commands.no_such_part'"]
    assert "Watch live-patch redirections per task" in proc.stdout


def test_missing_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("GDBKLP_VENV", "/nonexistent/venv")
    proc = run_gdb_batch("help klp-watch")
    assert_no_traceback(proc)
    notes = [l for l in proc.stdout.splitlines() if l.startswith("gdbklp:")]
    embedded = run_gdb_batch("python import sys; print('python%d.%d' % sys.version_info[:2])").stdout.split()[-1]
    assert embedded in ("python3.11", "python3.13")  # Debian 12's gdb 13, Debian 13's gdb 16
    assert notes == [f"gdbklp: no {embedded} environment at /nonexistent/venv (run ./bootstrap setup); "
                     "loading without it: instruction display is off"]
    assert "Watch live-patch redirections per task" in proc.stdout


def test_a_gdb_older_than_supported_is_refused_in_one_line():
    pretend_newer_minimum = f"python import sys; sys.path.insert(0, {str(REPO)!r}); " \
                            "import gdbklp.versions as v; v.MIN_GDB = (99, 0)"
    proc = run_gdb_batch("help klp-watch", args=("-ex", pretend_newer_minimum))
    assert_no_traceback(proc)
    assert "gdbklp: not loaded: gdbklp needs gdb 99.0 or newer; this is gdb " in proc.stdout
    assert 'Undefined command: "klp-watch"' in proc.stderr

