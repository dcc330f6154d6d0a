// Shared by the CPU and CUDA backends of mfdetr::fused_roi_align: argument checks and the
// sampling taps of one RoIAlign sample point on F = c1 + interpolate(e, size=c1's, bilinear,
// align_corners=False), without materialising F.
//
// RoIAlign convention: torchvision.ops.roi_align with aligned=True (box corners are continuous
// coordinates, shifted by -0.5 so pixel centres sit at integers; no minimum box size; a bin's
// sample grid is sampling_ratio x sampling_ratio, or ceil(box size / output size) when <= 0;
// samples outside [-1, H] x [-1, W] are zero, others clamped to the map). Upsampling convention:
// F.interpolate(mode="bilinear", align_corners=False) with an explicit size: source coordinate
// (dst + 0.5) * in / out - 0.5, clamped at 0, the upper neighbour clamped to the last pixel.
#pragma once

#include <ATen/ATen.h>

#include "../common.h"

namespace mfdetr {

struct FusedRoiAlignSizes {
  int64_t batch, channels, height, width, e_height, e_width, rois, pooled_height, pooled_width;
};

inline FusedRoiAlignSizes check_fused_roi_align_inputs(const at::Tensor& c1, const at::Tensor& e,
                                                       const at::Tensor& boxes, int64_t pooled_height,
                                                       int64_t pooled_width, int64_t sampling_ratio) {
  TORCH_CHECK_VALUE(c1.dim() == 4, "fused_roi_align: c1 must be [B, C, H, W], got ", c1.sizes());
  TORCH_CHECK_VALUE(e.dim() == 4 && e.size(0) == c1.size(0) && e.size(1) == c1.size(1),
                    "fused_roi_align: e must be [B, C, He, We] with c1's B and C ", c1.sizes().slice(0, 2),
                    ", got ", e.sizes());
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 5,
                    "fused_roi_align: boxes must be [K, 5] (batch index, x1, y1, x2, y2), got ", boxes.sizes());
  TORCH_CHECK_VALUE(pooled_height > 0 && pooled_width > 0, "fused_roi_align: output_size must be positive, got (",
                    pooled_height, ", ", pooled_width, ")");
  TORCH_CHECK_VALUE(sampling_ratio >= -1 && sampling_ratio < (1 << 16), "fused_roi_align: sampling_ratio must be "
                    ">= -1 (<= 0: adaptive), got ", sampling_ratio);
  TORCH_CHECK_VALUE(c1.numel() == 0 || e.numel() > 0 || c1.size(1) == 0,
                    "fused_roi_align: e is empty but c1 is not (interpolate needs at least one pixel)");
  TORCH_CHECK_TYPE(at::isFloatingType(c1.scalar_type()), "fused_roi_align: c1 must be floating point, got ",
                   c1.scalar_type());
  TORCH_CHECK_TYPE(e.scalar_type() == c1.scalar_type() && boxes.scalar_type() == c1.scalar_type(),
                   "fused_roi_align: e (", e.scalar_type(), ") and boxes (", boxes.scalar_type(),
                   ") must have c1's dtype (", c1.scalar_type(), ")");
  TORCH_CHECK(e.device() == c1.device() && boxes.device() == c1.device(),
              "fused_roi_align: c1, e and boxes must be on one device, got ", c1.device(), ", ", e.device(), ", ",
              boxes.device());
  return {c1.size(0), c1.size(1), c1.size(2), c1.size(3), e.size(2), e.size(3), boxes.size(0), pooled_height,
          pooled_width};
}

// grad_output of the backward against the forward's sizes (and c1's dtype / device).
inline void check_fused_roi_align_grad_output(const at::Tensor& grad_output, const at::Tensor& c1,
                                              const FusedRoiAlignSizes& s) {
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({s.rois, s.channels, s.pooled_height, s.pooled_width}),
                    "fused_roi_align_backward: grad_output must be [K, C, PH, PW] = [", s.rois, ", ", s.channels,
                    ", ", s.pooled_height, ", ", s.pooled_width, "], got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == c1.scalar_type(),
                   "fused_roi_align_backward: grad_output must have c1's dtype (", c1.scalar_type(), "), got ",
                   grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == c1.device(), "fused_roi_align_backward: grad_output must be on ", c1.device(),
              ", got ", grad_output.device());
}

// Geometry of one box: sample grid and spacing (torchvision roi_align, aligned=True).
template <typename acc_t>
struct RoiGeometry {
  acc_t start_h, start_w, bin_h, bin_w;
  int grid_h, grid_w;
  acc_t inv_count;

