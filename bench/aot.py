"""Ahead-of-time compile matrix of the Triton kernels for A100 (sm_80) and H100 (sm_90).

    python bench/aot.py --full                   # the full matrix (hours on 2 cores)
    python bench/aot.py --subset heavy --resources   # the rows the autotuners prune by
    python bench/aot.py --subset variants        # every variant on every arch, configs dealt
    python bench/aot.py --before                 # the configs main shipped before issue 12

Runs :mod:`canfast.kernels.report` (no GPU needed) and writes ``bench/results/aot.json`` and
``bench/results/aot.md`` (atomically): one row per compiled kernel with its registers, spills,
stack, shared memory, tensor-core instructions and predicted warps per SM.

``--full`` compiles every config x dtype x variant x arch instead, appending each row to a log
as it is ready (``--log``; a rerun skips the rows already there, so the matrix can be run in
parts, e.g. ``--dtypes bf16,fp16``; the log is not committed, and a missing one starts from the
rows of the committed ``aot_full.json``), and writes the summary ``bench/results/aot_full.md``
and the rows, compactly, to ``bench/results/aot_full.json`` (``--summary`` only rewrites those
two from the log). ``--before`` writes only ``aot_before_after.md``: the worst row of each
``masked_linear`` and ``score_accumulate`` config over a few heavy variants, for the configs on
main before issue 12 and now.
``bench/roofline_triton.py`` turns ``aot.json`` into the tables of ``bench/roofline_triton.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import triton
from canfast.kernels import _resources as resources_module
from canfast.kernels import report

RESULTS = Path(__file__).resolve().parent / "results"

# The CUDA config lists on main before issue 12 (commit 5de2ce9), for the before/after table
# (masked_linear's tiles, with the score-strip width the kernel now takes).
BEFORE = {
    "canfast.kernels.masked_linear": [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "SCORE_N": 16},
            num_stages=s,
            num_warps=w,
        )
        for m, n, k, s, w in [
            (128, 256, 64, 3, 8),
            (256, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 128, 32, 4, 4),
            (64, 256, 32, 4, 4),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 32, 5, 2),
            (32, 64, 32, 5, 2),
        ]
    ],
    "canfast.kernels.score_accumulate": [
        triton.Config({"BLOCK_T": t, "BLOCK_C": c}, num_warps=w)
        for t, c, w in [
            (16, 128, 4),
            (32, 128, 4),
            (16, 256, 4),
            (32, 256, 8),
            (64, 64, 4),
            (8, 512, 4),
        ]
    ],
}

# The variants of the before/after table: the heaviest epilogue of each direction (both in the
# kernels' heavy lists, so the "after" rows come from the compile cache of the resource run).
BEFORE_AFTER_VARIANTS = {
    "canfast.kernels.masked_linear": (
        "fwd bias in=2 out=2",
        "bwd in=2 out=2 score valid alpha=3",
    ),
    "canfast.kernels.score_accumulate": ("valid alpha=3", "valid alpha=1"),
}
# (dtype, choice): bf16, IEEE float32 and, where the kernel has it, TF32 float32.
BEFORE_AFTER_DTYPES = (("bf16", 0), ("fp32", 0), ("fp32", 1))


RESOURCES = Path(__file__).resolve().parent.parent / "kernels" / "_resources.py"


def resource_table(rows: list[report.Row]) -> str:
    """The source of kernels/_resources.py: per kernel, (arch, dtype, config) -> (the most shared
    memory any compiled variant needs, whether any of them spills)."""
    from canfast.kernels._resources import RESOURCES

    # The (kernel, dtype) pairs compiled in this run replace their entries; the others are kept
    # while their config is still shipped.
    compiled = {(row.kernel, row.dtype) for row in rows}
    table = {
        kernel: {
            key: value
            for key, value in entries.items()
            if (kernel, key[1]) not in compiled and _shipped(kernel, key[1], key[2])
        }
        for kernel, entries in RESOURCES.items()
    }
    for row in rows:
        key = (row.arch, row.dtype, row.config, row.split)
        shared, spilled = table.setdefault(row.kernel, {}).get(key, (0, False))
        table[row.kernel][key] = (
            max(shared, row.shared),
            spilled or bool(row.spill_stores or row.spill_loads),
        )
    lines = [
        '"""Compiled resources of the autotune configs, per kernel: (arch, dtype, config,',
        "split) ->"
        " (shared memory in bytes, whether any compiled variant spills). Written by ``python",
        "bench/aot.py --subset heavy --resources`` from the ahead-of-time report",
        '(canfast.kernels.report); the autotuners prune by it (_common.keeps). Do not edit."""',
        "",
        "RESOURCES: dict[str, dict[tuple[str, str, str, str], tuple[int, bool]]] = {",
    ]
    for kernel in sorted(table):
        # Double-quoted, as ruff format writes them.
        lines.append(f"    {json.dumps(kernel)}: {{")
        for key in sorted(table[kernel]):
            quoted = ", ".join(json.dumps(part) for part in key)
            lines.append(f"        ({quoted}): {table[kernel][key]!r},")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _shipped(kernel: str, dtype: str, config: str) -> bool:
    """Whether ``config`` is in the list the launcher of ``kernel`` runs for ``dtype``."""
    aot = report.spec(f"canfast.kernels.{kernel}")
    return config in {report.config_label(c) for c in aot.configs_for(dtype)}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def before_after(workers: int | None) -> str:
    """Markdown: per kernel, arch and dtype, the shipped configs before and after and how many
    of them spill; then per config the worst spill and the registers and warps/SM of the
    heaviest variant."""
    found: list[tuple[str, report.Row]] = []
    for module, old_configs in BEFORE.items():
        aot = report.spec(module)
        names = [v.name for v in aot.variants]
        for label, configs in (("before", old_configs), ("after", None)):
            jobs = [
                report.Job(module, c, d, choice, names.index(v), arch)
                for arch in report.ARCHS
                for d, choice in BEFORE_AFTER_DTYPES
                if choice < len(aot.dtype_constexprs(d))
                for c in range(len(configs or aot.configs_for(aot.dtype_constexprs(d)[choice][0])))
                for v in BEFORE_AFTER_VARIANTS[module]
            ]
            found += [(label, row) for row in report.run(jobs, workers, configs=configs)]
    groups: dict[tuple, list[report.Row]] = {}
    for label, row in found:
        groups.setdefault((row.kernel, row.arch, row.dtype, label, row.config), []).append(row)
    summary: dict[tuple, list[list[report.Row]]] = {}
    for (kernel, arch, dtype, label, _), rows in groups.items():
        summary.setdefault((kernel, arch, dtype, label), []).append(rows)
    out = [
        "| kernel | arch | dtype | configs before → after | spilling before → after "
        "| worst spill st/ld (B) before → after | over shared memory before → after "
        "| min warps/SM before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    done = set()
    for kernel, arch, dtype, _ in summary:
        if (kernel, arch, dtype) in done:
            continue
        done.add((kernel, arch, dtype))
        cells = []
        for label in ("before", "after"):
            configs = summary.get((kernel, arch, dtype, label), [])
            rows = [r for c in configs for r in c]
            spilling = sum(any(r.spill_stores or r.spill_loads for r in c) for c in configs)
            over = sum(any(r.shared > r.shared_limit for r in c) for c in configs)
            worst = max(rows, key=lambda r: r.spill_stores + r.spill_loads)
            cells.append(
                (
                    len(configs),
                    spilling,
                    f"{worst.spill_stores}/{worst.spill_loads}",
                    over,
                    min(r.warps_per_sm for r in rows),
                )
            )
        out.append(
            f"| {kernel} | {arch} | {dtype} | "
            + " | ".join(f"{b} → {a}" for b, a in zip(*cells))
            + " |"
        )
    out += [
        "",
        "| kernel | arch | dtype | configs | config | worst regs | worst spill st/ld (B) "
        "| shared KB | min warps/SM | tensor core | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch, dtype, label, config), rows in groups.items():
        worst = max(rows, key=lambda r: (r.spill_stores + r.spill_loads, r.registers))
        tc = max(r.wgmma if arch == "sm_90" else r.mma_sync for r in rows)
        problems = sorted({p.split(" B")[0] for r in rows for p in r.problems})
        out.append(
            f"| {kernel} | {arch} | {dtype} | {label} | {config} | "
            f"{max(r.registers for r in rows)} | {worst.spill_stores}/{worst.spill_loads} | "
            f"{max(r.shared for r in rows) // 1024} | {min(r.warps_per_sm for r in rows)} | "
            f"{tc or '-'} | {'; '.join(problems) or 'ok'} |"
        )
    return "\n".join(out) + "\n"


FULL_LOG = Path(__file__).resolve().parent / "results" / "aot_full.log.jsonl"


def _row_key(row: dict) -> tuple:
    return (row["kernel"], row["arch"], row["dtype"], row["variant"], row["config"])


def _job_key(job: report.Job) -> tuple:
    aot = report.spec(job.module)
    label = aot.dtype_constexprs(job.dtype)[job.choice][0]
    config = report.config_label(aot.configs_for(label)[job.config])
    name = aot.variants[job.variant].name
    return (report.kernel_name(job.module), job.arch, label, name, config)


def full_jobs(modules: list[str], dtypes: list[str]) -> list[report.Job]:
    """Every compile of the full matrix, grouped so that a stopped run leaves whole (kernel,
    dtype, arch) cells: the small kernels first, then dtype, arch, config and variant."""
    jobs = [job for m in modules for job in report.jobs_for(m, list(report.ARCHS), "full", dtypes)]
    size = {m: len(report.spec(m).variants) for m in modules}
    return sorted(
        jobs,
        key=lambda j: (size[j.module], j.module, dtypes.index(j.dtype), j.choice, j.arch,
                       j.config, j.variant),
    )  # fmt: skip


def read_log(log: Path) -> tuple[list[dict], list[dict]]:
    """The rows of a full-matrix log (the last one of a key wins) and its run records."""
    rows: dict[tuple, dict] = {}
    runs = []
    if log.exists():
        for line in log.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short when a run was stopped
            if "run" in record:
                runs.append(record["run"])
            else:
                rows[_row_key(record)] = record
    return list(rows.values()), runs


def seed_log(log: Path) -> int:
    """Start a missing ``log`` from the committed ``aot_full.json``, so that a fresh clone
    resumes the matrix where the last run left it instead of compiling it again. Its rows keep
    what was measured; the fields it does not store (whether the dtype needs tensor cores, the
    autotuner's pruning, the table split) follow from each row's job, as in a compile. Its run
    records keep their wall time as ``wall_s``. Returns the rows seeded."""
    summary = RESULTS / "aot_full.json"
    if log.exists() or not summary.exists():
        return 0
    saved = json.loads(summary.read_text())
    jobs = {_job_key(j): j for j in full_jobs(list(report.KERNEL_MODULES), list(report.DTYPES))}
    lines = [json.dumps({"run": {**run, "seeded": True}}) for run in saved["runs"]]
    if lines:  # the summary holds one wall time, and one count of dropped rows, for its runs
        first = {**saved["runs"][0], "seeded": True, "wall_s": saved["wall_s"]}
        first["dropped_compiled"] = saved.get("dropped_compiled", 0)
        lines[0] = json.dumps({"run": first})
    # The spilling rows of configs no longer shipped: the record of why they were taken out.
    lines += [json.dumps({**row, "seeded": True}) for row in saved.get("dropped_spilling", [])]
    for values in saved["rows"]:
        row = dict(zip(saved["columns"], values, strict=True))
        job = jobs.get(_row_key(row))
        if job is None:
            continue  # a config no longer shipped
        aot = report.spec(job.module)
        variant = aot.variants[job.variant]
        config = aot.configs_for(row["dtype"])[job.config]
        split = report.split_of(aot, variant)
        row["tensor_core_required"] = row["dtype"] in aot.tensor_core
        row["pruned"] = report.pruned(job.module, config, row["dtype"], job.arch, split)
        row["split"] = split
        lines.append(json.dumps(row))
    log.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(log, "\n".join(lines) + "\n")
    return len(lines) - len(saved["runs"])


def run_full(modules: list[str], dtypes: list[str], workers: int | None, log: Path) -> None:
    """Compile the full matrix into ``log``, one JSON line per row, skipping rows present."""
    done = {_row_key(r) for r in read_log(log)[0]}
    jobs = [j for j in full_jobs(modules, dtypes) if _job_key(j) not in done]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        start = {
            "started": time.time(), "compiles": len(jobs), "skipped": len(done),
            "kernels": [report.kernel_name(m) for m in modules], "dtypes": dtypes,
            "workers": workers or os.cpu_count(), "cpus": os.cpu_count(),
            "triton": triton.__version__,
        }  # fmt: skip
        f.write(json.dumps({"run": start}) + "\n")
        f.flush()
        for row in report.run_iter(jobs, workers):
            f.write(json.dumps({**asdict(row), "finished": round(time.time(), 1)}) + "\n")
            f.flush()


KERNELS = {report.kernel_name(m) for m in report.KERNEL_MODULES}
FULL_COLUMNS = (
    "kernel", "arch", "dtype", "variant", "config", "num_warps", "num_stages", "registers",
    "spill_stores", "spill_loads", "stack", "shared", "shared_limit", "mma_sync", "wgmma",
    "warps_per_sm", "compile_s",
)  # fmt: skip


DROPPED_COLUMNS = (
    "kernel", "arch", "dtype", "variant", "config", "registers", "spill_stores", "spill_loads",
    "stack",
)  # fmt: skip


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def write_full_summary(log: Path) -> None:
    """``aot_full.md`` (per kernel, arch and dtype, then per config) and ``aot_full.json`` (the
    rows as lists under their column names) from the full matrix's log."""
    rows, runs = read_log(log)
    expected = {_job_key(j): j for j in full_jobs(list(report.KERNEL_MODULES), list(report.DTYPES))}
    dropped = [r for r in rows if _row_key(r) not in expected and r["kernel"] in KERNELS]
    dropped_compiled = sum(run.get("dropped_compiled", 0) for run in runs) + sum(
        not r.get("seeded") for r in dropped
    )
    rows = [r for r in rows if _row_key(r) in expected]  # configs no longer shipped drop out
    order = {key: i for i, key in enumerate(expected)}
    rows.sort(key=lambda r: order[_row_key(r)])
    names = [f.name for f in fields(report.Row)]
    parsed = [report.Row(**{n: r[n] for n in names if n in r}) for r in rows]
    # Wall time: from each run's start to its last row (a run may have been stopped).
    wall = sum(run.get("wall_s", 0.0) for run in runs if run.get("seeded"))
    for i, run in enumerate(runs):
        if run.get("seeded"):
            continue  # its rows carry no finishing time; its wall time came with it
        end = runs[i + 1]["started"] if i + 1 < len(runs) else float("inf")
        done = [r["finished"] for r in rows if run["started"] <= r.get("finished", 0) < end]
        wall += (max(done) - run["started"]) if done else 0.0
    cells: dict[tuple, list[report.Row]] = {}
    for row in parsed:
        cells.setdefault((row.kernel, row.arch, row.dtype), []).append(row)
    want: dict[tuple, int] = {}
    for kernel, arch, dtype, _, _ in expected:
        want[kernel, arch, dtype] = want.get((kernel, arch, dtype), 0) + 1
    bad = [r for r in parsed if r.problems]
    lines = [
        f"# Full ahead-of-time compile matrix (Triton {triton.__version__})",
        "",
        f"{len(parsed)} of {len(expected)} compiles (every autotune config x dtype x launcher "
        f"variant x arch of every kernel) in {wall / 3600:.2f} h of wall time on "
        f"{runs[-1]['cpus'] if runs else os.cpu_count()} shared CPU cores "
        f"({len(runs)} run(s) of `python bench/aot.py --full`, Triton's compile cache in use). "
        f"{len(bad)} rows with problems (spills, shared memory over the arch's limit, or a "
        "bf16/fp16/TF32 dot without tensor-core instructions).",
        "",
        "Per kernel, arch and dtype: the compiles done of those expected, the configs the "
        "launcher runs for that dtype, the range over every config and variant of registers, "
        "shared memory and predicted warps per SM, the rows that spill, and the tensor-core "
        "instructions in the PTX (`mma.sync` on sm_80, `wgmma.mma_async` on sm_90; the "
        "smallest count of any row). `fp32` is IEEE float32 (CUDA-core FMA dots), `fp32-tf32` "
        "float32 with TF32 dots.",
        "",
        "| kernel | arch | dtype | compiled | configs | regs | spilling rows | max spill st/ld (B) "
        "| shared KB (limit) | tensor core | warps/SM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, arch, dtype), count in want.items():
        got = cells.get((kernel, arch, dtype), [])
        if not got:
            lines.append(f"| {kernel} | {arch} | {dtype} | 0 / {count} | | | | | | | |")
            continue
        spilling = [r for r in got if r.spill_stores or r.spill_loads]
        worst = max(got, key=lambda r: r.spill_stores + r.spill_loads)
        op = report.ARCHS[arch].tensor_core_op
        tc = [r.wgmma if op.startswith("wgmma") else r.mma_sync for r in got]
        tc_cell = (
            f"{op.split('.')[0]} >= {min(tc)}"
            if min(tc)
            else ("-" if not max(tc) else f"missing in {tc.count(0)}")
        )
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {len(got)} / {count} | "
            f"{len({r.config for r in got})} | {_span([r.registers for r in got])} | "
            f"{len(spilling)} | {worst.spill_stores}/{worst.spill_loads} | "
            f"{_span([round(r.shared / 1024) for r in got])} ({got[0].shared_limit // 1024}) | "
            f"{tc_cell} | {_span([r.warps_per_sm for r in got])} |"
        )
    lines += [
        "",
        "Per config (over every variant of the launcher):",
        "",
        "| kernel | arch | dtype | config | variants | regs | spill st/ld max (B) | shared KB "
        "| tensor core | warps/SM | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    configs: dict[tuple, list[report.Row]] = {}
    for row in parsed:
        configs.setdefault((row.kernel, row.arch, row.dtype, row.config), []).append(row)
    for (kernel, arch, dtype, config), got in configs.items():
        op = report.ARCHS[arch].tensor_core_op
        tc = [r.wgmma if op.startswith("wgmma") else r.mma_sync for r in got]
        worst = max(got, key=lambda r: r.spill_stores + r.spill_loads)
        problems = sorted({p.split(" ")[0] for r in got for p in r.problems})
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {config} | {len(got)} | "
            f"{_span([r.registers for r in got])} | {worst.spill_stores}/{worst.spill_loads} | "
            f"{_span([round(r.shared / 1024) for r in got])} | "
            f"{_span(tc) if max(tc) else '-'} | {_span([r.warps_per_sm for r in got])} | "
            f"{', '.join(problems) or 'ok'} |"
        )
    spilled = [r for r in dropped if r["spill_stores"] or r["spill_loads"]]
    if spilled:
        lines += [
            "",
            "Configs taken out of the shipped lists after this matrix found them spilling, "
            f"and their spilling rows (of {dropped_compiled} rows compiled for configs no longer "
            "shipped, not counted above):",
            "",
            "| kernel | arch | dtype | variant | config | regs | spill st/ld (B) | stack |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['variant']} | {r['config']} | "
            f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['stack']} |"
            for r in spilled
        ]
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "aot_full.md", "\n".join(lines) + "\n")
    body = ",\n".join(json.dumps([r[c] for c in FULL_COLUMNS]) for r in rows)
    meta = {"triton": triton.__version__, "compiles": len(rows), "expected": len(expected),
            "wall_s": round(wall, 1), "runs": runs, "columns": list(FULL_COLUMNS),
            "dropped_compiled": dropped_compiled,
            "dropped_spilling": [{c: r[c] for c in DROPPED_COLUMNS} for r in spilled]}  # fmt: skip
    head = json.dumps(meta, indent=1)[:-2]
    write_atomic(RESULTS / "aot_full.json", head + ',\n "rows": [\n' + body + "\n ]\n}\n")


