"""Fails when a CUDA kernel loads, through the non-coherent path, a buffer it also writes.

``ld.global.nc`` (the read-only data cache, what ``__ldg`` and ``const __restrict__`` give)
is valid only for data that stays unchanged for the whole kernel: a block that writes a
buffer and reads it back after a barrier may get stale values through it. nvcc and NVRTC
fold plain loads into ``.nc`` on their own, so the source cannot show it; the PTX can.

For each ``.entry`` of the PTX files given, every register is traced back to the pointer
parameters it is computed from (a flow-insensitive union over the whole kernel, which can
only over-approximate); a parameter is *written* when a global or generic store or atomic
addresses memory through it, and the check fails when a ``ld.global.nc`` reads through a
written parameter.

Usage: python3 .ci/ptx_coherence.py FILE.ptx...    (exit 1 and one line per finding)
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_ENTRY = re.compile(r"\.entry\s+(\S+?)\s*\(")
_REGISTER = re.compile(r"%[A-Za-z_][\w.]*")
_PARAM_LOAD = re.compile(r"^ld\.param\.[usb]64\s+(%\w+),\s*\[\s*\S+?_param_(\d+)\s*\]")
_ADDRESS = re.compile(r"\[([^\]]+)\]")
#: Instructions that write memory through their address operand; ``st.shared``,
#: ``st.local`` and ``st.param`` cannot reach a kernel's buffers.
_WRITES = re.compile(r"^(st(\.global)?|atom(\.global)?|red(\.global)?)\.(?!shared|local|param)")


@dataclass(frozen=True)
class Finding:
    kernel: str
    parameter: int
    line: int  # 1-based, in the PTX file

    def __str__(self) -> str:
        return (f"{self.kernel}: parameter {self.parameter} is written, and read through "
                f"ld.global.nc at PTX line {self.line}")


def _instructions(lines: list[str], start: int) -> list[tuple[int, str]]:
    """The body of the entry opened at line ``start``: (line number, instruction) pairs."""
    depth, body = 0, []
    for number in range(start, len(lines)):
        text = lines[number].split("//", 1)[0].strip()
        depth += text.count("{") - text.count("}")
        for part in filter(None, (p.strip(" {}") for p in text.split(";"))):
            body.append((number + 1, part))
        if depth == 0 and "}" in text:
            break
    return body


def _sources(lines: list[tuple[int, str]]) -> dict[str, set[int]]:
    """Each register's pointer parameters (the union over all its definitions)."""
    origins: dict[str, set[int]] = defaultdict(set)
    changed = True
    while changed:
        changed = False
        for _, instruction in lines:
            parameter = _PARAM_LOAD.match(instruction)
            operands = _REGISTER.findall(instruction)
            if parameter:
                found = {int(parameter.group(2))}
            elif operands and not instruction.startswith(("ld.", "st.", "atom.", "red.")):
                # Arithmetic, moves, conversions, selects: the destination comes first. A
                # value loaded from memory is data, not an address computed from one.
                found = set().union(*(origins[r] for r in operands[1:]))
            else:
                continue
            target = origins[operands[0]] if operands else set()
            if operands and not found <= target:
                target |= found
                changed = True
    return origins


def _through(instruction: str, origins: dict[str, set[int]]) -> set[int]:
    """The parameters behind the instruction's address operand."""
    address = _ADDRESS.search(instruction)
    if address is None:
        return set()
    return set().union(*(origins[r] for r in _REGISTER.findall(address.group(1))))


def check(ptx: str) -> list[Finding]:
    """Every non-coherent load of a buffer its kernel writes, in PTX text."""
    lines = ptx.splitlines()
    findings = []
    for number, line in enumerate(lines):
        entry = _ENTRY.search(line)
        if entry is None:
            continue
        body = _instructions(lines, number)
        origins = _sources(body)
        written = set().union(*(_through(i, origins) for _, i in body if _WRITES.match(i)))
        for line_number, instruction in body:
            if instruction.startswith("ld.global.nc"):
                findings += [Finding(entry.group(1), p, line_number)
                             for p in sorted(_through(instruction, origins) & written)]
    return findings


def main(paths: list[str]) -> int:
    findings = [f"{path}: {finding}" for path in paths for finding in check(Path(path).read_text())]
    print("\n".join(findings) if findings else
          f"ptx_coherence: no kernel reads a buffer it writes through ld.global.nc "
          f"({len(paths)} PTX file(s))")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
