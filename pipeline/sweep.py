"""Train and evaluate many ablation configs on ONE cache, and print the paper's table beside ours.

``cli.py sweep --cache TRAIN --val-cache VAL --configs 'configs/ablations/t2_*.yaml' --out DIR``:
for each config (sorted by file name) ``DIR/<config stem>/`` is a :func:`pipeline.train.train`
run directory (a config with no trainable parameter, the training-free baseline, is only
evaluated). A config whose ``eval/metrics.json`` exists is finished and not redone; an
interrupted one resumes from its ``checkpoint.pt``; a run directory written with another config
(other overrides, an edited file) is refused. ``DIR/table.md`` is rewritten after every
config: the paper's columns (AP, AP50, AP75, APs, APm, APl, ▲FLOPs, ▲#params) for our run,
then the paper's own numbers of the same row.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
from pathlib import Path

from .ablations import METRIC_COLUMNS, config_cost, load_targets, paper_row
from .cache import RANDOM_INIT_BANNER, FeatureCache
from .config import ConfigError, config_from_dict, load_config, save_config
from .utils import write_bytes_atomic

log = logging.getLogger(__name__)


def expand_configs(patterns: list[str]) -> list[Path]:
    """Config files matching the glob ``patterns`` (sorted, duplicates removed).

    Raises:
        FileNotFoundError: a pattern matches nothing (names it).
    """
    paths: dict[str, Path] = {}
    for pattern in patterns:
        found = sorted(glob.glob(str(pattern)))
        if not found:
            raise FileNotFoundError(f"--configs {pattern!r} matches no file")
        for f in found:
            paths.setdefault(str(Path(f).resolve()), Path(f))
    return sorted(paths.values(), key=lambda p: p.name)


def run_sweep(cache: str | Path, val_cache: str | Path, configs: list[str], out: str | Path, *,
              overrides: list[str] | None = None, device: str = "auto", flops: bool = True,
              targets: str | Path | None = None, impl: str = "auto", progress: bool = True) -> Path:
    """Run every config and write ``<out>/table.md``; returns its path.

    Args:
        cache, val_cache: training / validation caches (the same detector for every config).
        configs: glob patterns of config files.
        out: sweep directory; one run directory per config stem.
        overrides: ``--set`` items applied to every config (e.g. a short schedule:
            ``train.max_iters=50``).
        flops: count ▲FLOPs (one head forward per config at the paper's input size; cached in
            ``<run>/cost.json``).
        targets: ``ablation-targets.json`` (default ``../shared/papers/``); without it the paper
            columns are empty.

    Raises:
        FileNotFoundError: a pattern matches nothing; CacheError / ConfigError as
        :func:`pipeline.train.train` (checked for EVERY config before the first one trains).
    """
    from .cache_requirements import check_cache_supports
    from .head import build_head, count_parameters
    from .inference import baseline_head, evaluate_cache
    from .train import resolve_device, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    paths = expand_configs(configs)
    train_cache = FeatureCache.open(cache)
    FeatureCache.open(val_cache, expected=train_cache.fingerprint)
    cfgs = {}
    for path in paths:  # refuse every unusable config before anything trains
        cfg = load_config(path, overrides)
        resolved = dataclasses.replace(cfg, head=check_cache_supports(cfg, train_cache, cache))
        _check_same_config(resolved, out / path.stem)
        cfgs[path] = cfg
    try:
        paper = load_targets(targets)
    except FileNotFoundError as e:
        log.warning("%s: the table gets no paper columns", e)
        paper = {}
    rows = []
    for n, path in enumerate(paths, 1):
        cfg, run = cfgs[path], out / path.stem
        metrics_path = run / "eval" / "metrics.json"
        cost = _cost(cfg, run, flops)
        if metrics_path.is_file():
            log.info("[%d/%d] %s: finished earlier (%s), not redone", n, len(paths), path.name, metrics_path)
        else:
            log.info("[%d/%d] %s -> %s", n, len(paths), path.name, run)
            run.mkdir(parents=True, exist_ok=True)
            probe = build_head(check_cache_supports(cfg, train_cache, cache))[0]
            if count_parameters(probe) == 0:  # the training-free baseline: evaluate only
                save_config(dataclasses.replace(cfg, head=probe.cfg), run / "config.yaml")
                head = baseline_head(cfg, val_cache)
                dev = resolve_device(device)
                evaluate_cache(head.to(dev), cfg, val_cache, run / "eval", device=dev, boxes=cfg.train.boxes,
                               progress=progress, impl=impl)
            else:
                train(cfg, cache, run, val_cache=val_cache, resume=(run / "checkpoint.pt").is_file(), device=device,
                      progress=progress, impl=impl)
        metrics = json.loads(metrics_path.read_text())
        rows.append((path, cfg, cost, metrics, paper_row(cfg, paper) if paper and cfg.paper else None))
        table = format_table(rows, banner=RANDOM_INIT_BANNER if train_cache.fingerprint.get("random_init") else None,
                             cache=cache, overrides=overrides)
        write_bytes_atomic(out / "table.md", table.encode())
    return out / "table.md"


def _check_same_config(resolved, run: Path) -> None:
    """Refuse to reuse a run directory written with another config (finished or not).

    Raises:
        ConfigError: ``<run>/config.yaml`` differs from ``resolved`` (names the run).
    """
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        return
    previous = config_from_dict(yaml.safe_load(path.read_text()), where=str(path))
    if json.dumps(previous.to_dict(), sort_keys=True) != json.dumps(resolved.to_dict(), sort_keys=True):
        raise ConfigError(f"{run} was run with another config (other --set overrides or an edited file); "
                          "use another --out, or delete that run directory to redo it")


def _cost(cfg, run: Path, flops: bool) -> dict:
    """▲#params / ▲FLOPs of a config at its own ``widths:`` (the paper's detector), cached in ``cost.json``."""
    path = run / "cost.json"
    if path.is_file():
        cost = json.loads(path.read_text())
        if cost.get("flops_delta_G") is not None or not flops:
            return cost
    try:
        cost = config_cost(cfg, flops=flops)
    except ValueError as e:  # no widths: (not a paper row); the table shows no cost
        log.warning("%s: no ▲ columns (%s)", run.name, e)
        return {"params_delta_M": None, "flops_delta_G": None}
    cost = {k: cost[k] for k in ("params_delta_M", "flops_delta_G", "widths", "modules")}
    run.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(cost, indent=1).encode())
    return cost


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_table(rows, banner: str | None = None, cache=None, overrides=()) -> str:
    """Markdown of a sweep: per config, our AP columns and ▲ columns, then the paper's.

    Our ▲ columns are counted at the config's ``widths:`` detector in the paper's convention (the
    mean val2017 image, 100 boxes, 300 for DINO-FocalNet-L; :func:`pipeline.ablations.config_cost`),
    whatever the cache's detector.
    """
    ours = [h for _, _, h in METRIC_COLUMNS]
    header = (["config", "paper row", *ours, "▲FLOPs (G)", "▲#params (M)"]
              + [f"paper {h}" for h in ours] + ["paper ▲FLOPs", "paper ▲#params"])
    lines = []
    if banner:
        lines += [f"> {banner}", ""]
    if cache is not None:
        lines += [f"Cache: `{cache}`" + (f"; overrides: `{' '.join(overrides)}`" if overrides else ""), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path, cfg, cost, metrics, prow in rows:
        segm = metrics.get("segm", {})
        row_text = f"T{cfg.paper['table']}: {cfg.paper['row']}" if cfg.paper else "-"
        cells = [path.stem, row_text.replace("|", "\\|")]
        cells += [_num(segm.get(key)) for key, _, _ in METRIC_COLUMNS]
        cells += [_num(cost.get("flops_delta_G"), "{:.2f}"), _num(cost.get("params_delta_M"), "{:.2f}")]
        prow = prow or {}
        cells += [_num(prow.get(key)) for _, key, _ in METRIC_COLUMNS]
        cells += [_num(prow.get("flops_delta_G"), "{:.2f}"), _num(prow.get("params_delta_M"), "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