def write_before_after(workers: int | None) -> None:
    table = before_after(workers)
    write_atomic(
        RESULTS / "aot_before_after.md",
        "# masked_linear and score_accumulate: configs before and after issue 12\n\n"
        "Both config lists compiled on the current kernels (the fused-score backward included) "
        "for sm_80 and sm_90 by `python bench/aot.py --before`: *before* is the list main "
        "shipped before issue 12 (the same for every dtype), *after* the lists the launchers "
        "run now (masked_linear: one per kind of dot). Worst row over the variants "
        + "; ".join(f"`{v}`" for vs in BEFORE_AFTER_VARIANTS.values() for v in vs)
        + ". `fp32` is IEEE float32 (CUDA-core FMA dots), `fp32-tf32` TF32 dots.\n\n"
        + table,
    )
    print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=report.SUBSETS, default="heavy")
    parser.add_argument("--full", action="store_true", help="the full matrix, into --log")
    parser.add_argument("--summary", action="store_true", help="only summarize --log")
    parser.add_argument("--log", type=Path, default=FULL_LOG, help="the full matrix's row log")
    parser.add_argument("--dtypes", default=",".join(report.DTYPES))
    parser.add_argument("--kernels", default="", help="comma-separated kernel names (all)")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--before", action="store_true", help="only the before/after table")
    parser.add_argument(
        "--resources",
        action="store_true",
        help="rewrite kernels/_resources.py, the table the autotuners prune by, from these rows",
    )
    args = parser.parse_args(argv)
    wanted = {k for k in args.kernels.split(",") if k}
    modules = [m for m in report.KERNEL_MODULES if not wanted or report.kernel_name(m) in wanted]
    if args.full or args.summary:
        seeded = seed_log(args.log)
        if seeded:
            print(f"{args.log.name}: started from {seeded} rows of aot_full.json", file=sys.stderr)
        if args.full:
            run_full(modules, report.parse_dtypes(args.dtypes), args.jobs or None, args.log)
        write_full_summary(args.log)
        return 0
    if args.before:
        write_before_after(args.jobs or None)
        return 0
    archs = list(report.ARCHS)
    started = time.perf_counter()
    dtypes = report.parse_dtypes(args.dtypes)
    jobs = [job for m in modules for job in report.jobs_for(m, archs, args.subset, dtypes)]
    rows = report.run(jobs, args.jobs or None)
    elapsed = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "subset": args.subset,
        "kernels": [report.kernel_name(m) for m in modules],
        "dtypes": dtypes,
        "triton": triton.__version__,
        "compiles": len(rows),
        "wall_s": round(elapsed, 1),
        "cpus": os.cpu_count(),
        "note": "compile times on a shared 2-core machine",
    }
    if args.resources:
        write_atomic(RESOURCES, resource_table(rows))
        importlib.reload(resources_module)
    # Rows of the (kernel, dtype) pairs not compiled in this run are kept from the last one, if
    # their config is still shipped.
    kept = []
    compiled = {(row.kernel, row.dtype) for row in rows}
    if (RESULTS / "aot.json").exists():
        previous = json.loads((RESULTS / "aot.json").read_text())
        kept = [
            r
            for r in previous["rows"]
            if (r["kernel"], r["dtype"]) not in compiled
            and _shipped(r["kernel"], r["dtype"], r["config"])
        ]
        meta["runs"] = [
            *previous.get("runs", [{k: previous[k] for k in ("subset", "kernels", "wall_s")}]),
        ]
    meta.setdefault("runs", []).append(
        {k: meta[k] for k in ("subset", "kernels", "dtypes", "wall_s")}
    )
    all_rows = kept + report.as_json(rows)
    names = [f.name for f in fields(report.Row)]
    table_rows = [report.Row(**{n: r[n] for n in names if n in r}) for r in all_rows]
    # Whether the autotuner drops a row follows the table as it is now.
    modules = {report.kernel_name(m): m for m in report.KERNEL_MODULES}
    for row in table_rows:
        aot = report.spec(modules[row.kernel])
        config = next(c for c in aot.configs_for(row.dtype) if report.config_label(c) == row.config)
        row.pruned = report.pruned(modules[row.kernel], config, row.dtype, row.arch, row.split)
    all_rows = report.as_json(table_rows)
    bad = [r for r in table_rows if r.problems and not r.pruned]
    runs = "; ".join(
        f"{', '.join(run['kernels'])} ({', '.join(run.get('dtypes', report.DTYPES))}): "
        f"subset {run['subset']}, {run['wall_s']:.0f} s"
        for run in meta["runs"]
    )
    header = (
        f"# Ahead-of-time compile report (Triton {triton.__version__})\n\n"
        f"{len(table_rows)} compiles for sm_80 and sm_90 on {os.cpu_count()} shared cores "
        f"({runs}). {len(bad)} rows with problems in configs the autotuner runs; rows marked "
        "`pruned` are configs the autotuner drops for that dtype and arch "
        "(kernels/_resources.py).\n\n"
    )
    write_atomic(RESULTS / "aot.json", json.dumps({**meta, "rows": all_rows}, indent=1))
    write_atomic(RESULTS / "aot.md", header + report.markdown(table_rows) + "\n")
    print(report.text_table(rows))
    print(f"\n{len(rows)} compiles in {elapsed:.0f} s, {len(bad)} with problems", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
