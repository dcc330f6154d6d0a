"""Safe loading of official detector checkpoints (no arbitrary unpickling).

The official training scripts (FocalNet-DINO ``main.py``, H-Deformable-DETR ``main.py``) save
``{'model': state_dict, 'optimizer': ..., 'lr_scheduler': ..., 'epoch': int, 'args': argparse.Namespace}``.
``torch.load(weights_only=True)`` refuses the pickled ``Namespace`` unless it is allow-listed, so
the file is read with ``weights_only=True`` inside ``torch.serialization.safe_globals`` of
``argparse.Namespace`` and numpy's plain-data classes (see ``_allowed_globals``)
and never with ``weights_only=False``.  A ``module.`` prefix (DistributedDataParallel) is stripped
as ``util.utils.clean_state_dict`` does.

Tied parameters (one module registered under two names, e.g. DINO's
``class_embed.{i}`` and ``transformer.decoder.class_embed.{i}``) appear under every name in
the file; their values are checked equal and loaded once.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pipeline.detectors.base import KeyReport
from pipeline.utils import file_sha256  # noqa: F401  (re-exported)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read safely or does not match the model (message names the file)."""


def _unsupported_global(message: str) -> str | None:
    """Name of the global a weights-only unpickler refused, parsed from torch's error message."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if m:
        return m.group(1)
    m = re.search(r"global '?([\w.]+)'? ", message) or re.search(r"unsupported GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def _allowed_globals() -> list:
    """Plain-data classes a training checkpoint's ``args`` may hold besides builtins.

    ``argparse.Namespace`` (the official ``args`` entry) and numpy scalars / arrays / dtypes
    (hyper-parameters saved as numpy values). Everything else is refused by the weights-only
    unpickler; code is never executed.
    """
    import numpy as np

    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return [argparse.Namespace, multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtype_classes]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read the model ``state_dict`` from a checkpoint file, safely.

    Accepts ``{'model': state_dict, ...}`` (official release / training checkpoint; other entries
    such as ``optimizer``, ``lr_scheduler``, ``epoch``, ``args`` are ignored) or a bare state_dict
    (a mapping whose values are all tensors).  A leading ``module.`` is stripped from every key.

    Args:
        path: the file.

    Returns:
        ``{key: tensor}`` on CPU, dtypes as stored.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not a torch file, the pickle needs a global outside the allow-list
            (the message names it), or no state_dict found.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = _unsupported_global(str(e))
        if name is not None:
            raise CheckpointError(
                f"{path}: refusing to unpickle global {name!r} (weights_only=True allows plain data and "
                f"argparse.Namespace only); convert the file to a state_dict-only checkpoint offline") from e
        # torch's own message suggests weights_only=False, which we never do on downloaded files:
        # keep only the pickle's complaint.
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|Check the documentation|$)", str(e), re.S)
        reason = detail.group(1).strip() if detail else str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (unpickling failed: {reason})") from e
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises many types on non-torch bytes (IndexError, EOFError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {first})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        sd = obj["model"]
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        sd = obj
    else:
        keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no 'model' state_dict and not a bare state_dict (top level: {keys})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"{path}: state_dict entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k[7:] if k.startswith("module.") else k] = v
    return out


def _alias_groups(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """``(canonical name -> tensor, every name -> its canonical name, unique parameter count)``.

    Names sharing one Parameter/buffer object form a group; the canonical name is the first in
    registration order (``named_parameters(remove_duplicate=False)``).
    """
    canonical: dict[str, Tensor] = {}
    alias_of: dict[str, str] = {}
    first_by_id: dict[int, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        key = id(t)
        if key in first_by_id:
            alias_of[name] = first_by_id[key]
        else:
            first_by_id[key] = name
            alias_of[name] = name
            canonical[name] = t
    num_params = sum(p.numel() for p in model.parameters())
    return canonical, alias_of, num_params


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True,
                            source: str = "<state_dict>") -> KeyReport:
    """Copy a state_dict into ``model`` after checking keys, shapes and tied aliases.

    Values are cast to each parameter's dtype (e.g. float16 file -> float32 model).  Tied
    aliases present in the file are compared with ``torch.equal`` and loaded once.

    Args:
        model: target module (its parameters are updated in place).
        state_dict: ``{key: tensor}``.
        strict: raise if anything is missing, unexpected or mis-shaped (nothing is loaded then).
            With ``strict=False`` the matching keys are loaded and the report returned.
        source: file name used in error messages.

    Returns:
        :class:`~pipeline.detectors.base.KeyReport`.

    Raises:
        CheckpointError: (strict) any key problem, or (always) tied aliases with different values.
    """
    canonical, alias_of, num_params = _alias_groups(model)
    report = KeyReport(num_params=num_params)
    chosen: dict[str, tuple[str, Tensor]] = {}
    for key, value in state_dict.items():
        target = alias_of.get(key)
        if target is None:
            report.unexpected.append(key)
            continue
        if target in chosen:
            first_key, first_value = chosen[target]
            if first_value.shape != value.shape or not torch.equal(first_value, value.to(first_value.dtype)):
                raise CheckpointError(f"{source}: tied keys {first_key!r} and {key!r} hold different values")
            report.aliases_checked.append(key)
            continue
        chosen[target] = (key, value)
    for name, t in canonical.items():
        if name not in chosen:
            report.missing.append(name)
        elif tuple(chosen[name][1].shape) != tuple(t.shape):
            report.mismatched.append((chosen[name][0], tuple(chosen[name][1].shape), tuple(t.shape)))
    if strict and not report.ok:
        raise CheckpointError(f"{source}: checkpoint does not match {type(model).__name__}\n{report.format()}")
    bad = {k for k, _, _ in report.mismatched}
    with torch.no_grad():
        for name, (key, value) in chosen.items():
            if key not in bad:
                canonical[name].copy_(value)
    return report


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> KeyReport:
    """Read ``path`` with :func:`read_state_dict` and load it with :func:`load_state_dict_checked`.

    Raises:
        FileNotFoundError, CheckpointError: see those functions (messages name the file).
    """
    return load_state_dict_checked(model, read_state_dict(path), strict=strict, source=os.fspath(path))
