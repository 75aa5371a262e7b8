"""gdbklp watch: a full-screen live monitor of klp-watch (prompt_toolkit), driving
gdb-multiarch over MI (pygdbmi).

    gdbklp watch --attach 127.0.0.1:PORT --vmlinux VMLINUX [--sample HZ] [--report FILE]
    gdbklp watch --lab [--trampoline NAME] [--workload ARGS] # boot the lab guest and watch it
    gdbklp watch --launch "qemu-system-ppc64 ..." --vmlinux VMLINUX

Every gdb exchange happens on one background thread (GdbFeed), so the screen
never waits for gdb: it shows the latest status the feed read (klp-watch
status --json, twice a second) and queues the keys' actions. With --lab the
monitor drives the guest too: `r` (or --workload) starts klplab-run with the
arguments typed, on its own thread, and the guest's console (its serial log:
the kernel's messages and the workload's output) is shown. Failures before
the screen opens (gdb missing, nothing listening, a vmlinux that is not the
running kernel) are one line on the terminal; the screen restores the
terminal however it ends.
"""

import contextlib
import json
import queue
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gdbklp.errors import GdbklpError
from gdbklp.lab import LabError
from gdbklp.gdbmi import GdbSession
from gdbklp.ports import free_port, host_and_port, is_listening, require_listener
from gdbklp.options import WatchOptions

POLL_SECONDS = 0.5
GDBSTUB_OPTIONS = ("-s", "-gdb")  # QEMU's own gdbstub options: -s listens on every interface
KEYS = "p pause/resume   ↑↓ select task   f klp-frames of the task   s save report   q quit"
LAB_KEYS = "   r run a workload"
CONSOLE_LINES = 8
CONSOLE_TAIL_BYTES = 4096


@dataclass
class Snapshot:
    """What the screen shows; replaced whole by the feed, read by the screen."""

    guest: str = "connecting"
    status: dict = field(default_factory=dict)
    rate: float = 0.0                 # redirections per second, over the last poll
    message: str = ""
    detail: str = ""                  # klp-frames output of the selected task
    ended: str | None = None          # set when the feed stops: why


class GdbFeed(threading.Thread):
    """Owns the gdb session: polls the watch, runs the actions the keys queue."""

    def __init__(self, gdb: GdbSession):
        super().__init__(name="gdbklp gdb feed", daemon=True)
        self.gdb = gdb
        self.snapshot = Snapshot(guest="running" if gdb.running else "paused")
        self.actions: queue.Queue = queue.Queue()
        self.last = (time.monotonic(), 0)

    def run(self) -> None:
        try:
            while True:
                try:
                    action = self.actions.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    action = None
                if action is not None and action() == "quit":
                    return
                self.poll()
        except Exception as e:  # gdb went away: say so, the screen closes
            self.update(ended=f"gdb: {e}")

    def update(self, **changes) -> None:
        self.snapshot = Snapshot(**{**self.snapshot.__dict__, **changes})  # the screen redraws on its timer

    def poll(self) -> None:
        status = json.loads(self.gdb.console("klp-watch status --json").strip().splitlines()[-1])
        now, count = time.monotonic(), status["redirections"]
        then, before = self.last
        self.last = (now, count)
        self.update(status=status, rate=(count - before) / (now - then) if now > then else 0.0,
                    guest="running" if self.gdb.running else "paused")

    # ---- actions (run on this thread) ------------------------------------------

    def toggle_pause(self) -> None:
        if self.gdb.running:
            self.gdb.interrupt()
            self.update(guest="paused", message="guest paused")
        else:
            self.gdb.cont()
            self.update(guest="running", message="guest resumed")

    def frames(self, pid: int) -> None:
        was_running = self.gdb.running
        if was_running:
            self.gdb.interrupt()
        try:
            self.update(detail=self.gdb.console(f"klp-frames --task {pid}"), message=f"klp-frames of pid {pid}")
        except GdbklpError as e:
            self.update(detail="", message=str(e).strip().splitlines()[-1])
        finally:
            if was_running:
                self.gdb.cont()

    def save(self, path: Path) -> None:
        self.gdb.console(f"klp-watch report --report {path}")
        self.update(message=f"report saved to {path}")

    def quit(self, leave_running: bool) -> str:
        if self.gdb.running:
            self.gdb.interrupt()
        self.gdb.console("klp-watch stop")
        if leave_running:  # QEMU resumes the guest when gdb detaches
            self.gdb.mi("-target-detach")
        else:
            self.gdb.console("kill")
        self.update(ended="detached, the guest keeps running" if leave_running else "guest stopped")
        return "quit"


