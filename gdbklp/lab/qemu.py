"""Run the lab guest in qemu-system-ppc64 and talk to its console.

The guest's console (hvc0) is QEMU's stdio; a reader thread copies it to a
log file and a buffer, so the host can wait for markers printed by the lab's
/init and run shell commands on the guest (serve mode). The gdbstub listens
on 127.0.0.1 only.

No QEMU outlives its owner: the child gets PR_SET_PDEATHSIG (SIGKILL when the
owner dies, even by SIGKILL), and close() runs from atexit and on SIGTERM.
"""

import atexit
import ctypes
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gdbklp.lab import LabError
from gdbklp.lab import config as cfg
from gdbklp.lab import root as labroot
from gdbklp.ports import free_port, is_listening
from gdbklp.versions import MIN_QEMU, dotted

PR_SET_PDEATHSIG = 1
_live_guests: "set[Guest]" = set()


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _close_all_guests() -> None:
    for guest in list(_live_guests):
        guest.close()


def _on_signal(signum, frame):
    """SIGTERM or SIGINT: the guests go first, while the process is whole, then
    the signal's usual outcome (exit 143; KeyboardInterrupt)."""
    _close_all_guests()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


atexit.register(_close_all_guests)


def kernel_cmdline(mode: str = "serve", patch: bool = True, run_args: str = "",
                   extra: tuple[str, ...] = (), qemu: cfg.QemuConfig = cfg.QEMU,
                   trampoline: str = cfg.DEFAULT_TRAMPOLINE) -> str:
    if trampoline not in cfg.TRAMPOLINES:
        raise LabError(f"unknown trampoline {trampoline!r} (one of {', '.join(cfg.TRAMPOLINES)})")
    words = [*qemu.append, f"klplab.mode={mode}"]
    if trampoline != cfg.DEFAULT_TRAMPOLINE:
        words.append(f"klp_trampoline={trampoline}")
    if not patch:
        words.append("klplab.patch=0")
    if run_args:
        words.append("klplab.run=" + ",".join(run_args.split()))
    return " ".join([*words, *extra])


@dataclass(frozen=True)
class Emulator:
    """A qemu-system-ppc64 the lab can start: how, and which version it is."""

    which: str              # a key of config.QEMUS
    argv: tuple[str, ...]   # the command that starts it, before its options
    env: tuple[tuple[str, str], ...]
    version: str            # its first --version line
    plugin: Path | None = None  # the recorder plugin it can load (-plugin), if any

    @property
    def version_number(self) -> tuple[int, ...]:
        match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", self.version)
        return tuple(int(g or 0) for g in match.groups()) if match else ()

    def describe(self) -> str:
        return f"{self.version.replace('QEMU emulator version', 'QEMU')}: {cfg.QEMUS[self.which]}"


def emulator(which: str | None = None, qemu: cfg.QemuConfig = cfg.QEMU) -> Emulator:
    """The QEMU the lab runs: which (or $GDBKLP_QEMU, or the default) of
    config.QEMUS. Refuses, in one line, one that is missing or too old."""
    which = which or os.environ.get("GDBKLP_QEMU") or cfg.DEFAULT_QEMU
    if which not in cfg.QEMUS:
        raise LabError(f"unknown QEMU {which!r} (one of {', '.join(cfg.QEMUS)})")
    plugin = None
    if which == "host":
        if not Path(qemu.program).exists():
            raise LabError(f"the host has no {qemu.program}: apt-get install qemu-system-ppc")
        argv, env = [qemu.program], {}
    elif which == "record":
        from gdbklp.lab import build  # the recorder is built (or verified in the cache) on first use
        recorder = build.build_recorder()
        root = labroot.ensure_root()
        argv, env = recorder_command(root, recorder.qemu)
        plugin = recorder.plugin
    else:
        root = labroot.ensure_root()
        argv, env = labroot.host_command(root, qemu.program)
    out = subprocess.run([*argv, "--version"], env={**os.environ, **env}, capture_output=True, text=True)
    version = (out.stdout.splitlines() or [""])[0]
    if which != "host":  # its firmware (SLOF) too, not the host's
        argv += ["-L", str(root / "usr/share/qemu")]
    found = Emulator(which, tuple(argv), tuple(env.items()), version, plugin)
    if not found.version_number:
        raise LabError(f"{' '.join(argv)} --version did not say its version: {(out.stdout + out.stderr).strip()[:200]}")
    if found.version_number < MIN_QEMU:
        raise LabError(f"{qemu.program} is QEMU {'.'.join(map(str, found.version_number))}; "
                       f"the lab needs QEMU {dotted(MIN_QEMU)} or newer")
    return found


