// CPU backend of mfdetr::fused_roi_align (forward and backward):
// roi_align(c1 + interpolate(e, size=c1's), boxes, aligned=True) without materialising the sum.
//
// Layout: c1 and e are read channels-last ([B, H, W, C], in the accumulation dtype), so every tap
// is one contiguous run of C values and the inner loop is a vectorisable axpy over channels.
// The taps of a bin (all its samples; fused_roi_align.h) are computed once per box and merged by
// pixel (neighbouring samples share c1 and e pixels: at most 16 distinct c1 and 25 distinct e
// pixels per bin for a 2x2 sample grid, usually far fewer).
// Forward: boxes in parallel, each writes its own [bins, C] rows. Backward: the taps of all boxes
// are built first (boxes in parallel), then the channels are split between threads, each
// scattering into its own channel range of grad_c1 / grad_e (no atomics).
// float32/float64, float16/bfloat16 with float32 accumulation. Reference:
// kernels/reference.py::fused_roi_align.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fused_roi_align.h"

namespace mfdetr {
namespace {

// Adds (index, weight) to a small tap list, merging a repeated index.
template <typename acc_t>
void add_tap(std::vector<int64_t>& index, std::vector<acc_t>& weight, int64_t begin, int64_t i, acc_t w) {
  for (int64_t t = begin; t < static_cast<int64_t>(index.size()); ++t) {
    if (index[t] == i) {
      weight[t] += w;
      return;
    }
  }
  index.push_back(i);
  weight.push_back(w);
}

// All taps of one box, bin by bin: bin b's c1 taps are [c1_start[b], c1_start[b + 1]) (pixel
// indices h * W + w of one image, weights including 1 / samples); the same for e.
template <typename acc_t>
struct BoxTaps {
  std::vector<int64_t> c1_index, e_index, c1_start, e_start;
  std::vector<acc_t> c1_weight, e_weight;

  BoxTaps() = default;
  BoxTaps(const acc_t* box, acc_t spatial_scale, int64_t sampling_ratio, const FusedRoiAlignSizes& s) {
    const RoiGeometry<acc_t> g(box, spatial_scale, s.pooled_height, s.pooled_width, sampling_ratio);
    const int64_t bins = s.pooled_height * s.pooled_width;
    c1_start.reserve(bins + 1);
    e_start.reserve(bins + 1);
    c1_start.push_back(0);
    e_start.push_back(0);
    for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
      for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
        const int64_t c1_begin = static_cast<int64_t>(c1_index.size());
        const int64_t e_begin = static_cast<int64_t>(e_index.size());
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const acc_t y = g.start_h + ph * g.bin_h + (iy + acc_t(0.5)) * g.bin_h / static_cast<acc_t>(g.grid_h);
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const acc_t x = g.start_w + pw * g.bin_w + (ix + acc_t(0.5)) * g.bin_w / static_cast<acc_t>(g.grid_w);
            const FusedTaps<acc_t> t(y, x, g.inv_count, s.height, s.width, s.e_height, s.e_width);
            for (int j = 0; j < t.n_c1; ++j) add_tap(c1_index, c1_weight, c1_begin, t.c1_index[j], t.c1_weight[j]);
            for (int j = 0; j < t.n_e; ++j) add_tap(e_index, e_weight, e_begin, t.e_index[j], t.e_weight[j]);
          }
        }
        c1_start.push_back(static_cast<int64_t>(c1_index.size()));
        e_start.push_back(static_cast<int64_t>(e_index.size()));
      }
    }
  }
};

// Box k's batch index, checked against B.
template <typename acc_t>
int64_t batch_of(const acc_t* box, int64_t k, int64_t batch) {
  const int64_t b = static_cast<int64_t>(box[0]);
  TORCH_CHECK_VALUE(b >= 0 && b < batch && static_cast<acc_t>(b) == box[0], "fused_roi_align: boxes[", k,
                    ", 0] (batch index) must be an integer in [0, ", batch, "), got ", static_cast<double>(box[0]));
  return b;
}

// The channel loops are compiled per ISA level (MFDETR_CPU_CLONES, common.h).

// dst[0:n] += sum_t weight[t] * src[index[t] * stride + 0:n]  (one bin's gather, forward)
template <typename T>
MFDETR_FORCE_INLINE void gather_rows_impl(int64_t n, int64_t count, const int64_t* __restrict__ index,
                                          const T* __restrict__ weight, const T* __restrict__ src, int64_t stride,
                                          T* __restrict__ dst) {
  for (int64_t t = 0; t < count; ++t) {
    const T w = weight[t];
    const T* row = src + index[t] * stride;
    for (int64_t c = 0; c < n; ++c) dst[c] += w * row[c];
  }
}

