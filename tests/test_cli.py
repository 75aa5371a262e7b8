"""The command line's front: --version, help before any set-up, bad ports in one line."""

import os
import subprocess
import sys

from helpers import REPO
from gdbklp import __version__


def gdbklp(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gdbklp", *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_version():
    proc = gdbklp("--version")
    assert proc.returncode == 0 and proc.stdout == f"gdbklp {__version__}\n"


def test_lab_gdb_on_a_port_where_nothing_listens_is_one_line_and_fails():
    for port, complaint in (("9", "nothing listens on 127.0.0.1:9 (Connection refused): is the guest's "
                                  "gdbstub there?"),
                            ("0x10", "'0x10' is not a port number"), ("70000", "port 70000 is out of range "
                                                                               "(1 to 65535)")):
        proc = gdbklp("lab", "gdb", "--port", port)
        assert proc.returncode == 1 and proc.stderr.splitlines()[-1] == f"gdbklp: {complaint}"


def test_bootstrap_help_comes_before_any_set_up(tmp_path):
    # a venv that does not exist: had the set-up run, it would have made one
    env = {**os.environ, "GDBKLP_VENV": str(tmp_path / "venv")}
    for args in (["--help"], ["demo", "--help"], ["test", "-h"], ["setup", "--help"]):
        proc = subprocess.run([str(REPO / "bootstrap"), *args], capture_output=True, text=True, timeout=30,
                              env=env)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: ./bootstrap demo")
    assert not (tmp_path / "venv").exists()
