"""GPU readiness without a GPU: the Triton kernels compiled ahead of time for A100 and H100.

The kernels are compiled for sm_80 and sm_90 with the ptxas in Triton's wheel (no CUDA, driver
or GPU), for a pairwise covering subset of the launcher variants with every autotune config and
dtype dealt in (``canfast.kernels.report``, subset ``ci``). A compiled kernel must not spill,
must fit in shared memory, and a bf16/fp16 (or TF32) ``tl.dot`` must compile to ``mma.sync`` on
sm_80 and ``wgmma`` on sm_90, which the PTX shows. ``bench/aot.py`` runs the full matrix.
"""

from __future__ import annotations

import types

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

import triton  # noqa: E402
from canfast.kernels import _common, report  # noqa: E402

ARCHS = ("sm_80", "sm_90")
JOBS = [job for module in report.KERNEL_MODULES for job in report.jobs_for(module, ARCHS, "ci")]


def _job_id(job: report.Job) -> str:
    aot = report.spec(job.module)
    label = aot.dtype_constexprs(job.dtype)[job.choice][0]
    config = report.config_label(aot.configs_for(label)[job.config]).replace(" ", "-")
    variant = aot.variants[job.variant].name.replace(" ", "-")
    return f"{report.kernel_name(job.module)}-{job.arch}-{label}-{variant}-{config}"


@pytest.fixture(scope="module")
def compiled() -> dict[report.Job, report.Row]:
    # One pool for the whole subset: the compiles are independent and each worker imports
    # torch and Triton once.
    return dict(zip(JOBS, report.run(JOBS)))


@pytest.mark.parametrize("job", JOBS, ids=_job_id)
def test_compiles_without_spills_on_tensor_cores(compiled, job):
    row = compiled[job]
    assert not row.pruned, "the CI subset compiles only configs the autotuner would run"
    assert row.problems == [], report.text_table([row])
    if row.tensor_core_required:
        op = report.ARCHS[row.arch].tensor_core_op
        assert (row.wgmma if op.startswith("wgmma") else row.mma_sync) > 0


def test_subset_covers_every_kernel_config_dtype_and_arch():
    for module in report.KERNEL_MODULES:
        aot = report.spec(module)
        jobs = [j for j in JOBS if j.module == module]
        for arch in ARCHS:
            here = [j for j in jobs if j.arch == arch]
            assert {j.dtype for j in here} == set(report.DTYPES)
            for dtype in report.DTYPES:
                for choice, (label, _) in enumerate(aot.dtype_constexprs(dtype)):
                    compiled = {j.config for j in here if (j.dtype, j.choice) == (dtype, choice)}
                    assert compiled == set(range(len(aot.configs_for(label)))), (arch, label)
            # Every pair of settings some variant combines is compiled together.
            covered = set()
            for j in here:
                f = report._features(aot.variants[j.variant])
                covered |= {(a, b) for a in f for b in f if a < b}
            for v in aot.variants:
                f = report._features(v)
                assert {(a, b) for a in f for b in f if a < b} <= covered, v.name


def test_resource_table_bounds_every_compiled_variant(compiled):
    """The table the autotuners prune by is built from the heavy variants only; no variant of
    the CI subset may need more shared memory or spill where the table says it does not."""
    from canfast.kernels._resources import RESOURCES

    for job, row in compiled.items():
        entry = RESOURCES[row.kernel].get((row.arch, row.dtype, row.config, row.split))
        assert entry is not None, f"{_job_id(job)} missing from kernels/_resources.py"
        shared, spilled = entry
        assert row.shared <= shared, _job_id(job)
        assert spilled or not (row.spill_stores or row.spill_loads), _job_id(job)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("module", report.KERNEL_MODULES)
def test_every_shipped_config_is_clean_by_construction(module, arch):
    """No config list ships a config that spills or overflows shared memory on A100 or H100:
    for every dtype (IEEE float32 and TF32 included), every part of the table and both archs,
    the compiled-resource table keeps the whole list, so the autotuner's pruning is only a
    safety net (for GPUs with less shared memory, such as sm_86). A config missing from the
    table would be kept unchecked, so each must be in it."""
    from canfast.kernels._resources import RESOURCES

    aot = report.spec(module)
    table = RESOURCES[report.kernel_name(module)]
    for dtype in report.DTYPES:
        for label, _ in aot.dtype_constexprs(dtype):
            configs = aot.configs_for(label)
            # IEEE float32 keeps two (see IEEE_CONFIGS in kernels/masked_linear.py).
            assert len(configs) >= 2, f"{label}: too few configs to tune over"
            for part in {report.split_of(aot, v) for v in aot.variants}:
                for config in configs:
                    key = (arch, label, report.config_label(config), part)
                    assert key in table, f"{key} missing from kernels/_resources.py"
                    assert not report.pruned(module, config, label, arch, part), key


