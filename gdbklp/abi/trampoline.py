"""livepatch_handler as a small register and memory machine, from its own code.

The push half (entry to the bctrl into C, P1) and the return half (P3, the
instruction after the bctrl, to the blr into A) are run instruction by
instruction over values that are either concrete (int) or symbolic (Sym:
"the value the code started with", plus an offset). The same machine:

- proves statically that the pop mirrors the push (lint_livepatch_handler):
  run symbolically from the entry, with C modelled by the ELFv2 calling
  convention, the return half must restore LR from the RA slot, r2 from the
  slot r2 was saved to, leave r1 untouched, compare the loaded magic with
  the magic stored, and put livepatch_sp back where it was;
- predicts P4 at a P3 stop (predict_return): run concretely on the
  registers and the words the return half loads (which the P3 check has
  read already), it says where the blr goes and with which r1, r2 and
  livepatch_sp, before A resumes.

An instruction the machine does not model is refused (TrampolineError names
its address and the instruction), never guessed over.
"""

import dataclasses
import functools
from dataclasses import dataclass, field

from gdbklp.abi import ppc
from gdbklp.abi.ftrace import HandlerEntry
from gdbklp.abi.livepatch import LayoutError, LivepatchHandlerLayout, decode_livepatch_handler

MAX_INSNS = 64
SPR_NAMES = {ppc.SPR_LR: "lr", ppc.SPR_CTR: "ctr"}


class TrampolineError(LayoutError):
    """The machine met code it does not model; str() names the address and instruction."""


@dataclass(frozen=True)
class Sym:
    """A symbolic value: what `name` held when the run started, plus offset."""

    name: str
    offset: int = 0

    def __add__(self, other: int) -> "Sym":
        return Sym(self.name, self.offset + other)

    def __str__(self) -> str:
        return self.name + (f"{self.offset:+d}" if self.offset else "")


Value = int | Sym


def add(value: Value, imm: int) -> Value:
    return (value + imm) & ppc.MASK64 if isinstance(value, int) else value + imm


def text(value: Value) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


# the handler's code, run once per redirection by the P4 prediction
_code_words = functools.lru_cache(maxsize=8)(ppc.words)


