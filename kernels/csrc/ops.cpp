// Schemas of the compiled ops (declared once, here) and the Python module stub.
//
// Backends register in their own files (<op>/<op>_cpu.cpp, <op>/<op>_cuda.cu) with
// TORCH_LIBRARY_IMPL; fake (meta) kernels and autograd are registered from Python in
// kernels/ops.py, as pytorch/extension-cpp does.

#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef MFDETR_CUDA_ARCHS
#define MFDETR_CUDA_ARCHS ""
#endif

namespace mfdetr {

// Comma-separated CUDA architectures compiled in ("" for a CPU-only build).
std::string cuda_archs() { return MFDETR_CUDA_ARCHS; }

TORCH_LIBRARY(mfdetr, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "fused_roi_align(Tensor c1, Tensor e, Tensor boxes, int pooled_height, int pooled_width, "
      "float spatial_scale, int sampling_ratio) -> Tensor");
  m.def(
      "fused_roi_align_backward(Tensor grad_output, Tensor c1, Tensor e, Tensor boxes, int pooled_height, "
      "int pooled_width, float spatial_scale, int sampling_ratio) -> (Tensor, Tensor)");
  m.def("cuda_archs() -> str", &cuda_archs);
}

}  // namespace mfdetr

// `import kernels._C` loads this shared library, which runs the registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
