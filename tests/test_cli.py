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


def test_every_option_has_help():
    """Each option of gdbklp's command line says what it does in --help."""
    import argparse
    from gdbklp import monitor
    from gdbklp.lab import cli as lab_cli
    parser = argparse.ArgumentParser(prog="gdbklp")
    sub = parser.add_subparsers()
    lab_cli.configure(sub.add_parser("lab"))
    monitor.configure(sub.add_parser("watch"))
    silent, seen = [], 0

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        nonlocal seen
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif action.dest != "help":
                seen += 1
                if not action.help:
                    silent.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "gdbklp")
    assert seen > 50 and silent == []


def test_watch_kernel_needs_the_lab():
    proc = gdbklp("watch", "--attach", "127.0.0.1:9", "--vmlinux", sys.executable, "--kernel", "7.3")
    assert proc.returncode == 1 and proc.stderr == "gdbklp: --kernel chooses the lab kernel to boot: it needs --lab\n"
