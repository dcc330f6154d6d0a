// CUDA backend of mfdetr::fused_roi_align (forward and backward):
// roi_align(c1 + interpolate(e, size=c1's), boxes, aligned=True) without materialising the sum.
// One thread per output element (k, c, ph, pw); the taps of each sample come from
// fused_roi_align.h. The backward scatters with atomicAdd into accumulation-dtype buffers.
// float32, float64, float16, bfloat16 (float32 accumulation). Every launch is checked.

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_roi_align.h"

namespace mfdetr {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, bool kBackward>
__global__ void fused_roi_align_kernel(int64_t total, FusedRoiAlignSizes s, const scalar_t* __restrict__ c1,
                                       const scalar_t* __restrict__ e,
                                       const at::opmath_type<scalar_t>* __restrict__ boxes, double spatial_scale,
                                       int64_t sampling_ratio, scalar_t* __restrict__ out,
                                       const scalar_t* __restrict__ grad_out, at::opmath_type<scalar_t>* grad_c1,
                                       at::opmath_type<scalar_t>* grad_e) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t pw = idx % s.pooled_width;
  const int64_t ph = (idx / s.pooled_width) % s.pooled_height;
  const int64_t c = (idx / s.pooled_width / s.pooled_height) % s.channels;
  const int64_t k = idx / s.pooled_width / s.pooled_height / s.channels;
  const acc_t* box = boxes + 5 * k;
  const int64_t b = static_cast<int64_t>(box[0]);  // range checked on the host
  const RoiGeometry<acc_t> g(box, static_cast<acc_t>(spatial_scale), s.pooled_height, s.pooled_width,
                             sampling_ratio);
  const int64_t plane = s.height * s.width, e_plane = s.e_height * s.e_width;
  const int64_t c1_offset = (b * s.channels + c) * plane, e_offset = (b * s.channels + c) * e_plane;
  const acc_t go = kBackward ? static_cast<acc_t>(grad_out[idx]) : acc_t(0);
  acc_t acc = 0;
  for (int iy = 0; iy < g.grid_h; ++iy) {
    const acc_t y = g.start_h + ph * g.bin_h + (iy + acc_t(0.5)) * g.bin_h / static_cast<acc_t>(g.grid_h);
    for (int ix = 0; ix < g.grid_w; ++ix) {
      const acc_t x = g.start_w + pw * g.bin_w + (ix + acc_t(0.5)) * g.bin_w / static_cast<acc_t>(g.grid_w);
      const FusedTaps<acc_t> t(y, x, g.inv_count, s.height, s.width, s.e_height, s.e_width);
      for (int j = 0; j < t.n_c1; ++j) {
        if (kBackward) {
          atomicAdd(grad_c1 + c1_offset + t.c1_index[j], t.c1_weight[j] * go);
        } else {
          acc += t.c1_weight[j] * static_cast<acc_t>(c1[c1_offset + t.c1_index[j]]);
        }
      }
      for (int j = 0; j < t.n_e; ++j) {
        if (kBackward) {
          atomicAdd(grad_e + e_offset + t.e_index[j], t.e_weight[j] * go);
        } else {
          acc += t.e_weight[j] * static_cast<acc_t>(e[e_offset + t.e_index[j]]);
        }
      }
    }
  }
  if (!kBackward) out[idx] = static_cast<scalar_t>(acc);
}

// Box batch indices must be integers in [0, B) (read back once: K is small).
void check_batch_indices(const at::Tensor& boxes, int64_t batch) {
  if (boxes.size(0) == 0) return;
  const auto index = boxes.select(1, 0).to(at::kDouble).cpu();
  const double* p = index.const_data_ptr<double>();
  for (int64_t k = 0; k < index.size(0); ++k) {
    TORCH_CHECK_VALUE(p[k] >= 0 && p[k] < batch && p[k] == static_cast<double>(static_cast<int64_t>(p[k])),
                      "fused_roi_align: boxes[", k, ", 0] (batch index) must be an integer in [0, ", batch,
                      "), got ", p[k]);
  }
}

at::Tensor fused_roi_align_cuda(const at::Tensor& c1, const at::Tensor& e, const at::Tensor& boxes,
                                int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                                int64_t sampling_ratio) {
  const auto s = check_fused_roi_align_inputs(c1, e, boxes, pooled_height, pooled_width, sampling_ratio);
  check_batch_indices(boxes, s.batch);
  const c10::cuda::CUDAGuard guard(c1.device());
  at::Tensor out = at::zeros({s.rois, s.channels, pooled_height, pooled_width}, c1.options());
  const int64_t total = out.numel();
  if (total == 0 || c1.numel() == 0) return out;
  const auto c1c = c1.contiguous(), ec = e.contiguous();
  const auto box_acc = boxes.to(at::toOpMathType(c1.scalar_type())).contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c1.scalar_type(), "fused_roi_align_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    fused_roi_align_kernel<scalar_t, false><<<(total + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        total, s, c1c.const_data_ptr<scalar_t>(), ec.const_data_ptr<scalar_t>(), box_acc.const_data_ptr<acc_t>(),
        spatial_scale, sampling_ratio, out.mutable_data_ptr<scalar_t>(), nullptr, nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> fused_roi_align_backward_cuda(const at::Tensor& grad_output, const at::Tensor& c1,
                                                                 const at::Tensor& e, const at::Tensor& boxes,
                                                                 int64_t pooled_height, int64_t pooled_width,
                                                                 double spatial_scale, int64_t sampling_ratio) {
  const auto s = check_fused_roi_align_inputs(c1, e, boxes, pooled_height, pooled_width, sampling_ratio);
  check_fused_roi_align_grad_output(grad_output, c1, s);
  check_batch_indices(boxes, s.batch);
  const c10::cuda::CUDAGuard guard(c1.device());
  const auto acc_dtype = at::toOpMathType(c1.scalar_type());
  at::Tensor grad_c1 = at::zeros(c1.sizes(), c1.options().dtype(acc_dtype));
  at::Tensor grad_e = at::zeros(e.sizes(), e.options().dtype(acc_dtype));
  const int64_t total = grad_output.numel();
  if (total > 0 && c1.numel() > 0) {
    const auto go = grad_output.contiguous();
    const auto box_acc = boxes.to(acc_dtype).contiguous();
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c1.scalar_type(), "fused_roi_align_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      fused_roi_align_kernel<scalar_t, true><<<(total + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          total, s, nullptr, nullptr, box_acc.const_data_ptr<acc_t>(), spatial_scale, sampling_ratio, nullptr,
          go.const_data_ptr<scalar_t>(), grad_c1.mutable_data_ptr<acc_t>(), grad_e.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_c1.to(c1.scalar_type()), grad_e.to(e.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mfdetr, CUDA, m) {
  m.impl("fused_roi_align", &fused_roi_align_cuda);
  m.impl("fused_roi_align_backward", &fused_roi_align_backward_cuda);
}

}  // namespace mfdetr
