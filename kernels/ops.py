"""Typed entry points of the custom ops and the run-time choice of their implementation.

Implementations of :func:`ms_deform_attn`:

- ``"reference"``: pure PyTorch (:mod:`kernels.reference`), any device and dtype; the ground truth.
- ``"cpu"``: the compiled C++ kernel (``kernels/csrc/ms_deform_attn/ms_deform_attn_cpu.cpp``).
- ``"cuda"``: the compiled CUDA kernel (``kernels/csrc/ms_deform_attn/ms_deform_attn_cuda.cu``).
- ``"auto"``: the compiled kernel for the tensors' device when it is built, else the reference
  (said once per device in the log, with the reason).

The choice is a run-time setting of the process, not part of a model: :func:`set_impl` /
:func:`use_impl`, initialised from the environment variable ``MFDETR_IMPL`` (default ``auto``),
or an explicit ``impl=`` argument. The compiled ops live in the ``mfdetr`` torch.library
namespace: the schemas are declared once in ``kernels/csrc/ops.cpp``, the fake (meta) kernels
and the autograd formula are registered here (pytorch/extension-cpp's layout).
Nothing in ``kernels/`` imports from ``pipeline/``.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator

import torch
from torch import Tensor

from . import reference

log = logging.getLogger(__name__)

#: Accepted values of ``impl`` / ``--impl`` / ``MFDETR_IMPL``.
IMPLS = ("auto", "cuda", "cpu", "reference")
#: Environment variable holding the default implementation.
ENV_VAR = "MFDETR_IMPL"
#: How to get the compiled kernels (quoted in errors).
BUILD_HINT = ("build the extension with `pip install -e .` (C++ CPU kernel; or `python setup.py build_ext "
              "--inplace`), adding FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST for the CUDA kernel (needs nvcc)")

try:  # the extension is optional: its absence is recorded, reported by `cli.py env` and logged by "auto"
    _C = importlib.import_module("kernels._C")
    COMPILED_ERROR: str | None = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    COMPILED_ERROR = f"{type(e).__name__}: {e}"


#: The compiled ops (``mfdetr::<name>``) that :func:`resolve_impl` chooses between.
OPS = ("ms_deform_attn", "fused_roi_align")
# (op, device type) pairs with a compiled kernel registered (looked up once: torch.compile traces
# the checks below)
_COMPILED = frozenset() if _C is None else frozenset(
    (op, dev) for op in OPS for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"mfdetr::{op}", key))


class KernelUnavailableError(RuntimeError):
    """An explicitly chosen compiled kernel is not built (the message says how to build it)."""


def compiled_available(device_type: str, op: str = "ms_deform_attn") -> bool:
    """Whether the compiled kernel of ``op`` (:data:`OPS`) is built for ``device_type`` ("cpu" or "cuda")."""
    return _C is not None and (op, device_type) in _COMPILED


def compiled_cuda_archs() -> list[str]:
    """CUDA architectures compiled into the extension (``TORCH_CUDA_ARCH_LIST`` at build time); [] if none."""
    if _C is None:
        return []
    return [a for a in torch.ops.mfdetr.cuda_archs().replace(",", ";").split(";") if a]


def available_impls() -> list[str]:
    """The implementations usable in this process (``reference`` always)."""
    return [name for name in ("cuda", "cpu") if compiled_available(name)] + ["reference"]


def _check_impl(impl: str, where: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{where} must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


_current = _check_impl(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")
_auto_logged: set[tuple[str, str]] = set()


def get_impl() -> str:
    """The process-wide implementation setting (one of :data:`IMPLS`)."""
    return _current


def set_impl(impl: str) -> str:
    """Set the process-wide implementation; returns the previous one.

    Raises:
        ValueError: ``impl`` not in :data:`IMPLS`.
        KernelUnavailableError: an explicit ``"cpu"``/``"cuda"`` whose kernel is not built (names how
            to build it).
    """
    global _current
    _check_impl(impl, "impl")
    if impl in ("cpu", "cuda") and not compiled_available(impl):
        raise KernelUnavailableError(_unavailable_message(impl))
    previous, _current = _current, impl
    return previous


def configure(impl: str) -> dict:
    """Entry point of a command (extract, train-head, evaluate): :func:`set_impl`, log it, return
    :func:`describe_impl` for the run's metrics. Raises as :func:`set_impl`."""
    set_impl(impl)
    info = describe_impl()
    log.info("ms_deform_attn implementation: %s (resolves to %s; built: %s)", info["impl"],
             ", ".join(f"{k}: {v}" for k, v in info["resolved"].items()), ", ".join(available_impls()))
    return info


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Context manager: :func:`set_impl` for the block, then restore the previous setting."""
    previous = set_impl(impl)
    try:
        yield
    finally:
        set_impl(previous)


def _unavailable_message(impl: str, op: str = "ms_deform_attn") -> str:
    why = f" (import of kernels._C failed: {COMPILED_ERROR})" if COMPILED_ERROR else ""
    return f"impl={impl!r}: the compiled {impl.upper()} kernel of {op} is not built{why}; {BUILD_HINT}"


def resolve_impl(impl: str | None, device: torch.device, announce: bool = True, op: str = "ms_deform_attn") -> str:
    """The concrete implementation (``"cpu"``, ``"cuda"`` or ``"reference"``) for tensors on ``device``.

    Args:
        impl: one of :data:`IMPLS`, or None for the process-wide setting (:func:`get_impl`).
        device: device of the op's tensors.
        announce: log what ``"auto"`` chose (once per op and device type per process).
        op: which compiled op (:data:`OPS`).

    Raises:
        ValueError: unknown ``impl``, or a compiled kernel asked for tensors on another device type.
        KernelUnavailableError: an explicit compiled kernel that is not built (names how to build it).
    """
    impl = _check_impl(_current if impl is None else impl, "impl")
    if impl == "reference":
        return impl
    if impl == "auto":
        chosen = device.type if compiled_available(device.type, op) else "reference"
        if announce and (op, device.type) not in _auto_logged:
            _auto_logged.add((op, device.type))
            if chosen == "reference":
                log.info("%s impl=auto on %s: no compiled kernel for this device, using the pure-PyTorch "
                         "reference%s", op, device.type, f" ({COMPILED_ERROR})" if COMPILED_ERROR else "")
            else:
                log.info("%s impl=auto on %s: using the compiled %s kernel", op, device.type, chosen)
        return chosen
    if device.type != impl:
        raise ValueError(f"impl={impl!r} but the tensors are on {device.type}; use impl='auto' or move them")
    if not compiled_available(impl, op):
        raise KernelUnavailableError(_unavailable_message(impl, op))
    return impl


def describe_impl(impl: str | None = None) -> dict:
    """What to record in logs and metrics: the setting and what it resolves to on each device type."""
    setting = _current if impl is None else _check_impl(impl, "impl")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    resolved = {}
    for dev in devices:
        try:
            resolved[dev] = resolve_impl(setting, torch.device(dev), announce=False)
        except (ValueError, RuntimeError):
            resolved[dev] = "unavailable"
    return {"impl": setting, "resolved": resolved}


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    impl: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR, Zhu et al. 2020, Eq. 3).

    Semantics: :func:`kernels.reference.ms_deform_attn` (= the official
    ``ms_deform_attn_core_pytorch``: bilinear, ``align_corners=False``, zero padding).

    Args:
        value: ``Tensor[N, S, M, Dh]`` floating point.
        spatial_shapes: ``Tensor[L, 2]`` int64 ``(H_l, W_l)``, on value's device for compiled kernels.
        level_start_index: ``Tensor[L]`` int64 start of each level in S.
        sampling_locations: ``Tensor[N, Lq, M, L, P, 2]`` ``(x, y)`` normalized to ``[0, 1]``
            (outside = zero padding).
        attention_weights: ``Tensor[N, Lq, M, L, P]``.
        impl: one of :data:`IMPLS`; None = the process-wide setting (:func:`get_impl`).

    Returns:
        ``Tensor[N, Lq, M * Dh]`` in value's dtype. Differentiable in value, sampling_locations
        and attention_weights with every implementation. Compiled kernels compute in the
        promoted dtype of the three float inputs (float32 accumulation for float16/bfloat16).

    Raises:
        ValueError: unknown ``impl`` or inconsistent shapes (the message names the argument).
        KernelUnavailableError: an explicit compiled ``impl`` that is not built.
    """
    if level_start_index.numel() != spatial_shapes.shape[0]:
        raise ValueError(
            f"level_start_index has {level_start_index.numel()} entries, "
            f"spatial_shapes has {spatial_shapes.shape[0]} levels"
        )
    chosen = resolve_impl(impl, value.device)
    if chosen == "reference":
        return reference.ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights)
    dtype = value.dtype
    if not sampling_locations.dtype == attention_weights.dtype == dtype:
        dtype = torch.promote_types(torch.promote_types(dtype, sampling_locations.dtype), attention_weights.dtype)
    out = torch.ops.mfdetr.ms_deform_attn(
        value.to(dtype), spatial_shapes.to(value.device), level_start_index.to(value.device),
        sampling_locations.to(dtype), attention_weights.to(dtype))
    return out.to(value.dtype)


