"""Every op of :mod:`canfast.ops`, on every backend, against float64 computations of its formula.

Backends: ``torch`` (the reference itself), ``cpp`` once per instruction set this CPU runs
(scalar, AVX2, AVX-512: each is its own code path), and ``triton`` in the interpreter
(``TRITON_INTERPRET=1`` from conftest.py) on small shapes, because the interpreter is slow.

Inputs are fresh random values rounded to the dtype under test; the truth is computed in float64
from those rounded values. Outputs that ops add into (score sums, score sinks of both units) are
pre-filled with random values and the increment is checked; ``_C``'s kernels are also run on
NaN-filled outputs to show they write every element. Errors are relative to the largest
magnitude of the truth; ``TOL`` gives the bound per dtype. ``masked_linear`` also runs under
``torch.compile`` (its custom ops and fake implementations), on CPU with the ``aot_eager``
backend, which needs no C compiler.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from canfast import ops

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
# The score is summed in fp32 whatever the input dtype, and bf16 / fp16 inputs are exact in
# fp32, so its sums must reach fp32 accuracy for every dtype: a 16-bit accumulator fails here.
SUM_TOL = 2e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

BACKENDS = ["torch", "cpp:scalar", "cpp:avx2", "cpp:avx512", "triton"]
FAST_BACKENDS = ["cpp:scalar", "cpp:avx2", "cpp:avx512", "triton"]


def _cases(backends: list[str], shapes: list[tuple], triton_shapes: list[tuple]) -> list:
    """(backend, shape) pairs; triton, slow in the interpreter, gets ``triton_shapes`` only."""
    return [
        pytest.param(backend, shape, id=f"{backend}-{shape}")
        for backend in backends
        for shape in (triton_shapes if backend == "triton" else shapes)
    ]


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The backend name for canfast.ops; for ``cpp:<isa>`` the kernels run with that ISA."""
    name = request.param
    if name == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if not name.startswith("cpp:"):
        yield name
        return
    # No skip when _C is missing: a broken build must fail these tests, not hide from them.
    from canfast import _C

    isa = name.split(":", 1)[1]
    if isa not in _C.supported_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    _C.set_isa(isa)
    try:
        yield "cpp"
    finally:
        _C.set_isa("auto")


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; inf when actual is not finite."""
    actual = actual.detach().double()
    if not torch.isfinite(actual).all():
        return float("inf")
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual: Tensor, expected: Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.0e}"


def assert_increment(after: Tensor, before: Tensor, want: Tensor, tol: float, what: str) -> None:
    """``after - before`` matches ``want`` for an fp32 accumulator pre-filled with ``before``.

    Adding into fp32 rounds at the scale of the accumulator, not of the increment, so the bound
    is ``tol`` relative to the increment plus one fp32 rounding of the largest value involved.
    """
    assert after.shape == want.shape, f"{what}: shape {after.shape} != {want.shape}"
    after64, before64 = after.double(), before.double()
    assert torch.isfinite(after64).all(), f"{what}: not finite"
    err = (after64 - before64 - want).abs().max().item()
    scale = want.abs().max().item()
    rounding = 2.0**-23 * max(before64.abs().max().item(), after64.abs().max().item())
    assert err <= tol * scale + rounding, f"{what}: error {err:.3g}, increment scale {scale:.3g}"


def randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def block_rows(mask: Tensor, rows: int) -> Tensor:
    """A [C] or [M, C] mask as [rows, C]: row r gets block r // (rows / M)."""
    if mask.dim() == 1:
        return mask.expand(rows, -1)
    return mask.repeat_interleave(rows // mask.shape[0], dim=0)


# ----------------------------------------------------------------------------------------------
# score_accumulate


def score_truth(a: Tensor, g: Tensor, alpha: float, valid: Tensor | None) -> Tensor:
    a64, g64 = a.double().abs(), g.double().abs()
    weighted = g64.pow(alpha) * a64  # float64 pow(0, 0) = 1, as the contract says
    stacked = torch.stack([weighted, a64, g64], dim=1)  # [B, 3, T, C]
    if valid is not None:
        stacked = torch.where(valid[:, None, :, None], stacked, 0.0)
    return stacked.sum(dim=2)


SCORE_SHAPES = [
    (1, 1, 1),
    (2, 3, 5),
    (3, 40, 1),
    (3, 17, 33),
    (2, 9, 130),
    (1, 1, 1000),
    (4, 65, 257),
    (2, 300, 1100),  # more rows than one flush block, more channels than one chunk
]
TRITON_SCORE_SHAPES = [(1, 1, 1), (3, 17, 33)]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.37])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize(
    ("backend", "shape"), _cases(BACKENDS, SCORE_SHAPES, TRITON_SCORE_SHAPES), indirect=["backend"]
)
@pytest.mark.parametrize("with_valid", [False, True], ids=["all", "valid"])
def test_score_accumulate(backend, shape, dtype, alpha, with_valid) -> None:
    batch, steps, channels = shape
    a = randn(*shape, dtype=dtype)
    g = randn(*shape, dtype=dtype, scale=1e-2)
    g.view(-1)[:: max(1, g.numel() // 7)] = 0  # exact zeros: 0**alpha is 0, or 1 at alpha 0
    valid = torch.rand(batch, steps) > 0.3 if with_valid else None
    if valid is not None:
        valid[-1] = False  # a sample with no valid row adds nothing
        # Padding content must never reach the sums, however poisonous.
        a = torch.where(valid[..., None], a, torch.tensor(float("nan"), dtype=dtype))
        g = torch.where(valid[..., None], g, torch.tensor(float("inf"), dtype=dtype))
    before = torch.randn(batch, 3, channels)
    out = before.clone()
    returned = ops.score_accumulate(a, g, alpha, out, valid, backend=backend)
    assert returned is out
    assert_increment(out, before, score_truth(a, g, alpha, valid), SUM_TOL, "sums")


@pytest.mark.parametrize("alpha", [1e-3, 0.3, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_score_power_elementwise(backend, dtype, alpha) -> None:
    """One row, |a| = 1: each weighted sum is |g|**alpha alone, checked element by element over
    the whole exponent range of the dtype (subnormals included), zero and infinity."""
    info = torch.finfo(dtype)
    low = torch.log2(torch.tensor(info.smallest_normal)).item() - 8  # into the subnormals
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET"):
        # Triton's interpreter widens bf16 subnormals wrongly (a bare load + .to(float32)
        # returns 0 for 9.2e-41), so only normal bf16 inputs say anything about the kernel there.
        low = torch.log2(torch.tensor(info.smallest_normal)).item()
    high = torch.log2(torch.tensor(info.max)).item() - 1
    g = (2.0 ** torch.linspace(low, high, 197, dtype=torch.float64)).to(dtype)
    g = torch.cat([g, torch.tensor([0.0, float("inf")], dtype=dtype)])
    g = g * torch.where(torch.rand(g.shape) > 0.5, 1, -1).to(dtype)
    a = torch.ones_like(g)
    out = torch.zeros(1, 3, g.numel())
    ops.score_accumulate(a.view(1, 1, -1), g.view(1, 1, -1), alpha, out, backend=backend)
    want = g.double().abs().pow(alpha)
    got = out[0, 0].double()
    # The sums are fp32: results below its smallest normal keep fewer bits, so those may also be
    # off by a couple of its subnormal spacings (2**-149).
    finite = torch.isfinite(want)
    bound = SUM_TOL * want[finite] + 2.0**-148
    worst = ((got[finite] - want[finite]).abs() / bound).max().item()
    assert worst <= 1.0, f"|g|**{alpha}: error {worst:.3g} x the bound (relative {SUM_TOL})"
    assert got[want == 0].eq(0).all(), "0**alpha must be 0 for alpha > 0"
    assert torch.isinf(got[torch.isinf(want)]).all(), "inf**alpha must be inf"


@pytest.mark.parametrize("backend", FAST_BACKENDS, indirect=True)
def test_score_strided_inputs(backend) -> None:
    """Slices along time and channels, an expanded gradient, a transposed one, a strided out."""
    a = randn(3, 20, 70)[:, ::2, 3:40]  # strided rows, offset channels
    grads = {
        "time-strided": randn(3, 20, 37, scale=1e-2)[:, ::2],
        "expanded": randn(3, 1, 37).expand(3, 10, 37),  # stride 0 along time
        "transposed": randn(3, 37, 10).transpose(1, 2),  # channels not unit-stride
    }
    for name, grad in grads.items():
        out = torch.zeros(3, 3, 37)
        ops.score_accumulate(a, grad, 0.5, out, backend=backend)
        assert_close(out, score_truth(a, grad, 0.5, None), SUM_TOL, name)
    out_t = torch.zeros(3, 37, 3).transpose(1, 2)
    ops.score_accumulate(a, grads["time-strided"], 1.0, out_t, backend=backend)
    assert_close(out_t, score_truth(a, grads["time-strided"], 1.0, None), SUM_TOL, "strided out")


# ----------------------------------------------------------------------------------------------
# masked_linear

# (leading shape of x, K, N, mask blocks M or None for [C] masks)
LINEAR_SHAPES = [
    ((1,), 1, 1, None),
    ((5,), 7, 3, None),
    ((4, 3), 33, 17, 2),
    ((6,), 130, 65, 3),
    ((2, 5), 64, 31, 1),
    ((1, 1), 300, 257, 1),
    ((9, 2), 37, 1, 3),
    ((3, 100), 70, 1030, 3),  # several row blocks and channel chunks in the epilogue
]
TRITON_LINEAR_SHAPES = [((1,), 1, 1, None), ((4, 3), 33, 17, 2)]


def _mask(blocks: int | None, channels: int) -> Tensor:
    shape = (channels,) if blocks is None else (blocks, channels)
    return (torch.rand(shape) > 0.3).float()


def linear_truth(
    x: Tensor, w: Tensor, b: Tensor | None, om: Tensor | None, im: Tensor | None
) -> Tensor:
    rows = x.shape[:-1].numel()
    x64 = x.double().reshape(rows, -1)
    if im is not None:
        x64 = x64 * block_rows(im.to(x.dtype).double(), rows)
    y = x64 @ w.double().t()
    if b is not None:
        y = y + b.double()
    if om is not None:
        y = y * block_rows(om.to(x.dtype).double(), rows)
    return y.reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("masks", ["none", "out", "in", "both"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize(
    ("backend", "shape"),
    _cases(BACKENDS, LINEAR_SHAPES, TRITON_LINEAR_SHAPES),
    indirect=["backend"],
)
def test_masked_linear(backend, shape, dtype, masks, with_bias) -> None:
    lead, k, n, blocks = shape
    x = randn(*lead, k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if with_bias else None
    om = _mask(blocks, n) if masks in ("out", "both") else None
    im = _mask(blocks, k) if masks in ("in", "both") else None
    y = ops.masked_linear(x, w, b, om, im, backend=backend)
    want = linear_truth(x, w, b, om, im)
    assert y.dtype == dtype
    assert_close(y, want, TOL[dtype], "y")
    if om is not None:
        off = block_rows(om, x.shape[:-1].numel()).reshape(want.shape) == 0
        assert y[off].eq(0).all(), "masked output channels must be exactly zero"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_masked_linear_conv1d_weight(backend, dtype) -> None:
    """GPT-2 Conv1D keeps [K, N]; callers pass weight.t(), a non-contiguous [N, K] view."""
    x = randn(6, 2, 40, dtype=dtype)
    w_kn = randn(40, 24, dtype=dtype, scale=0.2)
    om, im = _mask(2, 24), _mask(None, 40)
    y = ops.masked_linear(x, w_kn.t(), None, om, im, backend=backend)
    assert_close(y, linear_truth(x, w_kn.t(), None, om, im), TOL[dtype], "conv1d y")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_masked_linear_backward(backend, dtype, transposed) -> None:
    """dL/dx = ((dL/dy * out_mask) @ W) * in_mask; no gradient reaches the weights."""
    x = randn(4, 3, 45, dtype=dtype).requires_grad_()
    w = randn(29, 45, dtype=dtype, scale=0.15)
    if transposed:
        w = w.t().contiguous().t()
    w.requires_grad_()
    b = randn(29, dtype=dtype)
    om, im = _mask(2, 29), _mask(4, 45)
    y = ops.masked_linear(x, w, b, om, im, backend=backend)
    grad_y = randn(*y.shape, dtype=dtype)
    y.backward(grad_y)
    rows = 12
    want = (grad_y.double().reshape(rows, -1) * block_rows(om.double(), rows)) @ w.double()
    want = (want * block_rows(im.double(), rows)).reshape(x.shape)
    assert_close(x.grad, want, TOL[dtype], "dx")
    assert w.grad is None, "the weights are frozen: masked_linear gives dL/dx only"


@pytest.mark.parametrize("backend", ["cpp:avx2", "triton"], indirect=True)
def test_masked_linear_second_derivative_raises(backend) -> None:
    """backward(create_graph=True) still gives dL/dx, and a use of the second derivative (which
    the kernels cannot give) raises instead of answering wrongly."""
    x = randn(4, 3, 45, dtype=torch.float32).requires_grad_()
    w = randn(29, 45, dtype=torch.float32, scale=0.15)
    om = torch.ones(29)
    om[3] = 0  # a mask: cpp runs its own kernels only where one is in force
    y = ops.masked_linear(x, w, out_mask=om, backend=backend)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    want = (2 * y.detach().double().reshape(12, -1)) @ w.double()
    assert_close(dx.detach(), want.reshape(x.shape), TOL[torch.float32], "dx")
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "cpp:avx2"], indirect=True)
def test_unmasked_call_is_torch_product(backend) -> None:
    """Without masks, a backend whose products are torch's runs a tracked call as torch's own
    product: no Python autograd node, the weights get no gradient, and second derivatives are
    torch's (here: exact, where the kernels' own backward refuses them)."""
    x = randn(4, 3, 45).requires_grad_()
    w = randn(29, 45, scale=0.15).requires_grad_()
    y = ops.masked_linear(x, w, backend=backend)
    assert "MaskedLinear" not in _graph_names(y.grad_fn)
    (dx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    (ddx,) = torch.autograd.grad(dx.sum(), x)
    xr = x.detach().clone().requires_grad_()
    (dxr,) = torch.autograd.grad((xr @ w.detach().t()).pow(2).sum(), xr, create_graph=True)
    (ddxr,) = torch.autograd.grad(dxr.sum(), xr)
    assert torch.equal(dx, dxr) and torch.equal(ddx, ddxr)
    ops.masked_linear(x, w, backend=backend).sum().backward()
    assert w.grad is None and x.grad is not None


def _graph_names(node) -> str:
    """The class names of every node of an autograd graph, joined."""
    seen, names, stack = set(), [], [node]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return " ".join(names)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_masked_linear_score_sink(backend, dtype, alpha, unit) -> None:
    """The backward adds the CAN score to the sink while it computes dL/dx: of (y, dL/dy) for
    unit out, of (x, dL/dx) for unit mid, with padding rows left out and masks in force."""
    samples, steps, k, n = 3, 5, 24, 19
    x = randn(samples, steps, k, dtype=dtype).requires_grad_()
    w = randn(n, k, dtype=dtype, scale=0.2)
    om, im = _mask(None, n), _mask(3, k)
    valid = torch.rand(samples, steps) > 0.25
    channels = n if unit == "out" else k
    before = torch.randn(samples, 3, channels)
    sink = ops.ScoreSink(alpha, before.clone(), valid, unit)
    y = ops.masked_linear(x, w, None, om, im, sink, backend=backend)
    grad_y = randn(*y.shape, dtype=dtype, scale=1e-2)
    y.backward(grad_y)
    rows = samples * steps
    want_dx = (grad_y.double().reshape(rows, n) * om.double()) @ w.double()
    want_dx = (want_dx * block_rows(im.double(), rows)).reshape(x.shape)
    assert_close(x.grad, want_dx, TOL[dtype], "dx with sink")
    if unit == "out":
        want = score_truth(y.detach(), grad_y, alpha, valid)
    else:
        # The gradient the score reads is dL/dx as computed, rounded to the input's dtype.
        want = score_truth(x.detach(), x.grad, alpha, valid)
    assert_increment(sink.out, before, want, SUM_TOL, "sink sums")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_unmasked_score_sink(backend, dtype, unit, bias) -> None:
    """Without masks (on cpp and torch: torch's own product, its sink fed from a hook on the
    product's backward node) the sink gets the same sums, with padding rows left out; it holds
    its activation until the backward has fed it, and a retained graph cannot feed it twice."""
    samples, steps, k, n = 3, 5, 24, 19
    x = randn(samples, steps, k, dtype=dtype).requires_grad_()
    w = randn(n, k, dtype=dtype, scale=0.2)
    b = randn(n, dtype=dtype) if bias else None
    valid = torch.rand(samples, steps) > 0.25
    channels = n if unit == "out" else k
    sink = ops.ScoreSink(0.5, torch.zeros(samples, 3, channels), valid, unit)
    y = ops.masked_linear(x, w, b, sink=sink, backend=backend)
    kept = y if unit == "out" else x
    assert torch.equal(sink.pending.reshape(-1, channels), kept.detach().reshape(-1, channels))
    grad_y = randn(*y.shape, dtype=dtype, scale=1e-2)
    y.backward(grad_y, retain_graph=True)
    assert sink.pending is None
    want_dx = (grad_y.double().reshape(-1, n) @ w.double()).reshape(x.shape)
    assert_close(x.grad, want_dx, TOL[dtype], "dx")
    g = grad_y if unit == "out" else x.grad
    want = score_truth(kept.detach(), g, 0.5, valid)
    assert_increment(sink.out, torch.zeros_like(sink.out), want, SUM_TOL, "sink sums")
    with pytest.raises(RuntimeError, match="fed it already"):
        y.backward(grad_y)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_score_sink_with_untracked_input(backend, unit, masked) -> None:
    """The first site on a path sees an x that needs no gradient: the call still starts a graph
    that feeds its sink, x gets no gradient, and without masks on cpp and torch no Python node
    is made and (unit out) no dL/dx is computed: the graph ends at the call's own output."""
    samples, steps, k, n = 3, 5, 24, 19
    x = randn(samples, steps, k)
    w = randn(n, k, scale=0.2)
    im = _mask(3, k) if masked else None
    valid = torch.rand(samples, steps) > 0.25
    channels = n if unit == "out" else k
    sink = ops.ScoreSink(0.5, torch.zeros(samples, 3, channels), valid, unit)
    y = ops.masked_linear(x, w, None, None, im, sink, backend=backend)
    assert y.requires_grad and sink.pending is not None
    if not masked and backend in ("torch", "cpp:avx2"):
        names = _graph_names(y.grad_fn)
        assert "MaskedLinear" not in names
        if unit == "out":
            assert "Mm" not in names, names
    grad_y = randn(*y.shape, scale=1e-2)
    y.backward(grad_y)
    assert sink.pending is None and x.grad is None
    xm = x if im is None else x * block_rows(im, samples * steps).reshape(x.shape)
    if unit == "out":
        want = score_truth((xm.reshape(-1, k) @ w.t()).reshape(y.shape), grad_y, 0.5, valid)
    else:
        dx = grad_y.double().reshape(-1, n) @ w.double()
        if im is not None:
            dx = dx * block_rows(im.double(), samples * steps)
        want = score_truth(x.detach(), dx.reshape(x.shape).float(), 0.5, valid)
    assert_increment(sink.out, torch.zeros_like(sink.out), want, SUM_TOL, "sink sums")


@pytest.mark.parametrize("layout", ["rows", "contiguous", "strided", "4d"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", ["torch", "cpp:avx2"], indirect=True)
def test_unmasked_tracked_call_is_the_backends_product(backend, unit, dtype, bias, layout) -> None:
    """An unmasked call that autograd tracks runs as torch's own product (in x's shape where
    torch's linear is the product of the rows): its output and dL/dx are, bit for bit, the
    backend's own masked_linear and its backward on the flattened rows."""
    k, n = 40, 24
    base = randn(4, 6, k, dtype=dtype)
    x = {
        "rows": base.reshape(24, k),
        "contiguous": base,
        "strided": base.transpose(0, 1),
        "4d": base.reshape(2, 2, 6, k),
    }[layout]
    assert x.is_contiguous() == (layout != "strided")
    w = randn(n, k, dtype=dtype, scale=0.2)
    b = randn(n, dtype=dtype) if bias else None
    grad_y = randn(*x.shape[:-1], n, dtype=dtype)

    rows = x.reshape(-1, k).clone().requires_grad_()
    want = _masked_linear_function(rows, w, b, backend)
    want.backward(grad_y.reshape(-1, n))

    tracked = x.clone().requires_grad_()
    samples = x.shape[0]
    channels = n if unit == "out" else k
    for sink in (None, ops.ScoreSink(0.5, torch.zeros(samples, 3, channels), None, unit)):
        tracked.grad = None
        y = ops.masked_linear(tracked, w, b, sink=sink, backend=backend)
        assert "MaskedLinear" not in _graph_names(y.grad_fn)
        assert y.shape == (*x.shape[:-1], n)
        assert torch.equal(y.detach().reshape(-1, n), want.detach())
        y.backward(grad_y)
        assert torch.equal(tracked.grad.reshape(-1, k), rows.grad)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", ["torch", "cpp:avx2", "triton"], indirect=True)
def test_feed_is_the_checked_call(backend, unit, masked) -> None:
    """LinearPlan.feed, the call of a route whose sinks canfast made, gives what the checked
    call gives: the same output, dL/dx and sums, bit for bit; unchecked only where it runs as
    torch's product, so a sink that does not fit x is still refused on any other path."""
    samples, steps, k, n = 3, 5, 24, 19
    w, b = randn(n, k, scale=0.2), randn(n)
    om = _mask(None, n) if masked else None
    plan = ops.LinearPlan.of(w, b, om, backend=backend)
    valid = torch.rand(samples, steps) > 0.25
    channels = n if unit == "out" else k
    x = randn(samples, steps, k)
    grad_y = randn(samples, steps, n, scale=1e-2)
    got = []
    for call in (plan, plan.feed):
        tracked = x.clone().requires_grad_()
        sink = ops.ScoreSink(0.5, torch.zeros(samples, 3, channels), valid, unit)
        y = call(tracked, sink)
        y.backward(grad_y)
        got.append((y.detach(), tracked.grad, sink.out))
    for checked, fed in zip(*got, strict=True):
        assert torch.equal(checked, fed)
    misfit = ops.ScoreSink(0.5, torch.zeros(samples, 3, channels + 1), valid, unit)
    if plan.by_torch:
        return
    with pytest.raises(ValueError, match="sink.out"):
        plan.feed(x.clone().requires_grad_(), misfit)


def _masked_linear_function(x: Tensor, w: Tensor, b: Tensor | None, backend: str) -> Tensor:
    """The backend's own kernels for an unmasked call, through the op's autograd Function (an
    all-ones mask keeps the contract from running it as torch's product)."""
    ones = torch.ones(w.shape[0], dtype=x.dtype)
    y = ops.masked_linear(x, w, b, out_mask=ones, backend=backend)
    assert "MaskedLinear" in _graph_names(y.grad_fn)
    return y


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", ["torch", "cpp:avx2"], indirect=True)
def test_score_sink_under_autocast(backend, unit, masked) -> None:
    """Under CPU autocast the product runs in bfloat16 while x stays float32: each score still
    reads an activation and a gradient of one dtype (the kernels read raw memory by dtype)."""
    x = randn(2, 4, 8).requires_grad_()
    w = randn(6, 8, scale=0.3)
    om = torch.ones(6)
    if masked:
        om[1] = 0
    sink = ops.ScoreSink(1.0, torch.zeros(2, 3, 6 if unit == "out" else 8), None, unit)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.masked_linear(x, w, out_mask=om if masked else None, sink=sink, backend=backend)
    grad_y = randn(*y.shape, dtype=y.dtype)
    y.backward(grad_y)
    if unit == "out":
        want = score_truth(y.detach(), grad_y, 1.0, None)
    else:
        want = score_truth(x.detach(), x.grad, 1.0, None)
    assert_close(sink.out, want, TOL[torch.bfloat16], "sums under autocast")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", ["torch", "cpp:avx2"], indirect=True)
def test_score_sink_edge_cases(backend, unit, masked) -> None:
    """The same on both ways a call runs (torch's product, or the kernels' Function where a
    mask is in force): one sink fed by two calls gets both scores; a call whose output the loss
    never uses stays pending; create_graph leaves the sums out of the graph; a zero-row call."""
    x = randn(2, 4, 8).requires_grad_()
    w = randn(6, 8, scale=0.3)
    om = torch.ones(6)
    if masked:
        om[1] = 0
    channels = 6 if unit == "out" else 8

    def call(x, sink):
        return ops.masked_linear(x, w, out_mask=om if masked else None, sink=sink, backend=backend)

    shared = ops.ScoreSink(0.5, torch.zeros(2, 3, channels), None, unit)
    y1, y2 = call(x, shared), call(2 * x, shared)
    loss = y1.square().sum() + y2.sum()
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    assert shared.pending is None and not shared.out.requires_grad
    g1 = 2 * y1.detach()
    g2 = torch.ones_like(g1)
    if unit == "out":
        want = score_truth(y1.detach(), g1, 0.5, None) + score_truth(y2.detach(), g2, 0.5, None)
    else:
        keep = om if masked else torch.ones(6)
        want = score_truth(x.detach(), (g1 * keep) @ w, 0.5, None)
        want += score_truth(2 * x.detach(), (g2 * keep) @ w, 0.5, None)
    assert_close(shared.out, want, SUM_TOL, "two calls, one sink")

    unused = ops.ScoreSink(0.5, torch.zeros(2, 3, channels), None, unit)
    used = ops.ScoreSink(0.5, torch.zeros(2, 3, channels), None, unit)
    call(x, unused)
    call(x, used).sum().backward()
    assert unused.pending is not None and not unused.out.any()
    assert used.pending is None and used.out.any()

    empty = ops.ScoreSink(0.5, torch.zeros(2, 3, channels), None, unit)
    call(randn(2, 0, 8).requires_grad_(), empty).sum().backward()
    assert empty.pending is None and not empty.out.any()


@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize("backend", ["torch", "cpp:avx2", "triton"], indirect=True)
def test_score_sink_on_an_input_without_grad(backend, unit) -> None:
    """The first layer's input needs no gradient; the sink is still fed, and x gets none."""
    x, w = randn(2, 4, 8), randn(6, 8)
    out = torch.zeros(2, 3, 6 if unit == "out" else 8)
    y = ops.masked_linear(x, w, sink=ops.ScoreSink(1.0, out, None, unit), backend=backend)
    y.sum().backward()
    grad = torch.ones(2, 4, 6) if unit == "out" else torch.ones(2, 4, 6) @ w
    a = y.detach() if unit == "out" else x
    assert_close(out, score_truth(a, grad, 1.0, None), SUM_TOL, "sums")
    assert x.grad is None


def test_score_sink_needs_a_backward() -> None:
    x, w = randn(2, 4, 8), randn(6, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="backward"):
        ops.masked_linear(x, w, sink=ops.ScoreSink(0.5, torch.zeros(2, 3, 6)))
    for sink in (
        ops.ScoreSink(0.5, torch.zeros(3, 3, 6)),  # 8 rows do not split into 3 samples
        ops.ScoreSink(0.5, torch.zeros(2, 3, 5)),
        ops.ScoreSink(1.5, torch.zeros(2, 3, 6)),
        ops.ScoreSink(0.5, torch.zeros(2, 3, 6), unit="in"),
        ops.ScoreSink(0.5, torch.zeros(2, 3, 6), torch.ones(2, 3, dtype=torch.bool)),
    ):
        with pytest.raises(ValueError):
            ops.masked_linear(x.requires_grad_(), w, sink=sink)


@pytest.mark.parametrize("backend", ["torch", "cpp:avx2"], indirect=True)
def test_masked_linear_under_torch_compile(backend) -> None:
    """The custom ops and their fake implementations trace: the compiled function gives the
    eager values, forward and backward, with a sink."""
    x = randn(2, 5, 12).requires_grad_()
    w, b = randn(7, 12), randn(7)
    om, im = _mask(2, 7), _mask(None, 12)

    def step(x: Tensor, out: Tensor) -> Tensor:
        sink = ops.ScoreSink(0.5, out, None, "out")
        return ops.masked_linear(x, w, b, om, im, sink, backend=backend).square().sum()

    eager_out, compiled_out = torch.zeros(2, 3, 7), torch.zeros(2, 3, 7)
    step(x, eager_out).backward()
    eager_dx, x.grad = x.grad, None
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(x, compiled_out).backward()
    assert_close(x.grad, eager_dx.double(), TOL[torch.float32], "compiled dx")
    assert_close(compiled_out, eager_out.double(), SUM_TOL, "compiled sink")


# ----------------------------------------------------------------------------------------------
# ablate_expand

# (leading shape of y, N, K, number of neurons)
ABLATE_SHAPES = [
    ((1,), 1, 1, 1),
    ((3,), 5, 7, 2),
    ((2, 4), 33, 20, 5),
    ((1, 1), 130, 65, 3),
    ((3, 7), 64, 129, 0),
]
TRITON_ABLATE_SHAPES = [((1,), 1, 1, 1), ((2, 4), 33, 20, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("unit", ["out", "mid"])
@pytest.mark.parametrize(
    ("backend", "shape"),
    _cases(BACKENDS, ABLATE_SHAPES, TRITON_ABLATE_SHAPES),
    indirect=["backend"],
)
def test_ablate_expand(backend, shape, dtype, unit) -> None:
    lead, n_out, n_mid, count = shape
    y = randn(*lead, n_out, dtype=dtype)
    limit = n_out if unit == "out" else n_mid
    neurons = torch.randint(-limit, limit, (count,))
    if unit == "out":
        got = ops.ablate_expand(y, neurons, backend=backend)
        want = y.unsqueeze(0).repeat(count, *([1] * y.dim()))
        for i, j in enumerate(neurons.tolist()):
            want[i, ..., j] = 0
        # Zeroing is a copy: it must be exact, bit for bit.
        assert got.shape == want.shape and torch.equal(got, want)
        return
    mid = randn(*lead, n_mid, dtype=dtype)
    w = randn(n_out, n_mid, dtype=dtype)
    got = ops.ablate_expand(y, neurons, mid, w, backend=backend)
    want = (
        torch.stack(
            [y.double() - mid.double()[..., j, None] * w.double()[:, j] for j in neurons.tolist()]
        )
        if count
        else torch.empty(0, *y.shape, dtype=torch.float64)
    )
    assert got.dtype == dtype
    if count:
        assert_close(got, want, TOL[dtype], "ablate mid")
    else:
        assert got.shape == want.shape


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_ablate_expand_conv1d_weight(backend) -> None:
    y, mid = randn(2, 3, 16), randn(2, 3, 40)
    w_kn = randn(40, 16)
    neurons = torch.tensor([0, 39, 7])
    got = ops.ablate_expand(y, neurons, mid, w_kn.t(), backend=backend)
    want = torch.stack(
        [y.double() - mid.double()[..., j, None] * w_kn.double()[j] for j in (0, 39, 7)]
    )
    assert_close(got, want, TOL[torch.float32], "ablate conv1d")


@pytest.mark.parametrize("backend", ["cpp:scalar", "cpp:avx2", "cpp:avx512"], indirect=True)
def test_cpp_passes_split_over_threads(backend, monkeypatch) -> None:
    """Every cpp pass gives the reference's answer when it is split over several threads (the
    sizes that do so in use are too large for a test, so the split is forced)."""
    import canfast.ops.cpp as cpp

    monkeypatch.setattr(cpp, "_ELEMENTS_PER_THREAD", 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        a, g = randn(4, 65, 257), randn(4, 65, 257, scale=1e-2)
        assert cpp._threads(a.numel()) == 3
        valid = torch.rand(4, 65) > 0.3
        before = torch.randn(4, 3, 257)
        out = ops.score_accumulate(a, g, 0.37, before.clone(), valid, backend=backend)
        assert_increment(out, before, score_truth(a, g, 0.37, valid), SUM_TOL, "score")

        samples, steps, k, n = 4, 30, 48, 40
        x = randn(samples, steps, k).requires_grad_()
        w = randn(n, k, scale=0.2)
        om, im = _mask(2, n), _mask(4, k)
        sink = ops.ScoreSink(0.5, torch.zeros(samples, 3, k), valid[:, :steps], "mid")
        y = ops.masked_linear(x, w, None, om, im, sink, backend=backend)
        rows = samples * steps
        want_y = linear_truth(x.detach().reshape(rows, k), w, None, om, im)
        assert_close(y.reshape(rows, n), want_y, TOL[torch.float32], "y")
        grad_y = randn(*y.shape, scale=1e-2)
        y.backward(grad_y)
        want_dx = (grad_y.double().reshape(rows, n) * block_rows(om.double(), rows)) @ w.double()
        want_dx = (want_dx * block_rows(im.double(), rows)).reshape(x.shape)
        assert_close(x.grad, want_dx, TOL[torch.float32], "dx")
        want = score_truth(x.detach(), x.grad, 0.5, valid[:, :steps])
        assert_increment(sink.out, torch.zeros(samples, 3, k), want, SUM_TOL, "mid sums")

        mid = randn(samples, steps, k)
        neurons = torch.tensor([0, 5, 47, 12])
        got = ops.ablate_expand(y.detach(), neurons, mid, w, backend=backend)
        want = torch.stack(
            [y.double() - mid.double()[..., j, None] * w.double()[:, j] for j in (0, 5, 47, 12)]
        )
        assert_close(got, want, TOL[torch.float32], "ablate mid")
        got = ops.ablate_expand(y.detach(), neurons[:2], backend=backend)
        assert torch.equal(got[1, ..., 5], torch.zeros(samples, steps))
        assert torch.equal(got[1, ..., :5], y.detach()[..., :5])
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# _C writes every element it owns (outputs filled with NaN first)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("backend", ["cpp:scalar", "cpp:avx2", "cpp:avx512"], indirect=True)
def test_cpp_kernels_write_every_element(backend, dtype) -> None:
    from canfast import _C
    from canfast.ops.cpp import _DTYPE_CODES

    code = _DTYPE_CODES[dtype]
    rows, n, count = 7, 37, 3
    y = randn(rows, n, dtype=dtype)
    mid_cols, w_rows = torch.randn(rows, count), torch.randn(count, n)
    neurons = torch.tensor([5, 0, 36])
    out = torch.full((count, rows, n), float("nan"), dtype=dtype)
    _C.ablate_expand(
        y.data_ptr(),
        out.data_ptr(),
        code,
        rows,
        n,
        n,
        count,
        0,
        mid_cols.data_ptr(),
        w_rows.data_ptr(),
        0,
    )
    want = y.double() - mid_cols.double().t()[:, :, None] * w_rows.double()[:, None, :]
    assert_close(out, want, TOL[dtype], "ablate into NaN")
    out.fill_(float("nan"))
    _C.ablate_expand(
        y.data_ptr(), out.data_ptr(), code, rows, n, n, count, neurons.data_ptr(), 0, 0, 0
    )
    assert not out.isnan().any()

    mask = torch.rand(1, n)
    dst = torch.full((rows, n), float("nan"), dtype=dtype)
    _C.row_mask(y.data_ptr(), dst.data_ptr(), code, rows, n, n, n, mask.data_ptr(), 1, n, 0)
    assert_close(dst, y.double() * mask.to(dtype).double(), TOL[dtype], "row mask into NaN")


# ----------------------------------------------------------------------------------------------
# Argument checks: a wrong argument raises, nothing crashes


CHECKED_BACKENDS = ["cpp:scalar", "cpp:avx512", "triton"]


@pytest.mark.parametrize("backend", ["torch", *CHECKED_BACKENDS], indirect=True)
def test_alpha_out_of_range_raises(backend) -> None:
    a = randn(2, 3, 4)
    for alpha in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError):
            ops.score_accumulate(a, a, alpha, torch.zeros(2, 3, 4), backend=backend)


@pytest.mark.parametrize("backend", CHECKED_BACKENDS, indirect=True)
def test_bad_score_arguments_raise(backend) -> None:
    a, g = randn(2, 3, 4), randn(2, 3, 4)
    out = torch.zeros(2, 3, 4)
    bad = {
        "float64 inputs": (a.double(), g.double(), out, None),
        "mixed dtypes": (a, g.bfloat16(), out, None),
        "shape mismatch": (a, g[:, :2], out, None),
        "float16 out": (a, g, out.half(), None),
        "out shape": (a, g, torch.zeros(2, 2, 4), None),
        "valid shape": (a, g, out, torch.ones(2, 4, dtype=torch.bool)),
        "2-D inputs": (a[0], g[0], out[0], None),
    }
    for what, (a_, g_, out_, valid) in bad.items():
        with pytest.raises(ValueError):
            ops.score_accumulate(a_, g_, 0.5, out_, valid, backend=backend)
            pytest.fail(f"no ValueError for {what}")


@pytest.mark.parametrize("backend", CHECKED_BACKENDS, indirect=True)
def test_bad_linear_arguments_raise(backend) -> None:
    x, w = randn(6, 8), randn(5, 8)
    bad = {
        "weight K": (x, randn(5, 7), None, None, None, None),
        "weight dtype": (x, w.bfloat16(), None, None, None, None),
        "float64": (x.double(), w.double(), None, None, None, None),
        "bias shape": (x, w, randn(4), None, None, None),
        "out_mask size": (x, w, None, torch.ones(4), None, None),
        "mask blocks": (x, w, None, torch.ones(4, 5), None, None),  # 6 rows, 4 blocks
        "in_mask size": (x, w, None, None, torch.ones(9), None),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError):
            ops.masked_linear(*args, backend=backend)
            pytest.fail(f"no ValueError for {what}")


@pytest.mark.parametrize("backend", CHECKED_BACKENDS, indirect=True)
def test_bad_ablate_arguments_raise(backend) -> None:
    y = randn(3, 5)
    with pytest.raises(ValueError):
        ops.ablate_expand(y, torch.tensor([0.5]), backend=backend)
    with pytest.raises(ValueError):
        ops.ablate_expand(y, torch.tensor([1]), randn(3, 4), randn(4, 4), backend=backend)
    # Out-of-range neurons raise IndexError, as torch indexing (the reference) does.
    for neuron in (5, -6):
        with pytest.raises(IndexError):
            ops.ablate_expand(y, torch.tensor([neuron]), backend=backend)
    with pytest.raises(ValueError):
        ops.ablate_expand(y.double(), torch.tensor([1]), backend=backend)


def test_cpp_raw_arguments_raise() -> None:
    """_C itself refuses what would crash: null pointers, bad codes, sizes, strides, alpha."""
    from canfast import _C

    a = torch.randn(2, 3, 4)
    out = torch.zeros(2, 3, 4)
    p, o = a.data_ptr(), out.data_ptr()

    def score(**change):
        args = dict(
            a=p,
            g=p,
            dtype=0,
            B=2,
            T=3,
            C=4,
            a_sb=12,
            a_st=4,
            g_sb=12,
            g_st=4,
            valid=0,
            v_sb=0,
            v_st=0,
            out=o,
            o_sb=12,
            o_sk=4,
            alpha=0.5,
            threads=0,
        )
        args.update(change)
        _C.score_accumulate(**args)

    score()  # the unchanged call is fine
    for change in (
        {"a": 0},
        {"out": 0},
        {"dtype": 3},
        {"dtype": -1},
        {"B": -1},
        {"a_st": -4},
        {"o_sk": 2},  # rows of out would overlap
        {"alpha": 1.5},
        {"alpha": float("nan")},
        {"threads": -2},
        {"a": p + 1},  # misaligned float pointer
    ):
        with pytest.raises(ValueError):
            score(**change)
    with pytest.raises(ValueError):
        _C.row_mask(p, p, 0, 6, 4, 4, 4, o, 4, 4, 0)  # 6 rows, 4 mask blocks
    with pytest.raises(ValueError):
        score(g_mask=o, g_mask_M=4)  # 6 rows, 4 mask blocks
    with pytest.raises(ValueError):
        _C.row_mask(p, o, 1, 3, 4, 4, 4, 0, 1, 4, 0)  # null mask
    with pytest.raises(ValueError):
        _C.ablate_expand(p, o, 0, 2, 4, 4, 1, 0, 0, 0, 0)  # neither unit
    idx = torch.tensor([4])
    with pytest.raises(ValueError):
        _C.ablate_expand(p, o, 0, 2, 4, 4, 1, idx.data_ptr(), 0, 0, 0)  # neuron out of range
    with pytest.raises(ValueError):
        _C.set_isa("neon")
