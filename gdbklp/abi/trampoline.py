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
from dataclasses import dataclass, field

from gdbklp.abi import ppc
from gdbklp.abi.ftrace import HandlerEntry
from gdbklp.abi.livepatch import LayoutError, LivepatchHandlerLayout, decode_livepatch_handler

MAX_INSNS = 64
SPR_NAMES = {8: "lr", 9: "ctr"}
TD_EQ, TD_NE = 4, 24  # TO fields of tdeq and tdne (lt|gt)


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
    return (value + imm) & 0xFFFFFFFFFFFFFFFF if isinstance(value, int) else value + imm


def text(value: Value) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


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
        op, rt, ra = word >> 26, (word >> 21) & 31, (word >> 16) & 31
        imm = word & 0xFFFF
        simm = imm - 0x10000 if imm & 0x8000 else imm
        base = lambda: 0 if ra == 0 else self.get(f"r{ra}")
        if word == ppc.NOP:
            return None
        if ppc.is_ld(word) or ppc.is_std(word):
            d = ppc.decode_dform(word)
            address = add(self.get(f"r{d.ra}"), d.disp)
            if ppc.is_ld(word):
                self.set(f"r{d.rt}", self.word(address, at), at, loaded_from=address)
            else:
                self.store(address, self.get(f"r{d.rt}"), at, f"r{d.rt}")
            return None
        if op == 14:  # addi (li when rA is 0)
            self.set(f"r{rt}", add(base(), simm), at)
        elif op == 15 and ra == 0:  # lis
            self.set(f"r{rt}", (simm << 16) & 0xFFFFFFFFFFFFFFFF, at)
        elif op == 15 and isinstance(self.get(f"r{ra}"), int):  # addis
            self.set(f"r{rt}", add(self.get(f"r{ra}"), simm << 16), at)
        elif op in (24, 25) and isinstance(self.get(f"r{rt}"), int):  # ori, oris (rS is bits 6-10)
            self.set(f"r{ra}", self.get(f"r{rt}") | (imm << (16 if op == 25 else 0)), at)
        elif op == 31 and (word >> 1) & 0x3FF == 444 and rt == (word >> 11) & 31:  # mr rA,rS (or rA,rS,rS)
            self.move(f"r{ra}", f"r{rt}", at)
        elif op == 31 and (word >> 1) & 0x3FF in (339, 467):  # mfspr, mtspr
            spr = ((word >> 16) & 31) | (((word >> 11) & 31) << 5)
            if spr not in SPR_NAMES:
                raise self.refuse(word, at)
            if (word >> 1) & 0x3FF == 339:
                self.move(f"r{rt}", SPR_NAMES[spr], at)
            else:
                self.move(SPR_NAMES[spr], f"r{rt}", at)
        elif op == 31 and (word >> 1) & 0x3FF == 68:  # td TO,rA,rB
            rb = f"r{(word >> 11) & 31}"
            self.compares.append((at, self.get(f"r{ra}"), self.get(rb), rt))
            self.compared_from.append((self.loaded_from.get(f"r{ra}"), self.loaded_from.get(rb)))
        elif op == 2:  # tdi TO,rA,SIMM
            self.compares.append((at, self.get(f"r{ra}"), simm & 0xFFFFFFFFFFFFFFFF, rt))
            self.compared_from.append((self.loaded_from.get(f"r{ra}"), None))
        elif word == ppc.BCTRL:
            return "call"
        elif word == ppc.BLR:
            return "return"
        else:
            raise self.refuse(word, at)
        return None

    @staticmethod
    def refuse(word: int, at: int) -> TrampolineError:
        insn = ppc.disassemble(word.to_bytes(4, "little"), at)[0][1]
        return TrampolineError(f"livepatch_handler: cannot model `{insn}` ({word:#010x}) at {at:#x}")

    def run(self, code: bytes, address: int, start: int, until: str, stop_at_trap: bool = False) -> tuple[int, bool]:
        """Execute from start until an instruction returns until (or, with
        stop_at_trap, until a td/tdi traps): (its address, whether it trapped)."""
        insns = ppc.words(code)
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
        return bool(to & 4)
    if isinstance(a, int) and isinstance(b, int):
        sa, sb = (v - (1 << 64) if v >> 63 else v for v in (a, b))
        return bool((to & 16 and sa < sb) or (to & 8 and sa > sb) or (to & 2 and a < b) or (to & 1 and a > b))
    return None


# ---- the static proof: the pop mirrors the push -----------------------------------

