"""Evaluation plots: precision-recall curves and a per-category AP bar chart (matplotlib, Agg).

Input is what COCOeval accumulates: ``precision [T, R, K, A, M]`` (T = 10 IoU thresholds
0.50:0.05:0.95, R = 101 recall points 0:0.01:1, K categories, A = 4 area ranges with "all"
first, M = 3 maxDets with 100 last; -1 where undefined), as in pycocotools' ``accumulate``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pr_curves(precision: np.ndarray) -> dict[str, np.ndarray]:
    """Category-mean precision at each recall point (area "all", maxDets 100).

    Returns:
        ``{"recall": [101], "IoU=0.50": [101], "IoU=0.75": [101], "IoU=0.50:0.95": [101]}``;
        a recall point where no category is defined gives NaN.
    """
    p = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # [T, R, K]
    valid = p > -1
    def mean(x, v):
        s, n = np.where(v, x, 0.0).sum(-1), v.sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, s / np.maximum(n, 1), np.nan)
    per_t = mean(p, valid)  # [T, R]
    return {"recall": np.linspace(0, 1, p.shape[1]), "IoU=0.50": per_t[0], "IoU=0.75": per_t[5],
            "IoU=0.50:0.95": np.nanmean(per_t, axis=0) if np.isfinite(per_t).any() else per_t[0]}


def plot_pr_curves(precision: np.ndarray, path: str | Path, title: str) -> Path:
    """Write the PR curves of :func:`pr_curves` as a PNG (800 x 600 px); returns ``path``."""
    plt = _plt()
    curves = pr_curves(precision)
    fig, ax = plt.subplots(figsize=(8, 6), dpi=100)
    for name in ("IoU=0.50", "IoU=0.75", "IoU=0.50:0.95"):
        ax.plot(curves["recall"], curves[name], label=name)
    ax.set(xlabel="recall", ylabel="precision (mean over categories)", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_per_category(per_category: dict[str, float], path: str | Path, title: str) -> Path:
    """Write a horizontal bar chart of per-category AP (percent, sorted, NaN categories left out)."""
    plt = _plt()
    items = sorted(((n, v) for n, v in per_category.items() if v is not None and np.isfinite(v)),
                   key=lambda t: t[1])
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(items) + 1)), dpi=100)
    ax.barh([n for n, _ in items], [v for _, v in items], color="tab:blue")
    ax.set(xlabel="AP (percent)", title=title, xlim=(0, 100))
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_plots(metrics: dict, precisions: dict[str, np.ndarray], out_dir: str | Path) -> list[Path]:
    """PR curves and per-category AP charts for every evaluated iou type.

    Files: ``<out_dir>/pr_<iou_type>.png`` and ``<out_dir>/per_category_<iou_type>.png``; the
    metrics' banner (random-init) and evaluator label go into the titles.

    Args:
        metrics: dict of :func:`pipeline.evaluate.evaluate_coco` (``{iou_type: {"AP", ...,
            "per_category"}}``, optional ``banner``).
        precisions: ``{iou_type: precision [T, R, K, A, M]}``.

    Returns:
        the written paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    banner = metrics.get("banner")
    written = []
    for iou_type, prec in precisions.items():
        m = metrics.get(iou_type) or {}
        label = f"{iou_type} AP {m.get('AP', float('nan')):.1f}" + (f" ({m['evaluator']})" if m.get("evaluator") else "")
        title = label + (f"\n{banner}" if banner else "")
        written.append(plot_pr_curves(prec, out_dir / f"pr_{iou_type}.png", title))
        if m.get("per_category"):
            written.append(plot_per_category(m["per_category"], out_dir / f"per_category_{iou_type}.png", title))
    return written
