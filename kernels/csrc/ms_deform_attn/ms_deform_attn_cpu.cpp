// CPU backend of mfdetr::ms_deform_attn (forward and backward): ATen + at::parallel_for
// (OpenMP), the inner loops run over the Dh contiguous channels of a head so the compiler
// vectorises them (`omp simd`). float32/float64, and float16/bfloat16 with float32
// accumulation. Semantics: kernels/reference.py::ms_deform_attn (see ms_deform_attn.h).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn.h"

namespace mfdetr {
namespace {

template <typename scalar_t>
void forward_impl(const MsDeformAttnSizes& s, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                  const scalar_t* locations, const scalar_t* weights, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = s.heads, dh = s.channels, pixel_stride = s.heads * s.channels;
  at::parallel_for(0, s.batch * s.queries, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc_buffer(dh);
    acc_t* acc = acc_buffer.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / s.queries;
      for (int64_t m = 0; m < heads; ++m) {
        for (int64_t c = 0; c < dh; ++c) acc[c] = 0;
        const int64_t sample0 = (nq * heads + m) * s.levels * s.points;
        for (int64_t l = 0; l < s.levels; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const scalar_t* level = value + ((n * s.tokens + starts[l]) * heads + m) * dh;
          for (int64_t p = 0; p < s.points; ++p) {
            const int64_t i = sample0 + l * s.points + p;
            const acc_t a = static_cast<acc_t>(weights[i]);
            const BilinearCorners<acc_t> b(static_cast<acc_t>(locations[2 * i]) * width - acc_t(0.5),
                                    static_cast<acc_t>(locations[2 * i + 1]) * height - acc_t(0.5), height, width);
            for (int k = 0; k < 4; ++k) {
              if (b.index[k] < 0) continue;
              const acc_t coeff = a * b.weight[k];
              const scalar_t* __restrict__ v = level + b.index[k] * pixel_stride;
#pragma omp simd
              for (int64_t c = 0; c < dh; ++c) acc[c] += coeff * static_cast<acc_t>(v[c]);
            }
          }
        }
        scalar_t* o = out + (nq * heads + m) * dh;
        for (int64_t c = 0; c < dh; ++c) o[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// One task per (batch element, head): grad_value[n, :, m, :] is written by that task only,
// so the scatter needs no atomics; grad_locations / grad_weights are per sample.
template <typename scalar_t>
void backward_impl(const MsDeformAttnSizes& s, const scalar_t* grad_out, const scalar_t* value,
                   const int64_t* shapes, const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                   at::opmath_type<scalar_t>* grad_value, scalar_t* grad_locations, scalar_t* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t heads = s.heads, dh = s.channels, pixel_stride = s.heads * s.channels;
  at::parallel_for(0, s.batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / heads, m = nm % heads;
      for (int64_t q = 0; q < s.queries; ++q) {
        const int64_t nq = n * s.queries + q;
        const scalar_t* __restrict__ go = grad_out + (nq * heads + m) * dh;
        const int64_t sample0 = (nq * heads + m) * s.levels * s.points;
        for (int64_t l = 0; l < s.levels; ++l) {
          const int64_t height = shapes[2 * l], width = shapes[2 * l + 1];
          const int64_t offset = ((n * s.tokens + starts[l]) * heads + m) * dh;
          for (int64_t p = 0; p < s.points; ++p) {
            const int64_t i = sample0 + l * s.points + p;
            const acc_t a = static_cast<acc_t>(weights[i]);
            const BilinearCorners<acc_t> b(static_cast<acc_t>(locations[2 * i]) * width - acc_t(0.5),
                                    static_cast<acc_t>(locations[2 * i + 1]) * height - acc_t(0.5), height, width);
            acc_t sample = 0, grad_x = 0, grad_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (b.index[k] < 0) continue;
              const scalar_t* __restrict__ v = value + offset + b.index[k] * pixel_stride;
              acc_t* __restrict__ gv = grad_value + offset + b.index[k] * pixel_stride;
              const acc_t coeff = a * b.weight[k];
              acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
              for (int64_t c = 0; c < dh; ++c) {
                const acc_t g = static_cast<acc_t>(go[c]);
                dot += g * static_cast<acc_t>(v[c]);
                gv[c] += coeff * g;
              }
              sample += b.weight[k] * dot;
              grad_x += b.dx[k] * dot;
              grad_y += b.dy[k] * dot;
            }
            grad_weights[i] = static_cast<scalar_t>(sample);
            grad_locations[2 * i] = static_cast<scalar_t>(a * grad_x * width);
            grad_locations[2 * i + 1] = static_cast<scalar_t>(a * grad_y * height);
          }
        }
      }
    }
  });
}

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
  at::Tensor out = at::zeros({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (out.numel() == 0 || s.levels == 0 || s.points == 0) return out;
  const auto v = value.contiguous(), shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
  const auto loc = sampling_locations.contiguous(), w = attention_weights.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    forward_impl<scalar_t>(s, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                           starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                           w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
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
  const auto acc_dtype = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_locations = at::zeros(sampling_locations.sizes(), sampling_locations.options());
  at::Tensor grad_weights = at::zeros(attention_weights.sizes(), attention_weights.options());
  if (grad_weights.numel() > 0 && value.numel() > 0) {
    const auto go = grad_output.contiguous(), v = value.contiguous(), shapes = spatial_shapes.contiguous();
    const auto starts = level_start_index.contiguous(), loc = sampling_locations.contiguous();
    const auto w = attention_weights.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      backward_impl<scalar_t>(s, go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                              loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                              grad_value.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                              grad_locations.mutable_data_ptr<scalar_t>(), grad_weights.mutable_data_ptr<scalar_t>());
    });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(mfdetr, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace mfdetr
