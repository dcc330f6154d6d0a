// Shared by every op of kernels/csrc: host/device qualifiers for code that both the C++ (CPU) and
// the CUDA backends compile.
#pragma once

#ifdef __CUDACC__
#define MFDETR_HOST_DEVICE __host__ __device__
#else
#define MFDETR_HOST_DEVICE
#endif

// CPU loops compiled once per x86-64 ISA level (AVX-512, AVX2, baseline), the best one the running
// CPU supports chosen when the library loads (GCC function multiversioning, `target_clones`: an
// ifunc). Put it on a non-template function whose hot loops are MFDETR_FORCE_INLINE templates, so
// the loops are vectorised for each ISA. Elsewhere (clang, other architectures, a libc without
// ifunc such as musl; include after a standard header, which defines __GLIBC__) one plain version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#if __GNUC__ >= 12  // x86-64-v3 = AVX2 + FMA; v4 adds AVX-512 F/BW/CD/DQ/VL
#define MFDETR_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MFDETR_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#else
#define MFDETR_CPU_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define MFDETR_FORCE_INLINE inline __attribute__((always_inline))
#else
#define MFDETR_FORCE_INLINE inline
#endif