  MFDETR_HOST_DEVICE RoiGeometry(const acc_t* box, acc_t spatial_scale, int64_t pooled_height, int64_t pooled_width,
                                 int64_t sampling_ratio) {
    start_w = box[1] * spatial_scale - acc_t(0.5);
    start_h = box[2] * spatial_scale - acc_t(0.5);
    const acc_t roi_w = box[3] * spatial_scale - acc_t(0.5) - start_w;
    const acc_t roi_h = box[4] * spatial_scale - acc_t(0.5) - start_h;
    bin_h = roi_h / static_cast<acc_t>(pooled_height);
    bin_w = roi_w / static_cast<acc_t>(pooled_width);
    grid_h = sampling_ratio > 0 ? static_cast<int>(sampling_ratio) : static_cast<int>(ceil(roi_h / pooled_height));
    grid_w = sampling_ratio > 0 ? static_cast<int>(sampling_ratio) : static_cast<int>(ceil(roi_w / pooled_width));
    const int count = grid_h * grid_w > 1 ? grid_h * grid_w : 1;
    inv_count = acc_t(1) / static_cast<acc_t>(count);
  }
};

// Up to 4 c1 taps and 16 e taps (flat indices within one channel plane, weights) of the sample
// at (y, x) of the c1 grid; `scale` is the weight every tap is multiplied by.
template <typename acc_t>
struct FusedTaps {
  int n_c1 = 0, n_e = 0;
  int64_t c1_index[4], e_index[16];
  acc_t c1_weight[4], e_weight[16];

  MFDETR_HOST_DEVICE FusedTaps(acc_t y, acc_t x, acc_t scale, int64_t height, int64_t width, int64_t e_height,
                               int64_t e_width) {
    if (y < acc_t(-1) || y > static_cast<acc_t>(height) || x < acc_t(-1) || x > static_cast<acc_t>(width)) return;
    if (y <= 0) y = 0;
    if (x <= 0) x = 0;
    int64_t y_low = static_cast<int64_t>(y), x_low = static_cast<int64_t>(x), y_high, x_high;
    if (y_low >= height - 1) {
      y_high = y_low = height - 1;
      y = static_cast<acc_t>(y_low);
    } else {
      y_high = y_low + 1;
    }
    if (x_low >= width - 1) {
      x_high = x_low = width - 1;
      x = static_cast<acc_t>(x_low);
    } else {
      x_high = x_low + 1;
    }
    const acc_t ly = y - static_cast<acc_t>(y_low), lx = x - static_cast<acc_t>(x_low);
    const acc_t hy = acc_t(1) - ly, hx = acc_t(1) - lx;
    const int64_t ys[4] = {y_low, y_low, y_high, y_high};
    const int64_t xs[4] = {x_low, x_high, x_low, x_high};
    const acc_t ws[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
    const acc_t scale_y = static_cast<acc_t>(e_height) / static_cast<acc_t>(height);
    const acc_t scale_x = static_cast<acc_t>(e_width) / static_cast<acc_t>(width);
    for (int k = 0; k < 4; ++k) {
      const acc_t w = ws[k] * scale;
      c1_index[n_c1] = ys[k] * width + xs[k];
      c1_weight[n_c1++] = w;
      // the upsampled e at integer pixel (ys[k], xs[k]) of the c1 grid
      acc_t sy = (static_cast<acc_t>(ys[k]) + acc_t(0.5)) * scale_y - acc_t(0.5);
      acc_t sx = (static_cast<acc_t>(xs[k]) + acc_t(0.5)) * scale_x - acc_t(0.5);
      sy = sy < 0 ? acc_t(0) : sy;
      sx = sx < 0 ? acc_t(0) : sx;
      const int64_t ey0 = static_cast<int64_t>(sy), ex0 = static_cast<int64_t>(sx);
      const int64_t ey1 = ey0 < e_height - 1 ? ey0 + 1 : ey0, ex1 = ex0 < e_width - 1 ? ex0 + 1 : ex0;
      const acc_t ely = sy - static_cast<acc_t>(ey0), elx = sx - static_cast<acc_t>(ex0);
      const int64_t eys[4] = {ey0, ey0, ey1, ey1};
      const int64_t exs[4] = {ex0, ex1, ex0, ex1};
      const acc_t ews[4] = {(1 - ely) * (1 - elx), (1 - ely) * elx, ely * (1 - elx), ely * elx};
      for (int j = 0; j < 4; ++j) {
        e_index[n_e] = eys[j] * e_width + exs[j];
        e_weight[n_e++] = w * ews[j];
      }
    }
  }
};

}  // namespace mfdetr
