"""Ahead-of-time compile report: every Triton kernel of canfast, compiled for A100 and H100.

    python -m canfast.kernels.report --arch sm_80,sm_90 [--json] [--subset ci|variants|heavy|full]

No GPU, driver or CUDA toolkit is needed: ``triton.compile`` takes a named target
(``GPUTarget("cuda", 80 | 90, 32)``) and lowers the kernel to PTX and a cubin with the ``ptxas``
that Triton's wheel carries (the one Triton itself picks for the arch). For every autotune config,
dtype and launcher variant of every kernel a row gives:

- registers per thread, spill stores and loads, stack frame (from ``ptxas -v``);
- shared memory (the compiled kernel's metadata) against the arch's per-block limit;
- the tensor-core instructions in the PTX: ``mma.sync`` (sm_80) and ``wgmma`` (sm_90);
- the predicted occupancy in warps per SM, from registers, shared memory and warps per program.

A row fails when the kernel spills, when its shared memory does not fit, or when a dtype whose
``tl.dot`` must run on tensor cores compiled without them. ``--check`` exits 1 on any failure.

Adding a kernel: give its module a module-level ``AOT = AotSpec(...)`` (see
:mod:`canfast.kernels._aot`): the autotuner object, its CUDA config list, the kind of each
argument (``"*T"``, ``"i32:16"``, ``"1"``, ...) and the :class:`Variant` list of constexpr
combinations its launcher can produce; then add the module's name to ``KERNEL_MODULES`` below.
The report, ``tests/test_kernels_aot.py`` and ``bench/aot.py`` pick it up from there.

Compiles go through Triton's own cache (``TRITON_CACHE_DIR``), keyed by the kernel source, the
options and the Triton and ptxas versions, so a rerun on an unchanged kernel reuses the cubin.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import partial
from multiprocessing import get_context

import triton

from ._common import config_label, keeps

KERNEL_MODULES = (
    "canfast.kernels.masked_linear",
    "canfast.kernels.score_accumulate",
    "canfast.kernels.ablate_expand",
)

DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Arch:
    """What the occupancy and shared-memory checks need to know about one GPU generation."""

    name: str
    capability: int
    gpu: str
    shared_per_block: int  # the opt-in maximum of dynamic shared memory per program
    shared_per_sm: int
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    tensor_core_op: str = "mma.sync"


ARCHS = {
    "sm_80": Arch("sm_80", 80, "A100", 166912, 167936, tensor_core_op="mma.sync"),
    "sm_90": Arch("sm_90", 90, "H100", 232448, 233472, tensor_core_op="wgmma.mma_async"),
}

# Shared memory the driver keeps per program for itself.
_RESERVED_SHARED = 1024


@dataclass(frozen=True)
class Job:
    """One compile: a kernel, one of its configs, a dtype choice, a variant, an arch."""

    module: str
    config: int
    dtype: str
    choice: int
    variant: int
    arch: str


@dataclass
class Row:
    kernel: str
    arch: str
    dtype: str
    variant: str
    config: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    shared_limit: int
    mma_sync: int
    wgmma: int
    tensor_core_required: bool
    warps_per_sm: int
    compile_s: float
    pruned: bool = False
    split: str = ""  # the value of the kernel's table_split constexpr ("" if none)

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if self.shared > self.shared_limit:
            found.append(f"shared {self.shared} B > {self.shared_limit} B")
        op = ARCHS[self.arch].tensor_core_op
        count = self.wgmma if op.startswith("wgmma") else self.mma_sync
        if self.tensor_core_required and not count:
            found.append(f"no {op.split('.')[0]}")
        if self.warps_per_sm == 0:
            found.append("cannot launch")
        return found


def spec(module: str):
    """The ``AOT`` declaration of a kernel module."""
    return importlib.import_module(module).AOT


def kernel_name(module: str) -> str:
    return module.rsplit(".", 1)[1]


def split_of(aot, variant) -> str:
    """The part of the resource table a variant falls in."""
    return str(bool(variant.constexprs[aot.table_split])) if aot.table_split else ""


def pruned(module: str, config: triton.Config, label: str, arch: str, split: str = "") -> bool:
    """Whether the autotuner drops this config for this dtype choice on this arch (by the
    compiled-resource table, at the arch's own shared-memory limit)."""
    limit = ARCHS[arch].shared_per_block
    return not keeps(kernel_name(module), arch, label, config, limit, split)


def _features(variant) -> set[tuple[str, str]]:
    return {(k, repr(v)) for k, v in {**variant.constexprs, **variant.args}.items()}


def covering_variants(aot) -> list[int]:
    """Variants such that every pair of settings (constexpr values, argument kinds) that some
    launcher variant combines is compiled together at least once: a pairwise covering set,
    chosen greedily, starting from the variant with the most features switched on."""
    pairs = [{(a, b) for a in _features(v) for b in _features(v) if a < b} for v in aot.variants]
    todo = set().union(*pairs)
    order = sorted(
        range(len(aot.variants)),
        key=lambda i: -sum(bool(v) for v in aot.variants[i].constexprs.values()),
    )
    chosen = [order[0]]
    todo -= pairs[order[0]]
    while todo:
        best = max(order, key=lambda i: len(pairs[i] & todo))
        chosen.append(best)
        todo -= pairs[best]
    return sorted(chosen)


SUBSETS = ("ci", "variants", "heavy", "full")


def jobs_for(
    module: str, archs: Sequence[str], subset: str, dtypes: Sequence[str] = DTYPES
) -> list[Job]:
    """The compiles of one kernel in ``dtypes``, for one of four subsets:

    - ``full``: every config x dtype choice x variant x arch;
    - ``heavy``: the same for the kernel's ``heavy`` variants only (the resource table's source);
    - ``variants``: every variant on every arch once;
    - ``ci``: a pairwise covering set of the variants (:func:`covering_variants`) on every arch.

    In the last two the dtype choices are dealt out in turn, and then every config of each
    dtype choice's list not compiled yet, so that each is compiled at least once per arch as
    well (a config the autotuner prunes for a dtype is passed over).
    """
    aot = spec(module)
    choices = [(d, c) for d in dtypes for c in range(len(aot.dtype_constexprs(d)))]
    labels = {(d, c): aot.dtype_constexprs(d)[c][0] for d, c in choices}
    configs = {choice: aot.configs_for(labels[choice]) for choice in choices}
    names = [v.name for v in aot.variants]
    if subset == "ci":
        variants = covering_variants(aot)
    elif subset == "heavy":
        variants = [names.index(n) for n in aot.heavy] or list(range(len(names)))
    else:
        variants = list(range(len(names)))
    jobs = []
    for arch in archs:
        if subset in ("full", "heavy"):
            for dtype, choice in choices:
                for config in range(len(configs[dtype, choice])):
                    for variant in variants:
                        jobs.append(Job(module, config, dtype, choice, variant, arch))
            continue

        def runnable(choice: tuple[str, int], variant: int, arch: str = arch) -> list[int]:
            part = split_of(aot, aot.variants[variant])
            return [
                c
                for c, config in enumerate(configs[choice])
                if not pruned(module, config, labels[choice], arch, part)
            ]

        unused = {choice: list(range(len(configs[choice]))) for choice in choices}
        count = max(len(variants), len(choices))
        for i in range(count):
            variant = variants[i % len(variants)]
            # The dtype choice in turn, or the next one that has a config left to run.
            for step in range(len(choices)):
                choice = choices[(i + step) % len(choices)]
                if ok := runnable(choice, variant):
                    break
            if not ok:
                continue
            fresh = [c for c in unused[choice] if c in ok]
            config = fresh[0] if fresh else ok[i % len(ok)]
            if config in unused[choice]:
                unused[choice].remove(config)
            jobs.append(Job(module, config, *choice, variant, arch))
        # Then every config not compiled yet, each with the next variant that runs it.
        i = count
        for choice in choices:
            for config in unused[choice]:
                for step in range(len(variants)):
                    variant = variants[(i + step) % len(variants)]
                    if config in runnable(choice, variant):
                        jobs.append(Job(module, config, *choice, variant, arch))
                        i += step + 1
                        break
    return jobs


def _signature(aot, fn, job: Job) -> tuple[dict, dict, dict]:
    variant = aot.variants[job.variant]
    label, dtype_constexprs = aot.dtype_constexprs(job.dtype)[job.choice]
    config = aot.configs_for(label)[job.config]
    constexprs = {**variant.constexprs, **dtype_constexprs, **config.kwargs}
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind = variant.args.get(name, aot.args.get(name))
        if kind is None:
            raise ValueError(f"{job.module}: argument {name} has no declared kind")
        if kind in ("1", "none"):
            signature[name] = "constexpr"
            constexprs[name] = 1 if kind == "1" else None
            continue
        base, _, hint = kind.partition(":")
        if base.startswith("*"):
            signature[name] = f"*{job.dtype}" if base == "*T" else base
            hint = "16"  # every pointer the launchers pass comes from a torch allocation
        else:
            signature[name] = base
        if hint == "16":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_usage(ptx: str, arch: str) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, stack) from ``ptxas -v`` on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    capability = ARCHS[arch].capability
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = sm_arch_from_capability(capability)
        # The flags Triton passes, so the allocation is the one its own cubin got.
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src]
        log = subprocess.run(
            [*cmd, "-o", src + ".o"], check=True, capture_output=True, text=True
        ).stderr
    return _parse_ptxas(log)