// dst[index[t] * stride + 0:n] += weight[t] * src[0:n]  (one bin's scatter, backward)
template <typename T>
MFDETR_FORCE_INLINE void scatter_rows_impl(int64_t n, int64_t count, const int64_t* __restrict__ index,
                                           const T* __restrict__ weight, const T* __restrict__ src, int64_t stride,
                                           T* __restrict__ dst) {
  for (int64_t t = 0; t < count; ++t) {
    const T w = weight[t];
    T* row = dst + index[t] * stride;
    for (int64_t c = 0; c < n; ++c) row[c] += w * src[c];
  }
}

// Multiversioned entry points (function templates cannot carry target_clones).
MFDETR_CPU_CLONES void gather_rows(int64_t n, int64_t count, const int64_t* index, const float* weight,
                                   const float* src, int64_t stride, float* dst) {
  gather_rows_impl(n, count, index, weight, src, stride, dst);
}
MFDETR_CPU_CLONES void gather_rows(int64_t n, int64_t count, const int64_t* index, const double* weight,
                                   const double* src, int64_t stride, double* dst) {
  gather_rows_impl(n, count, index, weight, src, stride, dst);
}
MFDETR_CPU_CLONES void scatter_rows(int64_t n, int64_t count, const int64_t* index, const float* weight,
                                    const float* src, int64_t stride, float* dst) {
  scatter_rows_impl(n, count, index, weight, src, stride, dst);
}
MFDETR_CPU_CLONES void scatter_rows(int64_t n, int64_t count, const int64_t* index, const double* weight,
                                    const double* src, int64_t stride, double* dst) {
  scatter_rows_impl(n, count, index, weight, src, stride, dst);
}

// Forward in the accumulation dtype: c1 [B, H, W, C], e [B, He, We, C] channels-last -> out [K, bins, C].
template <typename acc_t>
void forward_impl(const FusedRoiAlignSizes& s, const acc_t* c1, const acc_t* e, const acc_t* boxes,
                  double spatial_scale, int64_t sampling_ratio, acc_t* out) {
  const int64_t C = s.channels, bins = s.pooled_height * s.pooled_width;
  const int64_t plane = s.height * s.width, e_plane = s.e_height * s.e_width;
  for (int64_t k = 0; k < s.rois; ++k) batch_of(boxes + 5 * k, k, s.batch);  // errors before any work
  at::parallel_for(0, s.rois, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k) {
      const acc_t* box = boxes + 5 * k;
      const int64_t b = static_cast<int64_t>(box[0]);
      const BoxTaps<acc_t> taps(box, static_cast<acc_t>(spatial_scale), sampling_ratio, s);
      const acc_t* c1_image = c1 + b * plane * C;
      const acc_t* e_image = e + b * e_plane * C;
      for (int64_t bin = 0; bin < bins; ++bin) {
        acc_t* o = out + (k * bins + bin) * C;  // zero-initialised
        const int64_t c1_t = taps.c1_start[bin], e_t = taps.e_start[bin];
        gather_rows(C, taps.c1_start[bin + 1] - c1_t, taps.c1_index.data() + c1_t, taps.c1_weight.data() + c1_t,
                    c1_image, C, o);
        gather_rows(C, taps.e_start[bin + 1] - e_t, taps.e_index.data() + e_t, taps.e_weight.data() + e_t, e_image,
                    C, o);
      }
    }
  });
}

