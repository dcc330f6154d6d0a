"""TensorBoard scalars beside ``metrics.jsonl`` (optional extra ``[tensorboard]``).

:class:`TensorBoardMirror` wraps the open ``metrics.jsonl`` file: every JSON line written to it
is also written as TensorBoard scalars under ``<run>/tensorboard/`` (``train/<key>`` for the
numeric fields of a step record, ``eval/<iou type>/<metric>`` for an evaluation record), at the
record's ``step``. The JSON-lines log stays the record of the run; TensorBoard is a view of it.
"""

from __future__ import annotations

import json
from pathlib import Path


class TensorBoardMirror:
    """File-like wrapper of ``metrics.jsonl`` that mirrors each record to TensorBoard.

    Args:
        file: the open ``metrics.jsonl`` (text, append mode).
        log_dir: TensorBoard event folder (``<run>/tensorboard``).
        purge_step: on ``--resume``, the checkpoint's step: events logged after it by the killed
            run are dropped (TensorBoard's ``purge_step``), as ``metrics.jsonl`` drops its lines.

    Raises:
        ValueError: the ``tensorboard`` package is not installed (names the extra).
    """

    def __init__(self, file, log_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install 'mask-frozen-detr[tensorboard]'"
                             ) from None
        self.file = file
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step or None)

    def write(self, text: str) -> int:
        """Write ``text`` (one or more JSON lines) to the file and each record's scalars to TensorBoard."""
        n = self.file.write(text)
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(rec.get("step", 0))
            if isinstance(rec.get("eval"), dict):
                for iou_type, m in rec["eval"].items():
                    for key, v in m.items():
                        if isinstance(v, (int, float)) and v == v:
                            self.writer.add_scalar(f"eval/{iou_type}/{key}", v, step)
                continue
            for key, v in rec.items():
                if key not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"train/{key}", v, step)
        return n

    def flush(self) -> None:
        """Flush both the file and the event writer."""
        self.file.flush()
        self.writer.flush()

    def close(self) -> None:
        """Close both."""
        self.file.close()
        self.writer.close()
