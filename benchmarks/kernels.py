"""Compiled kernels vs the pure-PyTorch reference, side by side in one run.

For each shape: forward, and forward + backward (gradients of value, sampling locations and
attention weights), best of ``--repeats`` runs, seconds; then the reference/kernel ratio.
Shapes (issue 15):

  * ``dino_encoder``: DINO-FocalNet-L's encoder self-attention, 5 levels (strides 4..64) of an
    ``--image`` sized input (800x1067 = about 71k tokens as queries and values), 8 heads x 32,
    4 points. The default ``--image 400x534`` (about 18k tokens) keeps the reference's backward
    affordable on a 2-core CPU; pass ``--image 800x1067`` for the full size.
  * ``box_encoder``: the head's box encoder, 100 boxes x 32x32 tokens, d = 128 (8 heads x 16),
    1 level, 4 points.
  * ``fused_roi_align_<C>``: 100 boxes pooled to 32x32 (sampling ratio 2) from c1 [1, C, 200, 267]
    + interpolate(e [1, C, 100, 134]), C = 128 (what the head pools: box_dim after its channel
    mapper), 192 and 256; the reference materialises the sum
    and calls torchvision's roi_align (aligned=True).

On CUDA the peak memory of each run is printed too. The last line holds the ratios as
``name=value`` (``<shape>_fwd`` and ``<shape>_fwdbwd`` = reference time / kernel time).

    python benchmarks/kernels.py                      # CPU kernel vs reference
    python benchmarks/kernels.py --device cuda --image 800x1067
"""

from __future__ import annotations

import time
from pathlib import Path
import sys

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import ops  # noqa: E402


def dino_encoder_shape(height: int, width: int) -> dict:
    """Levels of DINO-FocalNet-L at an ``height x width`` input: strides 4, 8, 16, 32 (backbone) and 64."""
    shapes, h, w = [], -(-height // 4), -(-width // 4)
    for _ in range(5):
        shapes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    tokens = sum(a * b for a, b in shapes)
    return dict(n=1, lq=tokens, heads=8, dh=32, points=4, shapes=shapes)


BOX_ENCODER = dict(n=100, lq=32 * 32, heads=8, dh=16, points=4, shapes=[(32, 32)])


def make_inputs(spec: dict, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(spec["shapes"], dtype=torch.int64)
    s = int(shapes.prod(1).sum())
    n, lq, m, dh, p, nl = spec["n"], spec["lq"], spec["heads"], spec["dh"], spec["points"], len(spec["shapes"])
    value = torch.randn(n, s, m, dh, generator=g)
    loc = torch.rand(n, lq, m, nl, p, 2, generator=g) * 1.1 - 0.05
    w = torch.rand(n, lq, m, nl, p, generator=g).softmax(-1)
    starts = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    return (value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device, dtype),
            w.to(device, dtype))


def timed(fn, repeats: int, device: str) -> tuple[float, int]:
    """Best wall time of ``repeats`` calls (after one warm-up) and the peak CUDA memory (bytes, 0 on CPU)."""
    fn()
    best, peak = float("inf"), 0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        best = min(best, time.perf_counter() - t)
    return best, peak


def bench_ms_deform_attn(spec: dict, impl: str, device: str, dtype: torch.dtype, repeats: int):
    value, shapes, starts, loc, w = make_inputs(spec, device, dtype)

    def forward():
        with torch.no_grad():
            ops.ms_deform_attn(value, shapes, starts, loc, w, impl=impl)

    leaves = [t.detach().requires_grad_(True) for t in (value, loc, w)]
    grad = torch.randn(spec["n"], spec["lq"], spec["heads"] * spec["dh"], device=device, dtype=dtype)

    def forward_backward():
        out = ops.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
        torch.autograd.grad(out, leaves, grad)

    return timed(forward, repeats, device), timed(forward_backward, repeats, device)


def bench_fused_roi_align(channels: int, impl: str, device: str, dtype: torch.dtype, repeats: int):
    g = torch.Generator().manual_seed(0)
    c1 = torch.randn(1, channels, 200, 267, generator=g).to(device, dtype)
    e = torch.randn(1, channels, 100, 134, generator=g).to(device, dtype)
    xy = torch.rand(100, 2, generator=g) * torch.tensor([230.0, 170.0])
    wh = torch.rand(100, 2, generator=g) * 60 + 4
    boxes = torch.cat((torch.zeros(100, 1), xy, xy + wh), 1).to(device, dtype)

    def forward():
        with torch.no_grad():
            ops.fused_roi_align(c1, e, boxes, 32, 1.0, 2, impl=impl)

    leaves = [t.detach().requires_grad_(True) for t in (c1, e)]
    grad = torch.randn(100, channels, 32, 32, device=device, dtype=dtype)

    def forward_backward():
        out = ops.fused_roi_align(leaves[0], leaves[1], boxes, 32, 1.0, 2, impl=impl)
        torch.autograd.grad(out, leaves, grad)

    return timed(forward, repeats, device), timed(forward_backward, repeats, device)


def report(name: str, times: dict, device: str, ratios: dict) -> None:
    for i, part in enumerate(("fwd", "fwdbwd")):
        (t_ref, m_ref), (t_k, m_k) = times["reference"][i], times[device][i]
        mem = f"   peak {m_ref / 2**20:.0f} / {m_k / 2**20:.0f} MiB" if device == "cuda" else ""
        click.echo(f"  {part:<7s} reference {t_ref:9.4f} s   {device} kernel {t_k:9.4f} s   "
                   f"ratio {t_ref / t_k:6.2f}x{mem}")
        ratios[f"{name}_{part}"] = t_ref / t_k


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
@click.option("--image", default="400x534", show_default=True, help="HxW of the DINO encoder shape (800x1067 = full).")
@click.option("--repeats", default=3, show_default=True)
def main(device, dtype, image, repeats):
    """Print kernel vs reference times; last line: the ratios as name=value."""
    if not ops.compiled_available(device):
        raise click.ClickException(f"no compiled {device} kernel: {ops.BUILD_HINT}")
    torch_dtype = getattr(torch, dtype)
    height, width = (int(v) for v in image.lower().split("x"))
    specs = {"dino_encoder": dino_encoder_shape(height, width), "box_encoder": BOX_ENCODER}
    click.echo(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, {dtype}")
    ratios = {}
    for name, spec in specs.items():
        tokens = sum(a * b for a, b in spec["shapes"])
        click.echo(f"{name}: N={spec['n']} Lq={spec['lq']} S={tokens} levels={spec['shapes']} "
                   f"heads={spec['heads']}x{spec['dh']} points={spec['points']}")
        times = {impl: bench_ms_deform_attn(spec, impl, device, torch_dtype, repeats)
                 for impl in ("reference", device)}
        report(name, times, device, ratios)
    if ops.compiled_available(device, "fused_roi_align"):
        for channels in (128, 192, 256):
            click.echo(f"fused_roi_align_{channels}: 100 boxes -> 32x32, c1 [1, {channels}, 200, 267], "
                       f"e [1, {channels}, 100, 134]")
            times = {impl: bench_fused_roi_align(channels, impl, device, torch_dtype, repeats)
                     for impl in ("reference", device)}
            report(f"fused_roi_align_{channels}", times, device, ratios)
    click.echo(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
