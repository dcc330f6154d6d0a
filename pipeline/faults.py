"""Fault injection at named points, for the reliability tests (no effect unless asked for).

Set ``MFDETR_FAULT=<point>:<n>[:<action>]`` and the process fails the ``n``-th time (1-based)
it reaches ``<point>``:

* ``exit`` (default): ``os._exit(137)``, as abrupt as ``kill -9`` (no ``finally``, no flush);
* ``enospc``: raise ``OSError(ENOSPC, "No space left on device")``, as a full disk would;
* ``eacces``: raise ``PermissionError(EACCES, ...)``, as a read-only mount would.

Several faults can be given, separated by commas. The counter is per process: a dask worker
counts its own hits. With ``MFDETR_FAULT`` unset, :func:`fault_point` is one dict lookup.

The points (each named where it is called):

=========================  ======================================================================
point                      where
=========================  ======================================================================
``extract.before_write``   extract: an image's detector output is ready, before its first array
``cache.between_arrays``   cache write: per-image arrays written, encoder tokens / C1 not yet
``cache.before_done``      cache write: every array of the image written, its done flag not yet
``cache.attrs``            cache: before an attribute (skipped list) write of the live store
``cache.create``           cache creation: arrays made under ``<out>.partial``, attrs not yet
``cache.rename``           cache creation: ``<out>.partial`` complete, not yet renamed to ``<out>``
``train.mid_step``         train-head: loss computed, optimizer step not yet taken
``train.checkpoint``       train-head: checkpoint tensors written to the temp file, not renamed
``evaluate.results``       evaluate: results JSON written to its temp file, not renamed
``evaluate.metrics``       evaluate: metrics JSON written to its temp file, not renamed
=========================  ======================================================================
"""

from __future__ import annotations

import errno
import os

ENV = "MFDETR_FAULT"
POINTS = ("extract.before_write", "cache.between_arrays", "cache.before_done", "cache.attrs", "cache.create",
          "cache.rename", "train.mid_step", "train.checkpoint", "evaluate.results", "evaluate.metrics")
ACTIONS = ("exit", "enospc", "eacces")

_hits: dict[str, int] = {}
_parsed: tuple[str, dict[str, tuple[int, str]]] | None = None


def _faults() -> dict[str, tuple[int, str]]:
    """``{point: (n, action)}`` from the environment (re-parsed when the variable changes).

    Raises:
        ValueError: a malformed entry, an unknown point or action (names the variable).
    """
    global _parsed
    spec = os.environ.get(ENV, "")
    if _parsed is not None and _parsed[0] == spec:
        return _parsed[1]
    faults = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
            raise ValueError(f"{ENV}: bad entry {entry!r}; expected <point>:<n>[:<action>] with n >= 1")
        point, n, action = parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "exit"
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r}; known points: {', '.join(POINTS)}")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        faults[point] = (n, action)
    _parsed = (spec, faults)
    return faults


def fault_point(point: str, path: str | os.PathLike | None = None) -> None:
    """Mark that the process reached ``point``; fail here if ``MFDETR_FAULT`` asks for it.

    Args:
        point: one of :data:`POINTS`.
        path: the file or store being written, named in the injected ``OSError``.

    Raises:
        OSError: injected ``enospc`` / ``eacces`` fault (``errno`` set, ``filename`` = ``path``).
        ValueError: ``MFDETR_FAULT`` is malformed.
    """
    faults = _faults()
    if point not in faults:
        return
    _hits[point] = _hits.get(point, 0) + 1
    n, action = faults[point]
    if _hits[point] != n:
        return
    if action == "exit":
        os._exit(137)
    code = errno.ENOSPC if action == "enospc" else errno.EACCES
    exc = PermissionError if action == "eacces" else OSError
    raise exc(code, os.strerror(code) + f" (injected by {ENV} at {point})", None if path is None else str(path))
