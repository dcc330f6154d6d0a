// CPU backend of mfdetr::fused_roi_align (forward and backward):
// roi_align(c1 + interpolate(e, size=c1's), boxes, aligned=True) without materialising the sum.
// Per box, the taps of every sample of every bin are computed once (fused_roi_align.h), then the
// channels are processed in parallel (at::parallel_for): the forward gathers, the backward
// scatters into grad_c1 / grad_e of the channels a thread owns, so no atomics are needed.
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

// All taps of one box, bin by bin (bin b's c1 taps are [c1_start[b], c1_start[b + 1])).
template <typename acc_t>
struct BoxTaps {
  std::vector<int64_t> c1_index, e_index, c1_start, e_start;
  std::vector<acc_t> c1_weight, e_weight;

  BoxTaps(const acc_t* box, acc_t spatial_scale, int64_t sampling_ratio, const FusedRoiAlignSizes& s) {
    const RoiGeometry<acc_t> g(box, spatial_scale, s.pooled_height, s.pooled_width, sampling_ratio);
    const int64_t bins = s.pooled_height * s.pooled_width;
    c1_start.assign(1, 0);
    e_start.assign(1, 0);
    for (int64_t ph = 0; ph < s.pooled_height; ++ph) {
      for (int64_t pw = 0; pw < s.pooled_width; ++pw) {
        for (int iy = 0; iy < g.grid_h; ++iy) {
          const acc_t y = g.start_h + ph * g.bin_h + (iy + acc_t(0.5)) * g.bin_h / static_cast<acc_t>(g.grid_h);
          for (int ix = 0; ix < g.grid_w; ++ix) {
            const acc_t x = g.start_w + pw * g.bin_w + (ix + acc_t(0.5)) * g.bin_w / static_cast<acc_t>(g.grid_w);
            const FusedTaps<acc_t> t(y, x, g.inv_count, s.height, s.width, s.e_height, s.e_width);
            c1_index.insert(c1_index.end(), t.c1_index, t.c1_index + t.n_c1);
            c1_weight.insert(c1_weight.end(), t.c1_weight, t.c1_weight + t.n_c1);
            e_index.insert(e_index.end(), t.e_index, t.e_index + t.n_e);
            e_weight.insert(e_weight.end(), t.e_weight, t.e_weight + t.n_e);
          }
        }
        c1_start.push_back(static_cast<int64_t>(c1_index.size()));
        e_start.push_back(static_cast<int64_t>(e_index.size()));
      }
    }
    (void)bins;
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

template <typename scalar_t>
void forward_impl(const FusedRoiAlignSizes& s, const scalar_t* c1, const scalar_t* e, const at::Tensor& boxes,
                  double spatial_scale, int64_t sampling_ratio, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  const int64_t plane = s.height * s.width, e_plane = s.e_height * s.e_width;
  const int64_t bins = s.pooled_height * s.pooled_width;
  for (int64_t k = 0; k < s.rois; ++k) {
    const acc_t* box = box_data + 5 * k;
    const int64_t b = batch_of(box, k, s.batch);
    const BoxTaps<acc_t> taps(box, static_cast<acc_t>(spatial_scale), sampling_ratio, s);
    at::parallel_for(0, s.channels, 16, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const scalar_t* c1_plane = c1 + (b * s.channels + c) * plane;
        const scalar_t* e_map = e + (b * s.channels + c) * e_plane;
        scalar_t* o = out + (k * s.channels + c) * bins;
        for (int64_t bin = 0; bin < bins; ++bin) {
          acc_t acc = 0;
          for (int64_t t = taps.c1_start[bin]; t < taps.c1_start[bin + 1]; ++t)
            acc += taps.c1_weight[t] * static_cast<acc_t>(c1_plane[taps.c1_index[t]]);
          for (int64_t t = taps.e_start[bin]; t < taps.e_start[bin + 1]; ++t)
            acc += taps.e_weight[t] * static_cast<acc_t>(e_map[taps.e_index[t]]);
          o[bin] = static_cast<scalar_t>(acc);
        }
      }
    });
  }
}

