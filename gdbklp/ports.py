"""Local TCP ports: a free one on 127.0.0.1, and whether a process listens on one
(the gdbstub listens on 127.0.0.1 only)."""

import os
import socket


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
