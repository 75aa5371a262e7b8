"""Capture test data from the lab into tests/data/
(run: .venv/bin/python tests/capture.py [--code-only] [--kernel GENERATION]).

livepatch_handler.json, ftrace_caller.json, ftrace_regs_caller.json: each
trampoline's code bytes, read from the lab vmlinux's ELF program headers
(what the CPU executes; ftrace patches only the call at ftrace_call /
ftrace_regs_call, which no test reads), with the symbol's address; the same
for the RFC flavours' redirect paths and helpers (klp_rfc_*.json,
KLP_return_helper*.json).

replacements.json: code of some replacements C from klp_lab_patch.ko.

With --kernel (a generation other than the default): only the trampolines'
code, into tests/data/GENERATION/, and on 7.3 an out-of-line stub read from
the running guest (ool_stub.json).

stacks/*.json: stack images (see capture_gdb.py) taken from the running lab:
a task stopped at the entry of each call kind's replacement C, and a task
asleep inside C.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gdbklp.abi.elf import read_elf_symbols, read_loaded_bytes  # noqa: E402
from gdbklp.lab import build, session  # noqa: E402
from gdbklp.lab import config as cfg  # noqa: E402
from gdbklp.lab import root as labroot  # noqa: E402
from gdbklp.lab import workload  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


CODE = {"livepatch_handler": 128, "ftrace_caller": 256, "ftrace_regs_caller": 512,
        # the RFC flavours (qemu-images/kernel-patches): redirect paths and their helpers
        "klp_rfc_redirect": 96, "KLP_return_helper": 32,
        "klp_rfc_fixed_redirect": 96, "KLP_return_helper_fixed": 32}
# the trampolines (without a symbol size in 7.x: whole enough to reach their exits)
GENERATION_CODE = {"livepatch_handler": 128, "ftrace_caller": 512, "ftrace_regs_caller": 768}
# replacements from klp_lab_patch.ko: their prologues and stack-argument accesses
# (relocations unapplied: calls read as `bl .`, which no test follows)
MODULE_CODE = ("klp_lab_c_local", "klp_lab_c_many_args", "klp_lab_c_varargs")


def capture_code(vmlinux: Path, name: str, length: int, kernel: str = cfg.DEFAULT_KERNEL) -> dict:
    """The symbol's code: length bytes, or its whole size if that is longer."""
    symbols = read_elf_symbols(vmlinux)
    address = symbols.address(name)
    length = max(length, symbols.lookup(address)[0].size or 0)
    return {"source": f"lab vmlinux (Linux {kernel}, Debian linux-source-{kernel})",
            "address": address, "code": read_loaded_bytes(vmlinux, address, length).hex()}


def capture_module_code(ko: Path, names) -> dict:
    """{name: code hex} of functions in a module object, from its .text."""
    cross = cfg.KERNEL.cross_compile
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text"
        # the lab root's binutils (the host has none)
        subprocess.run(labroot.wrap([cross + "objcopy", "-O", "binary", "--only-section=.text", str(ko), str(text)],
                                    binds=(tmp,)), check=True)
        code = text.read_bytes()
    out = {}
    for line in subprocess.run(labroot.wrap([cross + "nm", "-S", str(ko)]), check=True, capture_output=True,
                               text=True).stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3] in names and fields[2] in "tT":
            start, size = int(fields[0], 16), int(fields[1], 16)
            out[fields[3]] = code[start:start + size].hex()
    return {"source": f"{ko.name} of the lab", "functions": out}


def capture_stacks(images: build.LabImages, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with session.booted(images) as guest, session.attached(guest, images.vmlinux) as gdb:
        gdb.console(f"source {Path(__file__).parent / 'capture_gdb.py'}")
        for kind in workload.KINDS:
            gdb.console(f'break *$klp_addr("{workload.replacement_of(kind)}")')
            gdb.cont()
            start = guest.send(f"echo '{kind} 1 0' > /proc/klp_lab/run")
            gdb.wait_stopped(60)
            print(gdb.console(f"klp-capture {out / f'inside-c-{kind}.json'}"))
            gdb.console("delete")
            gdb.cont()
            guest.wait_done(start, 60)
            gdb.interrupt()
        # a task asleep inside C (the nap flag: C sleeps a second)
        gdb.cont()
        start = guest.send("echo 'local 1 8' > /proc/klp_lab/run & echo pid=$!; wait")
        pid = guest.wait_for(r"pid=(\d+)", 30, start.offset).group(1)
        time.sleep(0.3)
        gdb.interrupt()
        print(gdb.console(f"klp-capture {out / 'asleep-in-c-local.json'} --task {pid}"))
        gdb.cont()
        guest.wait_done(start, 60)


STUB_PROBE = """import json
from gdbklp.abi import ppc
from gdbklp.gdbext.inferior import target
function = int(gdb.parse_and_eval('$klp_addr("{function}")'))
words = ppc.words(target.read_memory(function, 32))
site = next(function + 4 * i for i, w in enumerate(words) if w & 0xFC000003 == 0x48000000)
stub = ppc.branch_target(int.from_bytes(target.read_memory(site, 4), "little"), site)
print(json.dumps({{"function": function, "site": site, "site_word": target.read_memory(site, 4).hex(),
                  "address": stub, "code": target.read_memory(stub, 16).hex()}}))
"""


def capture_ool_stub(images: build.LabImages, function: str = "klp_lab_b_local") -> dict:
    """The out-of-line stub of a live-patched (so traced) module function, read
    from the running guest: its address and 16 bytes, and the site in the
    function that branches to it."""
    with session.booted(images) as guest, session.attached(guest, images.vmlinux) as gdb:
        gdb.console("klp-frames")  # reads the module list
        with tempfile.TemporaryDirectory() as tmp:
            probe = Path(tmp) / "stub_probe.py"
            probe.write_text(STUB_PROBE.format(function=function))
            data = json.loads(gdb.console(f"source {probe}").strip().splitlines()[-1])
    return {"source": f"the lab guest (Linux {images.kernel.name}): {function}'s out-of-line stub", **data}


def main() -> None:
    kernel = sys.argv[sys.argv.index("--kernel") + 1] if "--kernel" in sys.argv else cfg.DEFAULT_KERNEL
    if kernel != cfg.DEFAULT_KERNEL:
        images = build.build_all(kernel=kernel)
        (DATA / kernel).mkdir(exist_ok=True)
        for name, length in GENERATION_CODE.items():
            (DATA / kernel / f"{name}.json").write_text(
                json.dumps(capture_code(images.vmlinux, name, length, kernel), indent=1) + "\n")
        if images.kernel.name == "7.3":
            (DATA / kernel / "ool_stub.json").write_text(json.dumps(capture_ool_stub(images), indent=1) + "\n")
        return
    images = build.build_all()
    DATA.mkdir(exist_ok=True)
    for name, length in CODE.items():
        (DATA / f"{name}.json").write_text(json.dumps(capture_code(images.vmlinux, name, length), indent=1) + "\n")
    (DATA / "replacements.json").write_text(json.dumps(
        capture_module_code(images.modules / "klp_lab_patch.ko", MODULE_CODE), indent=1) + "\n")
    if "--code-only" not in sys.argv:
        capture_stacks(images, DATA / "stacks")


if __name__ == "__main__":
    main()
