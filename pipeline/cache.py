"""The feature cache: a chunked Zarr v3 store of what the frozen detector produced per image.

Stage one (``pipeline/extract.py``) writes it once; stage two (training, evaluation) reads
only this store. The module knows tensors and metadata, never models.

Layout (``N`` images, ``K`` queries, ``D`` hidden dim, ``C`` logits, ``L`` levels, ``C1`` channels)::

    <store>/zarr.json            attrs: format, format_version, fingerprint, skipped
    image_ids       [N]        int64   exactly as in the annotation file
    orig_size       [N, 2]     int32   (height, width) of the decoded original image, pixels
    size            [N, 2]     int32   (height, width) after test-time resize, pixels
    done            [N]        uint8   0 = pending/partial, 1 = done, 2 = skipped (bad image);
                                       chunk of one image, written LAST for that image
    queries         [N, K, D]  feature dtype   last decoder layer, top-K by best class score
    queries_scale   [N, K]     float16 (int8 stores only) per-row dequantisation scale
    logits          [N, K, C]  float32 class logits (column = detector class index)
    boxes           [N, K, 4]  float32 cxcywh normalized to the image
    query_index     [N, K]     int32   index among the detector's queries
    spatial_shapes  [N, L, 2]  int32   (H_l, W_l) of the stored (valid) encoder levels
    valid_ratios    [N, L, 2]  float32 as the detector computed them, (w, h)
    token_offset    [N + 1]    int64   row range of image i in the encoder arrays
    encoder/layer_<k> [T, D]   feature dtype   flattened multi-scale tokens after encoder layer k
                                       (only the detector levels listed in fingerprint ``levels``)
    encoder/layer_<k>_scale [T] float16 (int8 stores only) per-token-row scale
    c1_shape        [N, 2]     int32   (H1, W1)
    c1_offset       [N + 1]    int64   row range of image i in ``c1``
    c1              [P, C1]    feature dtype   stride-4 backbone map, pixels row-major (y, x)
    c1_scale        [P]        float16 (int8 stores only) per-pixel-row scale

Ragged maps are flat with per-image offsets. Every image's rows start on a chunk boundary, so
each image owns whole chunks: writers of different images never touch the same chunk (zarr
loses data when two writers touch one chunk or shard), and a partially written image is simply
rewritten on resume. Rows past an image's end inside its last chunk are never written apart
from that chunk's fill value, so the slack costs (almost) nothing after compression.

bfloat16 has no numpy dtype: it is stored as its raw 16 bits (``uint16``) and viewed back. int8 features are stored
zigzag-coded as ``uint8`` (:func:`zigzag_int8`: magnitudes in the low bits, which bit-shuffled
zstd compresses better); int8 arrays of earlier stores are read as they are.

A store is a local directory or any fsspec URL zarr accepts (``s3://...`` with the ``s3``
extra). A local store is built under ``<store>.partial`` and renamed into place; an object
store has no rename, so it is built in place with the attribute ``creating`` until its
attributes are written last (a store still marked is a crashed creation and is made again).

Feature dtypes (fingerprint ``dtype``): ``float16``/``bfloat16``/``float32`` are read back in
that dtype; ``int8`` is symmetric per-row quantisation (each token row, query row and C1
pixel row has its own float16 scale, the step ``max(max|x| / 127, 0.0329 * rms)``: relative
RMS error 0.95 % on well-spread rows, see :func:`quantize_int8`) and is dequantised to float32
on read. Fingerprint ``keep_bits``
(float16/float32 only) rounds the mantissa to that many bits with numcodecs ``BitRound``
before compression (lossy). The Blosc codec of each array (fingerprint ``codec``) is a
choice of :data:`CODECS`; ``auto`` takes :data:`AUTO_CODECS`, chosen by
``benchmarks/cache_size.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import zarr
from zarr.codecs import BitRound, BloscCodec
from zarr.core.sync import sync as _zarr_sync

from .faults import fault_point
from .record import SampleRecord

FORMAT = "mask-frozen-detr-cache"
FORMAT_VERSION = 1
#: Stored feature dtype -> the torch dtype ``read`` returns (int8 is dequantised to float32).
FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "int8": torch.float32}
#: Mantissa bits of the dtypes ``keep_bits`` (numcodecs BitRound) applies to.
MANTISSA_BITS = {"float16": 10, "float32": 23}
#: Blosc codecs a store may use per array: name -> (cname, shuffle, clevel). The names without a
#: level are clevel 3 (stores written before levels were a choice keep their names).
CODECS = {f"{cname}{level or ''}-{shuffle}": (cname, shuffle, level or 3)
          for cname in ("zstd", "lz4") for level in (None, 5, 7, 9) for shuffle in ("bitshuffle", "shuffle", "noshuffle")
          if cname == "zstd" or level is None}
#: ``codec="auto"``: (stored dtype, array kind) -> codec, from ``benchmarks/cache_size.py`` (README
#: "Cache size"). Kinds: ``tokens`` (encoder layers), ``c1``, ``queries``, ``scale``, ``other``.
#: Measured (random-init golden-small features, val2017, 320/480): zstd level 5 is where both
#: feature dtypes gain most for their encode speed (~130 MB/s per core here; level 9 gains 3-7 %
#: more at ~8 MB/s, level 3 loses 8-15 %). At level 5 float16 compresses best byte-shuffled
#: (1.22x on tokens) and zigzag-coded int8 best bit-shuffled (1.32x on tokens, 1.43x on C1; in
#: two's complement 1.20x / 1.31x), so int8 takes ~0.46x the float16 bytes; the float16 scales
#: compress best byte-shuffled. Every other array (logits, boxes, ...) keeps :data:`DEFAULT_CODEC`.
AUTO_CODECS = {("int8", "tokens"): "zstd5-bitshuffle", ("int8", "c1"): "zstd5-bitshuffle",
               ("int8", "queries"): "zstd5-bitshuffle", ("int8", "scale"): "zstd5-shuffle",
               ("float16", "tokens"): "zstd5-shuffle", ("float16", "c1"): "zstd5-shuffle",
               ("float16", "queries"): "zstd5-bitshuffle", ("bfloat16", "tokens"): "zstd5-shuffle",
               ("bfloat16", "c1"): "zstd5-shuffle", ("bfloat16", "queries"): "zstd5-shuffle"}
DEFAULT_CODEC = "zstd-bitshuffle"
#: int8 quantisation step as a fraction of the row's RMS (see :func:`quantize_int8`): a uniform
#: rounding error of step/sqrt(12) = 0.95 % of the RMS, inside the 1 % budget of the issue.
INT8_STEP_PER_RMS = 0.0329

# ``keep_bits`` stores use numcodecs' BitRound, which zarr flags on every open as outside the zarr
# v3 spec (readable by zarr-python + numcodecs; the README says so): not worth a warning per read.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

DONE, PENDING, SKIPPED = 1, 0, 2

# Fields of the fingerprint that must agree for two caches to be used together (train/val,
# or a head trained on one cache applied to another). ``finetuned`` (absent = the original
# weights) names a detector fine-tuned by ``train-head --online --finetune`` (paper Table 11):
# ``extract --finetuned RUN/head.pt`` records it, :func:`pipeline.checkpoint.load_checkpoint`
# derives it from a run's fine-tuned parameters.
COMPATIBILITY_KEYS = ("detector", "detector_config", "checkpoint_sha256", "finetuned", "preprocessing",
                      "encoder_layers", "top_k", "levels")


#: Printed above every table and stored in metrics files of a cache whose fingerprint says
#: ``random_init`` (no official weights): the numbers only show that the pipeline runs.
RANDOM_INIT_BANNER = "RANDOM-INIT DETECTOR (no official weights): these numbers are meaningless"


class CacheError(ValueError):
    """A cache that cannot be used as asked: wrong format, stale fingerprint, missing image."""


def bytes_per_image(*, top_k: int, hidden_dim: int, num_classes: int, num_levels: int, num_tokens: int,
                    c1_numel: int, num_encoder_layers: int, dtype: str = "float16", c1_channels: int | None = None) -> int:
    """Uncompressed bytes one image occupies in the store (the layout above; before Blosc).

    Args:
        top_k: K queries; hidden_dim: D; num_classes: C; num_levels: L (stored levels).
        num_tokens: S, encoder tokens of the image over the stored levels; c1_numel: ``C1 * H1 * W1``.
        num_encoder_layers: stored encoder layers; dtype: feature dtype (a key of ``FEATURE_DTYPES``).
        c1_channels: C1, needed for ``int8`` (one float16 scale per pixel row of C1).

    Raises:
        ValueError: unknown dtype, or ``int8`` without ``c1_channels``.
    """
    check_dtype(dtype, ValueError)
    if dtype == "int8":
        if not c1_channels:
            raise ValueError("bytes_per_image: int8 needs c1_channels (one scale per C1 pixel row)")
        rows = top_k + num_encoder_layers * num_tokens + c1_numel // c1_channels
        features = top_k * hidden_dim + num_encoder_layers * num_tokens * hidden_dim + c1_numel + 2 * rows
    else:
        feature = torch.finfo(FEATURE_DTYPES[dtype]).bits // 8
        features = (top_k * hidden_dim + num_encoder_layers * num_tokens * hidden_dim + c1_numel) * feature
    fixed = top_k * num_classes * 4 + top_k * 4 * 4 + top_k * 4 + num_levels * 2 * (4 + 4) \
        + 8 + 2 * 2 * 4 + 1 + 2 * 4 + 2 * 8  # logits, boxes, query_index, shapes/ratios, ids, sizes, done, offsets
    return features + fixed


def check_dtype(dtype: str, error=None) -> None:
    """Raise ``error`` (default :class:`CacheError`) naming ``--dtype`` unless ``dtype`` is a key of FEATURE_DTYPES."""
    if dtype not in FEATURE_DTYPES:
        raise (error or CacheError)(f"--dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")


def check_storage(dtype: str, keep_bits: int | None, codec: str) -> None:
    """Validate a store's feature dtype, ``keep_bits`` and codec choice.

    Raises:
        CacheError: unknown dtype or codec, or ``keep_bits`` outside ``1..mantissa bits`` or
            given for a dtype BitRound does not apply to (bfloat16, int8); the message names the flag.
    """
    check_dtype(dtype)
    if codec != "auto" and codec not in CODECS:
        raise CacheError(f"--codec must be 'auto' or one of {sorted(CODECS)}, got {codec!r}")
    if keep_bits is not None:
        if dtype not in MANTISSA_BITS:
            raise CacheError(f"--keep-bits applies to float16/float32 features (numcodecs BitRound), not {dtype}")
        if not 1 <= int(keep_bits) <= MANTISSA_BITS[dtype]:
            raise CacheError(f"--keep-bits must be in 1..{MANTISSA_BITS[dtype]} for {dtype}, got {keep_bits}")


def codec_of(dtype: str, kind: str, codec: str = "auto", keep_bits: int | None = None) -> str:
    """The :data:`CODECS` name an array of ``kind`` (tokens, c1, queries, scale, other) uses.

    ``auto``: :data:`AUTO_CODECS`; feature arrays rounded by ``keep_bits`` (BitRound zeroes
    their low mantissa bits) take ``zstd5-bitshuffle``, which packs those zero bits together.
    """
    if codec != "auto":
        return codec
    if keep_bits is not None and kind in ("tokens", "c1", "queries"):
        return "zstd5-bitshuffle"
    return AUTO_CODECS.get((dtype, kind), DEFAULT_CODEC)


def _compressor(name: str = DEFAULT_CODEC) -> BloscCodec:
    # numcodecs' Blosc through zarr's spec-conformant codec.
    cname, shuffle, clevel = CODECS[name]
    return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)


def _storage_dtype(dtype: str) -> str:
    check_dtype(dtype)
    return {"bfloat16": "uint16", "int8": "uint8"}.get(dtype, dtype)


def zigzag_int8(q: np.ndarray) -> np.ndarray:
    """int8 -> uint8 zigzag code (0, -1, 1, -2, 2, ... -> 0, 1, 2, 3, 4, ...): the magnitude goes to
    the low bits, so the high bit planes of small values are zero and bit-shuffled zstd packs them
    (two's complement fills them with copies of the sign). Measured: int8 tokens compress 1.32x
    instead of 1.20x (zstd 5, bit-shuffled). Inverse: :func:`unzigzag_int8`."""
    q16 = q.astype(np.int16)
    return ((q16 << 1) ^ (q16 >> 15)).astype(np.uint8)


def unzigzag_int8(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zigzag_int8`: uint8 code -> int8."""
    z16 = z.astype(np.int16)
    return ((z16 >> 1) ^ -(z16 & 1)).astype(np.int8)


def quantize_int8(x: torch.Tensor, dim: int = -1, step_per_rms: float = INT8_STEP_PER_RMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation with one float16 scale (the step) per slice, sized for the error budget.

    ``scale = max(max|x| / 127, step_per_rms * rms(x))`` over ``dim`` (rounded to float16),
    ``q = round(x / scale)`` in [-127, 127]; an all-zero slice gets scale 0 and q 0. Nothing is
    ever clipped: the step is at least ``max|x| / 127``. For a well-spread slice (max below
    ``127 * step_per_rms`` = 4.2 RMS, e.g. a Gaussian row of 256 values, max ~2.9 RMS) the step is
    ``step_per_rms * rms``: relative RMS error ``step_per_rms / sqrt(12)`` = 0.95 % — fewer levels
    than max-abs scaling (entropy ~7.0 instead of ~7.5 bits a value), so the bytes compress to
    <= 0.5x float16's. A slice with outliers (max above 4.2 RMS: an outlier channel) falls back to
    max-abs scaling: its outliers keep their value within half a step, and its relative error is
    larger than 0.95 % (as plain max-abs int8 would give). Error per element <= scale / 2.
    Source: symmetric per-row quantisation (e.g. LLM.int8, Dettmers et al. 2022) with the step
    chosen from the RMS budget; ``benchmarks/cache_size.py`` measures it.

    Args:
        x: ``[R, C]`` float tensor (any float dtype, any device).
        dim: the dimension reduced for the scale: -1 = one scale per row (``[R]``), 0 = one per
            column (``[C]``).
        step_per_rms: the step as a fraction of the slice's RMS (0 = plain max-abs scaling).

    Returns:
        ``(q [R, C] int8, scale float16 [R] or [C])`` on CPU.
    """
    x = x.detach().to("cpu", torch.float32)
    step = torch.maximum(x.abs().amax(dim=dim, keepdim=True) / 127,
                         float(step_per_rms) * x.pow(2).mean(dim=dim, keepdim=True).sqrt())
    scale = step.to(torch.float16)
    s = scale.float()
    q = torch.where(s > 0, x / torch.where(s > 0, s, 1), 0).round().clamp_(-127, 127).to(torch.int8)
    return q, scale.squeeze(dim)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``q * scale`` as float32, ``[R, C]``."""
    return q.to(torch.float32) * scale.to(torch.float32).unsqueeze(dim)


def _to_storage(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``[R, C]`` features -> (stored array, per-row float16 scale for int8 else None)."""
    if dtype == "int8":
        q, scale = quantize_int8(t)
        return zigzag_int8(q.numpy()), scale.numpy()
    t = t.detach().to("cpu", FEATURE_DTYPES[dtype]).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16), None
    return t.numpy(), None


def _from_storage(a: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    if dtype == "int8":  # uint8 zigzag (int8 arrays: stores written before zigzag, read as they are)
        q = unzigzag_int8(a) if a.dtype == np.uint8 else np.ascontiguousarray(a)
        return dequantize_int8(torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(scale)))
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def as_stored(record: SampleRecord, fingerprint: dict, encoder_layer: int) -> SampleRecord:
    """The record a store with ``fingerprint`` would return for ``record`` (written, then read back).

    For a live detector feeding a head trained on a cache (``cli.py predict``): the stored encoder
    levels (fingerprint ``levels``) are selected, only ``encoder_layer`` is kept, and the features
    (``queries``, the tokens, ``c1``) are rounded exactly as :meth:`FeatureCache.write` +
    :meth:`FeatureCache.read` round them (``dtype``, with int8's per-row scales; ``keep_bits`` with
    numcodecs ``BitRound``), so the head sees the values it was trained on. Other fields are
    shared, moved to the CPU.

    Args:
        record: a detector's :class:`~pipeline.record.SampleRecord` of one image.
        fingerprint: the training cache's fingerprint (``dtype``, ``keep_bits``, ``levels``).
        encoder_layer: the encoder layer the head reads (1-based).

    Raises:
        CacheError: ``encoder_layer`` not in the record.
    """
    import numcodecs

    if encoder_layer not in record.encoder_tokens:
        raise CacheError(f"encoder layer {encoder_layer} not extracted (have {sorted(record.encoder_tokens)})")
    if fingerprint.get("levels") is not None:
        record = record.select_levels(list(fingerprint["levels"]))
    dtype, keep_bits = fingerprint["dtype"], fingerprint.get("keep_bits")

    def rounded(rows: torch.Tensor) -> torch.Tensor:  # [R, C] as _put then _get
        data, scale = _to_storage(rows, dtype)
        if keep_bits is not None:
            data = np.asarray(numcodecs.BitRound(keepbits=int(keep_bits)).encode(data)).view(data.dtype).reshape(data.shape)
        return _from_storage(data, dtype, scale)

    c1 = record.c1.detach().cpu()
    h1, w1 = c1.shape[-2:]
    return dataclasses.replace(
        record, queries=rounded(record.queries), logits=record.logits.detach().to("cpu", torch.float32),
        boxes=record.boxes.detach().to("cpu", torch.float32),
        query_index=record.query_index.detach().to("cpu", torch.int64),
        encoder_tokens={encoder_layer: rounded(record.encoder_tokens[encoder_layer])},
        spatial_shapes=record.spatial_shapes.detach().to("cpu", torch.int64),
        level_start_index=record.level_start_index.detach().to("cpu", torch.int64),
        valid_ratios=torch.as_tensor(record.valid_ratios).detach().to("cpu", torch.float32),
        c1=rounded(c1.flatten(1).transpose(0, 1)).transpose(0, 1).reshape(-1, h1, w1))


def _aligned_offsets(rows: Iterable[int], chunk_rows: int) -> np.ndarray:
    """Start offsets with each image starting on a chunk boundary; last entry = total rows."""
    offsets = [0]
    for r in rows:
        end = offsets[-1] + int(r)
        offsets.append(-(-end // chunk_rows) * chunk_rows)  # next image starts on a chunk boundary
    return np.asarray(offsets, dtype=np.int64)


FINETUNED_HINT = (" (a head whose run fine-tuned the detector reads only features of that fine-tuned detector: "
                  "extract them with `cli.py extract ... --weights OFFICIAL.pth --finetuned RUN/head.pt`; a head "
                  "of the original detector reads a cache extracted without --finetuned)")


def fingerprint_diff(expected: dict, found: dict, keys: Iterable[str] = COMPATIBILITY_KEYS) -> list[str]:
    """Human-readable differences between two fingerprints on ``keys`` (empty = compatible)."""
    diffs = []
    for k in keys:
        a, b = expected.get(k), found.get(k)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            diffs.append(f"{k}: expected {json.dumps(a, sort_keys=True)}, cache has {json.dumps(b, sort_keys=True)}"
                         + (FINETUNED_HINT if k == "finetuned" else ""))
    return diffs


def is_url(path: str | os.PathLike) -> bool:
    """True when ``path`` is an fsspec URL (``s3://bucket/x.zarr``, ``gs://...``, ``memory://...``),
    not a local path. ``file://`` URLs count as URLs (stored through fsspec, without rename)."""
    return isinstance(path, str) and "://" in path


def store_location(path: str | os.PathLike) -> str | Path:
    """``path`` as the store is addressed: the URL string unchanged, or a local :class:`Path`."""
    return path.rstrip("/") if is_url(path) else Path(path)


def _url_fs(url: str):
    """``(fsspec filesystem, path inside it)`` of ``url``.

    Raises:
        CacheError: the URL's protocol is unknown to fsspec, or its filesystem package (an extra,
            e.g. ``s3fs`` for ``s3://``: ``pip install 'mask-frozen-detr[s3]'``) is not installed.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise CacheError(f"{url}: the filesystem for {url.split('://')[0]}:// is not installed ({e}); "
                         "for s3:// install the extra: pip install 'mask-frozen-detr[s3]'") from None
    except ValueError as e:
        raise CacheError(f"{url}: not a store URL fsspec knows ({e})") from None


def _open_zarr_group(path: str | Path, mode: str) -> zarr.Group:
    """The zarr group at a local path or an fsspec URL (zarr's ``FsspecStore``, asynchronous)."""
    if not is_url(path):
        return zarr.open_group(str(path), mode=mode)
    from zarr.storage import FsspecStore

    _url_fs(path)  # clear errors for an unknown protocol / a filesystem extra not installed
    # its own asynchronous filesystem instance, on zarr's event loop (a synchronous one is wrapped)
    store = FsspecStore.from_url(path, read_only=mode == "r")
    return zarr.open_group(store=store, mode=mode)


def _has_metadata(path: str | Path) -> bool:
    """Whether a zarr group's ``zarr.json`` exists at ``path`` (local path or URL)."""
    if is_url(path):
        fs, root = _url_fs(path)
        return fs.exists(f"{root}/zarr.json")
    return (Path(path) / "zarr.json").exists()


@dataclass
class ImageLayout:
    """What the writer must know about one image before any detector output exists.

    Attributes:
        image_id: id from the annotation file.
        orig_size: ``(height, width)`` of the original image, pixels.
        size: ``(height, width)`` after test-time resize, pixels.
        spatial_shapes: ``[(H_l, W_l)] * L`` of the encoder levels of the valid region.
        c1_shape: ``(H1, W1)`` of the stride-4 map.
    """

    image_id: int
    orig_size: tuple[int, int]
    size: tuple[int, int]
    spatial_shapes: list[tuple[int, int]]
    c1_shape: tuple[int, int]


class FeatureCache:
    """Reader and writer of one cache store (see the module docstring for the schema).

    Use :meth:`create_or_resume` to write and :meth:`open` to read. Indices ``i`` are positions
    in ``image_ids`` (0..N-1), not image ids; :meth:`index_of` converts.
    """

    def __init__(self, path: str | os.PathLike, group: zarr.Group):
        self.path = store_location(path)
        self.group = group
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{self.path}: not a {FORMAT} store (attrs.format = {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise CacheError(
                f"{self.path}: cache format version {attrs.get('format_version')} is not supported "
                f"(this code reads version {FORMAT_VERSION}); re-run extract"
            )
        self.fingerprint: dict = attrs["fingerprint"]
        self.dtype: str = self.fingerprint["dtype"]
        self.keep_bits: int | None = self.fingerprint.get("keep_bits")
        self.codec: str = self.fingerprint.get("codec", "auto")
        check_dtype(self.dtype)
        self.encoder_layers: list[int] = list(self.fingerprint["encoder_layers"])
        self.image_ids: np.ndarray = group["image_ids"][:]
        self._index = {int(i): n for n, i in enumerate(self.image_ids)}
        self._token_offset = group["token_offset"][:]
        self._c1_offset = group["c1_offset"][:]
        self._spatial_shapes = group["spatial_shapes"][:]
        self._c1_shape = group["c1_shape"][:]
        self._size = group["size"][:]
        self._orig_size = group["orig_size"][:]
        self._arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        """The array ``name`` (path in the group), opened once per :class:`FeatureCache`: its
        metadata (``zarr.json``) is read on first use only, so a read costs chunk requests alone."""
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = self.group[name]
        return arr

    @property
    def feature_widths(self) -> dict[str, int]:
        """``{"c1_channels": C1, "num_feature_levels": L}`` of the stored features, from the fingerprint.

        These are the mask head's detector-dependent input widths (``HeadConfig.with_widths``).

        Raises:
            CacheError: the fingerprint lacks them (a cache written before they were recorded:
                re-run extract) or they disagree with the stored arrays.
        """
        widths = self.fingerprint.get("feature_widths")
        if not isinstance(widths, dict) or set(widths) != {"c1_channels", "num_feature_levels"}:
            raise CacheError(f"{self.path}: the fingerprint has no feature_widths (c1_channels, num_feature_levels); "
                             "the cache predates them: re-run extract")
        stored = {"c1_channels": int(self.group["c1"].shape[1]),
                  "num_feature_levels": int(self._spatial_shapes.shape[1])}
        if {k: int(v) for k, v in widths.items()} != stored:
            raise CacheError(f"{self.path}: fingerprint feature_widths {widths} disagree with the stored arrays {stored}")
        return stored

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | os.PathLike, expected: dict | None = None,
             keys: Iterable[str] = COMPATIBILITY_KEYS, mode: str = "r") -> "FeatureCache":
        """Open an existing store (read-only by default), optionally checking its fingerprint.

        Args:
            path: the ``.zarr`` directory, or an fsspec URL (``s3://bucket/x.zarr``; see :func:`is_url`).
            mode: ``"r"`` or ``"r+"`` (a writer process resuming its share of the images).
            expected: a fingerprint (or part of one) the cache must match on ``keys``.

        Raises:
            CacheError: missing/foreign store, unsupported version, or a fingerprint that
                differs from ``expected`` (the message lists each differing field).
        """
        path = store_location(path)
        if not _has_metadata(path):
            raise CacheError(f"{path}: no feature cache here (missing {path}/zarr.json); run `cli.py extract` first")
        cache = cls(path, _open_zarr_group(path, mode))
        if expected is not None:
            diffs = fingerprint_diff(expected, cache.fingerprint, keys)
            if diffs:
                raise CacheError(f"{path}: cache is stale or from another setup:\n  " + "\n  ".join(diffs))
        return cache

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, fingerprint: dict, layouts: list[ImageLayout],
                         *, top_k: int, hidden_dim: int, num_classes: int, c1_channels: int,
                         token_chunk_rows: int = 8192, c1_chunk_rows: int = 8192,
                         overwrite: bool = False) -> "FeatureCache":
        """Create a new store, or reopen one written by the same command to resume it.

        Args:
            fingerprint: JSON-serialisable dict; must contain ``dtype`` (a key of
                ``FEATURE_DTYPES``) and ``encoder_layers`` (list of int), may contain
                ``keep_bits`` (int or None) and ``codec`` (``auto`` or a key of :data:`CODECS`),
                and should contain every field of ``COMPATIBILITY_KEYS``.
            layouts: one :class:`ImageLayout` per image, in store order.
            overwrite: delete an existing store at ``path`` instead of resuming it.

        Raises:
            CacheError: an existing store at ``path`` has another fingerprint or other images
                (the message says what differs and suggests ``--overwrite``); an invalid
                dtype/codec/keep_bits (before anything is written).
        """
        path = store_location(path)
        dtype = fingerprint["dtype"]
        keep_bits, codec = fingerprint.get("keep_bits"), fingerprint.get("codec", "auto")
        check_storage(dtype, keep_bits, codec)
        sdtype = _storage_dtype(dtype)
        image_ids = np.asarray([l.image_id for l in layouts], dtype=np.int64)
        url = is_url(path)
        if url and not overwrite and _has_metadata(path):
            # An object store has no rename: the group is created in place, marked "creating"
            # until its attrs are written last; a marked store is a crashed creation, made again.
            attrs = dict(_open_zarr_group(path, "r").attrs)
            if attrs.get("creating") == FORMAT and "format" not in attrs:
                overwrite = True
        if _has_metadata(path) and not overwrite:
            cache = cls.open(path)
            diffs = fingerprint_diff(fingerprint, cache.fingerprint, keys=sorted(fingerprint))
            if diffs or not np.array_equal(cache.image_ids, image_ids):
                if not np.array_equal(cache.image_ids, image_ids):
                    diffs.append(f"image_ids: {len(image_ids)} requested, cache holds {len(cache.image_ids)} "
                                 "(or another selection)")
                raise CacheError(
                    f"{path}: exists and was written with other settings, so it cannot be resumed:\n  "
                    + "\n  ".join(diffs) + "\nUse another --out or pass --overwrite to replace it."
                )
            return cls(path, _open_zarr_group(path, "r+"))

        if url:
            fs, root = _url_fs(path)
            if fs.exists(root) and not _has_metadata(path) and fs.ls(root):
                raise CacheError(f"{path}: exists and is not a feature cache; refusing to write into it")
            partial = path
            group = _open_zarr_group(path, "w")  # mode "w" clears what was there (--overwrite, crashed creation)
            group.attrs["creating"] = FORMAT
        else:
            if path.exists() and not (path / "zarr.json").exists() and any(path.iterdir()):
                raise CacheError(f"{path}: exists and is not a feature cache; refusing to write into it")
            if overwrite and path.exists():
                shutil.rmtree(path)
            # Built under a temporary name and renamed into place: a crash while creating never
            # leaves a half-made store at ``path``.
            partial = path.with_name(path.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)
            group = zarr.open_group(str(partial), mode="w")
        n = len(layouts)
        num_levels = len(layouts[0].spatial_shapes) if layouts else 0
        tok_rows = [sum(h * w for h, w in l.spatial_shapes) for l in layouts]
        c1_rows = [l.c1_shape[0] * l.c1_shape[1] for l in layouts]
        token_offset = _aligned_offsets(tok_rows, token_chunk_rows)
        c1_offset = _aligned_offsets(c1_rows, c1_chunk_rows)
        comp = _compressor(codec_of(dtype, "other", codec))

        def feature_array(parent, name, shape, chunks, kind):
            filters = [BitRound(keepbits=int(keep_bits))] if keep_bits is not None else None
            parent.create_array(name, shape=shape, chunks=chunks, dtype=sdtype, filters=filters,
                                compressors=_compressor(codec_of(dtype, kind, codec, keep_bits)), fill_value=0)
            if dtype == "int8":
                parent.create_array(f"{name}_scale", shape=shape[:-1], chunks=chunks[:-1], dtype="float16",
                                    compressors=_compressor(codec_of(dtype, "scale", codec)), fill_value=0)

        def small(name, data):
            arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape or (1,),
                                     compressors=comp, fill_value=0)
            arr[...] = data

        small("image_ids", image_ids)
        small("orig_size", np.asarray([l.orig_size for l in layouts], dtype=np.int32).reshape(n, 2))
        small("size", np.asarray([l.size for l in layouts], dtype=np.int32).reshape(n, 2))
        small("spatial_shapes", np.asarray([l.spatial_shapes for l in layouts], dtype=np.int32).reshape(n, num_levels, 2))
        small("c1_shape", np.asarray([l.c1_shape for l in layouts], dtype=np.int32).reshape(n, 2))
        small("token_offset", token_offset)
        small("c1_offset", c1_offset)
        group.create_array("done", shape=(n,), chunks=(1,), dtype="uint8", fill_value=PENDING, compressors=None)
        per_image = dict(
            logits=((n, top_k, num_classes), "float32"), boxes=((n, top_k, 4), "float32"),
            query_index=((n, top_k), "int32"), valid_ratios=((n, num_levels, 2), "float32"),
        )
        for name, (shape, dt) in per_image.items():
            group.create_array(name, shape=shape, chunks=(1,) + shape[1:], dtype=dt, compressors=comp, fill_value=0)
        feature_array(group, "queries", (n, top_k, hidden_dim), (1, top_k, hidden_dim), "queries")
        enc = group.create_group("encoder")
        for k in fingerprint["encoder_layers"]:
            feature_array(enc, f"layer_{k}", (int(token_offset[-1]), hidden_dim), (token_chunk_rows, hidden_dim), "tokens")
        feature_array(group, "c1", (int(c1_offset[-1]), c1_channels), (c1_chunk_rows, c1_channels), "c1")
        # attrs last: a store without them is not a cache and will be recreated.
        fault_point("cache.create", partial)
        group.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION,
                            "fingerprint": fingerprint, "skipped": {}})
        if url:
            group.attrs.pop("creating", None)
            return cls(path, _open_zarr_group(path, "r+"))
        fault_point("cache.rename", partial)
        os.replace(partial, path)
        return cls(path, zarr.open_group(str(path), mode="r+"))

    # ------------------------------------------------------------------ status
    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: int) -> int:
        """Position of ``image_id`` in the store. Raises CacheError if absent."""
        try:
            return self._index[int(image_id)]
        except KeyError:
            raise CacheError(f"{self.path}: image id {image_id} is not in this cache") from None

    def status(self) -> np.ndarray:
        """``[N]`` uint8: 0 pending/partial, 1 done, 2 skipped."""
        return self.group["done"][:]

    def sizes(self, indices: Iterable[int]) -> dict[int, tuple[int, int]]:
        """``{index: (h, w)}`` resized image size in pixels (from the layout) of the given indices."""
        return {int(i): (int(self._size[i][0]), int(self._size[i][1])) for i in indices}

    def done_indices(self) -> list[int]:
        """Indices of completely written images."""
        return [int(i) for i in np.flatnonzero(self.status() == DONE)]

    @property
    def skipped(self) -> dict[str, str]:
        """``{image_id: reason}`` of images skipped by ``--skip-bad-images``."""
        return dict(self.group.attrs.get("skipped", {}))

    # ------------------------------------------------------------------ writing
    def write(self, i: int, record: SampleRecord) -> None:
        """Write every array of image ``i`` from its record, then set its ``done`` flag (last).

        Args:
            i: store index (0..N-1).
            record: the detector's :class:`~pipeline.record.SampleRecord` of that image (its
                ``image_id``/``size``, when set, must be the layout's; ``extras`` are not stored).

        Raises:
            CacheError: the record disagrees with the layout the store was created with (image
                id, size, spatial_shapes, c1 or token counts, encoder layers; the message names
                the field); nothing of image ``i`` is marked done then.
        """
        image_id = int(self.image_ids[i])
        if record.image_id is not None and int(record.image_id) != image_id:
            raise CacheError(f"{self.path}: record of image {record.image_id} written at index {i}, which holds image {image_id}")
        if record.size is not None and tuple(int(x) for x in record.size) != tuple(int(x) for x in self._size[i]):
            raise CacheError(f"image {image_id}: size {tuple(record.size)} differs from the layout {tuple(self._size[i].tolist())}")
        exp_shapes = self._spatial_shapes[i]
        got_shapes = np.asarray(torch.as_tensor(record.spatial_shapes).tolist(), dtype=np.int32)
        if got_shapes.shape != exp_shapes.shape or not np.array_equal(got_shapes, exp_shapes):
            raise CacheError(f"image {image_id}: spatial_shapes {got_shapes.tolist()} differ from the "
                             f"layout {exp_shapes.tolist()} computed before extraction")
        c1 = record.c1
        h1, w1 = (int(x) for x in self._c1_shape[i])
        if tuple(c1.shape[1:]) != (h1, w1):
            raise CacheError(f"image {image_id}: c1 has shape {tuple(c1.shape)}, layout expects [*, {h1}, {w1}]")
        if set(record.encoder_tokens) != set(self.encoder_layers):
            raise CacheError(f"image {image_id}: encoder layers {sorted(record.encoder_tokens)} != cache's {self.encoder_layers}")
        t0, c0 = int(self._token_offset[i]), int(self._c1_offset[i])
        n_tok = int((exp_shapes[:, 0] * exp_shapes[:, 1]).sum())
        for k, tokens in record.encoder_tokens.items():
            if tokens.shape[0] != n_tok:
                raise CacheError(f"image {image_id}: encoder layer {k} has {tokens.shape[0]} tokens, "
                                 f"spatial_shapes give {n_tok}")
        self._array("done")[i] = PENDING
        self._store([
            *self._feature_rows("queries", i, record.queries),
            ("logits", i, record.logits.detach().to("cpu", torch.float32).numpy()),
            ("boxes", i, record.boxes.detach().to("cpu", torch.float32).numpy()),
            ("query_index", i, record.query_index.detach().to("cpu", torch.int32).numpy()),
            ("valid_ratios", i, torch.as_tensor(record.valid_ratios).detach().to("cpu", torch.float32).numpy()),
        ])
        fault_point("cache.between_arrays", self.path)
        features = [row for k, tokens in record.encoder_tokens.items()
                    for row in self._feature_rows(f"encoder/layer_{k}", slice(t0, t0 + n_tok), tokens)]
        features += self._feature_rows("c1", slice(c0, c0 + h1 * w1), c1.flatten(1).transpose(0, 1))
        self._store(features)
        fault_point("cache.before_done", self.path)
        self._array("done")[i] = DONE

    def _feature_rows(self, name: str, where, rows: torch.Tensor) -> list[tuple[str, object, np.ndarray]]:
        """``[R, C]`` feature rows for array ``name`` at ``where`` as stored (and their int8 scales)."""
        data, scale = _to_storage(rows, self.dtype)
        return [(name, where, data)] + ([] if scale is None else [(f"{name}_scale", where, scale)])

    def _store(self, requests: list[tuple[str, object, np.ndarray]]) -> None:
        """``array[selection] = value`` for each request, written concurrently (one event-loop pass;
        Blosc encoding runs in zarr's thread pool). Returns once every write has finished."""
        arrays = [self._array(name).async_array for name, _, _ in requests]

        async def gather():
            await asyncio.gather(*(a.setitem(sel, v) for a, (_, sel, v) in zip(arrays, requests)))

        _zarr_sync(gather())

    def mark_skipped(self, i: int, reason: str) -> None:
        """Flag image ``i`` as skipped (bad input) and record why in the store's attrs."""
        skipped = self.skipped
        skipped[str(int(self.image_ids[i]))] = reason
        fault_point("cache.attrs", self.path)
        self.group.attrs["skipped"] = skipped  # zarr writes zarr.json atomically (temp file + rename)
        self.group["done"][i] = SKIPPED

    # ------------------------------------------------------------------ reading
    def read(self, i: int, encoder_layer: int | Iterable[int] | None = None) -> SampleRecord:
        """Everything stored for image ``i`` as a :class:`~pipeline.record.SampleRecord`.

        Features (``queries [K, D]``, ``encoder_tokens {layer: [S, D]}``, ``c1 [C1, H1, W1]``)
        come in the cache dtype (``FEATURE_DTYPES[dtype]``: int8 is dequantised to float32); ``logits [K, C]`` and ``boxes [K, 4]`` (cxcywh normalized) are
        float32, ``query_index [K]``, ``spatial_shapes [L, 2]`` and ``level_start_index [L]``
        int64, ``valid_ratios [L, 2]`` float32; ``image_id``, ``orig_size`` and ``size``
        (``(h, w)`` pixels) are set. Equals ``read_many([i], encoder_layer)[0]``.

        Args:
            encoder_layer: the stored encoder layer(s) to read (default: the first stored one).

        Raises:
            CacheError: image ``i`` is not completely written, or a layer is not stored.
        """
        return self.read_many([i], encoder_layer)[0]

    def read_many(self, indices: Iterable[int], encoder_layer: int | Iterable[int] | None = None) -> list[SampleRecord]:
        """The records of several images (a training batch), read with few, concurrent requests.

        Two rounds of concurrent requests (zarr's asynchronous API, one event-loop pass each):
        first the ``done`` flags of all the images (an image's flag is set after all its arrays
        are written, so data read after it is complete), then every array of every image as ONE
        selection per array and image (one request per chunk it covers: a single chunk for the
        per-image arrays, ``ceil(rows / chunk_rows)`` for the encoder tokens and C1, plus the
        int8 scales). Array metadata is read once per opened cache, not per read. Blosc
        decoding runs in zarr's thread pool while other chunks are still being fetched.

        Args:
            indices: store indices (0..N-1), any order, repeats allowed.
            encoder_layer: as :meth:`read`.

        Returns:
            One :class:`~pipeline.record.SampleRecord` per index, in order (as :meth:`read`).

        Raises:
            CacheError: an image is not completely written (names the first such image id), or a
                layer is not stored.
        """
        indices = [int(i) for i in indices]
        if encoder_layer is None:
            layers = [self.encoder_layers[0]]
        elif isinstance(encoder_layer, (int, np.integer)):
            layers = [int(encoder_layer)]
        else:
            layers = [int(k) for k in encoder_layer]
        missing = [k for k in layers if k not in self.encoder_layers]
        if missing:
            raise CacheError(f"{self.path}: encoder layer(s) {missing} not stored (have {self.encoder_layers})")
        flags = self._fetch([("done", i) for i in indices])
        for i, flag in zip(indices, flags):
            if int(flag) != DONE:
                raise CacheError(f"{self.path}: image {int(self.image_ids[i])} is not completely extracted "
                                 f"(status {int(flag)}); re-run extract to finish it")
        int8 = self.dtype == "int8"
        plain = ("logits", "boxes", "query_index", "valid_ratios")
        requests, where = [], []  # (array, selection); per image: {field: position in requests}
        for i in indices:
            shapes = self._spatial_shapes[i]
            t0, c0 = int(self._token_offset[i]), int(self._c1_offset[i])
            t1 = t0 + int((shapes[:, 0].astype(np.int64) * shapes[:, 1]).sum())
            h1, w1 = (int(x) for x in self._c1_shape[i])
            features = {"queries": i, "c1": slice(c0, c0 + h1 * w1),
                        **{f"encoder/layer_{k}": slice(t0, t1) for k in layers}}
            pos = {}
            for name in plain:
                pos[name] = len(requests)
                requests.append((name, i))
            for name, sel in features.items():
                pos[name] = len(requests)
                requests.append((name, sel))
                if int8:
                    requests.append((f"{name}_scale", sel))
            where.append(pos)
        values = self._fetch(requests)

        def feature(pos, name):
            n = pos[name]
            return _from_storage(values[n], self.dtype, values[n + 1] if int8 else None)

        records = []
        for i, pos in zip(indices, where):
            shapes = torch.from_numpy(self._spatial_shapes[i].astype(np.int64))
            sizes = shapes[:, 0] * shapes[:, 1]
            h1, w1 = (int(x) for x in self._c1_shape[i])
            records.append(SampleRecord(
                queries=feature(pos, "queries"),
                logits=torch.from_numpy(values[pos["logits"]]),
                boxes=torch.from_numpy(values[pos["boxes"]]),
                query_index=torch.from_numpy(values[pos["query_index"]].astype(np.int64)),
                encoder_tokens={k: feature(pos, f"encoder/layer_{k}") for k in layers},
                spatial_shapes=shapes,
                level_start_index=torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1])),
                valid_ratios=torch.from_numpy(values[pos["valid_ratios"]]),
                c1=feature(pos, "c1").transpose(0, 1).reshape(-1, h1, w1),
                image_id=int(self.image_ids[i]),
                orig_size=tuple(int(x) for x in self._orig_size[i]),
                size=tuple(int(x) for x in self._size[i]),
            ))
        return records

    def _fetch(self, requests: list[tuple[str, object]]) -> list[np.ndarray]:
        """``[array[selection] for array, selection in requests]``, fetched concurrently (one event-loop pass)."""
        arrays = [self._array(name).async_array for name, _ in requests]

        async def gather():
            return await asyncio.gather(*(a.getitem(sel) for a, (_, sel) in zip(arrays, requests)))

        return [np.asarray(v) for v in _zarr_sync(gather())]

    def info(self) -> dict:
        """What the store holds and what it costs (``cli.py cache-info``).

        Returns a JSON-serialisable dict: ``path``, ``format_version``, ``storage`` (``dtype``,
        ``keep_bits``, ``codec``, ``levels``, ``encoder_layers``, ``top_k``, ``feature_widths``),
        ``detector``, ``checkpoint_sha256``, ``finetuned`` / ``finetuned_from`` (None unless
        extracted with ``--finetuned``), ``random_init``, ``preprocessing``, ``images``,
        ``done``, ``pending``, ``skipped`` (``{image_id: reason}``), ``arrays`` (per array path:
        ``dtype``, ``shape``, ``chunks``, ``codecs``, ``stored_bytes`` on disk, ``data_bytes``
        uncompressed bytes of the rows images use, ``ratio`` = data / stored), ``disk_bytes``
        (whole store), ``mb_per_done_image`` and ``ratio`` (all data bytes / all stored bytes).
        """
        status = self.status()
        used_tokens = int(sum(int((s[:, 0] * s[:, 1]).sum()) for s in self._spatial_shapes))
        used_c1 = int(sum(int(h * w) for h, w in self._c1_shape))
        arrays = {}

        def visit(group, prefix=""):
            for name, node in sorted(group.members(), key=lambda m: m[0]):
                if isinstance(node, zarr.Group):
                    visit(node, f"{prefix}{name}/")
                    continue
                path = prefix + name
                row_bytes = int(np.prod(node.shape[1:], dtype=np.int64)) * node.dtype.itemsize
                rows = used_tokens if path.startswith("encoder/") else used_c1 if path.startswith("c1") and \
                    path not in ("c1_shape", "c1_offset") else node.shape[0] if node.shape else 1
                stored = int(node.nbytes_stored())
                meta = node.metadata.to_dict()
                arrays[path] = {"dtype": str(node.dtype), "shape": list(node.shape), "chunks": list(node.chunks),
                                "codecs": [c["name"] + (f"({c['configuration'].get('cname', '')}"
                                                        f"{', ' + c['configuration']['shuffle'] if 'shuffle' in c.get('configuration', {}) else ''})"
                                                        if c["name"] == "blosc" else
                                                        f"(keepbits={c['configuration']['keepbits']})" if "bitround" in c["name"] else "")
                                           for c in meta.get("codecs", []) if c["name"] != "bytes"],
                                "stored_bytes": stored, "data_bytes": rows * row_bytes,
                                "ratio": round(rows * row_bytes / stored, 3) if stored else None}

        visit(self.group)
        disk = self.disk_bytes()
        n_done = int((status == DONE).sum())
        fp = self.fingerprint
        data_total = sum(a["data_bytes"] for a in arrays.values())
        stored_total = sum(a["stored_bytes"] for a in arrays.values())
        return {
            "path": str(self.path), "format_version": FORMAT_VERSION,
            "storage": {"dtype": self.dtype, "keep_bits": self.keep_bits, "codec": self.codec,
                        "levels": fp.get("levels"), "encoder_layers": self.encoder_layers, "top_k": fp.get("top_k"),
                        "feature_widths": fp.get("feature_widths")},
            "detector": fp.get("detector"), "checkpoint_sha256": fp.get("checkpoint_sha256"),
            "finetuned": fp.get("finetuned"), "finetuned_from": fp.get("finetuned_from"),
            "random_init": fp.get("random_init"), "preprocessing": fp.get("preprocessing"),
            "images": len(self), "done": n_done, "pending": int((status == PENDING).sum()),
            "skipped": self.skipped, "arrays": arrays, "disk_bytes": disk,
            "mb_per_done_image": round(disk / 1e6 / n_done, 3) if n_done else None,
            "ratio": round(data_total / stored_total, 3) if stored_total else None,
        }

    def disk_bytes(self) -> int:
        """Bytes the store occupies on disk (all files under ``path``; all objects under a URL)."""
        if is_url(self.path):
            fs, root = _url_fs(self.path)
            return int(fs.du(root, total=True))
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