@dataclass
class Machine:
    """Registers (r0..r31, lr, ctr) and the memory the code touched.

    read_register(name) gives a register's value where the run has not set
    it; load(address) a memory word the run has not stored. writer[] keeps,
    per register and per stored word, the instruction that produced its
    value (a load, an add, a constant; a move passes its source's on), so a
    wrong outcome names the instruction responsible.
    """

    read_register: object
    load: object
    regs: dict[str, Value] = field(default_factory=dict)
    memory: dict[Value, Value] = field(default_factory=dict)
    writer: dict[object, int] = field(default_factory=dict)
    loads: list[tuple[int, Value, Value]] = field(default_factory=list)     # (insn, address, value)
    stores: list[tuple[int, Value, Value]] = field(default_factory=list)    # (insn, address, value)
    compares: list[tuple[int, Value, Value, int]] = field(default_factory=list)  # (insn, a, b, TO)
    loaded_from: dict[str, Value] = field(default_factory=dict)  # register -> the address it was loaded from
    compared_from: list[tuple[Value | None, Value | None]] = field(default_factory=list)  # per compare

    def get(self, name: str) -> Value:
        if name not in self.regs:
            self.regs[name] = self.read_register(name)
        return self.regs[name]

    def set(self, name: str, value: Value, at: int, loaded_from: Value | None = None) -> None:
        self.regs[name] = value
        self.writer[name] = at
        self.loaded_from[name] = loaded_from

    def move(self, to: str, source: str, at: int) -> None:
        """to = source: the value keeps its origin (the instruction that produced it)."""
        self.set(to, self.get(source), self.writer.get(source, at), self.loaded_from.get(source))

    def word(self, address: Value, at: int) -> Value:
        value = self.memory[address] if address in self.memory else self.load(address)
        self.loads.append((at, address, value))
        return value

    def store(self, address: Value, value: Value, at: int, source: str) -> None:
        self.memory[address] = value
        self.writer[address] = self.writer.get(source, at)
        self.stores.append((at, address, value))

    def step(self, word: int, at: int) -> str | None:
        """Execute one instruction; returns "call" (bctrl), "return" (blr), or None."""
        if word == ppc.BCTRL:
            return "call"
        if word == ppc.BLR:
            return "return"
        if not (word == ppc.NOP or self.load_or_store(word, at) or self.compute(word, at)
                or self.move_register(word, at) or self.trap_compare(word, at)):
            raise self.refuse(word, at)
        return None

    def load_or_store(self, word: int, at: int) -> bool:
        """ld or std: the doubleword at rA + disp; False for any other instruction."""
        if not (ppc.is_ld(word) or ppc.is_std(word)):
            return False
        access = ppc.dsform(word)
        address = add(self.get(f"r{access.ra}"), access.disp)
        if ppc.is_ld(word):
            self.set(f"r{access.rt}", self.word(address, at), at, loaded_from=address)
        else:
            self.store(address, self.get(f"r{access.rs}"), at, f"r{access.rs}")
        return True

    def compute(self, word: int, at: int) -> bool:
        """addi, addis (li, lis), ori and oris; False for any other instruction,
        and for addis, ori or oris on a symbolic value (only addi's offsets
        from a symbol are modelled)."""
        d = ppc.dform(word)
        if ppc.is_addi(word) or ppc.is_addis(word):
            base = 0 if d.ra == 0 else self.get(f"r{d.ra}")  # rA 0 reads as 0: li, lis
            if ppc.is_addis(word) and not isinstance(base, int):
                return False
            self.set(f"r{d.rt}", add(base, ppc.add_immediate(word)), at)
        elif (ppc.is_ori(word) or ppc.is_oris(word)) and isinstance(self.get(f"r{d.rs}"), int):
            self.set(f"r{d.ra}", self.get(f"r{d.rs}") | ppc.or_immediate(word), at)
        else:
            return False
        return True

    def move_register(self, word: int, at: int) -> bool:
        """mr, and moves to and from LR and CTR; False for any other instruction."""
        if ppc.is_mr(word):
            mr = ppc.xform(word)
            self.move(f"r{mr.ra}", f"r{mr.rs}", at)
        elif (ppc.is_mfspr(word) or ppc.is_mtspr(word)) and ppc.xfxform(word).spr in SPR_NAMES:
            move = ppc.xfxform(word)
            if ppc.is_mfspr(word):
                self.move(f"r{move.rt}", SPR_NAMES[move.spr], at)
            else:
                self.move(SPR_NAMES[move.spr], f"r{move.rs}", at)
        else:
            return False
        return True

    def trap_compare(self, word: int, at: int) -> bool:
        """td and tdi: the compare is recorded (whether it traps is the caller's
        question: trap_taken); False for any other instruction."""
        if ppc.is_td(word):
            td = ppc.xform(word)
            a, b = f"r{td.ra}", f"r{td.rb}"
            self.compares.append((at, self.get(a), self.get(b), td.to))
            self.compared_from.append((self.loaded_from.get(a), self.loaded_from.get(b)))
        elif ppc.is_tdi(word):
            tdi = ppc.dform(word)
            self.compares.append((at, self.get(f"r{tdi.ra}"), tdi.disp & ppc.MASK64, tdi.to))
            self.compared_from.append((self.loaded_from.get(f"r{tdi.ra}"), None))
        else:
            return False
        return True

    @staticmethod
    def refuse(word: int, at: int) -> TrampolineError:
        insn = ppc.disassemble(word.to_bytes(4, "little"), at)[0][1]
        return TrampolineError(f"livepatch_handler: cannot model `{insn}` ({word:#010x}) at {at:#x}")

    def run(self, code: bytes, address: int, start: int, until: str, stop_at_trap: bool = False) -> tuple[int, bool]:
        """Execute from start until an instruction returns until (or, with
        stop_at_trap, until a td/tdi traps): (its address, whether it trapped)."""
        insns = _code_words(code)
        at = start
        for _ in range(MAX_INSNS):
            index = (at - address) // 4
            if not 0 <= index < len(insns):
                raise TrampolineError(f"livepatch_handler: ran past its code at {at:#x} looking for a {until}")
            outcome = self.step(insns[index], at)
            if stop_at_trap and self.compares and self.compares[-1][0] == at:
                _, a, b, to = self.compares[-1]
                if trap_taken(to, a, b):
                    return at, True
            if outcome == until:
                return at, False
            if outcome is not None:
                raise TrampolineError(f"livepatch_handler: unexpected {outcome} at {at:#x} "
                                      f"(expected a {until})")
            at += 4
        raise TrampolineError(f"livepatch_handler: no {until} within {MAX_INSNS} instructions of {start:#x}")


