"""Behaviours of the Triton backend that the shared op tests do not reach.

Strided (GPT-2 ``Conv1D``) weights, mask blocks that straddle row tiles, the score sinks (unit
``mid`` in the epilogue of the dL/dx kernel, with samples straddling row tiles), copy groups of
``ablate_expand``, and importing without Triton. Without a GPU the kernels run in Triton's
interpreter on CPU tensors, so shapes stay small.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton: its own library functions (tl.cdiv, tl.sum) are
    # jitted at import, and only interpreted-mode ones can be called from interpreted kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import canfast.kernels as kernels  # noqa: E402
from canfast.kernels._common import INTERPRET  # noqa: E402

from canfast import ops  # noqa: E402
from canfast.ops import reference  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest absolute error over the largest magnitude of the float64 truth."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def random(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every float ``torch.empty`` NaN-filled, so an element a kernel skips shows up."""
    original = torch.empty

    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        t = original(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)
    yield


@pytest.mark.skipif(not INTERPRET, reason="only the interpreter is restricted to one config")
def test_interpreter_runs_one_config_per_kernel() -> None:
    # More than one would make the autotuner benchmark every candidate through numpy.
    # import_module: the package attributes of these names are the ops, not their modules.
    from triton.runtime.autotuner import Autotuner

    for op in ("score_accumulate", "masked_linear", "ablate_expand"):
        module = importlib.import_module(f"canfast.kernels.{op}")
        # masked_linear has one autotuner per kind of dot, each with its own config list.
        tuners = [v for v in vars(module).values() if isinstance(v, Autotuner)]
        assert tuners and all(len(tuner.configs) == 1 for tuner in tuners), op


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv1d_weight_forward_and_backward(dtype: torch.dtype, poisoned_empty: None) -> None:
    rows, length, k_in, n_out = 5, 7, 40, 70
    conv_weight = random(k_in, n_out, dtype=dtype)  # GPT-2 Conv1D layout [K, N]
    weight = conv_weight.t()
    assert not weight.is_contiguous()
    bias = random(n_out, dtype=dtype)
    out_mask = (torch.rand(n_out, device=DEVICE) > 0.3).float()
    x = random(rows, length, k_in, dtype=dtype).requires_grad_(True)
    y = ops.masked_linear(x, weight, bias, out_mask, None, backend="triton")
    grad_y = random(*y.shape, dtype=dtype)
    y.backward(grad_y)

    x64 = x.detach().double().requires_grad_(True)
    y64 = ops.masked_linear(x64, weight.double(), bias.double(), out_mask.double(), backend="torch")
    y64.backward(grad_y.double())
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == y64.shape
    assert relative_error(y, y64) < tol
    assert relative_error(x.grad, x64.grad) < tol


@pytest.mark.parametrize("n_masks", [2, 3])
def test_mask_blocks_straddling_row_tiles(n_masks: int, poisoned_empty: None) -> None:
    # 6 rows x 5 positions: blocks of 15 or 10 flattened rows, not a multiple of any tile height.
    k_in, n_out = 24, 33
    x = random(6, 5, k_in).requires_grad_(True)
    weight = random(n_out, k_in)
    in_mask = (torch.rand(n_masks, k_in, device=DEVICE) > 0.4).float()
    out_mask = (torch.rand(n_masks, n_out, device=DEVICE) > 0.4).float()

    y = ops.masked_linear(x, weight, None, out_mask, in_mask, backend="triton")
    grad_y = random(*y.shape)
    y.backward(grad_y)

    x64 = x.detach().double().requires_grad_(True)
    y64 = ops.masked_linear(x64, weight.double(), None, out_mask, in_mask, backend="torch")
    y64.backward(grad_y.double())
    assert relative_error(y, y64) < 1e-5
    assert relative_error(x.grad, x64.grad) < 1e-5


def test_mask_blocks_must_divide_rows() -> None:
    with pytest.raises(ValueError, match="mask blocks"):
        ops.masked_linear(
            random(5, 8), random(4, 8), None, torch.ones(2, 4, device=DEVICE), backend="triton"
        )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_feeds_score_sink(alpha: float, dtype: torch.dtype) -> None:
    samples, length, k_in, n_out = 3, 6, 20, 36
    x = random(samples, length, k_in, dtype=dtype).requires_grad_(True)
    weight = random(n_out, k_in, dtype=dtype).requires_grad_(True)
    valid = torch.rand(samples, length, device=DEVICE) > 0.25
    out_before = random(samples, 3, n_out)
    sink = ops.ScoreSink(alpha, out_before.clone(), valid)

    y = ops.masked_linear(x, weight, None, None, None, sink, backend="triton")
    grad_y = random(*y.shape, dtype=dtype)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)

    y64 = x.detach().double() @ weight.detach().double().t()
    want = out_before.double()
    reference.score_accumulate(y64, grad_y.double(), alpha, want, valid)
    assert relative_error(sink.out, want) < TOLERANCE[dtype]
    assert relative_error(grad_x, grad_y.double() @ weight.detach().double()) < TOLERANCE[dtype]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.3])
