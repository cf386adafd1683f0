// Shared by the CPU and CUDA builds: functions marked HOST_DEVICE compile for both.
#pragma once

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif

// Loop unrolling hint for device code; the host compilers (gcc/clang, and nvcc's host pass) do not need it.
#if defined(__CUDA_ARCH__)
#define DDPM_UNROLL _Pragma("unroll")
#else
#define DDPM_UNROLL
#endif