if _C is not None:

    @torch.library.register_fake("mfdetr::ms_deform_attn")
    def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        torch._check(value.dim() == 4, lambda: "value must be [N, S, M, Dh]")
        torch._check(sampling_locations.dim() == 6, lambda: "sampling_locations must be [N, Lq, M, L, P, 2]")
        n, _, m, dh = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * dh))

    @torch.library.register_fake("mfdetr::ms_deform_attn_backward")
    def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights):
        return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.mfdetr.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights)
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd("mfdetr::ms_deform_attn", _backward, setup_context=_setup_context)


def fused_roi_align(
    c1: Tensor,
    e: Tensor,
    boxes: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    impl: str | None = None,
) -> Tensor:
    """RoIAlign of ``F = c1 + interpolate(e, size=c1's)`` without materialising F (compiled kernels).

    Equal to :func:`kernels.reference.fused_roi_align` = ``torchvision.ops.roi_align(c1 +
    F.interpolate(e, size=c1.shape[-2:], mode="bilinear", align_corners=False), boxes,
    output_size, spatial_scale, sampling_ratio, aligned=True)``; differentiable in c1 and e.

    Args:
        c1: ``Tensor[B, C, H, W]``.
        e: ``Tensor[B, C, He, We]`` (same B, C).
        boxes: ``Tensor[K, 5]`` ``(batch index, x1, y1, x2, y2)``; ``aligned=True`` (pixel centres
            at half-integers); boxes may be empty, zero-area or partly outside the map.
        output_size: ``R`` or ``(PH, PW)``.
        spatial_scale: box coordinates -> c1 pixels.
        sampling_ratio: samples per bin side; ``<= 0`` = adaptive (``ceil(box size / output size)``).
        impl: one of :data:`IMPLS`; None = the process-wide setting.

    Returns:
        ``Tensor[K, C, PH, PW]`` in c1's dtype.

    Raises:
        ValueError: inconsistent shapes or a batch index outside ``[0, B)`` (message names the argument).
        KernelUnavailableError: an explicit compiled ``impl`` that is not built.
    """
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else (int(v) for v in output_size)
    chosen = resolve_impl(impl, c1.device, op="fused_roi_align")
    if chosen == "reference":
        return reference.fused_roi_align(c1, e, boxes, (ph, pw), spatial_scale, sampling_ratio)
    return torch.ops.mfdetr.fused_roi_align(c1, e, boxes.to(c1.dtype), ph, pw, float(spatial_scale),
                                            int(sampling_ratio))