class Workload:
    """klplab-run in the lab guest, one at a time, on its own thread (the
    guest's shell in serve mode runs one command at a time)."""

    def __init__(self, guest, feed: GdbFeed):
        self.guest = guest
        self.feed = feed
        self.thread: threading.Thread | None = None

    def start(self, args: str) -> None:
        if self.thread is not None and self.thread.is_alive():
            self.feed.update(message="a workload is still running")
            return
        command = f"klplab-run {args}".strip()
        self.thread = threading.Thread(target=self._run, args=(command,), name="gdbklp workload", daemon=True)
        self.thread.start()
        self.feed.update(message=f"running '{command}' in the guest")

    def _run(self, command: str) -> None:
        try:
            status, _ = self.guest.run(command, timeout=3600)
            self.feed.update(message=f"'{command}' exited {status}")
        except LabError as e:
            self.feed.update(message=f"'{command}': {str(e).strip().splitlines()[-1]}")


def console_tail(path: Path, lines: int = CONSOLE_LINES) -> list[str]:
    """The last lines of the guest's console (its serial log)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(f.seek(0, 2) - CONSOLE_TAIL_BYTES, 0))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [line.rstrip("\r") for line in text.splitlines()[-lines:]]


def task_rows(status: dict) -> list[dict]:
    return sorted(status.get("tasks", []), key=lambda t: t["pid"])


def render_header(s: Snapshot) -> list:
    st = s.status
    return [("bold", f" gdbklp watch  guest: {s.guest}  design: {st.get('design', '?')}  "
                     f"mode: {st.get('mode') or '?'}  "
                     f"redirections: {st.get('redirections', 0)} ({s.rate:.1f}/s)  "
                     f"violations: {st.get('violations', 0)}"
                     + (f"  samples: {st['samples']}" if st.get("samples") else "") + "\n"),
            ("", f" {st.get('probe', '')}\n")]


def render_tasks(s: Snapshot, selected: int) -> list:
    out = [("underline", f" {'task':>18} {'pid':>6} {'comm':<16} {'cpus':<6} {'redirections':>12} {'violations':>10}\n")]
    for i, t in enumerate(task_rows(s.status)):
        style = "reverse" if i == selected else ("fg:ansired" if t["violations"] else "")
        cpus = ",".join(map(str, sorted(t["cpus"])))
        out.append((style, f" {t['task']:#18x} {t['pid']:>6} {t['comm']:<16} {cpus:<6} "
                           f"{t['redirections']:>12} {t['violations']:>10}\n"))
    return out


def render_kinds(s: Snapshot) -> list:
    out = [("underline", f" {'call site':<16} {'seen':>8} {'checked':>8} {'violations':>10}\n")]
    for site, t in sorted(s.status.get("by_call_site", {}).items()):
        out.append(("fg:ansired" if t["violations"] else "",
                    f" {site:<16} {t['seen']:>8} {t['checked']:>8} {t['violations']:>10}\n"))
    if s.status.get("old_code_calls"):
        out.append(("", f" calls not redirected (old code): {s.status['old_code_calls']}\n"))
    return out


def render_events(s: Snapshot) -> list:
    st = s.status
    text = "\n\n".join(st.get("latest_violations", [])) or "no violation"
    lines = [text] + [f"guest: {e}" for e in st.get("guest_events", [])] + \
            [f"error: {e}" for e in st.get("errors", [])]
    if s.detail:
        lines.append(s.detail)
    return [("fg:ansired" if st.get("violations") else "", "\n".join(lines) + "\n")]


class Screen:
    """The full-screen application: the feed's tables, and the keys that act on the guest."""

    def __init__(self, feed: GdbFeed, report: Path, workload: Workload | None, console_log: Path | None):
        from prompt_toolkit.widgets import TextArea

        self.feed, self.report, self.workload, self.console_log = feed, report, workload, console_log
        self.selected = 0         # the task row klp-frames shows
        self.choosing_quit = False
        self.asking = False       # the workload's arguments are being typed
        self.arguments = TextArea(height=1, multiline=False, prompt=" klplab-run ")

    def footer(self):
        if self.choosing_quit:
            return [("bold", " quit: d detach and leave the guest running, k stop the guest, Esc cancel")]
        if self.asking:
            return [("bold", " the workload's arguments (klplab-run -h lists them); Enter runs it, Esc cancels")]
        return [("", f" {KEYS}{LAB_KEYS if self.workload else ''}\n"), ("italic", f" {self.feed.snapshot.message}")]

    def move(self, step: int) -> None:
        last = max(len(task_rows(self.feed.snapshot.status)) - 1, 0)
        self.selected = min(max(self.selected + step, 0), last)

    def show_frames(self) -> None:
        rows = task_rows(self.feed.snapshot.status)
        if rows:
            pid = rows[min(self.selected, len(rows) - 1)]["pid"]
            self.feed.actions.put(lambda: self.feed.frames(pid))

    def ask_arguments(self, event) -> None:
        self.asking = True
        self.arguments.text = ""
        event.app.layout.focus(self.arguments)

    def run_workload(self) -> None:
        self.asking = False
        self.workload.start(self.arguments.text)

    def cancel(self) -> None:
        self.choosing_quit = self.asking = False

    def key_bindings(self):
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.key_binding import KeyBindings

        keys, feed = KeyBindings(), self.feed
        idle = Condition(lambda: not self.asking)
        actions = {"p": lambda e: feed.actions.put(feed.toggle_pause), "up": lambda e: self.move(-1),
                   "down": lambda e: self.move(1), "f": lambda e: self.show_frames(),
                   "s": lambda e: feed.actions.put(lambda: feed.save(self.report)),
                   "q": lambda e: setattr(self, "choosing_quit", True)}
        for key, action in actions.items():
            keys.add(key, filter=idle)(action)
        keys.add("r", filter=Condition(lambda: self.workload is not None and not self.asking))(self.ask_arguments)
        keys.add("enter", filter=Condition(lambda: self.asking))(lambda e: self.run_workload())
        keys.add("escape")(lambda e: self.cancel())
        for key, leave_running in (("d", True), ("k", False)):
            keys.add(key, filter=Condition(lambda: self.choosing_quit))(
                lambda e, leave=leave_running: feed.actions.put(lambda: feed.quit(leave)))
        return keys

    def layout(self):
        from prompt_toolkit.filters import Condition
        from prompt_toolkit.layout import ConditionalContainer, HSplit, Layout, Window
        from prompt_toolkit.layout.controls import FormattedTextControl

        def section(render, **window):
            return Window(FormattedTextControl(render), **window)

        snapshot = lambda: self.feed.snapshot  # noqa: E731 (read at each redraw)
        console = [Window(height=1, char="-"), section(
            lambda: [("fg:ansicyan", "\n".join(console_tail(self.console_log)))], height=CONSOLE_LINES)]
        return Layout(HSplit([
            section(lambda: render_header(snapshot()), height=2),
            section(lambda: render_tasks(snapshot(), self.selected), height=10),
            Window(height=1, char="-"),
            section(lambda: render_kinds(snapshot()), height=8),
            Window(height=1, char="-"),
            section(lambda: render_events(snapshot()), wrap_lines=True),
            ConditionalContainer(HSplit(console), filter=Condition(lambda: self.console_log is not None)),
            ConditionalContainer(self.arguments, filter=Condition(lambda: self.asking)),
            section(self.footer, height=2),
        ]))

    def run(self) -> str:
        """Until the feed ends (the watch, the guest, or the user's quit); returns why it ended."""
        from prompt_toolkit.application import Application

        app = Application(layout=self.layout(), key_bindings=self.key_bindings(), full_screen=True,
                          refresh_interval=POLL_SECONDS)

        def watch_feed():
            while self.feed.snapshot.ended is None:
                time.sleep(0.1)
            app.exit(result=self.feed.snapshot.ended)

        threading.Thread(target=watch_feed, daemon=True).start()
        return app.run()


