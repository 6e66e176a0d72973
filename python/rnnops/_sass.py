"""The loops of a compiled kernel's machine code (SASS, disassembled by the cuobjdump that ships
with Triton's NVIDIA backend): how many instructions each loop body issues per iteration, and
which. Where a kernel's time goes to issuing instructions rather than to memory (the selective
scans: every (step, channel, state element) needs an exponential and a few FMAs), the innermost
loop's instruction count per element is an offline floor on its time: at one instruction per
cycle per scheduler, an H100 issues 132 x 4 x 1.75e9 warp instructions a second. Shared by the
CUDA and the Triton compile checks."""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACKWARD_TARGET = re.compile(r"\bBRA\b.*?(0x[0-9a-f]+)")
_PREDICATE = re.compile(r"^@!?U?P\w+\s+")


@dataclass(frozen=True)
class Loop:
    start: int  # byte offset of the loop's first instruction
    end: int  # of its backward branch
    instructions: int  # in its body, nested loops excluded
    nested: int  # loops inside it
    opcodes: dict  # opcode (MUFU.EX2 kept whole, others without modifiers) -> count, nested loops excluded

    def count(self, opcode: str) -> int:
        return self.opcodes.get(opcode, 0)


def cuobjdump() -> str | None:
    """Triton's bundled cuobjdump, else one on PATH; None without either."""
    try:
        from triton.backends.nvidia import __file__ as backend
    except ImportError:
        return shutil.which("cuobjdump")
    bundled = Path(backend).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _functions(cubin: bytes) -> list[list[tuple[int, str]]]:
    """Each kernel of the cubin as its (address, instruction text) pairs."""
    tool = cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (it ships with Triton's NVIDIA backend)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    return [[(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, function.splitlines()) if m]
            for function in re.split(r"\n\s+Function : ", sass)[1:]]


def _opcode(text: str) -> str:
    return _PREDICATE.sub("", text).split()[0]


def _counted(text: str) -> str:
    """An instruction's opcode as Loop.opcodes and opcodes count it: MUFU's kept whole (MUFU.EX2),
    the others without modifiers (BAR, LDGSTS)."""
    opcode = _opcode(text)
    return opcode if opcode.startswith("MUFU") else opcode.split(".")[0]


def opcodes(cubin: bytes) -> collections.Counter:
    """How many of each opcode the cubin's kernels hold, each instruction once (a loop's body is
    not multiplied by its trips)."""
    return collections.Counter(_counted(text) for code in _functions(cubin) for _, text in code)


def loops(cubin: bytes) -> list[Loop]:
    """Every loop (a branch to an earlier address) of the cubin's kernels, in address order."""
    found = []
    for code in _functions(cubin):
        index = {address: i for i, (address, _) in enumerate(code)}
        spans = [(index[int(m.group(1), 16)], i) for i, (address, text) in enumerate(code)
                 if (m := _BACKWARD_TARGET.search(text)) and int(m.group(1), 16) < address]
        for first, last in spans:
            inner = [(a, b) for a, b in spans if first <= a and b <= last and (a, b) != (first, last)]
            own = [k for k in range(first, last + 1) if not any(a <= k <= b for a, b in inner)]
            counts = collections.Counter(_counted(code[k][1]) for k in own)
            found.append(Loop(code[first][0], code[last][0], len(own), len(inner), dict(counts)))
    return found


def innermost_exponential_loop(cubin: bytes) -> Loop:
    """The largest loop without nested loops that evaluates exponentials (MUFU.EX2): the per-step
    work of a scan kernel; raises LookupError where there is none."""
    candidates = [loop for loop in loops(cubin) if not loop.nested and loop.count("MUFU.EX2")]
    if not candidates:
        raise LookupError("no innermost loop evaluates exponentials")
    return max(candidates, key=lambda loop: loop.instructions)


# what ends a round of loads: an instruction that waits for a load's value or that nvcc does not
# move a load across (stores, special-function ops such as a logf's or an exponential's, barriers,
# branches)
ROUND_BREAKS = ("STS", "STG", "MUFU", "BAR", "BSYNC", "BRA")
STORE_BREAKS = ("STS", "STG", "BAR")


def load_rounds(cubin: bytes, load: str | tuple[str, ...], breaks: tuple[str, ...] = ROUND_BREAKS) -> list[int]:
    """The sizes, in address order, of the runs of loads whose opcode starts with ``load`` (or with
    one of them; e.g. "LDG.E.U16": 16-bit global loads, a half-precision kernel's activations) that
    no opcode in ``breaks`` interrupts. A phase whose loads form one round waits for one memory
    latency; one round a step, for as many as it has steps. The default breaks (ROUND_BREAKS) end
    a round at branches and special-function ops too, which nvcc does not move a load across;
    STORE_BREAKS end it only where a store or barrier waits, so that loads spread over the branches
    of their bounds tests (which wait for nothing) count as the one round they are."""
    rounds: list[int] = []
    for code in _functions(cubin):
        open_round = False
        for _, text in code:
            opcode = _opcode(text)
            if opcode.startswith(load):
                if open_round:
                    rounds[-1] += 1
                else:
                    rounds.append(1)
                open_round = True
            elif opcode.split(".")[0] in breaks:
                open_round = False
    return rounds


def longest_mma_chain(cubin: bytes) -> int:
    """The most tensor-core products (HMMA) in a row each of which accumulates into the one
    before's result, within a branch-free stretch of code: how many tensor-core latencies the
    longest such chain waits for (a loop body's, per iteration). A register any other
    instruction writes starts a new chain."""
    longest = 0
    for code in _functions(cubin):
        depth: dict[str, int] = {}
        for _, text in code:
            opcode = _opcode(text)
            if opcode.split(".")[0] in ("BRA", "BAR", "EXIT", "BSYNC"):
                depth.clear()
                continue
            operands = [o.strip().split(".")[0] for o in _PREDICATE.sub("", text)[len(opcode):].split(",")]
            if opcode.startswith("HMMA"):
                depth[operands[0]] = depth.get(operands[-1], 0) + 1
                longest = max(longest, depth[operands[0]])
            elif operands and operands[0] in depth:
                del depth[operands[0]]
    return longest
