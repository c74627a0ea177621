"""What the ahead-of-time report needs to know about a kernel, declared next to the kernel.

The autotuner of a kernel knows its configs but not how the launcher calls it: which arguments
are pointers to the data (in the dtype under test), which are unit strides that Triton
specializes to the constant 1, which pointers may be None, and which constexpr combinations the
launcher can produce. :class:`AotSpec` says that once per kernel module, as a module-level
``AOT`` object, and :mod:`canfast.kernels.report` compiles every combination of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import triton

# Argument kinds, as strings so that a declaration reads like a signature:
#   "*T"      pointer to the dtype under test, 16-byte aligned (torch allocations are)
#   "*fp32", "*u8", "*i64"   pointer to that type, 16-byte aligned
#   "i32"     an integer with no divisibility hint (a row count, a sample count)
#   "i32:16"  an integer divisible by 16 (feature sizes and their strides at real shapes)
#   "fp32"    a float scalar
#   "1"       an integer equal to 1 (a unit stride), which Triton turns into a constant
#   "none"    a pointer passed as None, which Triton turns into a constant
ARG_KINDS = ("*T", "*fp32", "*u8", "*i64", "i32", "i32:16", "fp32", "1", "none")


@dataclass(frozen=True)
class Variant:
    """One way the launcher calls the kernel: its constexprs and how its arguments look.

    ``args`` overrides the kernel's default argument kinds (a mask pointer that is None in this
    variant, a weight that is transposed so another stride is the unit one).
    """

    name: str
    constexprs: Mapping[str, object]
    args: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AotSpec:
    """A kernel as the launchers run it, for the ahead-of-time compile report.

    ``dtype_constexprs`` gives, for a data dtype name (``fp32``, ``bf16``, ``fp16``), the
    constexprs the launcher derives from the dtype, one mapping per choice it can make (float32
    matmuls may run in IEEE or TF32 precision); each choice is labelled.
    ``tensor_core`` names the dtypes whose ``tl.dot`` must run on tensor cores.
    ``dtype_configs`` gives a dtype label a config list of its own (float32 matmuls on the CUDA
    cores need smaller tiles than bf16 ones on the tensor cores).
    ``heavy`` names the variants the resource table is built from (the CI test checks that no
    other variant needs more).
    """

    kernel: object  # a triton.autotune object of the kernel (its .fn is the jitted kernel)
    configs: Sequence[triton.Config]
    args: Mapping[str, str]
    variants: Sequence[Variant]
    dtype_constexprs: Callable[[str], Sequence[tuple[str, Mapping[str, object]]]] = lambda d: [
        (d, {})
    ]
    tensor_core: Sequence[str] = ()
    # The variants with the most register pressure: the compiled-resource table that the
    # autotuner prunes by is built from every config and dtype in these (all, if empty).
    heavy: Sequence[str] = ()
    # A constexpr whose value splits the table: configs are pruned separately for each value
    # (masked_linear's SCORE epilogue needs more registers than the plain matmul).
    table_split: str | None = None
    # Config lists of their own for some dtype labels (the launcher then runs an autotuner of
    # its own for them); the others use ``configs``.
    dtype_configs: Mapping[str, Sequence[triton.Config]] = field(default_factory=dict)

    def configs_for(self, label: str) -> Sequence[triton.Config]:
        """The autotune configs the launcher runs for a dtype label (fp32, fp32-tf32, ...)."""
        return self.dtype_configs.get(label, self.configs)

    def __post_init__(self) -> None:
        for name, kind in self.args.items():
            if kind not in ARG_KINDS:
                raise ValueError(f"{name}: unknown argument kind {kind!r}")
        for variant in self.variants:
            for name, kind in variant.args.items():
                if kind not in ARG_KINDS or name not in self.args:
                    raise ValueError(f"variant {variant.name}: bad argument {name}={kind!r}")