if _C is not None:

    @torch.library.register_fake("mfdetr::fused_roi_align")
    def _fused_roi_align_fake(c1, e, boxes, pooled_height, pooled_width, spatial_scale, sampling_ratio):
        torch._check(c1.dim() == 4, lambda: "c1 must be [B, C, H, W]")
        torch._check(boxes.dim() == 2, lambda: "boxes must be [K, 5]")
        return c1.new_empty((boxes.shape[0], c1.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("mfdetr::fused_roi_align_backward")
    def _fused_roi_align_backward_fake(grad_output, c1, e, boxes, pooled_height, pooled_width, spatial_scale,
                                       sampling_ratio):
        return torch.empty_like(c1), torch.empty_like(e)

    def _roi_setup_context(ctx, inputs, output):
        c1, e, boxes, ctx.pooled_height, ctx.pooled_width, ctx.spatial_scale, ctx.sampling_ratio = inputs
        ctx.save_for_backward(c1, e, boxes)

    def _roi_backward(ctx, grad_output):
        c1, e, boxes = ctx.saved_tensors
        grad_c1, grad_e = torch.ops.mfdetr.fused_roi_align_backward(
            grad_output.contiguous(), c1, e, boxes, ctx.pooled_height, ctx.pooled_width, ctx.spatial_scale,
            ctx.sampling_ratio)
        return grad_c1, grad_e, None, None, None, None, None

    torch.library.register_autograd("mfdetr::fused_roi_align", _roi_backward, setup_context=_roi_setup_context)
