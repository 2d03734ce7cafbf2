"""The collectives of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

Every SPMD row of the benchmark records a summary of its step's collectives, so a race
shows what each layout communicates (a layout that gathers whole activations, or that
reduces gradients once per microbatch, is visible in its row, not only in its time).
"""

import dataclasses
import math
import re
from typing import Any

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# Bytes per element of HLO element types (sub-byte types rounded up to one byte).
_ELEMENT_BYTES = {"pred": 1, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True, slots=True)
class Collective:
    """One collective of a compiled HLO module."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]  # its result, one shape per tuple element
    nbytes: int  # of its result, all tuple elements
    in_loop: bool  # inside a while loop's body (the accumulation loop), or called from one
    op_name: str  # the JAX operation it came from (metadata)


def _element_bytes(dtype: str) -> int:
    if dtype in _ELEMENT_BYTES:
        return _ELEMENT_BYTES[dtype]
    bits = re.search(r"(\d+)", dtype)
    return max(1, int(bits.group(1)) // 8) if bits else 0


def collectives(hlo: str) -> list[Collective]:
    """Every collective in `hlo`, with where it sits.

    On the CPU backend bf16 math runs in f32, so compare shapes, not bytes, with a GPU's
    program.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> text = jax.jit(lambda x: x.sum()).lower(jnp.ones(4)).compile().as_text()
        >>> collectives(text)  # one device: nothing to communicate
        []
    """
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif name is not None:
            bodies[name].append(line)
    callees = re.compile(r"(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-]+)")
    in_loop, stack = set(), re.findall(r"body=%?([\w.\-]+)", hlo)
    while stack:
        current = stack.pop()
        if current not in in_loop:
            in_loop.add(current)
            stack += callees.findall("\n".join(bodies.get(current, ())))
    kinds = "|".join(COLLECTIVES)
    op = re.compile(rf"= (.*?) ({kinds})(?:-start)?\(")
    found = []
    for computation, lines in bodies.items():
        for line in lines:
            match = op.search(line)
            if match is None:
                continue
            typed = [
                (dtype, tuple(int(d) for d in dims.split(",") if d))
                for dtype, dims in _SHAPE.findall(match.group(1))
            ]
            op_name = re.search(r'op_name="([^"]*)"', line)
            found.append(
                Collective(
                    kind=match.group(2),
                    shapes=tuple(shape for _, shape in typed),
                    nbytes=sum(_element_bytes(t) * math.prod(s) for t, s in typed),
                    in_loop=computation in in_loop,
                    op_name=op_name.group(1) if op_name else "",
                )
            )
    return found


def summary(found: list[Collective]) -> dict[str, dict[str, Any]]:
    """Count and bytes per kind, split by place: "all-reduce" (once per step) and
    "all-reduce in loop" (once per accumulation microbatch), for a result row.

    Example:
        >>> one = Collective("all-reduce", ((4, 8),), 128, True, "psum")
        >>> summary([one, one])
        {'all-reduce in loop': {'count': 2, 'bytes': 256, 'largest': [4, 8]}}
    """
    groups: dict[str, list[Collective]] = {}
    for c in found:
        groups.setdefault(f"{c.kind} in loop" if c.in_loop else c.kind, []).append(c)
    summaries = {}
    for key, group in sorted(groups.items()):
        largest = max(group, key=lambda c: c.nbytes)
        summaries[key] = {
            "count": len(group),
            "bytes": sum(c.nbytes for c in group),
            "largest": list(max(largest.shapes, key=math.prod)) if largest.shapes else [],
        }
    return summaries