def trap_taken(to: int, a: Value, b: Value) -> bool | None:
    """Does td/tdi with this TO trap for a, b? None when symbolic values leave it open."""
    if a == b:
        return bool(to & ppc.TO_EQ)
    if isinstance(a, int) and isinstance(b, int):
        sa, sb = (v - (1 << 64) if v >> 63 else v for v in (a, b))
        return bool((to & ppc.TO_LT and sa < sb) or (to & ppc.TO_GT and sa > sb)
                    or (to & ppc.TO_LTU and a < b) or (to & ppc.TO_GTU and a > b))
    return None


# ---- the static proof: the pop mirrors the push -----------------------------------

@dataclass(frozen=True)
class Finding:
    """One verdict of a static check (klp-lint), at the instruction it is about."""

    ok: bool
    address: int
    text: str


# what the ELFv2 ABI lets C change: the volatile registers and CTR (LR holds P3 when it returns)
CLOBBERED_BY_C = (*ppc.VOLATILE_GPRS, "ctr")


def lint_livepatch_handler(code: bytes, address: int, ra: str = "lr", c: str = "ctr") -> list[Finding]:
    """Prove from the code that the return half undoes exactly what the push half did.

    Symbolic run: at the entry r1 = sp, r2 = toc, r13 = paca, RA in
    register ra and C in register c (where ftrace_caller leaves them:
    gdbklp.abi.ftrace.decode_handler_entry); memory holds what it holds
    (the same address loads the same symbol). C is entered at the bctrl and returns to the next instruction
    (P3) with LR = P3, r2 its own TOC, the volatile registers clobbered and
    r1, r13 and memory as they were (its ELFv2 duties).
    """
    m = Machine(read_register=lambda name: Sym(name), load=lambda a: Sym(f"[{text(a)}]"))
    p1, _ = m.run(code, address, address, "call")
    entered = m.get("ctr")
    pushed, pushed_stores = dict(m.memory), len(m.stores)
    for name in CLOBBERED_BY_C:
        m.set(name, Sym(f"clobbered:{name}"), p1)
    m.set("r2", Sym("toc_of_c"), p1)
    m.set("lr", p1 + 4, p1)
    blr, _ = m.run(code, address, p1 + 4, "return")
    run = _HandlerRun(m, p1, blr, pushed, pushed_stores)
    return [
        Finding(True, p1, f"P1 (the bctrl into C) at {p1:#x}, P3 at {p1 + 4:#x}, the return (blr) at {blr:#x}"),
        Finding(entered == Sym(c), m.writer.get("ctr", p1), f"the bctrl enters C: CTR is {text(entered)}, "
                                                            f"C came in {c}"),
        _restored(run, "lr", Sym(ra), "RA", f"the return goes to RA (in {ra} at the entry): LR at the blr is"),
        _restored(run, "r2", Sym("r2"), "r2", "r2 is A's again:"),
        Finding(m.get("r1") == Sym("r1"), m.writer.get("r1", blr),
                f"r1 untouched by the trampoline: {text(m.get('r1'))}"),
        *_livepatch_sp_restored(run),
        *_magic_checked(run),
        *_pop_mirrors_push(run),
    ]