def recorder_command(root: Path, binary: Path) -> tuple[list[str], dict[str, str]]:
    """(argv prefix, environment) that run the recorder's QEMU, a binary
    outside the lab root, as labroot.host_command runs the root's own: through
    the root's dynamic loader and libraries. Its modules directory is its own
    (it has none): the root's modules are another QEMU's."""
    if root == Path("/"):
        return [str(binary)], {"QEMU_MODULE_DIR": str(binary.parent)}
    loader = root / labroot.elf_interpreter(binary).lstrip("/")
    dirs = labroot.library_dirs(root)
    return ([str(loader), "--library-path", ":".join(map(str, dirs)), str(binary)],
            {"QEMU_MODULE_DIR": str(binary.parent)})


@dataclass(frozen=True)
class SentCommand:
    """A command sent to the guest's shell: where its output starts on the
    console, and how many commands were sent before it."""

    offset: int
    number: int


class Guest:
    """One lab guest. Use as a context manager, or call close().

    plugin_socket: with the recorder's QEMU (emulator("record")), the UNIX
    socket its plugin listens on for gdbklp.recorder (-plugin SO,socket=PATH).
    """

    def __init__(self, vmlinux: Path, initramfs: Path, *, append: str,
                 smp: int | None = None, stopped: bool = False,
                 workdir: Path | None = None, qemu: cfg.QemuConfig = cfg.QEMU,
                 emulator: Emulator | None = None, plugin_socket: Path | None = None):
        self.emulator = emulator
        self.plugin_socket = Path(plugin_socket) if plugin_socket else None
        self.vmlinux = Path(vmlinux)
        self.initramfs = Path(initramfs)
        self.append = append
        self.smp = smp or qemu.smp
        self.stopped = stopped
        self.qemu = qemu
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="gdbklp-lab-"))
        self.serial_log = self.workdir / "serial.log"
        self.gdb_port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._console = ""
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self._commands_sent = 0
        self._done_markers: list[re.Match] = []
        self._markers_scanned = 0

    # ---- life cycle --------------------------------------------------------

    def command_line(self, port: int) -> list[str]:
        q = self.qemu
        if self.emulator is None:
            self.emulator = emulator("record" if self.plugin_socket is not None else None, qemu=q)
        cmd = [
            *self.emulator.argv, "-M", q.machine, "-cpu", q.cpu, "-smp", str(self.smp), "-m", q.memory,
            "-accel", q.accel, "-nodefaults", "-nographic", "-no-reboot",
            "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
            "-kernel", str(self.vmlinux), "-initrd", str(self.initramfs),
            "-append", self.append,
            "-gdb", f"tcp:127.0.0.1:{port}",
        ]
        if self.plugin_socket is not None:
            if self.emulator.plugin is None:
                raise LabError(f"{self.emulator.describe()} has no recorder plugin: the recorder needs "
                               "--qemu record")
            cmd += ["-plugin", f"{self.emulator.plugin},socket={self.plugin_socket}"]
        return cmd + (["-S"] if self.stopped else [])

    def start(self, attempts: int = 3) -> "Guest":
        """Start QEMU; a gdbstub port taken in the meantime is replaced by another."""
        if threading.current_thread() is threading.main_thread():
            for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
                if signal.getsignal(signum) in (default, None):
                    signal.signal(signum, _on_signal)
        for _ in range(attempts):
            port = free_port()
            stderr_path = self.workdir / "qemu.stderr"
            with open(stderr_path, "w") as err:
                self.proc = subprocess.Popen(
                    self.command_line(port), env={**os.environ, **dict(self.emulator.env)},
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                    preexec_fn=_die_with_parent, start_new_session=True)
            _live_guests.add(self)
            self._reader = threading.Thread(target=self._read_console, daemon=True)
            self._reader.start()
            if self._wait_for_gdbstub(port):
                self.gdb_port = port
                return self
            stderr = stderr_path.read_text(errors="replace")
            self.close()
            if "Address already in use" not in stderr and "Failed to bind" not in stderr:
                raise LabError(f"QEMU exited early: {stderr.strip().splitlines()[-1:]}"
                               f"{self._serial_tail()}")
        raise LabError(f"no free gdbstub port after {attempts} attempts")

    def _wait_for_gdbstub(self, port: int, timeout: float = 10.0) -> bool:
        """True once QEMU listens on the port; False if QEMU exits first.

        Looks in /proc/net/tcp rather than connecting: a client connecting to
        QEMU's gdbstub pauses the guest.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if is_listening(port, self.proc.pid):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Kill QEMU (if running) and wait for it."""
        proc, self.proc = self.proc, None
        _live_guests.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)  # it reads to the end of QEMU's output: not from a closed pipe
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def __enter__(self) -> "Guest":
        return self if self.proc else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- console -------------------------------------------------------------

    def _read_console(self) -> None:
        proc = self.proc
        with open(self.serial_log, "ab") as log:
            while True:
                data = os.read(proc.stdout.fileno(), 65536) if proc.stdout else b""
                if not data:
                    break
                log.write(data)
                log.flush()
                with self._cond:
                    self._console += data.decode(errors="replace").replace("\r", "")
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def console(self) -> str:
        with self._cond:
            return self._console

    def _serial_tail(self, lines: int = 15) -> str:
        tail = self.console.splitlines()[-lines:]
        return ("\nlast lines of the serial log:\n  " + "\n  ".join(tail)) if tail else \
            "\n(the serial log is empty)"

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """Wait until the console (from offset start) matches pattern."""
        regex = re.compile(pattern)
        return self._wait_until(lambda: regex.search(self._console, start), timeout,
                                f"while waiting for {pattern!r}",
                                lambda: f"timed out after {timeout:.0f} s waiting for {pattern!r}")

    def _wait_until(self, found, timeout: float, during: str, late):
        """found()'s first true answer, asked whenever the console grows (under
        its lock); LabError if QEMU exits first ("QEMU exited " + during) or
        timeout passes (late())."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                answer = found()
                if answer:
                    return answer
                if self.proc is None or self.proc.poll() is not None:
                    raise LabError(f"QEMU exited {during}{self._serial_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LabError(f"{late()}{self._serial_tail()}")
                self._cond.wait(min(left, 0.5))

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for(re.escape(self.qemu.ready_marker), timeout)

    def send(self, command: str) -> SentCommand:
        """Start a shell command on the guest (serve mode); wait_done(it) waits for it."""
        with self._cond:
            sent = SentCommand(len(self._console), self._commands_sent)
            self._commands_sent += 1
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return sent

    def wait_done(self, sent: SentCommand, timeout: float = 120.0) -> tuple[int, str]:
        """Wait for a command send() started; return (status, output).

        The guest's shell runs its commands one after the other and ends each
        with one done marker: the command's marker is the (number + 1)-th. An
        earlier command that has not ended (a test that failed before waiting
        for its own) holds this one back instead of lending it its marker."""
        done = re.compile(re.escape(self.qemu.done_marker) + r" (\d+)\n")
        markers = self._done_markers

        def ended():
            for m in done.finditer(self._console, self._markers_scanned):
                markers.append(m)
                self._markers_scanned = m.end()
            return len(markers) > sent.number

        self._wait_until(ended, timeout, "while a guest command ran",
                         lambda: f"guest command {sent.number + 1} did not end within {timeout:.0f} s "
                                 f"({len(markers)} ended)")
        with self._cond:
            m = markers[sent.number]
            begin = max(sent.offset, markers[sent.number - 1].end() if sent.number else 0)
            return int(m.group(1)), self._console[begin:m.start()]

    def run(self, command: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run a shell command on the guest (serve mode); return (status, output)."""
        with self._lock:
            return self.wait_done(self.send(command), timeout)

    def check(self, command: str, timeout: float = 120.0) -> str:
        status, output = self.run(command, timeout)
        if status != 0:
            raise LabError(f"guest command {command!r} failed ({status}): {output.strip()}")
        return output