def run_screen(feed: GdbFeed, report: Path, workload: Workload | None = None,
               console_log: Path | None = None) -> str:
    """The full-screen application; returns why it ended."""
    return Screen(feed, report, workload, console_log).run()


@dataclass(frozen=True)
class WatchTarget:
    vmlinux: Path
    port: int
    host: str = "127.0.0.1"
    guest: object = None  # the lab guest (gdbklp.lab.qemu.Guest), which the monitor also drives
    recorder: str | None = None  # the socket of the QEMU's recorder plugin, for a recorded watch


@contextlib.contextmanager
def guest_to_watch(args):
    """The guest to watch: attached, started from a QEMU command line, or the
    lab booted for it (stopped on exit when we started it)."""
    if args.lab:
        from gdbklp.lab import build, session
        from gdbklp.lab.config import DEFAULT_KERNEL
        images = build.build_all(kernel=args.kernel or DEFAULT_KERNEL)
        with tempfile.TemporaryDirectory(prefix="gdbklp-recorder-") as tmp:
            socket = Path(tmp) / "recorder.sock" if args.record is not None else None
            with session.booted(images, trampoline=args.trampoline, plugin_socket=socket) as guest:
                yield WatchTarget(images.vmlinux, guest.gdb_port, guest=guest,
                                  recorder=str(socket) if socket else None)
    elif args.launch:
        words = shlex.split(args.launch)
        if any(w in GDBSTUB_OPTIONS for w in words):
            raise LabError("--launch: leave the gdbstub to gdbklp (no -s or -gdb: it listens on 127.0.0.1 only)")
        port = free_port()
        proc = subprocess.Popen([*words, "-gdb", f"tcp:127.0.0.1:{port}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not is_listening(port, proc.pid):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"QEMU did not open its gdbstub on 127.0.0.1:{port}: "
                                   f"{proc.stderr.read().decode(errors='replace').strip()[-300:]}")
                time.sleep(0.2)
            yield WatchTarget(args.vmlinux, port, recorder=args.record or None)
        finally:
            proc.kill()
    else:
        host, port = host_and_port(args.attach)
        yield WatchTarget(args.vmlinux, port, host, recorder=args.record or None)


def cmd_watch(args) -> int:
    if not (args.lab or args.launch or args.attach):
        raise LabError("say which guest to watch: --attach HOST:PORT, --launch CMDLINE or --lab")
    if not args.lab and not args.vmlinux:
        raise LabError("--vmlinux is needed with --attach and --launch")
    if args.workload and not args.lab:
        raise LabError("--workload starts klplab-run in the lab guest: it needs --lab")
    if args.kernel and not args.lab:
        raise LabError("--kernel chooses the lab kernel to boot: it needs --lab")
    if args.record == "" and not args.lab:
        raise LabError("--record: give the socket your QEMU's recorder plugin listens on "
                       "(-plugin libklprecord.so,socket=PATH)")
    with guest_to_watch(args) as watched:
        if not Path(watched.vmlinux).is_file():
            raise LabError(f"no vmlinux at {watched.vmlinux}")
        with GdbSession(watched.vmlinux) as gdb:
            require_listener(watched.host, watched.port)
            try:
                gdb.connect(watched.port, watched.host, timeout=30)
            except GdbklpError as e:
                raise LabError(f"cannot attach to the gdbstub: {str(e).strip().splitlines()[-1]}") from None
            # gdb runs the guest in the background: klp-watch may park it (the faster
            # mode on a QEMU that flushes its translations at every stop)
            options = WatchOptions(quiet=True, report=str(args.report), sample=args.sample,
                                   resolve_indirect=args.resolve_indirect, background=True,
                                   record=watched.recorder)
            try:
                gdb.console(options.command())
            except GdbklpError as e:  # no live patching, another kernel: gdbklp's one line
                raise LabError(str(e).strip().splitlines()[-1]) from None
            gdb.cont()
            feed = GdbFeed(gdb)
            feed.start()
            workload = Workload(watched.guest, feed) if watched.guest else None
            if args.workload:
                workload.start(args.workload)
            ended = run_screen(feed, Path(args.report), workload,
                               watched.guest.serial_log if watched.guest else None)
    print(f"gdbklp watch: {ended}; report in {args.report}")
    return 0


def configure(parser) -> None:
    from gdbklp.lab.config import DEFAULT_KERNEL, DEFAULT_TRAMPOLINE, KERNELS, TRAMPOLINES
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--attach", metavar="HOST:PORT", help="a guest's gdbstub (QEMU -gdb tcp:127.0.0.1:PORT)")
    where.add_argument("--launch", metavar="CMDLINE", help="start QEMU with this command line (gdbklp adds -gdb)")
    where.add_argument("--lab", action="store_true", help="boot the lab guest (gdbklp lab build first)")
    parser.add_argument("--vmlinux", type=Path, metavar="PATH", help="the running kernel's vmlinux (with --attach, --launch)")
    parser.add_argument("--workload", metavar="ARGS", help="with --lab: start klplab-run ARGS in the guest once the "
                                                      "watch runs (the r key starts more)")
    parser.add_argument("--kernel", choices=tuple(KERNELS), default=None,
                        help=f"with --lab: the lab kernel generation to boot (default {DEFAULT_KERNEL})")
    parser.add_argument("--trampoline", choices=tuple(TRAMPOLINES), default=DEFAULT_TRAMPOLINE,
                        help="with --lab: the trampoline design the guest runs")
    parser.add_argument("--sample", type=float, metavar="HZ", help="sampling mode instead of breakpoints")
    parser.add_argument("--record", nargs="?", const="", metavar="SOCKET",
                        help="record mode: every redirection checked with no stop, by QEMU's recorder plugin "
                             "(with --lab: booted with it; else the socket your QEMU's plugin listens on)")
    parser.add_argument("--resolve-indirect", action="store_true",
                        help="name B and C of every indirect call (one more stop per redirection, at P1)")
    parser.add_argument("--report", default="klp-watch.json", metavar="FILE", help="where the report is saved (key s, and at exit)")
    parser.set_defaults(func=cmd_watch)