// Backward in the accumulation dtype: grad_out [K, bins, C] -> grad_c1 [B, H, W, C], grad_e [B, He, We, C].
template <typename acc_t>
void backward_impl(const FusedRoiAlignSizes& s, const acc_t* grad_out, const acc_t* boxes, double spatial_scale,
                   int64_t sampling_ratio, acc_t* grad_c1, acc_t* grad_e) {
  const int64_t C = s.channels, bins = s.pooled_height * s.pooled_width;
  const int64_t plane = s.height * s.width, e_plane = s.e_height * s.e_width;
  for (int64_t k = 0; k < s.rois; ++k) batch_of(boxes + 5 * k, k, s.batch);
  std::vector<BoxTaps<acc_t>> taps(s.rois);
  at::parallel_for(0, s.rois, 1, [&](int64_t k_begin, int64_t k_end) {
    for (int64_t k = k_begin; k < k_end; ++k)
      taps[k] = BoxTaps<acc_t>(boxes + 5 * k, static_cast<acc_t>(spatial_scale), sampling_ratio, s);
  });
  // channel blocks of 16 (one cache line of float32) or more per thread
  at::parallel_for(0, C, 16, [&](int64_t c_begin, int64_t c_end) {
    const int64_t n = c_end - c_begin;
    for (int64_t k = 0; k < s.rois; ++k) {
      const int64_t b = static_cast<int64_t>(boxes[5 * k]);
      const BoxTaps<acc_t>& tk = taps[k];
      acc_t* gc1 = grad_c1 + b * plane * C + c_begin;
      acc_t* ge = grad_e + b * e_plane * C + c_begin;
      for (int64_t bin = 0; bin < bins; ++bin) {
        const acc_t* go = grad_out + (k * bins + bin) * C + c_begin;
        const int64_t c1_t = tk.c1_start[bin], e_t = tk.e_start[bin];
        scatter_rows(n, tk.c1_start[bin + 1] - c1_t, tk.c1_index.data() + c1_t, tk.c1_weight.data() + c1_t, go, C,
                     gc1);
        scatter_rows(n, tk.e_start[bin + 1] - e_t, tk.e_index.data() + e_t, tk.e_weight.data() + e_t, go, C, ge);
      }
    }
  });
}

// [B, C, H, W] of any float dtype -> contiguous channels-last [B, H, W, C] in `acc_dtype`.
at::Tensor channels_last(const at::Tensor& x, at::ScalarType acc_dtype) {
  return x.to(acc_dtype).permute({0, 2, 3, 1}).contiguous();
}

at::Tensor fused_roi_align_cpu(const at::Tensor& c1, const at::Tensor& e, const at::Tensor& boxes,
                               int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                               int64_t sampling_ratio) {
  const auto s = check_fused_roi_align_inputs(c1, e, boxes, pooled_height, pooled_width, sampling_ratio);
  if (s.rois == 0 || s.channels == 0 || c1.numel() == 0)
    return at::zeros({s.rois, s.channels, pooled_height, pooled_width}, c1.options());
  const auto acc_dtype = at::toOpMathType(c1.scalar_type());
  const auto c1_hwc = channels_last(c1, acc_dtype), e_hwc = channels_last(e, acc_dtype);
  const auto box_acc = boxes.to(acc_dtype).contiguous();
  at::Tensor out = at::zeros({s.rois, pooled_height, pooled_width, s.channels}, c1.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES(acc_dtype, "fused_roi_align_cpu", [&] {
    forward_impl<scalar_t>(s, c1_hwc.const_data_ptr<scalar_t>(), e_hwc.const_data_ptr<scalar_t>(),
                           box_acc.const_data_ptr<scalar_t>(), spatial_scale, sampling_ratio,
                           out.mutable_data_ptr<scalar_t>());
  });
  return out.permute({0, 3, 1, 2}).to(c1.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> fused_roi_align_backward_cpu(const at::Tensor& grad_output, const at::Tensor& c1,
                                                                const at::Tensor& e, const at::Tensor& boxes,
                                                                int64_t pooled_height, int64_t pooled_width,
                                                                double spatial_scale, int64_t sampling_ratio) {
  const auto s = check_fused_roi_align_inputs(c1, e, boxes, pooled_height, pooled_width, sampling_ratio);
  check_fused_roi_align_grad_output(grad_output, c1, s);
  const auto acc_dtype = at::toOpMathType(c1.scalar_type());
  const auto acc = c1.options().dtype(acc_dtype);
  at::Tensor grad_c1 = at::zeros({s.batch, s.height, s.width, s.channels}, acc);
  at::Tensor grad_e = at::zeros({s.batch, s.e_height, s.e_width, s.channels}, acc);
  if (grad_output.numel() > 0 && c1.numel() > 0) {
    const auto go = channels_last(grad_output, acc_dtype);  // [K, PH, PW, C]
    const auto box_acc = boxes.to(acc_dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc_dtype, "fused_roi_align_backward_cpu", [&] {
      backward_impl<scalar_t>(s, go.const_data_ptr<scalar_t>(), box_acc.const_data_ptr<scalar_t>(), spatial_scale,
                              sampling_ratio, grad_c1.mutable_data_ptr<scalar_t>(), grad_e.mutable_data_ptr<scalar_t>());
    });
  }
  return {grad_c1.permute({0, 3, 1, 2}).to(c1.scalar_type()).contiguous(),
          grad_e.permute({0, 3, 1, 2}).to(e.scalar_type()).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(mfdetr, CPU, m) {
  m.impl("fused_roi_align", &fused_roi_align_cpu);
  m.impl("fused_roi_align_backward", &fused_roi_align_backward_cpu);
}

}  // namespace mfdetr
