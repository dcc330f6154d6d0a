"""Stage one: run the frozen detector once over a COCO-format dataset into the feature cache.

Data flow: annotation file -> (decode, resize, normalise) -> detector.extract -> FeatureCache.
Every image owns its own chunks in the store and its ``done`` flag is written last, so an
interrupted run (even SIGKILL) resumes by re-running the same command: finished images are
skipped and a partially written image is rewritten.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from kernels import ops as kernel_ops

from . import data
from .cache import DONE, PENDING, SKIPPED, FeatureCache, ImageLayout, check_storage, is_url
from .frozen_detector import DetectorOptions, build_frozen_detector
from .faults import fault_point
from .utils import WriterLock, file_sha256
from .views import ViewPlan, parse_views, plan_view, view_image

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ExtractOptions(DetectorOptions):
    """Options of ``cli.py extract`` (see its ``--help``); the detector fields are those of
    :class:`~pipeline.frozen_detector.DetectorOptions`.

    Attributes:
        encoder_layers: encoder layers to store, counted from 1.
        top_k: queries kept per image.
        dtype: stored feature dtype (``float16``, ``bfloat16``, ``float32``, ``int8``: per-row
            scales, dequantised on read; see :mod:`pipeline.cache`).
        keep_bits: mantissa bits kept by numcodecs BitRound (float16/float32 only; lossy), None = all.
        codec: Blosc codec of the feature arrays (``auto`` = measured per array, or a key of
            :data:`pipeline.cache.CODECS`).
        levels: encoder levels to store (indices, 0 = finest), None = all of the detector's.
        min_size, max_size: test-time resize (pixels): shorter side, cap on the longer side.
        batch_size: images per detector forward; only images of identical resized size are
            batched (no padding), so values do not depend on it beyond float rounding.
        decode_workers: DataLoader workers decoding images (None = 0 on CPU, up to 4 on CUDA).
        workers: > 1 starts a dask.distributed ``LocalCluster`` of that many worker processes
            (one thread each; with ``--device cuda`` worker ``r`` uses ``cuda:{r}``).
        scheduler: address of an existing dask scheduler to submit to instead (``tcp://host:8786``).
        unit_images: images per work unit (a contiguous block of store indices; each image owns
            whole chunks, so units never share a chunk). retries: re-runs of a failed unit.
        views: augmented views stored per image (:mod:`pipeline.views`; None = ``["orig"]``):
            entries are image-major (entry ``n * V + v`` = view ``v`` of image ``n``), recorded in
            the fingerprint's ``views`` when not just ``orig``.
        writer: ``thread`` writes the cache from a background thread, ``inline`` after each
            forward, ``auto`` picks by :func:`write_behind` of ``device``. The stored values are
            identical either way.
    """

    out: Path
    coco_root: Path | None = None
    split: str | None = None
    ann_file: Path | None = None
    image_dir: Path | None = None
    image_ids: list[int] | None = None
    max_images: int | None = None
    min_size: int = 800
    max_size: int = 1333
    encoder_layers: list[int] = field(default_factory=lambda: [4])
    top_k: int = 100
    dtype: str = "float16"
    keep_bits: int | None = None
    codec: str = "auto"
    levels: list[int] | None = None
    skip_bad_images: bool = False
    overwrite: bool = False
    workers: int = 1
    batch_size: int = 1
    decode_workers: int | None = None
    scheduler: str | None = None
    unit_images: int = 8
    retries: int = 2
    views: list[str] | None = None
    writer: str = "auto"


def make_fingerprint(opts: ExtractOptions, detector, checkpoint_sha: str, ann_file: Path) -> dict:
    """Everything that determines the cached values (the cache's identity); with ``--finetuned``
    also ``finetuned`` / ``finetuned_from`` (:func:`pipeline.frozen_detector.load_finetuned`)."""
    return {
        "detector": opts.detector,
        "detector_config": detector.config(),
        "checkpoint_sha256": checkpoint_sha,
        "random_init": opts.weights is None,
        "preprocessing": {"min_size": opts.min_size, "max_size": opts.max_size,
                          "mean": list(data.IMAGENET_MEAN), "std": list(data.IMAGENET_STD),
                          "resize": "PIL bilinear, DETR get_size_with_aspect_ratio", "exif_transpose": True,
                          "precision": opts.precision},
        "encoder_layers": sorted(set(int(k) for k in opts.encoder_layers)),
        "top_k": int(opts.top_k),
        "dtype": opts.dtype,
        "keep_bits": None if opts.keep_bits is None else int(opts.keep_bits),
        "codec": opts.codec,
        "levels": stored_levels(opts, detector),
        "class_to_category_id": {str(k): int(v) for k, v in detector.class_to_category_id().items()},
        "feature_widths": {"c1_channels": int(detector.c1_channels),
                           "num_feature_levels": len(stored_levels(opts, detector))},
        "ann_file": str(Path(ann_file).resolve()),
        "ann_sha256": file_sha256(Path(ann_file)),
        **({"views": views} if (views := parse_views(opts.views)) != ["orig"] else {}),
        **(getattr(detector, "finetuned_fingerprint", None) or {}),  # extract --finetuned (frozen_detector.py)
    }


def stored_levels(opts: ExtractOptions, detector) -> list[int]:
    """The encoder levels the store holds (``--levels``, default all of the detector's), ascending.

    Raises:
        ValueError: a level outside ``0..num_feature_levels-1`` or repeated (names ``--levels``).
    """
    n = int(detector.num_feature_levels)
    if opts.levels is None:
        return list(range(n))
    levels = [int(k) for k in opts.levels]
    if not levels or len(set(levels)) != len(levels) or not all(0 <= k < n for k in levels):
        raise ValueError(f"--levels must be distinct level indices in 0..{n - 1} (0 = finest) of {opts.detector}, "
                         f"got {opts.levels}")
    return sorted(levels)


def _log_class_mapping(column_to_category: dict[int, int], coco) -> None:
    """Print the detector's logit column -> dataset category mapping (the 91-vs-80 pitfall)."""
    names = {int(c["id"]): c["name"] for c in coco.dataset["categories"]}
    log.info("class mapping: %d logit columns -> category ids (%s)", len(column_to_category),
             "identity" if all(k == v for k, v in column_to_category.items()) else "remapped")
    for col, cat in sorted(column_to_category.items()):
        log.debug("  logit column %3d -> category_id %3d %s", col, cat, names.get(cat, "(not in this dataset)"))
    missing = sorted(set(names) - set(column_to_category.values()))
    if missing:
        log.warning("dataset categories %s have no logit column in this detector: the head cannot be "
                    "trained for them", missing)


def _layouts(coco, image_ids, detector, min_size, max_size, levels: list[int],
             views: list[str] = ("orig",)) -> list[ImageLayout]:
    """One layout per (image, view), image-major; a view's ``orig_size`` is its frame (:mod:`pipeline.views`)."""
    layouts = []
    for image_id in image_ids:
        info = coco.imgs[image_id]
        w, h = int(info["width"]), int(info["height"])
        for view in views:
            plan = plan_view(view, image_id, w, h, min_size, max_size)
            (rh, rw), frame = plan.size, plan.frame_size
            shapes, c1_hw = detector.feature_shapes(rh, rw)
            shapes = shapes[levels]
            layouts.append(ImageLayout(int(image_id), frame, (rh, rw), [tuple(int(x) for x in s) for s in shapes.tolist()],
                                       tuple(int(x) for x in c1_hw)))
    return layouts


def entry_plans(cache, coco, indices: list[int], min_size: int, max_size: int) -> dict[int, ViewPlan]:
    """``{store index: ViewPlan}`` of the given entries (entry ``n * V + v`` = view ``v`` of image ``n``,
    views from the fingerprint, ``["orig"]`` when it records none)."""
    views = cache.fingerprint.get("views", ["orig"])
    plans = {}
    for i in indices:
        info = coco.imgs[int(cache.image_ids[i])]
        plans[i] = plan_view(views[i % len(views)], int(info["id"]), int(info["width"]), int(info["height"]),
                             min_size, max_size)
    return plans


def size_batches(sizes: dict[int, tuple[int, int]], indices: list[int], batch_size: int) -> list[list[int]]:
    """Batches of store indices whose resized ``(h, w)`` is identical, so no image is padded.

    Images keep their order within a size; a size's batches come where its first image was.
    Every image's cached values therefore come from an unpadded forward, as at batch size 1.

    Args:
        sizes: ``{index: (h, w)}`` resized size in pixels; indices: the images to batch.
        batch_size: at most this many images per batch (>= 1).

    Raises:
        ValueError: ``batch_size < 1`` (names ``--batch-size``).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(sizes[i]), []).append(i)
    return [g[j : j + batch_size] for g in groups.values() for j in range(0, len(g), batch_size)]


class _DecodedBatches(torch.utils.data.Dataset):
    """Item ``n``: ``[(index, image [3, h, w] float32 or None, error or None)]`` of batch ``n``
    (decoding and preprocessing, run in DataLoader workers when ``--decode-workers`` > 0)."""

    def __init__(self, batches, paths, expected_sizes, plans):
        self.batches, self.paths, self.expected, self.plans = batches, paths, expected_sizes, plans

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, n):
        out = []
        for i in self.batches[n]:
            try:
                image = data.load_image(self.paths[i], expected_size=self.expected[i])
            except data.DataError as e:
                out.append((i, None, str(e)))
                continue
            out.append((i, view_image(image, self.plans[i]), None))
        return out


def write_behind(device: str) -> bool:
    """Whether ``extract`` writes the cache from a background thread (True) or inline after each
    forward (False).

    A background writer only helps when the forward leaves CPU cores idle: on an accelerator
    (the forward runs on the device), or on a CPU with more usable cores than torch's intra-op
    threads. On a CPU whose cores all run the forward, a writer thread (quantisation, Blosc
    compression, zarr's event loop) preempts torch's OpenMP threads, and every parallel region
    waits for its preempted thread, so the forward slows by more than the writer's own CPU time;
    writing inline costs exactly that time (``benchmarks/extract.py`` measures both).
    """
    if torch.device(device).type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


WRITERS = ("auto", "thread", "inline")


def background_writer(opts: ExtractOptions) -> bool:
    """Whether ``extract`` writes from a background thread: ``opts.writer`` (:data:`WRITERS`),
    ``auto`` = :func:`write_behind` of ``opts.device``.

    Raises:
        ValueError: ``opts.writer`` is not one of :data:`WRITERS` (names ``--writer``).
    """
    if opts.writer not in WRITERS:
        raise ValueError(f"--writer must be one of {', '.join(WRITERS)}, got {opts.writer!r}")
    return write_behind(opts.device) if opts.writer == "auto" else opts.writer == "thread"


class _Writer:
    """Writes records into the cache through :meth:`FeatureCache.write`: from a background thread
    when ``background`` (so the detector never waits for the disk), else inline. ``put`` blocks
    when ``depth`` items are queued; an error in the thread is raised by the next ``put`` or by
    ``close`` (images written before it stay done). ``wait_seconds`` is the time the caller
    spent in ``put``/``close`` (queueing, or writing inline)."""

    def __init__(self, cache: FeatureCache, out, background: bool = True, depth: int = 2):
        import queue
        import threading

        self.cache, self.out, self.error, self.wait_seconds = cache, out, None, 0.0
        self.thread = None
        if background:
            self.queue: "queue.Queue" = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
            self.thread.start()

    def _write(self, kind: str, i: int, payload) -> None:
        if kind == "skip":
            self.cache.mark_skipped(i, payload)
        else:
            fault_point("extract.before_write", self.out)
            self.cache.write(i, payload)

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error; nothing more is written
            try:
                self._write(*item)
            except BaseException as e:  # re-raised in the main thread
                self.error = e

    def _check(self):
        if self.error is not None:
            raise self.error

    def put(self, kind: str, i: int, payload) -> None:
        t = time.perf_counter()
        try:
            self._check()
            if self.thread is None:
                self._write(kind, i, payload)
            else:
                self.queue.put((kind, i, payload))
        finally:
            self.wait_seconds += time.perf_counter() - t

    def close(self) -> None:
        t = time.perf_counter()
        try:
            if self.thread is not None:
                self.queue.put(None)
                self.thread.join()
            self._check()
        finally:
            self.wait_seconds += time.perf_counter() - t


def _extract_indices(opts: ExtractOptions, indices: list[int], detector, coco,
                     position: int = 0, in_main: bool = True) -> tuple[list[tuple[int, str]], int, dict]:
    """Extract the images at store positions ``indices``; returns ``([(index, reason)] skipped,
    number of detector forwards, stage seconds)``. The stage seconds are the wall time of this
    loop spent waiting for decoded images (``decode``), in ``detector.extract`` (``forward``, as
    the host sees it) and in the writer (``write``: queueing, or writing inline, see
    :func:`write_behind`).

    Runs in the main process or in a dask worker process (``in_main=False``, see
    :func:`_extract_unit`), which opens the store itself. Images of identical resized size are batched
    (``opts.batch_size``, :func:`size_batches`), decoded in ``opts.decode_workers`` DataLoader
    workers, and written through :meth:`FeatureCache.write` (from a background thread when
    :func:`write_behind`). Only the
    main process writes the store's attributes (the skip reasons); a worker returns them for
    the main process to record.
    """
    _, image_dir = data.resolve_dataset(opts.coco_root, opts.split, opts.ann_file, opts.image_dir)
    cache = FeatureCache.open(opts.out, mode="r+")
    skipped, forwards = [], 0
    dtype = next(detector.parameters()).dtype
    ids = {i: int(cache.image_ids[i]) for i in indices}
    paths = {i: Path(image_dir) / coco.imgs[ids[i]]["file_name"] for i in indices}
    expected = {i: (int(coco.imgs[ids[i]]["width"]), int(coco.imgs[ids[i]]["height"])) for i in indices}
    batches = size_batches(cache.sizes(indices), indices, opts.batch_size)
    plans = entry_plans(cache, coco, indices, opts.min_size, opts.max_size)  # "orig": the test-time resize
    workers = decode_workers(opts)
    loader = torch.utils.data.DataLoader(
        _DecodedBatches(batches, paths, expected, plans), batch_size=None, shuffle=False,
        num_workers=workers, multiprocessing_context="spawn" if workers else None,
        prefetch_factor=2 if workers else None, persistent_workers=False)
    writer = _Writer(cache, opts.out, background=background_writer(opts))
    stages = {"decode": 0.0, "forward": 0.0, "write": 0.0}
    bar = tqdm(total=len(indices), desc="extract", unit="img", position=position, dynamic_ncols=True)
    batches_in = iter(loader)
    try:
        while True:
            t = time.perf_counter()
            decoded = next(batches_in, None)
            stages["decode"] += time.perf_counter() - t
            if decoded is None:
                break
            good = []
            for i, x, error in decoded:
                if error is None:
                    good.append((i, x))
                    continue
                if not opts.skip_bad_images:
                    raise data.DataError(error)
                log.warning("skipping image %d: %s", ids[i], error)
                if in_main:
                    writer.put("skip", i, error)
                else:  # the main process records it (reason, then flag); a crash before leaves it pending
                    skipped.append((i, error))
            bar.update(len(decoded) - len(good))
            if not good:
                continue
            x = torch.stack([x for _, x in good]).to(opts.device, dtype)
            mask = torch.zeros((x.shape[0],) + x.shape[2:], dtype=torch.bool, device=opts.device)
            t = time.perf_counter()
            records = detector.extract(x, mask, list(cache.encoder_layers), cache.fingerprint["top_k"])
            stages["forward"] += time.perf_counter() - t
            forwards += 1
            for (i, _), record in zip(good, records):
                record = record.select_levels(cache.fingerprint["levels"])
                record.image_id, record.size = ids[i], tuple(int(s) for s in x.shape[2:])
                record.orig_size = plans[i].frame_size  # the original image's (h, w) for "orig"
                writer.put("write", i, record)
            bar.update(len(good))
    finally:
        bar.close()
        writer.close()  # what was computed before an error is still written (each image owns its chunks)
        stages["write"] = writer.wait_seconds
    return skipped, forwards, stages


class ExtractError(RuntimeError):
    """Distributed extraction could not run or some work units failed after their retries."""


_WORKER_DETECTORS: dict = {}  # per worker process: the built detector, reused across work units


def _extract_unit(opts: ExtractOptions, indices: list[int],
                  threads: int | None) -> tuple[list[tuple[int, str]], int, dict]:
    """One work unit on a dask worker: pin the device, reuse the process's detector, extract."""
    import dataclasses

    if threads:
        torch.set_num_threads(threads)  # the main process's count: identical values to a single-process run
    kernel_ops.set_impl(opts.impl)
    device = opts.device
    if device == "cuda":  # LocalCluster worker r -> cuda:r (names are 0..N-1); external workers: their CUDA_VISIBLE_DEVICES
        try:
            from distributed import get_worker

            rank = int(get_worker().name)
            device = f"cuda:{rank % max(1, torch.cuda.device_count())}"
        except (ValueError, TypeError):
            device = "cuda"
    opts = dataclasses.replace(opts, device=device)
    key = (opts.detector, opts.preset, str(opts.weights), str(opts.finetuned), opts.seed, opts.device, opts.precision)
    if key not in _WORKER_DETECTORS:
        _WORKER_DETECTORS.clear()
        _WORKER_DETECTORS[key] = build_frozen_detector(opts)[0]
    ann_file, _ = data.resolve_dataset(opts.coco_root, opts.split, opts.ann_file, opts.image_dir)
    coco = data.load_coco(ann_file, require_annotations=False)
    return _extract_indices(opts, indices, _WORKER_DETECTORS[key], coco, in_main=False)


def _run_distributed(opts: ExtractOptions, todo: list[int],
                     cache: FeatureCache) -> tuple[list[tuple[int, str]], int, dict]:
    """Extract ``todo`` on dask.distributed: a ``LocalCluster`` of ``opts.workers`` processes or the
    cluster at ``opts.scheduler``. Units of ``opts.unit_images`` consecutive images; a failed unit is
    retried ``opts.retries`` times, then its image ids are reported (what other units wrote stays done).
    Returns what :func:`_extract_indices` does, the stage seconds summed over the units.

    Raises:
        ExtractError: the scheduler cannot be reached (names ``--scheduler``), or units failed
            (names their image ids, the worker and the error; re-running resumes).
    """
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if opts.scheduler is not None:
        try:
            client = Client(opts.scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise ExtractError(f"--scheduler {opts.scheduler}: cannot reach the dask scheduler ({e}); start one with "
                               "`dask scheduler` and workers with `dask worker ADDRESS --nthreads 1`") from None
    else:
        cluster = LocalCluster(n_workers=opts.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               resources={"GPU": 1}, silence_logs=logging.WARNING)
        client = Client(cluster)
    failed = []
    skipped, forwards, stages = [], 0, {}
    try:
        threads = torch.get_num_threads() if cluster is not None else None
        unit = max(1, int(opts.unit_images))
        units = [todo[j : j + unit] for j in range(0, len(todo), unit)]
        resources = {"GPU": 1} if torch.device(opts.device).type == "cuda" else None
        futures = {client.submit(_extract_unit, opts, u, threads, key=f"extract-{u[0]}-{u[-1]}", pure=False,
                                 retries=opts.retries, resources=resources): u for u in units}
        bar = tqdm(total=len(todo), desc=f"extract ({len(client.scheduler_info()['workers'])} dask workers)",
                   unit="img", dynamic_ncols=True)
        for fut in as_completed(futures):
            u = futures[fut]
            try:
                s, f, st = fut.result()
                skipped += s
                forwards += f
                for k, v in st.items():
                    stages[k] = stages.get(k, 0.0) + v
            except Exception as e:  # after its retries: reported by image id below
                who = client.who_has(fut).get(fut.key) or "a worker"
                failed.append((u, who, e))
            bar.update(len(u))
        bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if failed:
        lines = [f"images {[int(cache.image_ids[i]) for i in u]} on {who}: {type(e).__name__}: {e}"
                 for u, who, e in failed]
        raise ExtractError(f"{len(failed)} work unit(s) failed after {opts.retries} retries (everything else is "
                           "written; re-run the same command to resume):\n  " + "\n  ".join(lines))
    return skipped, forwards, stages


def decode_workers(opts: ExtractOptions) -> int:
    """DataLoader workers that decode images: ``opts.decode_workers``, or by default none on CPU
    (the detector already uses every core) and up to 4 on an accelerator."""
    if opts.decode_workers is not None:
        if opts.decode_workers < 0:
            raise ValueError(f"--decode-workers must be >= 0, got {opts.decode_workers}")
        return int(opts.decode_workers)
    return 0 if torch.device(opts.device).type == "cpu" else min(4, os.cpu_count() or 1)


def run_extract(opts: ExtractOptions) -> dict:
    """Extract every selected image into ``opts.out`` (creating or resuming the store).

    Returns a summary dict: ``images``, ``done``, ``skipped``, ``extracted_now``, ``forwards``
    (detector forward passes), ``seconds`` (the extraction loop, detector built before),
    ``seconds_per_image``, ``stage_seconds`` (``decode`` / ``forward`` / ``write``: the loop's wall
    time waiting for decoded images, in the detector, in the writer; summed over work units when
    distributed), ``mb_per_image``, ``random_init`` and ``impl``.

    Raises:
        data.DataError: bad dataset or image (unless ``skip_bad_images``; images already
            written stay done and a re-run resumes after the fix).
        CacheError: an existing store at ``out`` was written with other settings.
        CheckpointError / ValueError: weights missing or of another model.
        LockError: another live ``extract`` writes ``out`` (the lock file ``<out>.lock`` names it).
        OSError: the store cannot be written (disk full, permissions); finished images stay done.
    """
    if is_url(opts.out):
        # An object store has no lock file: two extract commands on one URL are not detected.
        # Resuming needs none: images are redone unless their done flag (written last) is set.
        log.warning("%s: a store URL is not locked; run one extract command per store (with any --workers)", opts.out)
        return _run_extract_locked(opts)
    with WriterLock(lock_path(opts.out), command="extract"):
        return _run_extract_locked(opts)


def check_images_before_compute(coco, image_ids: list[int], image_dir: str | Path, skip_bad_images: bool,
                                sample: int = 3) -> None:
    """Fail fast, before the detector is built: every selected image file exists, and the first
    ``sample`` of them decode to their annotated size.

    Raises:
        data.DataError: a missing file (the message counts them and names the first few) or a
            sample image that does not decode, unless ``skip_bad_images`` (then a warning: those
            images will be skipped and recorded).
    """
    paths = [Path(image_dir) / coco.imgs[i]["file_name"] for i in image_ids]
    missing = [str(p) for p in paths if not p.is_file()]
    problems = [f"{len(missing)} of {len(paths)} image files are missing, e.g. {', '.join(missing[:3])}"] if missing else []
    for image_id, path in list(zip(image_ids, paths))[:sample]:
        if path.is_file():
            info = coco.imgs[image_id]
            try:
                data.load_image(path, expected_size=(int(info["width"]), int(info["height"])))
            except data.DataError as exc:
                problems.append(str(exc))
    if not problems:
        return
    if skip_bad_images:
        for problem in problems:
            log.warning("%s (these images will be skipped and recorded)", problem)
        return
    raise data.DataError("; ".join(problems) + " (fix the dataset or pass --skip-bad-images)")


def lock_path(out: str | Path) -> Path:
    """The lock file of the store ``out``: ``<out>.lock`` beside it (the store itself is created
    under another name and renamed, so the lock cannot live inside it)."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def _run_extract_locked(opts: ExtractOptions) -> dict:
    """:func:`run_extract` once the store's lock is held."""
    impl_info = kernel_ops.configure(opts.impl)
    ann_file, image_dir = data.resolve_dataset(opts.coco_root, opts.split, opts.ann_file, opts.image_dir)
    coco = data.load_coco(ann_file, require_annotations=False)  # test-dev image-info files have none
    image_ids = data.select_image_ids(coco, opts.image_ids, opts.max_images)
    if not 1 <= opts.top_k:
        raise ValueError(f"--top-k must be >= 1, got {opts.top_k}")
    check_storage(opts.dtype, opts.keep_bits, opts.codec)  # before any compute or write
    parse_views(opts.views)  # raises on a bad --views
    size_batches({}, [], opts.batch_size)  # raises on a bad --batch-size
    decode_workers(opts)  # raises on a bad --decode-workers
    background_writer(opts)  # raises on a bad --writer
    check_images_before_compute(coco, image_ids, image_dir, opts.skip_bad_images)
    detector, sha = build_frozen_detector(opts)
    if opts.top_k > detector.num_queries:
        raise ValueError(f"--top-k {opts.top_k} exceeds the detector's {detector.num_queries} queries")
    bad = [k for k in opts.encoder_layers if not 1 <= k <= detector.num_encoder_layers]
    if bad:
        raise ValueError(f"--encoder-layers {bad} out of range 1..{detector.num_encoder_layers}")
    fingerprint = make_fingerprint(opts, detector, sha, ann_file)
    _log_class_mapping(detector.class_to_category_id(), coco)
    layouts = _layouts(coco, image_ids, detector, opts.min_size, opts.max_size, fingerprint["levels"],
                       fingerprint.get("views", ["orig"]))
    cache = FeatureCache.create_or_resume(
        opts.out, fingerprint, layouts, top_k=opts.top_k, hidden_dim=detector.hidden_dim,
        num_classes=detector.num_classes, c1_channels=detector.c1_channels, overwrite=opts.overwrite)
    status = cache.status()
    todo = [int(i) for i in range(len(cache)) if status[i] == PENDING]
    log.info("%s: %d images, %d already done, %d skipped, %d to extract", opts.out, len(cache),
             int((status == DONE).sum()), int((status == SKIPPED).sum()), len(todo))
    start = time.time()
    if (opts.workers <= 1 and opts.scheduler is None) or not todo:
        skipped, forwards, stages = _extract_indices(opts, todo, detector, coco)  # reasons already recorded
    else:
        del detector
        skipped, forwards, stages = _run_distributed(opts, todo, cache)
        for i, reason in skipped:
            cache.mark_skipped(i, reason)
    seconds = time.time() - start
    if todo:
        log.info("extracted %d images in %.1f s: decode %.1f s, forward %.1f s, write %.1f s", len(todo), seconds,
                 stages.get("decode", 0.0), stages.get("forward", 0.0), stages.get("write", 0.0))
    status = cache.status()
    n_done = int((status == DONE).sum())
    n_now = int(sum(status[i] == DONE for i in todo))
    summary = {
        "images": len(cache), "done": n_done, "skipped": int((status == SKIPPED).sum()),
        "extracted_now": n_now, "forwards": forwards, "seconds": round(seconds, 2),
        "seconds_per_image": round(seconds / max(1, n_now), 3),
        "stage_seconds": {k: round(v, 2) for k, v in stages.items()},
        "mb_per_image": round(cache.disk_bytes() / 1e6 / max(1, n_done), 3),
        "random_init": fingerprint["random_init"],
        "impl": impl_info,
    }
    return summary