def _parse_ptxas(log: str) -> tuple[int, int, int, int]:
    frame = _PTXAS_FRAME.search(log)
    regs = _PTXAS_REGS.search(log)
    if not frame or not regs:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    stack, stores, loads = (int(v) for v in frame.groups())
    return int(regs.group(1)), stores, loads, stack


def warps_per_sm(arch: str, registers: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM for a program of ``num_warps`` warps with these resources.

    Registers are allocated per warp in units of 256; shared memory per program, plus what the
    driver reserves. 0 means the program cannot launch at all.
    """
    gpu = ARCHS[arch]
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = (gpu.registers_per_sm // per_warp) // num_warps
    by_shared = (
        gpu.shared_per_sm // (shared + _RESERVED_SHARED) if shared <= gpu.shared_per_block else 0
    )
    blocks = min(gpu.max_blocks_per_sm, gpu.max_warps_per_sm // num_warps, by_registers, by_shared)
    return blocks * num_warps


def compile_job(job: Job, configs: Sequence[triton.Config] | None = None) -> Row:
    """Compile one job for its arch and read its resources; ``configs`` replaces the kernel's
    config list (to compare other configs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    aot = spec(job.module)
    if configs is not None:
        aot = replace(aot, configs=list(configs), dtype_configs={})
    label, _ = aot.dtype_constexprs(job.dtype)[job.choice]
    config = aot.configs_for(label)[job.config]
    variant = aot.variants[job.variant]
    fn = aot.kernel.fn
    if not isinstance(fn, JITFunction):  # imported under TRITON_INTERPRET=1
        fn = JITFunction(fn.fn)
    signature, constexprs, attrs = _signature(aot, fn, job)
    started = time.perf_counter()
    # Triton runs ptxas -v itself; its log is printed only when asked. A cache hit runs no
    # ptxas, and then the PTX goes through ptxas again here.
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        previous = triton.knobs.nvidia.dump_ptxas_log
        triton.knobs.nvidia.dump_ptxas_log = True
        try:
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", ARCHS[job.arch].capability, 32),
                options={"num_warps": config.num_warps, "num_stages": config.num_stages},
            )
        finally:
            triton.knobs.nvidia.dump_ptxas_log = previous
    ptx = compiled.asm["ptx"]
    if _PTXAS_FRAME.search(log.getvalue()):
        registers, stores, loads, stack = _parse_ptxas(log.getvalue())
    else:
        registers, stores, loads, stack = _ptxas_usage(ptx, job.arch)
    elapsed = time.perf_counter() - started
    shared = compiled.metadata.shared
    return Row(
        kernel=kernel_name(job.module),
        arch=job.arch,
        dtype=label,
        variant=variant.name,
        config=config_label(config),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        registers=registers,
        spill_stores=stores,
        spill_loads=loads,
        stack=stack,
        shared=shared,
        shared_limit=ARCHS[job.arch].shared_per_block,
        mma_sync=len(re.findall(r"\bmma\.sync\.", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
        tensor_core_required=label in aot.tensor_core,
        warps_per_sm=warps_per_sm(job.arch, registers, shared, config.num_warps),
        compile_s=round(elapsed, 2),
        pruned=pruned(job.module, config, label, job.arch, split_of(aot, variant)),
        split=split_of(aot, variant),
    )


def run(
    jobs: Iterable[Job],
    workers: int | None = None,
    configs: Sequence[triton.Config] | None = None,
) -> list[Row]:
    """Compile ``jobs`` in fresh worker processes, which import the kernels without the
    interpreter even when this process runs under ``TRITON_INTERPRET=1``."""
    return list(run_iter(jobs, workers, configs))


def run_iter(
    jobs: Iterable[Job],
    workers: int | None = None,
    configs: Sequence[triton.Config] | None = None,
) -> Iterator[Row]:
    """:func:`run`, yielding the rows in job order as they are ready (a long matrix keeps what
    finished if it is stopped)."""
    jobs = list(jobs)
    if not jobs:
        return
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            yield from pool.map(partial(compile_job, configs=configs), jobs)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


COLUMNS = (
    ("kernel", "kernel"),
    ("arch", "arch"),
    ("dtype", "dtype"),
    ("variant", "variant"),
    ("config", "config"),
    ("regs", "registers"),
    ("spill st/ld", None),
    ("stack", "stack"),
    ("shared KB / limit", None),
    ("tensor core", None),
    ("warps/SM", "warps_per_sm"),
    ("ok", None),
)


def cells(row: Row) -> list[str]:
    op = ARCHS[row.arch].tensor_core_op
    count = row.wgmma if op.startswith("wgmma") else row.mma_sync
    values = {
        "spill st/ld": f"{row.spill_stores}/{row.spill_loads}",
        "shared KB / limit": f"{row.shared / 1024:.0f} / {row.shared_limit / 1024:.0f}",
        "tensor core": f"{op.split('.')[0]} x{count}" if count else "-",
        "ok": ("pruned: " if row.pruned else "") + ("; ".join(row.problems) or "ok"),
    }
    return [str(getattr(row, attr)) if attr else values[head] for head, attr in COLUMNS]


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a markdown table."""
    heads = [head for head, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[Row]) -> str:
    heads = [head for head, _ in COLUMNS]
    body = [cells(row) for row in rows]
    widths = [max(len(x) for x in column) for column in zip(heads, *body)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [heads, *body]
    )


def as_json(rows: Sequence[Row]) -> list[dict]:
    return [{**asdict(row), "problems": row.problems} for row in rows]


def parse_archs(text: str) -> list[str]:
    archs = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if not archs or unknown:
        raise ValueError(f"--arch: unknown {unknown or text!r}; choose from {', '.join(ARCHS)}")
    return archs


def parse_dtypes(text: str) -> list[str]:
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if not dtypes or unknown:
        raise ValueError(f"--dtypes: unknown {unknown or text!r}; choose from {', '.join(DTYPES)}")
    return dtypes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m canfast.kernels.report",
        description="Compile every canfast Triton kernel ahead of time and report its resources.",
    )
    parser.add_argument("--arch", default="sm_80,sm_90", help="comma-separated: sm_80, sm_90")
    parser.add_argument("--subset", choices=SUBSETS, default="full", help="see jobs_for")
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (all)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated data dtypes")
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (one per CPU)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 if a row has a problem")
    args = parser.parse_args(argv)
    try:
        archs = parse_archs(args.arch)
        dtypes = parse_dtypes(args.dtypes)
        wanted = {k.strip() for k in args.kernels.split(",") if k.strip()}
        modules = [m for m in KERNEL_MODULES if not wanted or kernel_name(m) in wanted]
        if wanted - {kernel_name(m) for m in modules}:
            raise ValueError(
                f"--kernels: unknown {sorted(wanted - set(map(kernel_name, modules)))}"
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = [job for m in modules for job in jobs_for(m, archs, args.subset, dtypes)]
    rows = run(jobs, args.jobs or None)
    if args.json:
        print(json.dumps(as_json(rows), indent=1))
    else:
        print(text_table(rows))
        bad = sum(bool(row.problems) for row in rows)
        print(f"\n{len(rows)} kernels compiled, {bad} with problems", file=sys.stderr)
    return 1 if args.check and any(row.problems for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
