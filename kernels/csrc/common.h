// Shared by every op of kernels/csrc: host/device qualifiers for code that both the C++ (CPU) and
// the CUDA backends compile.
#pragma once

#ifdef __CUDACC__
#define MFDETR_HOST_DEVICE __host__ __device__
#else
#define MFDETR_HOST_DEVICE
#endif