@dataclass(frozen=True)
class _HandlerRun:
    """lint_livepatch_handler's symbolic run, stopped at the blr of the return half."""

    machine: Machine
    p1: int                       # the bctrl into C
    blr: int                      # the return into A
    pushed: dict[Value, Value]    # memory as the push half left it
    pushed_stores: int            # how many of machine.stores the push half made

    @property
    def sp_cells(self) -> list[Value]:
        """Where the push stored livepatch_sp: words it loaded, added to and stored back."""
        return [a for a, v in self.pushed.items() if isinstance(v, Sym) and v.name.startswith("[") and v.offset]


def _restored(run: _HandlerRun, register: str, saved: Sym, name: str, headline: str) -> Finding:
    """register at the blr holds what it held at the entry (saved), loaded back
    from the slot the push saved it to."""
    value = run.machine.get(register)
    slot = next((a for a, v in run.pushed.items() if v == saved), None)
    if value == saved:
        where = f" (from the slot {name} was saved to, {text(slot)})"
    else:
        where = f", loaded from {text(_load_address(run.machine, value))}, while {name} was saved to {text(slot)}"
    return Finding(value == saved, run.machine.writer.get(register, run.blr), f"{headline} {text(value)}{where}")


def _livepatch_sp_restored(run: _HandlerRun) -> list[Finding]:
    """livepatch_sp, at the blr, is back to its value before the push."""
    m, cells = run.machine, run.sp_cells
    if not cells:
        return [Finding(False, run.p1, "no livepatch_sp update found in the push half")]
    return [Finding(m.memory.get(cell) == Sym(f"[{text(cell)}]"), m.writer.get(cell, run.blr),
                    f"livepatch_sp ({text(cell)}) back to its value before the push: "
                    f"pushed {run.pushed[cell].offset:+d}, now {text(m.memory.get(cell))}") for cell in cells]


def _magic_checked(run: _HandlerRun) -> list[Finding]:
    """The return half's compares (before it restores anything): a tdne of a
    word loaded from the record against the constant the push stored there."""
    m = run.machine
    if not m.compares:
        return [Finding(False, run.blr, "the return half compares no magic before returning")]
    magic_stores = {a: v for a, v in run.pushed.items() if isinstance(v, int)}
    stored = ", ".join(f"{text(v)} at {text(slot)}" for slot, v in magic_stores.items()) or "no constant"
    out = []
    for (at, a, b, to), sources in zip(m.compares, m.compared_from):
        # one operand loaded from the record, the other a constant built by the code
        pairs = [(src, other) for (src, other) in ((sources[0], b), (sources[1], a))
                 if src is not None and src in run.pushed and isinstance(other, int)]
        ok = to == ppc.TO_NE and any(magic_stores.get(src) == other for src, other in pairs)
        compared = "; ".join(f"the word at {text(src)} against {text(other)}" for src, other in pairs) or \
            f"{text(a)} against {text(b)}"
        check = "tdne" if to == ppc.TO_NE else f"td TO={to}"
        out.append(Finding(ok, at, f"the magic check ({check}) compares {compared}; the push stored {stored}"))
    return out


def _pop_mirrors_push(run: _HandlerRun) -> list[Finding]:
    """The pop reads every slot the push wrote and writes nothing but livepatch_sp."""
    cells = run.sp_cells
    popped = {a for at, a, v in run.machine.loads if at > run.p1 and a in run.pushed and a not in cells}
    unused = [a for a in run.pushed if a not in popped and a not in cells]
    out = [Finding(not unused, run.blr, "the pop reads every slot the push wrote"
                   + (f" (not: {', '.join(text(a) for a in unused)})" if unused else ""))]
    for at, a, v in run.machine.stores[run.pushed_stores:]:
        if a not in cells:
            out.append(Finding(False, at, f"the return half stores to {text(a)}, which is not livepatch_sp"))
    return out


