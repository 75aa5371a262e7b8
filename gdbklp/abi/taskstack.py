"""One task's kernel stack, decoded: frames, livepatch stack, and what is wrong.

This is what klp-frames shows per thread; pure Python over a memory reader.
"""

from dataclasses import asdict, dataclass

from gdbklp.abi.frames import Registers, Walk, walk_stack
from gdbklp.abi.ftrace import ool_stub_label
from gdbklp.abi.kernel import KernelView
from gdbklp.abi.livepatch import LivepatchStack, read_livepatch_stack


@dataclass
class TaskStack:
    label: str                 # "vCPU 0", "pid 95", ...
    task: int
    pid: int
    comm: str
    regs: Registers
    stack_base: int
    walk: Walk
    livepatch: LivepatchStack | None

    @property
    def problems(self) -> list[str]:
        out = list(self.walk.problems)
        if self.livepatch:
            out += self.livepatch.problems
            out += [f"livepatch stack entry at {addr:#x}: {p}"
                    for addr, ps in self.livepatch.entry_problems.items() for p in ps]
        return out

    def to_dict(self) -> dict:
        lp = None
        if self.livepatch:
            lp = {"base": self.livepatch.base, "livepatch_sp": self.livepatch.livepatch_sp,
                  "entries": [asdict(e) | {"problems": self.livepatch.entry_problems.get(e.address, [])}
                              for e in self.livepatch.entries],
                  "problems": self.livepatch.problems}
        return {"label": self.label, "task": self.task, "pid": self.pid, "comm": self.comm,
                "regs": asdict(self.regs), "stack_base": self.stack_base,
                "frames": [asdict(f) for f in self.walk.frames], "end": self.walk.end,
                "livepatch_stack": lp, "problems": self.problems}

    def format_text(self, view: KernelView) -> str:
        who = f"pid {self.pid} {self.comm}" if self.pid >= 0 else "pid ?"
        lines = [f"{self.label}: task {self.task:#x} ({who}), stack [{self.stack_base:#x}, "
                 f"{self.stack_base + view.thread_size:#x})"]
        for f in self.walk.frames:
            toc = ""
            if f.kind in ("current", "interrupt"):
                pass  # the innermost frame's slot belongs to its next call; an interrupt frame has none
            elif f.toc_save is not None:
                toc = f"  toc-save {f.toc_save:#x}" + (f" ({f.toc_owner})" if f.toc_owner else "")
            elif f.toc_slot_unused:
                toc = "  toc-slot unused"
            site = f"  [{f.call_site}]" if f.call_site else ""
            lines.append(f"  #{f.index:<2} sp {f.sp:#x}  {f.function:<44} {f.kind}{site}{toc}")
            lines += [f"       {n}" for n in f.notes]
        lines.append(f"  end: {self.walk.end}")
        if self.livepatch:
            lp = self.livepatch
            depth = len(lp.entries)
            lines.append(f"  livepatch stack: livepatch_sp {lp.livepatch_sp:#x} = base+{lp.livepatch_sp - lp.base}, "
                         f"{depth} entr{'y' if depth == 1 else 'ies'}")
            for i, e in enumerate(lp.entries):
                owner = view.toc_owner(e.toc) or "no object"
                verdict = "; ".join(lp.entry_problems.get(e.address, [])) or "ok"
                lines.append(f"    [{i}] at {e.address:#x}: ra {view.describe(e.ra)}  toc {e.toc:#x} ({owner})"
                             f"  magic {e.magic:#x}: {verdict}")
        problems = self.problems
        lines += [f"  PROBLEM: {p}" for p in problems] if problems else ["  no problems"]
        return "\n".join(lines)


def decode_task_stack(label: str, regs: Registers, task: int, read, view: KernelView,
                      pid: int = -1, comm: str = "?", stack_base: int | None = None) -> TaskStack:
    """Decode the kernel stack of task (its task_struct == thread_info address).

    regs are the task's registers (a running task's, or the sleeping task's
    saved r1 and resume pc); read(address, length) reads target memory;
    stack_base is the task's own stack (task->stack), when known. A running
    task may be on another stack (an interrupt or softirq stack, r1 outside
    its own): the frames are walked there, the livepatch stack stays at the
    bottom of the task's own stack, with no r1 to bound it.
    """
    own = stack_base if stack_base is not None else regs.sp & ~(view.thread_size - 1)
    on_own_stack = own <= regs.sp < own + view.thread_size
    base = own if on_own_stack else regs.sp & ~(view.thread_size - 1)
    livepatch = None
    if view.livepatch is not None:
        try:
            sp_slot = task + view.livepatch.ti_livepatch_sp
            livepatch_sp = int.from_bytes(read(sp_slot, 8), "little")
            lowest = regs.sp if on_own_stack else own + view.thread_size
            livepatch = read_livepatch_stack(read, own, livepatch_sp, lowest, view.livepatch, view)
        except Exception as e:
            livepatch = LivepatchStack(own, 0, [], [f"cannot read livepatch_sp: {e}"], {})
    walk = walk_stack(regs, read, view, base, livepatch.entries if livepatch else [])
    if view.ool_stubs:
        label_ool_stubs(walk, read, view)
    return TaskStack(label, task, pid, comm, regs, base, walk, livepatch)


def label_ool_stubs(walk: Walk, read, view: KernelView) -> None:
    """Name the out-of-line ftrace stub a frame is in: only the stopped pc, the
    LR register and the site ftrace_caller was called from (a traced frame) can
    be in one."""
    for frame in walk.frames:
        if frame.kind in ("current", "lr", "traced"):
            try:
                label = ool_stub_label(frame.pc, read, view.describe)
            except Exception:  # memory around pc not readable: the symbol label stays
                continue
            if label:
                frame.function = label
