// CPU backend of mfdetr::ms_deform_attn (forward and backward): ATen + at::parallel_for
// (OpenMP), the inner loops run over the Dh contiguous channels of a head so the compiler
// vectorises them (`omp simd`), compiled per x86-64 ISA level (MFDETR_CPU_CLONES: AVX-512,
// AVX2, baseline; the CPU's best is used) with fixed-width loops for Dh = 16 and 32.
// float32/float64, and float16/bfloat16 with float32 accumulation.
// Semantics: kernels/reference.py::ms_deform_attn (see ms_deform_attn.h).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn.h"

namespace mfdetr {
namespace {

// Raw pointers of one call; grad_* are null in the forward, out is null in the backward.
template <typename scalar_t>
struct Buffers {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const scalar_t* locations;
  const scalar_t* weights;
  scalar_t* out;
  const scalar_t* grad_out;
  at::opmath_type<scalar_t>* grad_value;
  scalar_t* grad_locations;
  scalar_t* grad_weights;
};

// The bilinear corners of sample i (its location (x, y) in [0, 1] of a height x width level, at
// pixel coordinate (x * width - 0.5, y * height - 0.5): the convention of ms_deform_attn.h).
template <typename scalar_t>
MFDETR_FORCE_INLINE BilinearCorners<at::opmath_type<scalar_t>> sample_corners(const Buffers<scalar_t>& b, int64_t i,
                                                                             int64_t height, int64_t width) {
  using acc_t = at::opmath_type<scalar_t>;
  return BilinearCorners<acc_t>(static_cast<acc_t>(b.locations[2 * i]) * width - acc_t(0.5),
                                static_cast<acc_t>(b.locations[2 * i + 1]) * height - acc_t(0.5), height, width);
}

// Forward of queries [begin, end) of the flattened (batch, query) range. kDh > 0: the channel
// count is a compile-time constant (the accumulator lives in registers); 0: s.channels, with
// `scratch` (s.channels values) as the accumulator.
template <typename scalar_t, int kDh>
MFDETR_FORCE_INLINE void forward_rows(const MsDeformAttnSizes& s, const Buffers<scalar_t>& b, int64_t begin,
                                      int64_t end, at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = s.heads, dh = kDh > 0 ? kDh : s.channels, pixel_stride = s.heads * s.channels;
  acc_t fixed[kDh > 0 ? kDh : 1];
  acc_t* acc = kDh > 0 ? fixed : scratch;
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / s.queries;
    for (int64_t m = 0; m < heads; ++m) {
      for (int64_t c = 0; c < dh; ++c) acc[c] = 0;
      const int64_t sample0 = (nq * heads + m) * s.levels * s.points;
      for (int64_t l = 0; l < s.levels; ++l) {
        const int64_t height = b.shapes[2 * l], width = b.shapes[2 * l + 1];
        const scalar_t* level = b.value + ((n * s.tokens + b.starts[l]) * heads + m) * dh;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t i = sample0 + l * s.points + p;
          const acc_t a = static_cast<acc_t>(b.weights[i]);
          const auto corners = sample_corners(b, i, height, width);
          for (int k = 0; k < 4; ++k) {
            if (corners.index[k] < 0) continue;
            const acc_t coeff = a * corners.weight[k];
            const scalar_t* __restrict__ v = level + corners.index[k] * pixel_stride;
#pragma omp simd
            for (int64_t c = 0; c < dh; ++c) acc[c] += coeff * static_cast<acc_t>(v[c]);
          }
        }
      }
      scalar_t* o = b.out + (nq * heads + m) * dh;
      for (int64_t c = 0; c < dh; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

// Backward of the (batch element, head) pairs [begin, end). Here value and grad_value are
// head-major, [N, M, S, Dh]: a pair reads and scatters into one contiguous [S, Dh] block (in
// [N, S, M, Dh] a head's channels are 1/M of every pixel's row, spread over the whole tensor),
// which it alone writes, so the scatter needs no atomics; grad_locations / grad_weights are per
// sample.
// kDh as in forward_rows (grad_output's channels are held in registers when fixed).
template <typename scalar_t, int kDh>
MFDETR_FORCE_INLINE void backward_pairs(const MsDeformAttnSizes& s, const Buffers<scalar_t>& b, int64_t begin,
                                        int64_t end, at::opmath_type<scalar_t>* scratch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = s.heads, dh = kDh > 0 ? kDh : s.channels, pixel_stride = dh;
  acc_t fixed[kDh > 0 ? kDh : 1];
  acc_t* g = kDh > 0 ? fixed : scratch;
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / heads, m = nm % heads;
    for (int64_t q = 0; q < s.queries; ++q) {
      const int64_t nq = n * s.queries + q;
      const scalar_t* go = b.grad_out + (nq * heads + m) * dh;
      for (int64_t c = 0; c < dh; ++c) g[c] = static_cast<acc_t>(go[c]);
      const int64_t sample0 = (nq * heads + m) * s.levels * s.points;
      for (int64_t l = 0; l < s.levels; ++l) {
        const int64_t height = b.shapes[2 * l], width = b.shapes[2 * l + 1];
        const int64_t offset = ((n * heads + m) * s.tokens + b.starts[l]) * dh;
        for (int64_t p = 0; p < s.points; ++p) {
          const int64_t i = sample0 + l * s.points + p;
          const acc_t a = static_cast<acc_t>(b.weights[i]);
          const auto corners = sample_corners(b, i, height, width);
          acc_t sample = 0, grad_x = 0, grad_y = 0;
          for (int k = 0; k < 4; ++k) {
            if (corners.index[k] < 0) continue;
            const scalar_t* __restrict__ v = b.value + offset + corners.index[k] * pixel_stride;
            acc_t* __restrict__ gv = b.grad_value + offset + corners.index[k] * pixel_stride;
            const acc_t coeff = a * corners.weight[k];
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t c = 0; c < dh; ++c) {
              dot += g[c] * static_cast<acc_t>(v[c]);
              gv[c] += coeff * g[c];
            }
            sample += corners.weight[k] * dot;
            grad_x += corners.dx[k] * dot;
            grad_y += corners.dy[k] * dot;
          }
          b.grad_weights[i] = static_cast<scalar_t>(sample);
          b.grad_locations[2 * i] = static_cast<scalar_t>(a * grad_x * width);
          b.grad_locations[2 * i + 1] = static_cast<scalar_t>(a * grad_y * height);
        }
      }
    }
  }
}

// `loop<scalar_t, kDh>(s, b, begin, end, scratch)` with the head widths Dh = 32 / 16 (every
// deformable layer of the detectors and the head) as fixed-width loops, other widths generic.
#define MFDETR_MSDA_BY_WIDTH(loop, scalar_t)          \
  if (s.channels == 32) {                             \
    loop<scalar_t, 32>(s, b, begin, end, scratch);    \
  } else if (s.channels == 16) {                      \
    loop<scalar_t, 16>(s, b, begin, end, scratch);    \
  } else {                                            \
    loop<scalar_t, 0>(s, b, begin, end, scratch);     \
  }

// One non-template overload per (direction, dtype), cloned per ISA (MFDETR_CPU_CLONES).
#define MFDETR_MSDA_CPU_ENTRIES(scalar_t)                                                                     \
  MFDETR_CPU_CLONES void forward_range(const MsDeformAttnSizes& s, const Buffers<scalar_t>& b, int64_t begin,  \
                                       int64_t end, at::opmath_type<scalar_t>* scratch) {                      \
    MFDETR_MSDA_BY_WIDTH(forward_rows, scalar_t)                                                               \
  }                                                                                                            \
  MFDETR_CPU_CLONES void backward_range(const MsDeformAttnSizes& s, const Buffers<scalar_t>& b, int64_t begin, \
                                        int64_t end, at::opmath_type<scalar_t>* scratch) {                     \
    MFDETR_MSDA_BY_WIDTH(backward_pairs, scalar_t)                                                             \
  }

MFDETR_MSDA_CPU_ENTRIES(float)
MFDETR_MSDA_CPU_ENTRIES(double)
MFDETR_MSDA_CPU_ENTRIES(at::Half)
MFDETR_MSDA_CPU_ENTRIES(at::BFloat16)
#undef MFDETR_MSDA_CPU_ENTRIES
#undef MFDETR_MSDA_BY_WIDTH

// spatial_shapes / level_start_index against value's S (cheap on CPU; a CUDA kernel would need a sync).
void check_levels_cpu(const MsDeformAttnSizes& s, const at::Tensor& spatial_shapes,
                      const at::Tensor& level_start_index) {
  const auto shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const int64_t* hw = shapes.const_data_ptr<int64_t>();
  const int64_t* start = starts.const_data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.levels; ++l) {
    TORCH_CHECK_VALUE(hw[2 * l] >= 0 && hw[2 * l + 1] >= 0, "ms_deform_attn: spatial_shapes[", l,
                      "] must be non-negative, got (", hw[2 * l], ", ", hw[2 * l + 1], ")");
    TORCH_CHECK_VALUE(start[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", start[l],
                      " but spatial_shapes put level ", l, " at token ", total);
    total += hw[2 * l] * hw[2 * l + 1];
  }
  TORCH_CHECK_VALUE(total == s.tokens, "ms_deform_attn: spatial_shapes sum to ", total,
                    " tokens, value has S = ", s.tokens);
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                              const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights);
  check_levels_cpu(s, spatial_shapes, level_start_index);
  if (s.batch * s.queries * s.heads * s.channels == 0 || s.levels == 0 || s.points == 0) {
    return at::zeros({s.batch, s.queries, s.heads * s.channels}, value.options());
  }
  at::Tensor out = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());  // every row written
  const auto v = value.contiguous(), shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    const Buffers<scalar_t> b{v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                              starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              nullptr, nullptr, nullptr, nullptr};
    at::parallel_for(0, s.batch * s.queries, 1, [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> scratch(s.channels);
      forward_range(s, b, begin, end, scratch.data());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const auto s = check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights);
  check_ms_deform_attn_grad_output(grad_output, value, s);
  check_levels_cpu(s, spatial_shapes, level_start_index);
  if (attention_weights.numel() == 0 || value.numel() == 0) {
    return {at::zeros(value.sizes(), value.options()),
            at::zeros(sampling_locations.sizes(), sampling_locations.options()),
            at::zeros(attention_weights.sizes(), attention_weights.options())};
  }
  // head-major [N, M, S, Dh] while the kernel runs (see backward_pairs); every sample's
  // grad_locations / grad_weights is written
  at::Tensor grad_value = at::zeros({s.batch, s.heads, s.tokens, s.channels},
                                    value.options().dtype(at::toOpMathType(value.scalar_type())));
  at::Tensor grad_locations = at::empty(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_weights = at::empty(attention_weights.sizes(), attention_weights.options());
  const auto go = grad_output.contiguous(), v = value.permute({0, 2, 1, 3}).contiguous();
  const auto shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const Buffers<scalar_t> b{v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                              starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(), nullptr, go.const_data_ptr<scalar_t>(),
                              grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                              grad_locations.mutable_data_ptr<scalar_t>(), grad_weights.mutable_data_ptr<scalar_t>()};
    at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<at::opmath_type<scalar_t>> scratch(s.channels);
      backward_range(s, b, begin, end, scratch.data());
    });
  });
  at::Tensor grad_value_out = at::empty(value.sizes(), value.options());  // back to [N, S, M, Dh]
  grad_value_out.copy_(grad_value.permute({0, 2, 1, 3}));
  return {grad_value_out, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mfdetr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mfdetr
