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
    config = report.config_label(aot.configs[job.config]).replace(" ", "-")
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
            runnable = {
                c
                for c in range(len(aot.configs))
                if any(not report.pruned(aot, c, d, arch) for d in report.DTYPES)
            }
            assert {j.config for j in here} >= runnable
            # Every pair of settings some variant combines is compiled together.
            covered = set()
            for j in here:
                f = report._features(aot.variants[j.variant])
                covered |= {(a, b) for a in f for b in f if a < b}
            for v in aot.variants:
                f = report._features(v)
                assert {(a, b) for a in f for b in f if a < b} <= covered, v.name


def test_shared_memory_estimate_bounds_the_compiled_kernels(compiled):
    """The autotune pruning estimate must not undercount what the compiler allocates."""
    checked = 0
    for job, row in compiled.items():
        aot = report.spec(job.module)
        if aot.shared_bytes is None or row.pruned:
            continue
        estimate = aot.shared_bytes(aot.configs[job.config], report.ELEMENT_BYTES[job.dtype])
        assert row.shared <= estimate, report.text_table([row])
        checked += 1
    assert checked


def test_a_spilling_config_is_caught():
    """The check can fail: the config main shipped before this test (128x256x64, 3 stages,
    8 warps) spills in the fused epilogue of the batched-mask forward on sm_80."""
    module = "canfast.kernels.masked_linear"
    aot = report.spec(module)
    big = triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3
    )
    variant = [v.name for v in aot.variants].index("fwd bias in=2 out=2 stats")
    job = report.Job(module, 0, "bf16", 0, variant, "sm_80")
    (row,) = report.run([job], configs=[big])
    assert row.spill_stores > 0 and any("spills" in p for p in row.problems)


def test_prune_keeps_configs_that_fit_the_device(monkeypatch):
    from canfast.kernels.masked_linear import CUDA_CONFIGS

    x = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"), element_size=lambda: 4)
    monkeypatch.setattr(_common, "_shared_memory_limit", lambda device: 101376)  # sm_86
    kept = _common.prune_by_shared_memory(CUDA_CONFIGS, {"x_ptr": x})
    assert kept and len(kept) < len(CUDA_CONFIGS)
    assert all(_common.matmul_shared_bytes(c, 4) <= 101376 for c in kept)
    monkeypatch.setattr(_common, "_shared_memory_limit", lambda device: 1024)
    kept = _common.prune_by_shared_memory(CUDA_CONFIGS, {"x_ptr": x})
    smallest = min(_common.matmul_shared_bytes(c, 4) for c in CUDA_CONFIGS)
    assert len(kept) == 1 and _common.matmul_shared_bytes(kept[0], 4) == smallest


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