def test_a_spilling_config_is_caught():
    """The check can fail: a config main shipped before this test (128x256x64, 3 stages,
    8 warps) spills in the epilogue of the batched-mask forward on sm_80."""
    module = "canfast.kernels.masked_linear"
    aot = report.spec(module)
    big = triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "SCORE_N": 16},
        num_warps=8,
        num_stages=3,
    )
    variant = [v.name for v in aot.variants].index("fwd bias in=2 out=2")
    job = report.Job(module, 0, "bf16", 0, variant, "sm_80")
    (row,) = report.run([job], configs=[big])
    assert row.spill_stores > 0 and any("spills" in p for p in row.problems)


def test_prune_by_resources_follows_the_table_and_the_device(monkeypatch):
    import torch
    from canfast.kernels import _resources
    from canfast.kernels.masked_linear import IEEE_CONFIGS, TF32_CONFIGS

    table = _resources.RESOURCES["masked_linear"]
    prune = _common.prune_by_resources("masked_linear", "x_ptr", "SCORE")
    x = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), dtype=torch.float32)
    monkeypatch.setattr(_common, "_arch", lambda device: "sm_80")
    for limit in (166912, 101376):  # A100, and consumer Ampere (sm_86)
        monkeypatch.setattr(_common, "_shared_memory_limit", lambda device, limit=limit: limit)
        for precision, configs in (("ieee", IEEE_CONFIGS), ("tf32", TF32_CONFIGS)):
            dtype = "fp32" if precision == "ieee" else "fp32-tf32"
            kept = prune(configs, {"x_ptr": x}, DOT_PRECISION=precision, SCORE=False)
            expected = [
                c
                for c in configs
                if not table[("sm_80", dtype, _common.config_label(c), "False")][1]
                and table[("sm_80", dtype, _common.config_label(c), "False")][0] <= limit
            ]
            assert kept == (expected or kept[:1]) and kept
    # A100: every shipped config fits; a config the table marks as spilling is dropped.
    monkeypatch.setattr(_common, "_shared_memory_limit", lambda device: 166912)
    assert prune(IEEE_CONFIGS, {"x_ptr": x}, DOT_PRECISION="ieee", SCORE=True) == IEEE_CONFIGS
    key = ("sm_80", "fp32", _common.config_label(IEEE_CONFIGS[0]), "True")
    monkeypatch.setitem(table, key, (table[key][0], True))
    kept = prune(IEEE_CONFIGS, {"x_ptr": x}, DOT_PRECISION="ieee", SCORE=True)
    assert kept == IEEE_CONFIGS[1:]
    # A generation without a table keeps every config; CPU tensors are not pruned.
    monkeypatch.setattr(_common, "_arch", lambda device: None)
    assert prune(IEEE_CONFIGS, {"x_ptr": x}, DOT_PRECISION="ieee") == IEEE_CONFIGS


def test_ptxas_log_and_occupancy():
    log = (
        "ptxas info    : Function properties for k\n"
        "    152 bytes stack frame, 152 bytes spill stores, 184 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 152 bytes cumulative stack size\n"
    )
    assert report._parse_ptxas(log) == (255, 152, 184, 152)
    # 255 registers: 8,192 per warp, so 8 warps fill the 65,536-register file.
    assert report.warps_per_sm("sm_80", 255, 0, 8) == 8
    # 64 registers, 4 warps, 48 KB of shared memory: shared memory allows 3 programs on A100.
    assert report.warps_per_sm("sm_80", 64, 48 * 1024, 4) == 12
    assert report.warps_per_sm("sm_90", 32, 0, 4) == 64
    assert report.warps_per_sm("sm_80", 32, 200 * 1024, 4) == 0


def test_cli_rejects_an_unknown_arch(capsys):
    assert report.main(["--arch", "sm_70"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sm_70" in err
