// Keyed Gaussian noise written to memory (e.g. a sampling chain's initial x_T): the same numbers the
// fused kernels draw in registers, from csrc/common/philox.h.
#include "elementwise.h"

namespace ddpm_fast {
namespace cpu {
namespace {

template <typename T>
void keyed_normal_typed(const NormalArgs& a) {
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.geo.numel_per_sample;
  for_each_chunk(a.geo, &a.key, a.t, [&](int64_t b, int64_t lo, int64_t hi, const float* z) {
    T* op = out + b * n + lo;
    for (int64_t i = 0; i < hi - lo; ++i) op[i] = static_cast<T>(z[i]);
  });
}

}  // namespace

void keyed_normal(const NormalArgs& a) {
  switch (a.dtype) {
    case DType::kFloat: return keyed_normal_typed<float>(a);
    case DType::kHalf: return keyed_normal_typed<at::Half>(a);
    case DType::kBFloat16: return keyed_normal_typed<at::BFloat16>(a);
  }
}

const char* capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace cpu
}  // namespace ddpm_fast
