// Shared by the CPU and CUDA backends of mfdetr::ms_deform_attn: argument checks and the
// bilinear sampling convention.
//
// Convention (Deformable DETR's ms_deform_attn_core_pytorch = F.grid_sample with
// align_corners=False and zero padding): a location (x, y) in [0, 1] of level l maps to the
// pixel coordinate (x * W_l - 0.5, y * H_l - 0.5); pixel centres sit at integers; the four
// neighbours outside the map contribute zero.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "../common.h"

namespace mfdetr {

struct MsDeformAttnSizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;
};

// Checks shapes and dtypes (messages name the argument) and returns the sizes.
// Shape errors raise ValueError, dtype errors TypeError (TORCH_CHECK_VALUE / _TYPE).
inline MsDeformAttnSizes check_ms_deform_attn_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights) {
  TORCH_CHECK_VALUE(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, Dh], got ", value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "ms_deform_attn: spatial_shapes must be [L, 2], got ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
                    "ms_deform_attn: sampling_locations must be [N, Lq, M, L, P, 2], got ",
                    sampling_locations.sizes());
  TORCH_CHECK_VALUE(attention_weights.dim() == 5 &&
                        attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
                    "ms_deform_attn: attention_weights must be [N, Lq, M, L, P] = sampling_locations.shape[:-1] ",
                    sampling_locations.sizes().slice(0, 5), ", got ", attention_weights.sizes());
  MsDeformAttnSizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                      sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK_VALUE(sampling_locations.size(0) == s.batch && sampling_locations.size(2) == s.heads,
                    "ms_deform_attn: sampling_locations [N, Lq, M, ...] = ", sampling_locations.sizes(),
                    " does not match value [N, S, M, Dh] = ", value.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.size(0) == s.levels, "ms_deform_attn: spatial_shapes has ",
                    spatial_shapes.size(0), " levels, sampling_locations has L = ", s.levels);
  TORCH_CHECK_VALUE(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
                    "ms_deform_attn: level_start_index must be [L] with L = ", s.levels, ", got ",
                    level_start_index.sizes());
  TORCH_CHECK_TYPE(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
                   spatial_shapes.scalar_type());
  TORCH_CHECK_TYPE(level_start_index.scalar_type() == at::kLong,
                   "ms_deform_attn: level_start_index must be int64, got ", level_start_index.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(value.scalar_type()), "ms_deform_attn: value must be floating point, got ",
                   value.scalar_type());
  TORCH_CHECK_TYPE(sampling_locations.scalar_type() == value.scalar_type() &&
                       attention_weights.scalar_type() == value.scalar_type(),
                   "ms_deform_attn: sampling_locations (", sampling_locations.scalar_type(),
                   ") and attention_weights (", attention_weights.scalar_type(), ") must have value's dtype (",
                   value.scalar_type(), ")");
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "ms_deform_attn: all inputs must be on value's device (",
                value.device(), "), got one on ", t->device());
  }
  return s;
}

// grad_output of the backward against the forward's sizes (and value's dtype / device).
inline void check_ms_deform_attn_grad_output(const at::Tensor& grad_output, const at::Tensor& value,
                                             const MsDeformAttnSizes& s) {
  TORCH_CHECK_VALUE(grad_output.dim() == 3 && grad_output.size(0) == s.batch && grad_output.size(1) == s.queries &&
                        grad_output.size(2) == s.heads * s.channels,
                    "ms_deform_attn_backward: grad_output must be [N, Lq, M * Dh] = [", s.batch, ", ", s.queries,
                    ", ", s.heads * s.channels, "], got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == value.scalar_type(),
                   "ms_deform_attn_backward: grad_output must have value's dtype (", value.scalar_type(), "), got ",
                   grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn_backward: grad_output must be on ",
              value.device(), ", got ", grad_output.device());
}

// The four bilinear neighbours of the pixel coordinate (x, y) of a level (the convention above):
// their flat index in the level (-1 when outside the map: zero padding), their weight, and
// d(weight)/dx, d(weight)/dy. Used by the CPU and the CUDA kernels alike.
template <typename acc_t>
struct BilinearCorners {
  int64_t index[4];
  acc_t weight[4], dx[4], dy[4];

  MFDETR_HOST_DEVICE BilinearCorners(acc_t x, acc_t y, int64_t height, int64_t width) {
#ifdef __CUDA_ARCH__
    const acc_t x0f = floor(x), y0f = floor(y);
#else
    const acc_t x0f = std::floor(x), y0f = std::floor(y);
#endif
    const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
    const acc_t lx = x - x0f, ly = y - y0f, hx = acc_t(1) - lx, hy = acc_t(1) - ly;
    const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
    const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
    const acc_t w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
    const acc_t ddx[4] = {-hy, hy, -ly, ly};
    const acc_t ddy[4] = {-hx, -lx, hx, lx};
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int k = 0; k < 4; ++k) {
      const bool inside = xs[k] >= 0 && xs[k] < width && ys[k] >= 0 && ys[k] < height;
      index[k] = inside ? ys[k] * width + xs[k] : -1;
      weight[k] = w[k];
      dx[k] = ddx[k];
      dy[k] = ddy[k];
    }
  }
};

}  // namespace mfdetr