@dataclass(frozen=True)
class Finding:
    """One verdict of a static check (klp-lint), at the instruction it is about."""

    ok: bool
    address: int
    text: str


# what the ELFv2 ABI lets C change: volatile registers (r0, r3..r12, CTR); LR holds P3
VOLATILE = ("r0", *(f"r{n}" for n in range(3, 13)), "ctr")


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
    pushed = dict(m.memory)
    stores_before = len(m.stores)
    for name in VOLATILE:
        m.set(name, Sym(f"clobbered:{name}"), p1)
    m.set("r2", Sym("toc_of_c"), p1)
    m.set("lr", p1 + 4, p1)
    blr, _ = m.run(code, address, p1 + 4, "return")
    out = [Finding(True, p1, f"P1 (the bctrl into C) at {p1:#x}, P3 at {p1 + 4:#x}, the return (blr) at {blr:#x}")]

    def check(ok: bool, what: str, where: int) -> None:
        out.append(Finding(ok, where, what))

    check(entered == Sym(c), f"the bctrl enters C: CTR is {text(entered)}, C came in {c}", m.writer.get("ctr", p1))
    ra_slot = next((a for a, v in pushed.items() if v == Sym(ra)), None)
    toc_slot = next((a for a, v in pushed.items() if v == Sym("r2")), None)
    sp_cells = [a for a, v in pushed.items() if isinstance(v, Sym) and v.name.startswith("[") and v.offset]
    lr = m.regs.get("lr")
    check(lr == Sym(ra), f"the return goes to RA (in {ra} at the entry): LR at the blr is {text(lr)}"
          + (f", loaded from {text(_load_address(m, lr))}, while RA was saved to {text(ra_slot)}"
             if lr != Sym(ra) else f" (from the slot RA was saved to, {text(ra_slot)})"),
          m.writer.get("lr", blr))
    r2 = m.get("r2")
    check(r2 == Sym("r2"), f"r2 is A's again: {text(r2)}"
          + (f", loaded from {text(_load_address(m, r2))}, while r2 was saved to {text(toc_slot)}"
             if r2 != Sym("r2") else f" (from the slot r2 was saved to, {text(toc_slot)})"),
          m.writer.get("r2", blr))
    r1 = m.get("r1")
    check(r1 == Sym("r1"), f"r1 untouched by the trampoline: {text(r1)}", m.writer.get("r1", blr))
    # livepatch_sp: the word the push loaded, added to and stored back
    for cell in sp_cells:
        before = Sym(f"[{text(cell)}]")
        after = m.memory.get(cell)
        size = pushed[cell].offset
        check(after == before, f"livepatch_sp ({text(cell)}) back to its value before the push: "
                               f"pushed {size:+d}, now {text(after)}", m.writer.get(cell, blr))
    if not sp_cells:
        check(False, "no livepatch_sp update found in the push half", p1)
    # the magic: the compare before the restores must be against the word stored by the push
    magic_stores = {a: v for a, v in pushed.items() if isinstance(v, int)}
    if not m.compares:
        check(False, "the return half compares no magic before returning", blr)
    for (at, a, b, to), sources in zip(m.compares, m.compared_from):
        # one operand loaded from the record, the other a constant built by the code
        pairs = [(src, other) for (src, other) in ((sources[0], b), (sources[1], a))
                 if src is not None and src in pushed and isinstance(other, int)]
        ok = to == TD_NE and any(magic_stores.get(src) == other for src, other in pairs)
        compared = "; ".join(f"the word at {text(src)} against {text(other)}" for src, other in pairs) or \
            f"{text(a)} against {text(b)}"
        check(ok, f"the magic check ({'tdne' if to == TD_NE else f'td TO={to}'}) compares {compared}; the push "
                  "stored " + (", ".join(f"{text(v)} at {text(slot)}" for slot, v in magic_stores.items())
                               or "no constant"), at)
    # the same slots, and nothing else: loads of the pop from the pushed record
    popped = {a for at, a, v in m.loads if at > p1 and a in pushed and a not in sp_cells}
    unused = [a for a in pushed if a not in popped and a not in sp_cells]
    check(not unused, "the pop reads every slot the push wrote"
          + (f" (not: {', '.join(text(a) for a in unused)})" if unused else ""), blr)
    extra = [(at, a) for at, a, v in m.stores[stores_before:] if a not in sp_cells]
    for at, a in extra:
        check(False, f"the return half stores to {text(a)}, which is not livepatch_sp", at)
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
