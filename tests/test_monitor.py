"""gdbklp watch, the full-screen monitor, through a pseudo-terminal with a real guest."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO
from gdbklp.lab.session import booted

CONTROL = re.compile(rb"\x1b\[([0-9;?]*)([a-zA-Z])|\x1b[()][AB0-2]|\x1b[>=]|[\r\n\b]")


class Screen:
    """Just enough of a VT100 to replay prompt_toolkit's output: it redraws only
    the cells that change, so the text on screen is not a substring of the bytes."""

    def __init__(self, rows, columns):
        self.rows, self.columns = rows, columns
        self.cells = [[" "] * columns for _ in range(rows)]
        self.row = self.col = 0

    def feed(self, data: bytes) -> None:
        pos = 0
        for m in CONTROL.finditer(data):
            self._text(data[pos:m.start()].decode(errors="replace"))
            pos = m.end()
            token = m.group(0)
            if token == b"\r":
                self.col = 0
            elif token == b"\n":
                self.row = min(self.row + 1, self.rows - 1)
            elif token == b"\b":
                self.col = max(self.col - 1, 0)
            elif m.group(2):
                self._csi(m.group(1).decode(), m.group(2).decode())
        self._text(data[pos:].decode(errors="replace"))

    def _text(self, text: str) -> None:
        for ch in text:
            if self.col >= self.columns:
                continue
            self.cells[self.row][self.col] = ch
            self.col += 1

    def _csi(self, params: str, op: str) -> None:
        if params.startswith("?"):
            return
        args = [int(a) if a else 0 for a in params.split(";")] if params else []
        n = args[0] if args and args[0] else 1
        if op == "A":
            self.row = max(self.row - n, 0)
        elif op == "B":
            self.row = min(self.row + n, self.rows - 1)
        elif op == "C":
            self.col = min(self.col + n, self.columns - 1)
        elif op == "D":
            self.col = max(self.col - n, 0)
        elif op == "H":
            self.row = min((args[0] if args else 1) - 1, self.rows - 1)
            self.col = min((args[1] if len(args) > 1 else 1) - 1, self.columns - 1)
        elif op == "K":
            self.cells[self.row][self.col:] = [" "] * (self.columns - self.col)
        elif op == "J":
            self.cells[self.row][self.col:] = [" "] * (self.columns - self.col)
            for r in range(self.row + 1, self.rows):
                self.cells[r] = [" "] * self.columns

    @property
    def text(self) -> str:
        return "\n".join("".join(row).rstrip() for row in self.cells)


class Terminal:
    """A program on a pseudo-terminal: send keys, read what it drew."""

    def __init__(self, argv, rows=40, columns=140):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ.update(TERM="xterm", LINES=str(rows), COLUMNS=str(columns))
            os.execv(argv[0], argv)
        import fcntl
        import struct
        import termios
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self.raw = b""
        self.screen = Screen(rows, columns)

    def _read(self, timeout: float) -> None:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the program exited
                return
            self.raw += data
            self.screen.feed(data)

    def read_until(self, pattern: str, timeout: float) -> str:
        """Wait until the screen shows pattern (a regular expression)."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen.text):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not shown within {timeout} s; the screen:\n{self.screen.text}")
            self._read(min(left, 0.5))
        return self.screen.text

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def press(self, keys: str, shows: str, timeout: float) -> str:
        """Send keys, then wait until the screen shows pattern shows."""
        self.send(keys)
        return self.read_until(shows, timeout)

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.2)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("the monitor did not exit")


def gdbklp(*args):
    return [sys.executable, "-m", "gdbklp", *args]


@pytest.mark.generations
@pytest.mark.guest
@pytest.mark.gdb
def test_monitor_watches_saves_and_detaches(lab, tmp_path):
    report = tmp_path / "report.json"
    with booted(lab, workdir=tmp_path) as guest:
        term = Terminal(gdbklp("watch", "--attach", f"127.0.0.1:{guest.gdb_port}", "--vmlinux", str(lab.vmlinux),
                               "--report", str(report)))
        term.read_until(r"guest: running", 120)
        guest.check("klplab-run -r -t 2 -n 3 -k local,global")
        # one row per task with its redirections, a row per call-site class
        term.read_until(r"klplab-run\s+[0-9,]+\s+6\s+0\n.*klplab-run\s+[0-9,]+\s+6\s+0", 60)
        term.read_until(r"global\s+6\s+6\s+0", 30)
        term.read_until(r"local\s+6\s+6\s+0", 30)
        # the selected task (the first) has exited: one line says so
        term.press("f", r"klp-frames: no task with pid \d+", 30)
        # a task asleep in C after one redirection: the last row; its frames show C
        guest.check("echo 8000 > /sys/module/klp_lab_patch/parameters/nap_ms; "
                    "(klplab-run -t 1 -n 2 -k local -f nap > /dev/null &)")
        term.read_until(r"klplab-run\s+[0-9,]+\s+1\s+0", 60)
        term.send("\x1b[B\x1b[B")  # down twice
        term.press("f", r"klp-frames of pid \d+", 60)
        term.read_until(r"klp_lab_c_local", 10)
        term.press("p", r"guest: paused", 30)
        term.press("p", r"guest resumed", 30)
        term.press("s", r"report saved to", 30)
        assert json.loads(report.read_text())["redirections"] >= 13
        term.press("q", r"d detach", 10)
        term.send("d")
        assert term.wait(60) == 0
        assert b"detached, the guest keeps running" in term.raw
        assert b"\x1b[?1049l" in term.raw  # the alternate screen was left: the terminal is back
        # detached, not stopped: the guest still answers
        assert "klp_lab_patch" in guest.check("cat /proc/modules")


