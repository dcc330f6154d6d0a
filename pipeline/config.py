"""Experiment configuration: one YAML file per experiment, ``--set key=value`` overrides.

A config has three sections: ``head`` (the mask head, see :class:`pipeline.head.HeadConfig`),
``train`` (:class:`TrainConfig`) and ``evaluate`` (:class:`EvalConfig`). A YAML file may name a
``base:`` file (path relative to itself) whose values it overrides. The fully resolved config
is written into every run directory and into every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .head.config import HeadConfig


class ConfigError(ValueError):
    """A config file or override that is not valid (the message names the file / key)."""


@dataclass
class TrainConfig:
    """Training recipe (paper Sec. 3.1 "Experiment Setup").

    Attributes:
        epochs: passes over the training cache (6 = the paper's 88,500 iterations at batch 8).
        max_iters: stop after this many iterations (overrides ``epochs`` when set).
        batch_size: images per iteration (8 in the paper; 2 and 4 also reported, Table 8).
        lr, betas, weight_decay: AdamW (1.5e-4, (0.9, 0.999), 5e-5).
        lr_drops: fractions of the total iterations where the lr is divided by ``lr_drop_factor``.
        clip_grad_norm: max global gradient L2 norm (0 = off).
        boxes: ``"pred"`` trains on the detector's matched predicted boxes; ``"gt"`` on the
            ground-truth boxes, each with the query matched to it (an upper bound of mask
            quality independent of the detector).
        encoder_layer: which cached encoder layer feeds the image encoder (Table 15: #4).
        num_queries: queries per image used in training and evaluation: the first (best-scored;
            the cache stores them by descending class score) ``num_queries`` of the cached ones;
            None = all cached (``extract --top-k``; the paper's "top ~100"). More than the cache
            holds is refused before training.
        seed: seeds data order and point sampling; with ``deterministic`` a CPU run repeats.
        num_workers: DataLoader worker processes (spawned; each opens the store itself).
        amp: autocast (bfloat16) on CUDA; ignored on CPU.
        checkpoint_every: iterations between checkpoints (the final one is always written).
        log_every: iterations between metric lines.
        eval_every_epoch: evaluate on ``--val-cache`` after every epoch (else only at the end).
        mask_fraction: in (0, 1]: train on the masks of this seeded fraction of the cached images
            (label efficiency, :mod:`pipeline.subsets`); 1 = all.
    """

    epochs: int = 6
    max_iters: int | None = None
    batch_size: int = 8
    lr: float = 1.5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-5
    lr_drops: tuple[float, ...] = (0.9, 0.95)
    lr_drop_factor: float = 0.1
    clip_grad_norm: float = 0.1
    boxes: str = "pred"
    encoder_layer: int = 4
    num_queries: int | None = None
    seed: int = 0
    num_workers: int = 0
    amp: bool = True
    deterministic: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    eval_every_epoch: bool = False
    mask_fraction: float = 1.0


@dataclass
class EvalConfig:
    """Inference/evaluation settings (paper Sec. 3.1; detectron2 conventions).

    Attributes:
        top_n: predictions kept per image, ranked by final score (COCO maxDets = 100).
        mask_threshold: probability threshold after pasting into the image.
        batch_size: images per forward (results do not depend on it).
    """

    top_n: int = 100
    mask_threshold: float = 0.5
    batch_size: int = 4


@dataclass
class Config:
    """The whole experiment. ``head`` is parsed once, here, into a :class:`HeadConfig`; every
    later stage receives that object (the widths are filled from the cache by ``train-head``)."""

    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    #: the paper row a config reproduces (``configs/ablations/``): ``{"table": int, "row": str}``
    #: with the row's setting text exactly as in ``shared/papers/ablation-targets.json``, and
    #: optionally ``"excuse"``: why its ▲#params cannot match the paper's (and by how much), and
    #: ``"flops_excuse"``: the same for its ▲FLOPs.
    paper: dict | None = None
    #: detector whose cache widths the row assumes (``hdetr-r50``, ``dino-focalnet``): what
    #: ``cli.py params`` counts with when no ``--widths`` is given. Never overrides a cache's widths.
    widths: str | None = None

    def to_dict(self) -> dict:
        """Plain nested dict (what checkpoints store and ``config_from_dict`` reads back)."""
        out = {"head": self.head.to_dict(), "train": asdict(self.train), "evaluate": asdict(self.evaluate)}
        if self.paper is not None:
            out["paper"] = copy.deepcopy(self.paper)
        if self.widths is not None:
            out["widths"] = self.widths
        return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        base_path = (path.parent / base).resolve()
        if base_path in seen:
            raise ConfigError(f"{path}: circular base {base_path}")
        raw = _merge(_read_yaml(base_path, seen + (base_path,)), raw)
    raw.pop("description", None)
    return raw


def _dataclass_from(cls, values: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    defaults = cls()
    return cls(**{k: _coerce(getattr(defaults, k), v, f"{where}.{k}") for k, v in values.items()})


def parse_value(text: str) -> Any:
    """Parse the value of ``--set key=value`` as YAML (numbers, bools, lists, null, strings).

    Numbers YAML 1.1 leaves as strings (``1e-3``) become floats.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return _number(value)


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(default: Any, value: Any, where: str) -> Any:
    """Cast ``value`` to the type of a field's ``default`` (YAML gives ``1e-3`` as a string)."""
    if isinstance(default, bool) or default is None:
        return value
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(_coerce(default[0] if default else None, v, where) for v in value)
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``["section.key=value", ...]`` to a raw config dict (dotted paths, YAML values).

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set: empty key in {item!r}")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[parts[-1]] = parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: missing file, bad YAML, unknown section or key (the message names them).
    """
    raw = _read_yaml(Path(path)) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, where=str(path) if path else "config")


def config_from_dict(raw: dict, where: str = "config") -> Config:
    """Build a :class:`Config` from a raw dict (as stored in checkpoints and run dirs)."""
    unknown = sorted(set(raw) - {"head", "train", "evaluate", "paper", "widths"})
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; expected head, train, evaluate (and paper, widths)")
    paper = raw.get("paper")
    if paper is not None and (not isinstance(paper, dict) or not isinstance(paper.get("table"), int)
                              or not isinstance(paper.get("row"), str) or set(paper) - {"table", "row", "excuse", "flops_excuse"}):
        raise ConfigError(f"{where}: paper must be {{table: <int>, row: <setting text>, [excuse: <why>], "
                          f"[flops_excuse: <why>]}}, got {paper!r}")
    widths = raw.get("widths")
    if widths is not None and not isinstance(widths, str):
        raise ConfigError(f"{where}: widths must be a detector name (hdetr-r50, dino-focalnet, ...), got {widths!r}")
    head = dict(raw.get("head") or {})
    head_defaults = HeadConfig()
    head = {k: _coerce(getattr(head_defaults, k, None), v, f"{where}: head.{k}") for k, v in head.items()}
    try:
        head_cfg = HeadConfig.from_dict(head)  # the one place a head config is parsed
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: head: {e}") from None
    evaluate = _dataclass_from(EvalConfig, raw.get("evaluate") or {}, f"{where}: evaluate")
    if evaluate.top_n < 1 or evaluate.batch_size < 1:
        raise ConfigError(f"{where}: evaluate.top_n and evaluate.batch_size must be >= 1, "
                          f"got {evaluate.top_n} and {evaluate.batch_size}")
    if not 0.0 < evaluate.mask_threshold < 1.0:
        raise ConfigError(f"{where}: evaluate.mask_threshold must be in (0, 1), got {evaluate.mask_threshold}")
    train = _dataclass_from(TrainConfig, raw.get("train") or {}, f"{where}: train")
    from .subsets import check_mask_fraction

    try:
        check_mask_fraction(train.mask_fraction, f"{where}: train.mask_fraction")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Config(head=head_cfg, train=train, evaluate=evaluate, paper=copy.deepcopy(paper), widths=widths)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))
    tmp.replace(path)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
