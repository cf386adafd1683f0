// Shared by the CPU and CUDA builds: functions marked HOST_DEVICE compile for both.
#pragma once

#if defined(__CUDACC__)
#define HOST_DEVICE __host__ __device__ __forceinline__
#else
#define HOST_DEVICE inline
#endif
