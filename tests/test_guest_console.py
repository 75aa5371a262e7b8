"""Guest commands and their output, against the serve loop of the lab's own
/init run by the host's sh (no QEMU): each command gets its own done marker,
even when an earlier one has not ended."""

import re
import subprocess
import threading
from pathlib import Path

import pytest

from gdbklp.lab import LabError
from gdbklp.lab.qemu import Guest

INIT = Path(__file__).parents[1] / "qemu-images/initramfs/init"


def serve_loop() -> str:
    """The loop /init runs in serve mode, as it is in the initramfs."""
    return re.search(r"^\s*while read -r line; do\n.*?^\s*done$", INIT.read_text(), re.M | re.S).group(0)


@pytest.fixture
def served(tmp_path):
    g = Guest(tmp_path / "vmlinux", tmp_path / "initramfs", append="", workdir=tmp_path)
    g.proc = subprocess.Popen(["sh", "-c", serve_loop()], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    g._reader = threading.Thread(target=g._read_console, daemon=True)
    g._reader.start()
    yield g
    g.close()


def test_a_command_gets_its_own_output_and_status(served):
    assert served.run("echo one; false") == (1, "one\n")
    assert served.check("echo two") == "two\n"


def test_a_command_after_one_still_running_waits_for_its_own_marker(served):
    slow = served.send("sleep 0.5; echo slow")
    assert served.run("echo fast") == (0, "fast\n")
    assert served.wait_done(slow, 5) == (0, "slow\n")


def test_a_command_that_does_not_end_names_itself(served):
    served.send("exec sleep 5")  # the shell itself: killed with it, nothing holds the console open
    with pytest.raises(LabError, match=r"guest command 2 did not end within 1 s \(0 ended\)"):
        served.run("echo never", timeout=1)
