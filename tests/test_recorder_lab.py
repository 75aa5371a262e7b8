"""The recorder for real: the 6.1 lab under the recorder's QEMU (trixie's
10.0, plugin API 4) with its plugin, armed at livepatch_handler's return
point (P3) by gdbklp.recorder, records exactly the guest's redirections,
with no gdbstub stop."""

import threading
import time

import pytest

from gdbklp.abi.elf import read_elf_symbols, read_loaded_bytes
from gdbklp.abi.livepatch import decode_livepatch_handler
from gdbklp.lab import workload
from gdbklp.lab.session import booted
from gdbklp.recorder import Read, RecordPoint, Recorder, Source, read_extent

pytestmark = pytest.mark.guest

KERNEL = 0xC000000000000000
REGISTERS = ("r1", "r13", "pc")


def p3_of(vmlinux) -> int:
    handler = read_elf_symbols(vmlinux).address("livepatch_handler")
    return decode_livepatch_handler(read_loaded_bytes(vmlinux, handler, 96), handler).return_point


@pytest.fixture(scope="module")
def recorded(lab, tmp_path_factory):
    """(guest, its plugin's socket, P3) under the recorder's QEMU."""
    workdir = tmp_path_factory.mktemp("recorder")
    socket_path = workdir / "recorder.sock"
    with booted(lab, workdir=workdir, plugin_socket=socket_path) as guest:
        yield guest, socket_path, p3_of(lab.vmlinux)


class Consumer:
    """Takes the recorder's records as fast as they come, in a thread."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.records = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.records += self.recorder.records(timeout=0.1)

    def stop(self) -> list:
        time.sleep(0.2)  # what the plugin still holds (it writes at least every millisecond)
        self._stop.set()
        self._thread.join()
        return self.records


def p3_point(p3: int) -> RecordPoint:
    return RecordPoint(p3, 3, (
        Read(Source.register("r1"), 32),
        # the same bytes, up to r1 + 16: a read of variable length, clamped
        Read(Source.register("r1"), 32, end=Source.register("r1"), end_offset=16),
    ))


def test_p3_records_every_redirection(recorded):
    guest, socket_path, p3 = recorded
    with Recorder(socket_path) as recorder:
        recorder.arm(REGISTERS, [p3_point(p3)])
        consumer = Consumer(recorder)
        counts = workload.parse_counts(guest.check("klplab-run -r -t 2 -n 500 -k local"))
        records = consumer.stop()
        stats = recorder.disarm()
    assert counts["local"].new == 1000 and counts["local"].bad == 0
    assert len(records) == counts["local"].new == stats.records_sent
    assert {r.point for r in records} == {3}
    assert {r.vcpu for r in records} <= {0, 1}
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    for r in records:
        sp, paca = r.registers["r1"], r.registers["r13"]
        assert r.registers["pc"] == p3
        assert sp >= KERNEL and sp % 16 == 0, hex(sp)  # a kernel stack, ABI-aligned
        assert paca >= KERNEL, hex(paca)
        (address, data), (short_address, short) = r.reads
        assert address == short_address == sp
        assert data is not None and len(data) == 32
        assert short == data[:16] == data[:read_extent(p3_point(p3).reads[1], sp, sp)[1]]
        # the frame's back chain: a higher kernel stack address
        assert int.from_bytes(data[:8], "little") > sp
    assert stats.armed_ns > 0


def test_armed_after_boot_it_fires_for_code_translated_before(recorded):
    guest, socket_path, p3 = recorded
    guest.check("klplab-run -r -t 1 -n 20 -k local")  # P3 is translated now, unwatched
    with Recorder(socket_path) as recorder:
        start = time.monotonic()
        recorder.arm(REGISTERS, [RecordPoint(p3, 1)])
        print(f"armed in {1000 * (time.monotonic() - start):.1f} ms")
        consumer = Consumer(recorder)
        counts = workload.parse_counts(guest.check("klplab-run -r -t 1 -n 20 -k local"))
        records = consumer.stop()
        recorder.disarm()
    assert counts["local"].new == 20
    assert len(records) == 20


def test_disarm_stops_the_records_and_counts_them(recorded):
    guest, socket_path, p3 = recorded
    with Recorder(socket_path) as recorder:
        recorder.arm(REGISTERS, [RecordPoint(p3, 1)])
        consumer = Consumer(recorder)
        guest.check("klplab-run -r -t 2 -n 50 -k local")
        records = consumer.stop()  # before the disarm: one thread at a time reads the connection
        stats = recorder.disarm()
        records += recorder.records(timeout=0.0)
        assert len(records) == stats.records_sent == 100
        assert recorder.stats().records_sent == 100  # nothing since
        counts = workload.parse_counts(guest.check("klplab-run -r -t 2 -n 50 -k local"))
        assert counts["local"].new == 100
        assert recorder.records(timeout=0.5) == []


def test_a_client_that_goes_away_leaves_the_guest_running(recorded):
    guest, socket_path, p3 = recorded
    stderr = guest.workdir / "qemu.stderr"
    before = stderr.read_text().count("klprecord: the client went away: disarmed")
    recorder = Recorder(socket_path)
    recorder.arm(REGISTERS, [p3_point(p3)])
    # the guest fills the socket and blocks on the client, which never reads and leaves
    started = guest.send("klplab-run -r -t 1 -n 20000 -k local")
    time.sleep(1.0)
    recorder.close()
    status, output = guest.wait_done(started, timeout=120)
    assert status == 0 and workload.parse_counts(output)["local"].new == 20000
    deadline = time.monotonic() + 10
    while stderr.read_text().count("klprecord: the client went away: disarmed") == before:
        assert time.monotonic() < deadline, stderr.read_text()[-2000:]
        time.sleep(0.1)
    assert guest.check("echo still-running").strip().endswith("still-running")
    # and the next client is served
    with Recorder(socket_path) as again:
        again.arm(REGISTERS, [RecordPoint(p3, 1)])
        consumer = Consumer(again)
        guest.check("klplab-run -r -t 1 -n 5 -k local")
        assert len(consumer.stop()) == 5
        again.disarm()