def _load_address(m: Machine, value: Value) -> Value | None:
    """Where the run loaded value from (the latest load), if it did."""
    for _, address, loaded in reversed(m.loads):
        if loaded == value:
            return address
    return None


# ---- the dynamic prediction: P4 from P3 ------------------------------------------

@dataclass(frozen=True)
class ReturnPrediction:
    """What the return half will do from a P3 stop."""

    pc: int | None            # where its blr goes (None: it traps first)
    r1: int
    r2: int
    livepatch_sp: dict[int, int]   # words it stores (livepatch_sp's cell -> value)
    trap_at: int | None       # the td/tdi that traps, if one does
    writer: dict[object, int]  # register or cell -> the instruction that set it


def predict_return(code: bytes, address: int, p3: int, read_register, load) -> ReturnPrediction:
    """Run the return half concretely from P3: read_register(name) gives the
    registers at P3, load(address) the words it loads (8 bytes, little endian)."""
    m = Machine(read_register=read_register, load=load)
    at, trapped = m.run(code, address, p3, "return", stop_at_trap=True)
    if trapped:
        return ReturnPrediction(None, m.get("r1"), m.get("r2"), {}, at, m.writer)
    return ReturnPrediction(m.get("lr"), m.get("r1"), m.get("r2"), {a: v for _, a, v in m.stores}, None, m.writer)


# ---- the layout, confirmed by the machine ------------------------------------------

def decode_layout(code: bytes, address: int) -> LivepatchHandlerLayout:
    """livepatch_handler's layout (gdbklp.abi.livepatch), with the magic the push
    really stores: the pattern decoder follows lis/ori only, the machine every
    instruction of the push (refusing, by address, one it does not model), so
    a magic built or stored another way is expected as what it is."""
    layout = decode_livepatch_handler(code, address)
    m = Machine(read_register=lambda name: Sym(name), load=lambda a: Sym(f"[{text(a)}]"))
    m.run(code, address, address, "call")
    new_sp = [v for v in m.memory.values() if isinstance(v, Sym) and v.offset == layout.entry_size]
    if len(new_sp) != 1:
        return layout
    stored = m.memory.get(new_sp[0] + layout.magic_slot)
    if isinstance(stored, int) and stored != layout.magic:
        return dataclasses.replace(layout, magic=stored)
    return layout


# ---- the hand-off: what ftrace_caller leaves, what livepatch_handler takes ------------

def lint_handler_entry(name: str, entry: HandlerEntry, layout: LivepatchHandlerLayout) -> list[Finding]:
    """Invariant 14, from the code: at livepatch_handler's entry RA and C are in the
    registers the handler takes them from, and the ftrace trampoline name has
    put back A's r1, r2 and every non-volatile register (r14..r31; with
    out-of-line stubs it keeps its own return address in r15)."""
    where = entry.branch

    def registers(names: tuple[str, ...]) -> str:
        return " and ".join(names) or "no register"

    return [
        Finding(layout.ra_register in entry.ra_registers, where,
                f"{name} leaves RA in {registers(entry.ra_registers)}; livepatch_handler takes it from "
                f"{layout.ra_register}"),
        Finding(layout.c_register in entry.c_registers, where,
                f"{name} leaves C in {registers(entry.c_registers)}; livepatch_handler takes it from "
                f"{layout.c_register}"),
        Finding(entry.frame_popped and entry.toc_restored, where,
                f"{name} gives A's r1 and r2 back before livepatch_handler: r1 "
                f"{'popped' if entry.frame_popped else 'NOT popped'}, r2 "
                f"{'restored' if entry.toc_restored else 'NOT restored'}"),
        Finding(not entry.clobbered, where,
                f"{name} restores the non-volatile registers on the way to livepatch_handler"
                + (f": not {', '.join(entry.clobbered)}" if entry.clobbered else "")),
    ]
