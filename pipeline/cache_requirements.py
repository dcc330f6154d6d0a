"""Refuse, before any training or evaluation, a config that needs what a cache does not hold.

Each refusal names the ``cli.py extract`` flag (or detector) that would add what is missing:

- ``train.encoder_layer`` not among the stored encoder layers -> ``--encoder-layers``;
- ``train.num_queries`` above the stored queries per image -> ``--top-k``;
- head widths (``c1_channels``, ``num_feature_levels``) other than the cache's -> a cache of a
  detector with those widths (``--detector``), see :meth:`pipeline.head.HeadConfig.with_widths`.
"""

from __future__ import annotations

from .cache import CacheError
from .config import Config, ConfigError
from .head import HeadConfig


def check_cache_supports(cfg: Config, cache, cache_path) -> HeadConfig:
    """Check ``cfg`` against an open :class:`pipeline.cache.FeatureCache`; return the head config
    with the cache's widths.

    Raises:
        CacheError: a stored item the config needs is missing (names the extract flag).
        ConfigError: the config's head widths contradict the cache's.
    """
    layer = cfg.train.encoder_layer
    if layer not in cache.encoder_layers:
        raise CacheError(f"{cache_path}: train.encoder_layer={layer} is not stored (cache has encoder layers "
                         f"{cache.encoder_layers}); re-extract with --encoder-layers "
                         f"{','.join(str(v) for v in sorted({*cache.encoder_layers, layer}))}")
    stored = int(cache.fingerprint["top_k"])
    want = cfg.train.num_queries
    if want is not None and want > stored:
        raise CacheError(f"{cache_path}: train.num_queries={want} but the cache stores {stored} queries per image; "
                         f"re-extract with --top-k {want}")
    widths = cache.feature_widths
    try:
        return cfg.head.with_widths(**widths, source=str(cache_path))
    except ValueError as e:
        detector = cache.fingerprint.get("detector", "?")
        raise ConfigError(f"{e} (the cache was extracted with --detector {detector}: {widths['c1_channels']}-channel C1, "
                          f"{widths['num_feature_levels']} encoder levels; a config needing other widths needs a cache "
                          "of a detector that has them)") from None