def test_monitor_bad_input_is_one_line():
    nothing = subprocess.run(gdbklp("watch", "--attach", "127.0.0.1:9", "--vmlinux", "/nonexistent"),
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert nothing.returncode == 1 and nothing.stderr.strip() == "gdbklp: no vmlinux at /nonexistent"
    assert "Traceback" not in nothing.stderr
    all_interfaces = subprocess.run(gdbklp("watch", "--launch", "qemu-system-ppc64 -gdb tcp::1234", "--vmlinux", sys.executable),
                                    capture_output=True, text=True, timeout=60, cwd=REPO)
    assert all_interfaces.returncode == 1 and "no -s or -gdb" in all_interfaces.stderr
    assert all_interfaces.stderr.count("\n") == 1
    for attach, complaint in (("127.0.0.1:abc", "'abc' is not a port number"),
                              ("127.0.0.1:99999", "port 99999 is out of range (1 to 65535)")):
        bad = subprocess.run(gdbklp("watch", "--attach", attach, "--vmlinux", sys.executable),
                             capture_output=True, text=True, timeout=60, cwd=REPO)
        assert bad.returncode == 1 and bad.stderr == f"gdbklp: {complaint}\n"
    no_gdb = subprocess.run(gdbklp("watch", "--attach", "127.0.0.1:9", "--vmlinux", sys.executable),
                            capture_output=True, text=True, timeout=60, cwd=REPO, env={"PATH": "/nonexistent"})
    assert no_gdb.returncode == 1
    assert no_gdb.stderr == "gdbklp: missing gdb-multiarch: install with 'apt-get install gdb-multiarch'\n"


@pytest.mark.gdb
def test_monitor_nothing_listening(lab):
    proc = subprocess.run(gdbklp("watch", "--attach", "127.0.0.1:9", "--vmlinux", str(lab.vmlinux)),
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == "gdbklp: nothing listens on 127.0.0.1:9 (Connection refused): is the guest's gdbstub there?\n"


@pytest.mark.gdb
def test_monitor_refuses_a_vmlinux_of_another_kernel(guest, lab, tmp_path):
    other = tmp_path / "vmlinux"
    other.write_bytes(lab.vmlinux.read_bytes().replace(b"Linux version ", b"Linux versi0n "))
    proc = subprocess.run(gdbklp("watch", "--attach", f"127.0.0.1:{guest.gdb_port}", "--vmlinux", str(other)),
                          capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "does not match the running kernel" in line and "Linux versi0n" in line


@pytest.mark.guest
@pytest.mark.gdb
@pytest.mark.parametrize("mode", [[], ["--record"]], ids=["auto", "record"])
def test_monitor_drives_the_lab_and_shows_its_console(lab, tmp_path, mode):
    # --lab --run: the workload starts with the watch; r starts another; the
    # guest's console shows klplab-run's counts
    term = Terminal(gdbklp("watch", "--lab", *mode, "--workload", "-t 1 -n 4 -k local,indirect", "--report",
                           str(tmp_path / "report.json")))
    term.read_until(r"redirections: 8 ", 180)
    term.read_until(r"klplab-counts-end", 30)
    term.read_until(r"'klplab-run -t 1 -n 4 -k local,indirect' exited 0", 30)
    term.press("r", r"klplab-run \S*$|Enter runs it", 10)
    term.press("-t 1 -n 3 -k global\r", r"redirections: 11 ", 60)
    term.read_until(r"global\s+3\s+3\s+0", 30)
    term.press("q", r"d detach", 10)
    term.send("k")
    assert term.wait(60) == 0
    assert b"guest stopped" in term.raw