template <typename scalar_t>
void backward_impl(const FusedRoiAlignSizes& s, const scalar_t* grad_out, const at::Tensor& boxes,
                   double spatial_scale, int64_t sampling_ratio, at::opmath_type<scalar_t>* grad_c1,
                   at::opmath_type<scalar_t>* grad_e) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  const int64_t plane = s.height * s.width, e_plane = s.e_height * s.e_width;
  const int64_t bins = s.pooled_height * s.pooled_width;
  for (int64_t k = 0; k < s.rois; ++k) {
    const acc_t* box = box_data + 5 * k;
    const int64_t b = batch_of(box, k, s.batch);
    const BoxTaps<acc_t> taps(box, static_cast<acc_t>(spatial_scale), sampling_ratio, s);
    at::parallel_for(0, s.channels, 16, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        acc_t* gc1 = grad_c1 + (b * s.channels + c) * plane;
        acc_t* ge = grad_e + (b * s.channels + c) * e_plane;
        const scalar_t* g = grad_out + (k * s.channels + c) * bins;
        for (int64_t bin = 0; bin < bins; ++bin) {
          const acc_t go = static_cast<acc_t>(g[bin]);
          for (int64_t t = taps.c1_start[bin]; t < taps.c1_start[bin + 1]; ++t)
            gc1[taps.c1_index[t]] += taps.c1_weight[t] * go;
          for (int64_t t = taps.e_start[bin]; t < taps.e_start[bin + 1]; ++t)
            ge[taps.e_index[t]] += taps.e_weight[t] * go;
        }
      }
    });
  }
}

at::Tensor fused_roi_align_cpu(const at::Tensor& c1, const at::Tensor& e, const at::Tensor& boxes,
                               int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                               int64_t sampling_ratio) {
  const auto s = check_fused_roi_align_inputs(c1, e, boxes, pooled_height, pooled_width, sampling_ratio);
  at::Tensor out = at::zeros({s.rois, s.channels, pooled_height, pooled_width}, c1.options());
  if (out.numel() == 0 || c1.numel() == 0) return out;
  const auto c1c = c1.contiguous(), ec = e.contiguous();
  const auto box_acc = boxes.to(at::toOpMathType(c1.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c1.scalar_type(), "fused_roi_align_cpu", [&] {
    forward_impl<scalar_t>(s, c1c.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(), box_acc, spatial_scale,
                           sampling_ratio, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_roi_align_backward_cpu(const at::Tensor& grad_output, const at::Tensor& c1,
                                                                const at::Tensor& e, const at::Tensor& boxes,
                                                                int64_t pooled_height, int64_t pooled_width,
                                                                double spatial_scale, int64_t sampling_ratio) {
  const auto s = check_fused_roi_align_inputs(c1, e, boxes, pooled_height, pooled_width, sampling_ratio);
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({s.rois, s.channels, pooled_height, pooled_width}),
                    "fused_roi_align_backward: grad_output must be [K, C, PH, PW] = [", s.rois, ", ", s.channels,
                    ", ", pooled_height, ", ", pooled_width, "], got ", grad_output.sizes());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == c1.scalar_type(),
                   "fused_roi_align_backward: grad_output must have c1's dtype (", c1.scalar_type(), "), got ",
                   grad_output.scalar_type());
  const auto acc_dtype = at::toOpMathType(c1.scalar_type());
  at::Tensor grad_c1 = at::zeros(c1.sizes(), c1.options().dtype(acc_dtype));
  at::Tensor grad_e = at::zeros(e.sizes(), e.options().dtype(acc_dtype));
  if (grad_output.numel() > 0 && c1.numel() > 0) {
    const auto go = grad_output.contiguous();
    const auto box_acc = boxes.to(acc_dtype).contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c1.scalar_type(), "fused_roi_align_backward_cpu", [&] {
      backward_impl<scalar_t>(s, go.const_data_ptr<scalar_t>(), box_acc, spatial_scale, sampling_ratio,
                              grad_c1.mutable_data_ptr<at::opmath_type<scalar_t>>(),
                              grad_e.mutable_data_ptr<at::opmath_type<scalar_t>>());
    });
  }
  return {grad_c1.to(c1.scalar_type()), grad_e.to(e.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mfdetr, CPU, m) {
  m.impl("fused_roi_align", &fused_roi_align_cpu);
  m.impl("fused_roi_align_backward", &fused_roi_align_backward_cpu);
}

}  // namespace mfdetr
