"""Description of one Triton kernel configuration, for ahead-of-time compilation.

``fastpeft.kernels.all_kernel_specs()`` returns one :class:`KernelSpec` per configuration the
dispatcher can choose; ``fastpeft check`` (``fastpeft/check.py``) compiles each of them for real
GPU targets without a GPU and checks registers, spills, shared memory and wgmma use.

Spelling rules (Triton 3.4-3.9 ``ASTSource``):

* ``signature`` lists *every* parameter of the kernel, in the order of the ``def``. Types are
  ``"*bf16"``, ``"*fp16"``, ``"*fp32"`` (pointers), ``"i32"``, ``"i64"``, ``"fp32"`` (scalars)
  and ``"constexpr"`` for ``tl.constexpr`` parameters.
* ``constexprs`` gives a value for each ``"constexpr"`` parameter, keyed by parameter name.
  Dtypes must be Triton dtypes (``tl.bfloat16``), not torch dtypes or strings; other values are
  plain ``int``/``float``/``bool``.
* A host-side tensor descriptor parameter (``triton.tools.tensor_descriptor.TensorDescriptor``)
  is typed ``"tensordesc<bf16[128, 64]>"``: element type and block shape (Triton 3.6 and 3.9).
* ``fn`` must be a module-level ``@triton.jit`` function: compiles run in worker processes that
  import it by module and name.
"""

from __future__ import annotations

from dataclasses import dataclass

# Integer parameter types that Triton's launcher specializes on divisibility by 16 (i1 is a bool).
_INTEGER_TYPES = ("i32", "i64", "u32", "u64")


@dataclass(frozen=True)
class KernelSpec:
    """One compile-time configuration of one Triton kernel.

    ``divisible_by_16`` names the parameters that Triton's launcher would specialize as multiples
    of 16 (pointers: 16-byte aligned; integers: sizes and strides divisible by 16). These hints
    change vectorization, software pipelining and so register and shared-memory use, so they
    should match the launches being checked. ``None`` means every pointer and every integer
    parameter but those the kernel exempts from specialization (``do_not_specialize``, see
    ``unspecialized_args``), which is what a launch with torch-allocated tensors and 16-aligned
    shapes (typical hidden sizes) gets; ``()`` means no hint at all.
    """

    name: str  # unique, e.g. "lora_fwd[bm=128,bn=256,bk=64,w=8,s=3,R=16,bf16]"
    fn: object  # the @triton.jit function
    signature: dict[str, str]  # every parameter in order: "*bf16", "i32", "constexpr", ...
    constexprs: dict[str, object]  # values of the constexpr parameters, by name
    num_warps: int
    num_stages: int
    expects_wgmma_on_sm90: bool = False
    # sm_90: the kernel's main loop loads through TMA tensor descriptors, so its PTX must hold
    # ``cp.async.bulk.tensor`` (a kernel that silently fell back to pointer loads fails).
    expects_tma_on_sm90: bool = False
    divisible_by_16: tuple[str, ...] | None = None
    # Triton's ``enable_fp_fusion`` of the launches (False: a * b + c stays a product and a sum,
    # as in torch: the dequantization kernels' bit-exact scales), compiled the same way.
    enable_fp_fusion: bool = True
    # The architecture family the dispatcher launches this configuration on: 80 for
    # compute capability 8.x (Ampere/Ada tables), 90 for 9.0 and newer (Hopper tables),
    # None for every architecture.
    arch_family: int | None = None

    def runs_on(self, capability: int) -> bool:
        """Whether the dispatcher can launch this configuration on ``capability`` (80, 90...)."""
        if self.arch_family is None:
            return True
        return (capability >= 90) == (self.arch_family >= 90)

    def aligned_params(self) -> tuple[str, ...]:
        """Names of the parameters compiled as multiples of 16 (see the class docstring)."""
        if self.divisible_by_16 is not None:
            return tuple(self.divisible_by_16)
        exempt = set(unspecialized_args(self.fn))
        return tuple(
            name for name, ty in self.signature.items()
            if (ty.startswith("*") or ty in _INTEGER_TYPES) and name not in exempt
        )


def unspecialized_args(fn: object) -> tuple[str, ...]:
    """The parameters ``fn``'s ``@triton.jit(do_not_specialize=...)`` exempts from launch-time
    specialization (never a constexpr 1, never "divisible by 16"): one compiled variant covers
    all their values. Works for JIT and interpreter objects (the interpreter keeps the
    decorator's arguments in ``kwargs``)."""
    names = getattr(fn, "do_not_specialize", None)
    if names is None:
        names = (getattr(fn, "kwargs", None) or {}).get("do_not_specialize") or ()
    arg_names = list(getattr(fn, "arg_names", None) or [])
    return tuple(arg_names[n] if isinstance(n, int) else n for n in names)