def test_mid_score_in_backward_epilogue(alpha: float, poisoned_empty: None) -> None:
    # 5 samples x 7 positions: row tiles of 16 hold parts of up to four samples, and the
    # batched in-mask's blocks (35 / 5 rows) straddle them too.
    samples, length, k_in, n_out = 5, 7, 40, 24
    x = random(samples, length, k_in).requires_grad_(True)
    weight = random(n_out, k_in)
    in_mask = (torch.rand(5, k_in, device=DEVICE) > 0.4).float()
    valid = torch.rand(samples, length, device=DEVICE) > 0.3
    before = random(samples, 3, k_in)
    sink = ops.ScoreSink(alpha, before.clone(), valid, "mid")
    y = ops.masked_linear(x, weight, None, None, in_mask, sink, backend="triton")
    grad_y = random(*y.shape)
    y.backward(grad_y)

    dx = (grad_y.double() @ weight.double()) * in_mask.double().repeat_interleave(7, 0).reshape(
        samples, length, k_in
    )
    assert relative_error(x.grad, dx) < 1e-5
    want = before.double()
    reference.score_accumulate(x.detach().double(), dx, alpha, want, valid)
    assert relative_error(sink.out, want) < 1e-5


def test_weight_gets_no_gradient() -> None:
    x = random(4, 8).requires_grad_(True)
    weight = random(6, 8).requires_grad_(True)
    ops.masked_linear(x, weight, backend="triton").sum().backward()
    assert x.grad is not None and weight.grad is None


def test_no_graph_without_grad_and_sink_needs_one() -> None:
    x = random(4, 8).requires_grad_(True)
    weight = random(6, 8)
    with torch.no_grad():
        assert not ops.masked_linear(x, weight, backend="triton").requires_grad
        sink = ops.ScoreSink(0.5, torch.zeros(4, 3, 6, device=DEVICE))
        with pytest.raises(ValueError, match="backward"):
            ops.masked_linear(x, weight, sink=sink, backend="triton")


def test_sink_rows_must_split_into_samples() -> None:
    x = random(5, 8).requires_grad_(True)
    sink = ops.ScoreSink(0.5, torch.zeros(2, 3, 6, device=DEVICE))
    with pytest.raises(ValueError, match="samples"):
        ops.masked_linear(x, random(6, 8), sink=sink, backend="triton")


@pytest.mark.parametrize("n_copies", [1, 7, 13])
@pytest.mark.parametrize("unit", ["out", "mid"])
def test_ablate_copy_groups(n_copies: int, unit: str, poisoned_empty: None) -> None:
    # A y of one or two tiles spreads the copies over several programs, some with none left.
    y = random(3, 20)
    k_in = 12
    mid = random(3, k_in) if unit == "mid" else None
    weight = random(k_in, 20).t() if unit == "mid" else None
    size = k_in if unit == "mid" else 20
    neurons = torch.randint(-size, size, (n_copies,), device=DEVICE)
    got = ops.ablate_expand(y, neurons, mid, weight, backend="triton")
    if unit == "mid":
        want = ops.ablate_expand(
            y.double(), neurons, mid.double(), weight.double(), backend="torch"
        )
    else:
        want = ops.ablate_expand(y, neurons, backend="torch")
    assert got.shape == want.shape
    assert relative_error(got, want) < 1e-6


def test_ablate_rejects_out_of_range_neurons() -> None:
    with pytest.raises(IndexError):
        ops.ablate_expand(random(2, 8), torch.tensor([3, 8], device=DEVICE), backend="triton")
    with pytest.raises(IndexError):
        ops.ablate_expand(
            random(2, 8),
            torch.tensor([-5], device=DEVICE),
            random(2, 4),
            random(8, 4),
            backend="triton",
        )


def test_score_alpha_zero_counts_zero_gradients() -> None:
    # torch.pow(0, 0) == 1: with alpha = 0 the weighted sum is the |a| sum whatever g is.
    a = random(2, 9, 40).transpose(0, 1).contiguous().transpose(0, 1)  # strided a
    g = torch.zeros(2, 9, 40, device=DEVICE)
    out = ops.score_accumulate(a, g, 0.0, torch.zeros(2, 3, 40, device=DEVICE), backend="triton")
    assert relative_error(out[:, 0], a.double().abs().sum(1)) < 1e-6
    assert torch.equal(out[:, 0], out[:, 1])
    assert not out[:, 2].any()


def test_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    path = Path(kernels.__file__)
    spec = importlib.util.spec_from_file_location(
        "canfast_kernels_without_triton", path, submodule_search_locations=[str(path.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.AVAILABLE is False
    assert not hasattr(module, "masked_linear")
