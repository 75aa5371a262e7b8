"""Drive gdb-multiarch over the MI protocol (pygdbmi), with gdbklp loaded.

Used by the live monitor, the lab demo and the tests, with any guest. MI runs asynchronously
(mi-async on): -exec-continue returns at once and the guest runs while gdb
keeps answering; -exec-interrupt stops it.
"""

import queue
import shutil
import threading
import time
from pathlib import Path

from gdbklp import gdbinit
from gdbklp.errors import GdbklpError

RESULT_CLASSES = ("done", "running", "connected", "error", "exit")


class GdbSessionError(GdbklpError):
    """gdb could not be started, or did not answer in time."""


class GdbCommandError(GdbSessionError):
    """gdb answered ^error; str() is gdb's message."""


def mi_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class GdbSession:
    def __init__(self, vmlinux: Path | None = None, gdb: str = "gdb-multiarch",
                 loader: Path | None = None):
        if not shutil.which(gdb):
            raise GdbSessionError(f"missing {gdb}: install with 'apt-get install gdb-multiarch'")
        from pygdbmi.gdbcontroller import GdbController

        self._token = 0
        self.running = False
        self.pending: list[dict] = []  # async records not consumed yet (e.g. *stopped)
        self.ctrl = GdbController(command=[gdb, "--nx", "-q", "--interpreter=mi3"])
        # gdb's output is read all the time, not only while a command waits: a
        # pipe nobody reads fills up and blocks gdb (and so the guest), e.g.
        # with the stops klp-watch's sampling mode prints while the guest runs
        self._records: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        threading.Thread(target=self._reader, name="gdb output reader", daemon=True).start()
        self.mi("-gdb-set mi-async on")
        self.mi("-gdb-set pagination off")
        self.mi("-gdb-set confirm off")
        if vmlinux is not None:
            self.console(f"file {vmlinux}", timeout=120)
        self.console(f"source {loader or gdbinit.loader_file()}")

    # ---- raw MI ------------------------------------------------------------

    def _reader(self) -> None:
        while not self._closing.is_set() and self.ctrl.gdb_process.poll() is None:
            try:
                for rec in self.ctrl.get_gdb_response(timeout_sec=0.05, raise_error_on_timeout=False):
                    self._records.put(rec)
            except Exception:  # gdb exited
                return

    def _read(self, timeout: float) -> list[dict]:
        """The records gdb printed since the last call; waits up to timeout for the first."""
        try:
            out = [self._records.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self._records.empty():
            out.append(self._records.get_nowait())
        return out

    def mi(self, command: str, timeout: float = 30.0) -> tuple[dict, str]:
        """Send one MI command; return (result record, console text it printed)."""
        self._token += 1
        token = self._token
        self.ctrl.write(f"{token}{command}", read_response=False)
        text = []
        result = None
        deadline = time.monotonic() + timeout
        while result is None and time.monotonic() < deadline:
            # consume the whole batch: a *stopped may follow the result in it
            for rec in self._read(0.1):
                if rec["type"] in ("console", "log") and rec.get("payload"):
                    text.append(rec["payload"])
                elif rec["type"] == "result" and rec.get("token") == token:
                    result = rec
                elif rec["type"] == "notify":
                    self.pending.append(rec)
        if result is None:
            raise GdbSessionError(f"gdb did not answer {command!r} within {timeout:.0f} s")
        if result["message"] == "error":
            msg = (result.get("payload") or {}).get("msg", "")
            # gdb prints the details (a Python exception, say) before ^error
            details = "".join(text).strip()
            raise GdbCommandError(f"{details}\n{msg}" if details and details not in msg else msg)
        return result, "".join(text)

    def console(self, command: str, timeout: float = 30.0) -> str:
        """Run a CLI command; return what it printed."""
        return self.mi(f"-interpreter-exec console {mi_quote(command)}", timeout)[1]

    # ---- execution control -----------------------------------------------

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 60.0) -> None:
        self.mi(f"-target-select remote {host}:{port}", timeout)

    def cont(self) -> None:
        self.pending = [r for r in self.pending if r.get("message") != "stopped"]
        self.mi("-exec-continue")
        self.running = True

    def wait_stopped(self, timeout: float, interrupted: bool = False) -> dict:
        """Wait for the next *stopped record (with interrupted, the one an
        interrupt causes: stops that breakpoint commands resume from may come
        first); return its payload."""
        deadline = time.monotonic() + timeout
        while True:
            for i, rec in enumerate(self.pending):
                payload = rec.get("payload") or {}
                if rec.get("message") == "stopped" and (
                        not interrupted or payload.get("reason") == "signal-received"):
                    del self.pending[: i + 1]
                    self.running = False
                    return payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise GdbSessionError(f"the guest did not stop within {timeout:.0f} s")
            self.pending += [r for r in self._read(min(left, 0.2)) if r["type"] == "notify"]

    def interrupt(self, timeout: float = 30.0) -> dict:
        self.pending = [r for r in self.pending if r.get("message") not in ("stopped", "running")]
        self.mi("-exec-interrupt")
        return self.wait_stopped(timeout, interrupted=True)

    def close(self) -> None:
        self._closing.set()
        try:
            self.ctrl.exit()
        except Exception:
            pass

    def __enter__(self) -> "GdbSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
