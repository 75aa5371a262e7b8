"""Replay stack images captured from the lab (tests/capture.py) without gdb."""

import base64
import json
import zlib
from pathlib import Path

from gdbklp.abi import elf
from gdbklp.abi.frames import Registers, decode_interrupt_frame
from gdbklp.abi.ftrace import decode_traced_calls
from gdbklp.abi.kernel import KernelView, ObjectInfo
from gdbklp.abi.livepatch import LivepatchHandlerLayout
from gdbklp.abi.taskstack import TaskStack, decode_task_stack

STACKS = Path(__file__).parent / "data" / "stacks"


class Unreadable(Exception):
    pass


class StackImage:
    """A captured task: its memory (mutable, to corrupt it) and the kernel's view."""

    def __init__(self, name: str, directory: Path = STACKS, code_edit=None):
        data = json.loads((directory / f"{name}.json").read_text())
        self.data = data
        self.base = data["stack_base"]
        self.stack = bytearray(zlib.decompress(base64.b64decode(data["stack"])))
        self.reads = {int(a, 16): bytes.fromhex(v) for a, v in data["reads"].items()}
        self.unreadable: list[tuple[int, int]] = []
        self.regs = Registers(**data["regs"])
        self.task = data["task"]
        # the kernel's code a view decodes where the image has it (the system
        # call entry, the ftrace trampolines): code_edit may change it first
        self.code = {n: (c["address"], bytes.fromhex(c["code"])) for n, c in data.get("code", {}).items()}
        if code_edit:
            code_edit(self.code)
        self.view = self.kernel_view()

    def kernel_view(self) -> KernelView:
        data = self.data
        by_object: dict[str, list[elf.Symbol]] = {}
        for obj, name_, address, size, type_ in data["symbols"]:
            by_object.setdefault(obj, []).append(elf.Symbol(name_, address, size, type_))
        objects = [ObjectInfo(o["name"], o["base"], o["size"],
                              elf.SymbolTable(by_object.get(o["name"], []), o["name"]), o["toc"])
                   for o in data["objects"]]
        livepatch = LivepatchHandlerLayout(**data["livepatch"]) if data.get("livepatch") else None
        if "system_call_common" not in self.code:  # a 6.1 image: the layout of its time
            return KernelView(objects, livepatch, thread_size=data["thread_size"])
        entry, code = self.code["system_call_common"]
        return KernelView(objects, livepatch, thread_size=data["thread_size"],
                          interrupt_frame=decode_interrupt_frame(code, entry, data["system_call_exception"]),
                          traced_calls=decode_traced_calls(
                              [(n, a, c) for n, (a, c) in self.code.items() if n != "system_call_common"]))

    # ---- memory ------------------------------------------------------------

    def read(self, address: int, length: int) -> bytes:
        for lo, hi in self.unreadable:
            if address < hi and address + length > lo:
                raise Unreadable(f"cannot access memory at {address:#x}")
        off = address - self.base
        if 0 <= off and off + length <= len(self.stack):
            return bytes(self.stack[off:off + length])
        for start, block in self.reads.items():
            if start <= address and address + length <= start + len(block):
                return block[address - start:address - start + length]
        raise Unreadable(f"cannot access memory at {address:#x} (not captured)")

    def u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def put_u64(self, address: int, value: int) -> None:
        off = address - self.base
        if 0 <= off < len(self.stack):
            self.stack[off:off + 8] = value.to_bytes(8, "little")
            return
        for start, block in self.reads.items():
            if start <= address and address + 8 <= start + len(block):
                b = bytearray(block)
                b[address - start:address - start + 8] = value.to_bytes(8, "little")
                self.reads[start] = bytes(b)
                return
        raise KeyError(f"{address:#x} is not in the image")

    # ---- decoding ----------------------------------------------------------

    @property
    def livepatch_sp_slot(self) -> int:
        return self.task + self.view.livepatch.ti_livepatch_sp

    def decode(self) -> TaskStack:
        return decode_task_stack(self.data["label"], self.regs, self.task, self.read, self.view,
                                 self.data["pid"], self.data["comm"], self.base)
