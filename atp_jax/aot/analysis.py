"""What a compiled program costs one device: memory (XLA's memory analysis), FLOPs (its cost analysis), the
collectives it runs (read from the partitioned HLO, loop bodies counted once per iteration), and whether any
large tensor lives whole on one device."""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


class DoesNotFit(RuntimeError):
    """The compiler refused the program: it needs more memory than the device has."""


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """One compiled program on one device of its mesh (bytes and FLOPs per device)."""

    name: str
    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated argument buffers
    temp_bytes: int
    code_bytes: int
    flops: float  # XLA's cost analysis: a loop body (the scanned decoder layers) is counted once, not per trip
    collectives: dict  # kind -> {"count": executions per call, "bytes": result bytes moved per call}
    whole_tensors: tuple  # (description, bytes) of large tensors found whole on one device

    @property
    def total_bytes(self) -> int:
        """Peak HBM the program needs on a device: arguments, outputs not aliased to them, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def compile_cost(name: str, jitted, *args, large_shapes: dict | None = None, min_whole_bytes: int = 2**26,
                 **kwargs) -> tuple[ProgramCost, object]:
    """Lowers and compiles `jitted(*args, **kwargs)` (ShapeDtypeStructs with shardings) and measures it.
    `large_shapes`: {description: global shape} of tensors that must never appear whole on a device (e.g. the
    parameters); one found whole at `min_whole_bytes` or more is listed in `whole_tensors`."""
    start = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program larger than the chip's HBM
        if "RESOURCE_EXHAUSTED" in str(e):
            raise DoesNotFit(f"{name}: {str(e).splitlines()[0]}") from e
        raise
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list) else (cost or {})
    hlo = compiled.as_text()
    return ProgramCost(name=name, compile_s=seconds, argument_bytes=mem.argument_size_in_bytes,
                       output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                       temp_bytes=mem.temp_size_in_bytes, code_bytes=mem.generated_code_size_in_bytes,
                       flops=float(cost.get("flops", 0.0)), collectives=collectives(hlo),
                       whole_tensors=whole_tensors(hlo, large_shapes or {}, min_whole_bytes)), compiled


# ---- reading the partitioned HLO ----------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(pred|[su]\d+|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_WHILE_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_WHILE_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_INT_CONSTANT = re.compile(r"=\s*s32\[\][^=]*\bconstant\((\d+)\)")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|true_computation|"
                    r"false_computation|called_computations)=(?:\{([^}]*)\}|%?([\w.\-]+))")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (a result type, possibly a tuple)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += size * DTYPE_BYTES.get(dtype, 4)
    return total


def _computations(hlo: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line[:1].isspace():
            current = m.group(1)
            out[current] = []
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            out[current].append(line)
    return out


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
    """Iterations of the while loop `line` starts: XLA's known_trip_count when annotated, else the bound of a
    `counter < N` condition (a scan's), else 1."""
    known = _TRIP_COUNT.search(line)
    if known:
        return int(known.group(1))
    condition = _WHILE_CONDITION.search(line)
    lines = computations.get(condition.group(1), []) if condition else []
    bounds = [int(c) for ln in lines for c in _INT_CONSTANT.findall(ln)]
    if len(bounds) == 1 and any("direction=LT" in ln for ln in lines):
        return bounds[0]
    return 1


def _multiplicities(computations: dict[str, list[str]]) -> dict[str, int]:
    """How many times each computation runs per call of the entry: a while body its trip count times,
    anything else it calls once per call of the caller."""
    edges: dict[str, list[tuple[str, int]]] = {name: [] for name in computations}
    for name, lines in computations.items():
        for line in lines:
            body = _WHILE_BODY.search(line)
            for listed, single in _CALLS.findall(line):
                for callee in (listed or single).replace("%", "").split(","):
                    callee = callee.strip()
                    if callee in computations:
                        n = _trip_count(line, computations) if body and callee == body.group(1) else 1
                        edges[name].append((callee, n))
    called = {c for es in edges.values() for c, _ in es}
    counts = {name: 0 for name in computations}

    def visit(name: str, times: int, depth: int = 0) -> None:
        counts[name] += times
        if depth < 64:
            for callee, n in edges[name]:
                visit(callee, times * n, depth + 1)

    for root in (n for n in computations if n not in called):
        visit(root, 1)
    return counts


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives one call runs (async start/done pairs counted once), loop
    bodies multiplied by their trip counts."""
    computations = _computations(hlo)
    times = _multiplicities(computations)
    out: dict[str, dict[str, int]] = {}
    for name, lines in computations.items():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            result, op = m.group(1), m.group(2)
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            if op.endswith("-start"):  # (operands..., results...) tuple: count the results only
                result = result.split("),")[-1] if result.startswith("(") else result
            entry = out.setdefault(kind, {"count": 0, "bytes": 0})
            entry["count"] += times[name]
            entry["bytes"] += times[name] * shape_bytes(result)
    return out


def whole_tensors(hlo: str, large_shapes: dict, min_bytes: int) -> tuple:
    """Large tensors of the given global shapes that some instruction of the per-device program holds whole."""
    wanted = {tuple(int(d) for d in shape): name for name, shape in large_shapes.items()
              if math.prod(shape) * 2 >= min_bytes}  # at least min_bytes even in a 2-byte dtype
    found: dict[str, int] = {}
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m or m.group(2) == "parameter":  # a computation's parameter is its caller's tensor again
            continue
        for dtype, dims in _SHAPE.findall(m.group(1)):
            shape = tuple(int(d) for d in dims.split(",") if d)
            if shape in wanted:
                size = math.prod(shape) * DTYPE_BYTES.get(dtype, 4)
                if size >= min_bytes:
                    key = f"{wanted[shape]} {dtype}{list(shape)} ({m.group(2)})"
                    found[key] = size
    return tuple(sorted(found.items()))


def unsharded_arguments(compiled, abstract_args, min_bytes: int = 2**26) -> list[tuple[str, int]]:
    """(path, bytes) of arguments of at least `min_bytes` that the compiled program keeps whole on a device."""
    shardings = jax.tree.leaves(compiled.input_shardings[0])
    leaves = jax.tree_util.tree_leaves_with_path(abstract_args)
    out = []
    for (path, leaf), sharding in zip(leaves, shardings, strict=True):
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if size >= min_bytes and tuple(sharding.shard_shape(leaf.shape)) == tuple(leaf.shape):
            out.append((jax.tree_util.keystr(path), size))
    return out
