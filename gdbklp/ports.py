"""Local TCP ports: a free one on 127.0.0.1, and whether a process listens on one
(the gdbstub listens on 127.0.0.1 only)."""

import os
import socket

from gdbklp.errors import GdbklpError

# how long an attach waits for a gdbstub to answer before saying nothing listens
REACH_SECONDS = 2.0


def port_number(text: str) -> int:
    """A TCP port given on the command line; GdbklpError, in one line, otherwise."""
    try:
        port = int(text)
    except ValueError:
        raise GdbklpError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise GdbklpError(f"port {port} is out of range (1 to 65535)")
    return port


def host_and_port(text: str) -> tuple[str, int]:
    """HOST:PORT (or PORT alone, on 127.0.0.1) as given on the command line."""
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", port_number(port)


def require_listener(host: str, port: int) -> None:
    """GdbklpError, in one line, unless something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=REACH_SECONDS):
            return
    except OSError as e:
        raise GdbklpError(f"nothing listens on {host}:{port} ({e.strerror or 'no answer'}): "
                          "is the guest's gdbstub there?") from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port: int, pid: int | None = None) -> bool:
    """Whether something (process pid, if given) listens on 127.0.0.1:port.

    Read from /proc/net/tcp and the process's file descriptors.
    """
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        inodes = {fields[9] for fields in (line.split() for line in list(f)[1:])
                  if fields[1] == wanted and fields[3] == "0A"}
    if not inodes or pid is None:
        return bool(inodes)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False
