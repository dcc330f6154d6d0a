// CUDA backend of mfdetr::ms_deform_attn (forward and backward).
// float32, float64, float16 and bfloat16; products and sums in float32 (float64 for float64).
// Semantics: kernels/reference.py::ms_deform_attn (see ms_deform_attn.h); every launch is checked.
//
// Forward: one thread per output element (n, q, m, c); neighbouring threads read neighbouring
// channels of the same pixel (coalesced). Backward: one thread per sample (n, q, m, l, p),
// looping over the Dh channels: it owns that sample's grad_locations / grad_weights (no
// reduction needed) and scatters into grad_value with atomicAdd on an accumulation-dtype buffer.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

namespace mfdetr {
namespace {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

template <typename scalar_t>
__global__ void forward_kernel(int64_t total, MsDeformAttnSizes s, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                               scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = idx % s.channels;
  const int64_t nqm = idx / s.channels;  // (n * Lq + q) * M + m
  const int64_t m = nqm % s.heads;
  const int64_t n = nqm / s.heads / s.queries;
  const int64_t pixel_stride = s.heads * s.channels;
  acc_t acc = 0;
  for (int64_t l = 0; l < s.levels; ++l) {
    const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
    const scalar_t* level = value + ((n * s.tokens + starts[l]) * s.heads + m) * s.channels + c;
    for (int64_t p = 0; p < s.points; ++p) {
      const int64_t i = (nqm * s.levels + l) * s.points + p;
      const acc_t a = static_cast<acc_t>(weights[i]);
      const BilinearCorners<acc_t> b(static_cast<acc_t>(locations[2 * i]) * width - acc_t(0.5),
                             static_cast<acc_t>(locations[2 * i + 1]) * height - acc_t(0.5), height, width);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (b.index[k] >= 0) acc += a * b.weight[k] * static_cast<acc_t>(level[b.index[k] * pixel_stride]);
      }
    }
  }
  out[idx] = static_cast<scalar_t>(acc);
}

template <typename scalar_t>
__global__ void backward_kernel(int64_t total, MsDeformAttnSizes s, const scalar_t* __restrict__ grad_out,
                                const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts, const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights, at::opmath_type<scalar_t>* grad_value,
                                scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // sample index
  if (i >= total) return;
  const int64_t l = (i / s.points) % s.levels;
  const int64_t nqm = i / s.points / s.levels;
  const int64_t m = nqm % s.heads;
  const int64_t n = nqm / s.heads / s.queries;
  const int64_t pixel_stride = s.heads * s.channels;
  const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
  const int64_t offset = ((n * s.tokens + starts[l]) * s.heads + m) * s.channels;
  const scalar_t* go = grad_out + nqm * s.channels;
  const acc_t a = static_cast<acc_t>(weights[i]);
  const BilinearCorners<acc_t> b(static_cast<acc_t>(locations[2 * i]) * width - acc_t(0.5),
                         static_cast<acc_t>(locations[2 * i + 1]) * height - acc_t(0.5), height, width);
  acc_t sample = 0, grad_x = 0, grad_y = 0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (b.index[k] < 0) continue;
    const scalar_t* v = value + offset + b.index[k] * pixel_stride;
    acc_t* gv = grad_value + offset + b.index[k] * pixel_stride;
    const acc_t coeff = a * b.weight[k];
    acc_t dot = 0;
    for (int64_t c = 0; c < s.channels; ++c) {
      const acc_t g = static_cast<acc_t>(go[c]);
      dot += g * static_cast<acc_t>(v[c]);
      atomicAdd(gv + c, coeff * g);
    }
    sample += b.weight[k] * dot;
    grad_x += b.dx[k] * dot;
    grad_y += b.dy[k] * dot;
  }
  grad_weights[i] = static_cast<scalar_t>(sample);
  grad_locations[2 * i] = static_cast<scalar_t>(a * grad_x * width);
  grad_locations[2 * i + 1] = static_cast<scalar_t>(a * grad_y * height);
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::zeros({s.batch, s.queries, s.heads * s.channels}, value.options());
  const int64_t total = out.numel();
  if (total == 0 || s.levels == 0 || s.points == 0 || s.tokens == 0) return out;
  const auto v = value.contiguous(), shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        total, s, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights);
  check_ms_deform_attn_grad_output(grad_output, value, s);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc_dtype = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), attention_weights.options());
  const int64_t total = grad_weights.numel();
  if (total > 0 && value.numel() > 0) {
    const auto go = grad_output.contiguous(), v = value.contiguous(), shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous(), loc = sampling_locations.contiguous();
    const auto w = attention_weights.contiguous();
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      backward_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
          total, s, go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(), grad_locations.mutable_data_ptr<scalar_t>(),
          grad_weights.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mfdetr, CUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace mfdetr
