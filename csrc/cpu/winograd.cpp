// 3x3 convolution, stride 1, padding 1, by Winograd's minimal filtering F(2x2, 3x3) or F(4x4, 3x3) (Lavin & Gray
// 2016; fp32 only), for
// fp32 channels_last (NHWC) activations: the U-Net's ResBlock and up/down-path 3x3 convolutions.
//
//   out[n, y, x, k] = bias[k] + sum_{c, i, j} in[n, y + i - 1, x + j - 1, c] * w[k, c, i, j]  (+ residual)
//
// Per 2x2 output tile and its 4x4 input patch d:  V = B^T d B,  U = G g G^T (the weights, transformed once),
// M = sum_c U .* V,  Y = A^T M A. The sum over c of the 16 elementwise products is 16 matrix products
// (tiles x C) @ (C x K), 2.25x fewer multiply-adds than the direct convolution. Tiles are processed in blocks
// whose transformed inputs and products stay in cache; the products run in oneDNN's brgemm micro-kernel
// or the BLAS (gemm.h: gemm_provider).
// B^T and A^T hold only 0 and +-1, so the transforms are additions; the rounding stays within a few ulps of
// the direct sum (tested against F.conv2d).
#include <algorithm>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "elementwise.h"
#include "gemm.h"

namespace ddpm_fast {
namespace cpu {
namespace {

// Tiles per block: the block's V (16 x tiles x C) and M (16 x tiles x K) live in L2/L3 between the transforms
// and the products, and 64-row products keep the BLAS near its peak (measured 48..128 within 3% here).
constexpr int64_t kTileBlock = 64;

// V = B^T d B for one 4x4 patch of a vector of channels (d[4 * i + j]: row i, column j).
template <typename V>
inline void input_transform(const V* d, V* v) {
  V t[16];
  for (int j = 0; j < 4; ++j) {
    t[0 + j] = d[0 + j] - d[8 + j];
    t[4 + j] = d[4 + j] + d[8 + j];
    t[8 + j] = d[8 + j] - d[4 + j];
    t[12 + j] = d[4 + j] - d[12 + j];
  }
  for (int i = 0; i < 4; ++i) {
    const V* r = t + 4 * i;
    v[4 * i + 0] = r[0] - r[2];
    v[4 * i + 1] = r[1] + r[2];
    v[4 * i + 2] = r[2] - r[1];
    v[4 * i + 3] = r[1] - r[3];
  }
}

// Y = A^T M A: the 2x2 outputs of one tile (y[2 * i + j]).
template <typename V>
inline void output_transform(const V* m, V* y) {
  V s[8];
  for (int j = 0; j < 4; ++j) {
    s[j] = m[j] + m[4 + j] + m[8 + j];
    s[4 + j] = m[4 + j] - m[8 + j] - m[12 + j];
  }
  for (int i = 0; i < 2; ++i) {
    const V* r = s + 4 * i;
    y[2 * i + 0] = r[0] + r[1] + r[2];
    y[2 * i + 1] = r[1] - r[2] - r[3];
  }
}

// F(4x4, 3x3): 6x6 input patches, 36 products, 4x4 outputs a tile (2.25 input values an output against F(2x2)'s
// 4, 2.25 multiply-adds in the products against 4). Interpolation points 0, 1, -1, 1/2, -2 (and infinity): with
// the textbook 0, +-1, +-2 the fp32 error at the U-Net's shapes was 2.7x larger (3.7e-5 against 1.3e-5 for 128
// channels at max |y| = 4.4; F(2x2) 2.2e-6, the direct sum 1.3e-6): the transforms' entries stay within [-2.5, 2.5]
// and G's within [-16/15, 1]. B^T follows from A^T and G (A^T diag(G g) B^T d = g * d for every g, d).
constexpr float kBT4[6][6] = {
    {1.f, -1.5f, -2.f, 1.5f, 1.f, 0.f},  {0.f, -1.f, 0.5f, 2.5f, 1.f, 0.f},   {0.f, 1.f, -2.5f, 0.5f, 1.f, 0.f},
    {0.f, -2.f, -1.f, 2.f, 1.f, 0.f},    {0.f, 0.5f, -1.f, -0.5f, 1.f, 0.f},  {0.f, 1.f, -1.5f, -2.f, 1.5f, 1.f},
};
constexpr float kAT4[4][6] = {
    {1.f, 1.f, 1.f, 1.f, 1.f, 0.f},
    {0.f, 1.f, -1.f, 0.5f, -2.f, 0.f},
    {0.f, 1.f, 1.f, 0.25f, 4.f, 0.f},
    {0.f, 1.f, -1.f, 0.125f, -8.f, 1.f},
};
constexpr double kG4[6][3] = {
    {1., 0., 0.},
    {1. / 3, 1. / 3, 1. / 3},
    {-1. / 3, 1. / 3, -1. / 3},
    {-16. / 15, -8. / 15, -4. / 15},
    {1. / 15, -2. / 15, 4. / 15},
    {0., 0., 1.},
};

inline float madd(float a, float b, float c) { return a * b + c; }
inline Vec madd(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }

// out[i * os] = sum_k m[i][k] in[k * is]: the matrix is a compile-time constant, so after unrolling its zeros
// vanish and its +-1 become additions.
template <int R, int Kd, typename V>
inline void apply(const float (&m)[R][Kd], const V* in, int is, V* out, int os) {
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    V acc(0.f);
    bool first = true;
#pragma GCC unroll 8
    for (int k = 0; k < Kd; ++k) {
      const float c = m[i][k];
      if (c == 0.f) continue;
      const V& x = in[k * is];
      if (first)
        acc = c == 1.f ? x : c == -1.f ? V(0.f) - x : V(c) * x;
      else
        acc = c == 1.f ? acc + x : c == -1.f ? acc - x : madd(V(c), x, acc);
      first = false;
    }
    out[i * os] = acc;
  }
}

// The tile sizes: kOut x kOut outputs from kIn x kIn inputs, kE = kIn^2 products.
template <int Out>
struct Tile;

template <>
struct Tile<2> {
  static constexpr int kOut = 2, kIn = 4, kE = 16;
  template <typename V>
  static void input(const V* d, V* v) { input_transform(d, v); }
  template <typename V>
  static void output(const V* m, V* y) { output_transform(m, y); }
};

template <>
struct Tile<4> {
  static constexpr int kOut = 4, kIn = 6, kE = 36;
  template <typename V>  // V = B^T d B
  static void input(const V* d, V* v) {
    V t[36];
    for (int j = 0; j < 6; ++j) apply(kBT4, d + j, 6, t + j, 6);
    for (int i = 0; i < 6; ++i) apply(kBT4, t + 6 * i, 1, v + 6 * i, 1);
  }
  template <typename V>  // Y = A^T M A (y[4 * i + j])
  static void output(const V* m, V* y) {
    V s[24];
    for (int j = 0; j < 6; ++j) apply(kAT4, m + j, 6, s + j, 6);
    for (int i = 0; i < 4; ++i) apply(kAT4, s + 6 * i, 1, y + 4 * i, 1);
  }
};

struct Scratch {
  std::vector<float> v, m;
};

template <int Out>
void winograd_conv3x3_tiles(const WinogradArgs& a) {
  using T = Tile<Out>;
  constexpr int A = T::kIn, E = T::kE, O = T::kOut;
  const int64_t N = a.batch, H = a.height, W = a.width, C = a.in_channels, K = a.out_channels;
  const int64_t TY = (H + O - 1) / O, TX = (W + O - 1) / O, tiles = N * TY * TX;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // Blocks of equal size, at most kTileBlock tiles. Fewer blocks than threads (small images at small batches: at
  // most kTileBlock tiles in all) split the output channels into parts too, in multiples of kChannelPart, each part
  // redoing its block's input transform (C work a tile against the products' E C K / parts). Smaller blocks
  // instead would stream every transformed weight through each thread, and the batch-1 layers are bound by those
  // weights' bandwidth (4x4 images at batch 1, one block: one thread was busy before this split).
  constexpr int64_t kChannelPart = 32;
  const int64_t nblocks = (tiles + kTileBlock - 1) / kTileBlock;
  const int64_t block = (tiles + nblocks - 1) / nblocks;
  const int64_t nkp = (K + kChannelPart - 1) / kChannelPart;
  const int64_t parts = nblocks >= nthreads ? 1 : std::min(nkp, (nthreads + nblocks - 1) / nblocks);
  const int64_t kp_per_part = (nkp + parts - 1) / parts;
  constexpr int64_t L = Vec::size();

  at::parallel_for(0, nblocks * parts, 1, [&](int64_t w0, int64_t w1) {
    thread_local Scratch s;  // reused across calls: no page faults on the hot path
    s.v.resize(E * block * C);
    s.m.resize(E * block * K);
    float* V = s.v.data();
    float* M = s.m.data();
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w / parts, part = w % parts;
      const int64_t k_lo = std::min(K, part * kp_per_part * kChannelPart);
      const int64_t k_hi = std::min(K, (part + 1) * kp_per_part * kChannelPart);
      if (k_lo >= k_hi) continue;
      const int64_t t0 = blk * block, nt = std::min(block, tiles - t0);
      // 1. input transform: V[e][tile][c]
      for (int64_t ti = 0; ti < nt; ++ti) {
        const int64_t tile = t0 + ti, n = tile / (TY * TX), ty = tile / TX % TY, tx = tile % TX;
        const int64_t y0 = O * ty - 1, x0 = O * tx - 1;
        const float* rows[E];  // input pixel of each patch position, nullptr in the zero padding
        for (int e = 0; e < E; ++e) {
          const int64_t y = y0 + e / A, x = x0 + e % A;
          rows[e] = (y >= 0 && y < H && x >= 0 && x < W) ? a.x + ((n * H + y) * W + x) * C : nullptr;
        }
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          Vec d[E], v[E];
          for (int e = 0; e < E; ++e) d[e] = rows[e] ? Vec::loadu(rows[e] + c) : Vec(0.f);
          T::input(d, v);
          for (int e = 0; e < E; ++e) v[e].store(V + (e * block + ti) * C + c);
        }
        for (; c < C; ++c) {
          float d[E], v[E];
          for (int e = 0; e < E; ++e) d[e] = rows[e] ? rows[e][c] : 0.f;
          T::input(d, v);
          for (int e = 0; e < E; ++e) V[(e * block + ti) * C + c] = v[e];
        }
      }
      // 2. the E products M[e] (nt x [k_lo, k_hi)) = V[e] (nt x C) @ U[e] (C x [k_lo, k_hi))
      for (int e = 0; e < E; ++e)
        matmul_rm(nt, k_hi - k_lo, C, V + e * block * C, C, a.u + e * C * K + k_lo, K, M + e * block * K + k_lo, K);
      // 3. output transform, bias and residual: O x O outputs a tile, clipped at the edges
      for (int64_t ti = 0; ti < nt; ++ti) {
        const int64_t tile = t0 + ti, n = tile / (TY * TX), ty = tile / TX % TY, tx = tile % TX;
        bool inside[O * O];
        int64_t off[O * O];
        for (int q = 0; q < O * O; ++q) {
          const int64_t y = O * ty + q / O, x = O * tx + q % O;
          inside[q] = y < H && x < W;
          off[q] = ((n * H + y) * W + x) * K;
        }
        int64_t k = k_lo;
        for (; k + L <= k_hi; k += L) {
          Vec m[E], y[O * O];
          for (int e = 0; e < E; ++e) m[e] = Vec::loadu(M + (e * block + ti) * K + k);
          T::output(m, y);
          const Vec bias = a.bias ? Vec::loadu(a.bias + k) : Vec(0.f);
          for (int q = 0; q < O * O; ++q) {
            if (!inside[q]) continue;
            Vec r = y[q] + bias;
            if (a.residual) r = r + Vec::loadu(a.residual + off[q] + k);
            r.store(a.out + off[q] + k);
          }
        }
        for (; k < k_hi; ++k) {
          float m[E], y[O * O];
          for (int e = 0; e < E; ++e) m[e] = M[(e * block + ti) * K + k];
          T::output(m, y);
          for (int q = 0; q < O * O; ++q) {
            if (!inside[q]) continue;
            float r = y[q] + (a.bias ? a.bias[k] : 0.f);
            if (a.residual) r += a.residual[off[q] + k];
            a.out[off[q] + k] = r;
          }
        }
      }
    }
  });
}

}  // namespace

const char* gemm_library() { return gemm_provider() == GemmProvider::kOneDnn ? "onednn" : "blas"; }

namespace {
// U = G g G^T for every 3x3 filter g of w[K][C][3][3], A = tile + 2 (G: A x 3). Not rotated: U[e][c][k] of
// g = w[k][c]; rotated: U[e][k][c] of g = w[k][c] flipped in both spatial axes (the weight of the data gradient's
// convolution, in/out channels swapped). Both write rows u[e][r][n0 .. n0 + 16) for a row r (threads split the rows)
// and 16 consecutive n, one filter per vector lane: the 16 filters are gathered into g[9][16] (rotated: 144
// contiguous floats; not rotated: 9 floats from each of 16 rows C * 9 apart, which the next r reads beside), then
// G g G^T runs on the lanes in fp32 and the A^2 results are stored as A^2 runs of 16 floats. (The filter-at-a-time
// loop this replaces wrote each U element K floats from the last: 6 ms for a 128 -> 128 F(4x4) layer, one thread.)
template <int A>
void weight_transform(const float* w, int64_t K, int64_t C, bool rotated, const float (&G)[A][3], float* u) {
  constexpr int L = 16;
  const int64_t R = rotated ? K : C, N = rotated ? C : K;
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    alignas(64) float g[9][L];
    for (int64_t r_row = r0; r_row < r1; ++r_row) {
      for (int64_t n0 = 0; n0 < N; n0 += L) {
        const int nl = static_cast<int>(std::min<int64_t>(L, N - n0));
        for (int j = 0; j < L; ++j) {
          if (j >= nl) {
            for (int s = 0; s < 9; ++s) g[s][j] = 0.f;
          } else if (rotated) {  // w[r][n0 + j][8 - s]
            const float* f = w + (r_row * C + n0 + j) * 9;
            for (int s = 0; s < 9; ++s) g[s][j] = f[8 - s];
          } else {  // w[n0 + j][r][s]
            const float* f = w + ((n0 + j) * C + r_row) * 9;
            for (int s = 0; s < 9; ++s) g[s][j] = f[s];
          }
        }
        for (int j0 = 0; j0 < L; j0 += Vec::size()) {  // G g G^T on the lanes j0 ..
          const int live = std::min<int>(Vec::size(), nl - j0);
          if (live <= 0) break;
          Vec gv[9], t[A][3];
          for (int s = 0; s < 9; ++s) gv[s] = Vec::loadu(&g[s][j0]);
          for (int i = 0; i < A; ++i)
            for (int q = 0; q < 3; ++q)
              t[i][q] = madd(Vec(G[i][0]), gv[q], madd(Vec(G[i][1]), gv[3 + q], Vec(G[i][2]) * gv[6 + q]));
          for (int i = 0; i < A; ++i)
            for (int p = 0; p < A; ++p) {
              const Vec r = madd(Vec(G[p][0]), t[i][0], madd(Vec(G[p][1]), t[i][1], Vec(G[p][2]) * t[i][2]));
              float* dst = u + ((i * A + p) * R + r_row) * N + n0 + j0;
              if (live == Vec::size())
                r.store(dst);
              else
                r.store(dst, live);
            }
        }
      }
    }
  });
}

constexpr float kG2f[4][3] = {{1.f, 0.f, 0.f}, {.5f, .5f, .5f}, {.5f, -.5f, .5f}, {0.f, 0.f, 1.f}};
constexpr float kG4f[6][3] = {
    {1.f, 0.f, 0.f},
    {float(kG4[1][0]), float(kG4[1][1]), float(kG4[1][2])},
    {float(kG4[2][0]), float(kG4[2][1]), float(kG4[2][2])},
    {float(kG4[3][0]), float(kG4[3][1]), float(kG4[3][2])},
    {float(kG4[4][0]), float(kG4[4][1]), float(kG4[4][2])},
    {0.f, 0.f, 1.f},
};
}  // namespace

void winograd_weight_transform(const float* w, int64_t K, int64_t C, float* u, bool rotated) {
  // G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
  weight_transform<4>(w, K, C, rotated, kG2f, u);
}

void winograd_weight_transform_4x4(const float* w, int64_t K, int64_t C, float* u, bool rotated) {
  weight_transform<6>(w, K, C, rotated, kG4f, u);
}

void winograd_conv3x3(const WinogradArgs& a) {
  if (a.tile == 4)
    winograd_conv3x3_tiles<4>(a);
  else
    winograd_conv3x3_tiles<2>(a);
}


// ------------------------------------------------------------------------------------------------ bf16
// The same algorithm with bf16 operands for the products: activations are read as bf16 and widened, the input
// transform runs in fp32 and V is rounded to bf16 once (its error is that of rounding the input, scaled by the
// transform's at most 4 additions), U is transformed in fp32 from the weight and rounded once, the products
// accumulate in fp32 (vdpbf16ps on AVX512-BF16, tiles on AMX, inside oneDNN's brgemm), and the output transform,
// bias and residual run in fp32 before the single rounding of the result to bf16.

const char* bf16_instructions() {
#if defined(__x86_64__) || defined(__i386__)
  static const char* name = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return "";
    __cpuid_count(7, 0, a, b, c, d);
    const bool amx = (d >> 22) & 1;  // AMX-BF16
    __cpuid_count(7, 1, a, b, c, d);
    const bool avx512 = (a >> 5) & 1;  // AVX512_BF16
    return amx ? "amx_bf16" : avx512 ? "avx512_bf16" : "";
  }();
  return name;
#else
  return "";
#endif
}

void winograd_pack_bf16(const float* u, int64_t K, int64_t C, c10::BFloat16* packed) {
  constexpr int64_t NB = kBf16Block;
  const int64_t nkb = (K + NB - 1) / NB, C2 = (C + 1) / 2 * 2;
  at::parallel_for(0, 16 * nkb, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = i / nkb, kb = i % nkb;
      c10::BFloat16* dst = packed + i * C2 * NB;
      for (int64_t c = 0; c < C2; ++c)
        for (int64_t n = 0; n < NB; ++n) {
          const int64_t k = kb * NB + n;
          const float v = (c < C && k < K) ? u[(e * C + c) * K + k] : 0.f;
          dst[((c / 2) * NB + n) * 2 + c % 2] = c10::BFloat16(v);
        }
    }
  });
}

namespace {
struct ScratchBf16 {
  std::vector<c10::BFloat16> v;
  std::vector<float> m;
};
}  // namespace

void winograd_conv3x3_bf16(const WinogradBf16Args& a) {
  using BF = c10::BFloat16;
  constexpr int64_t NB = kBf16Block;
  const int64_t N = a.batch, H = a.height, W = a.width, C = a.in_channels, K = a.out_channels;
  const int64_t C2 = (C + 1) / 2 * 2, nkb = (K + NB - 1) / NB;
  const int64_t TY = (H + 1) / 2, TX = (W + 1) / 2, tiles = N * TY * TX;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(8, std::min(kTileBlock, (tiles + nthreads - 1) / nthreads));
  const int64_t nblocks = (tiles + block - 1) / block;
  // Fewer tile blocks than threads (small images at batch 1): the output channels are split too, each part
  // redoing its block's input transform (C work a tile against the products' 16 C K / parts).
  const int64_t parts = std::min(nkb, (nthreads + nblocks - 1) / nblocks);
  const int64_t kb_per_part = (nkb + parts - 1) / parts;
  constexpr int64_t L = kLanes;  // 32 channels: two fp32 vectors, one 16-bit vector

  at::parallel_for(0, nblocks * parts, 1, [&](int64_t w0, int64_t w1) {
    thread_local ScratchBf16 s;
    s.v.resize(16 * block * C2);
    s.m.resize(16 * block * K);
    BF* V = s.v.data();
    float* M = s.m.data();
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t blk = w / parts, part = w % parts;
      const int64_t kb0 = part * kb_per_part, kb1 = std::min(nkb, kb0 + kb_per_part);
      if (kb0 >= kb1) continue;
      const int64_t k_lo = kb0 * NB, k_hi = std::min(K, kb1 * NB);
      const int64_t t0 = blk * block, nt = std::min(block, tiles - t0);
      // 1. input transform in fp32, V[e][tile][c] stored bf16 (a zero column pads odd C)
      for (int64_t ti = 0; ti < nt; ++ti) {
        const int64_t tile = t0 + ti, n = tile / (TY * TX), ty = tile / TX % TY, tx = tile % TX;
        const int64_t y0 = 2 * ty - 1, x0 = 2 * tx - 1;
        const BF* rows[16];
        for (int e = 0; e < 16; ++e) {
          const int64_t y = y0 + e / 4, x = x0 + e % 4;
          rows[e] = (y >= 0 && y < H && x >= 0 && x < W) ? a.x + ((n * H + y) * W + x) * C : nullptr;
        }
        int64_t c = 0;
        for (; c + L <= C; c += L) {
          Vec lo[16], hi[16], vlo[16], vhi[16];
          for (int e = 0; e < 16; ++e) {
            if (rows[e])
              load2(rows[e] + c, lo[e], hi[e]);
            else
              lo[e] = hi[e] = Vec(0.f);
          }
          input_transform(lo, vlo);
          input_transform(hi, vhi);
          for (int e = 0; e < 16; ++e) store2(V + (e * block + ti) * C2 + c, vlo[e], vhi[e]);
        }
        for (; c < C2; ++c) {
          float d[16], v[16];
          for (int e = 0; e < 16; ++e) d[e] = (rows[e] && c < C) ? static_cast<float>(rows[e][c]) : 0.f;
          input_transform(d, v);
          for (int e = 0; e < 16; ++e) V[(e * block + ti) * C2 + c] = BF(v[e]);
        }
      }
      // 2. the products M[e][:, k_lo:k_hi] (nt x NB blocks) = V[e] (nt x C2) @ U[e] (C2 x NB, VNNI-packed)
      for (int e = 0; e < 16; ++e)
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          const int64_t nb = std::min(NB, K - kb * NB);
          at::native::cpublas::brgemm(nt, nb, C2, C2, NB, K, /*add_C=*/false, V + e * block * C2,
                                      a.u + (e * nkb + kb) * C2 * NB, M + e * block * K + kb * NB,
                                      /*is_vnni=*/true);
        }
      // 3. output transform, bias and residual in fp32, one rounding to bf16
      for (int64_t ti = 0; ti < nt; ++ti) {
        const int64_t tile = t0 + ti, n = tile / (TY * TX), ty = tile / TX % TY, tx = tile % TX;
        const bool inside[4] = {true, 2 * tx + 1 < W, 2 * ty + 1 < H, 2 * tx + 1 < W && 2 * ty + 1 < H};
        int64_t off[4];
        for (int q = 0; q < 4; ++q) off[q] = ((n * H + 2 * ty + q / 2) * W + 2 * tx + q % 2) * K;
        int64_t k = k_lo;
        for (; k + L <= k_hi; k += L) {
          Vec mlo[16], mhi[16], ylo[4], yhi[4];
          for (int e = 0; e < 16; ++e) {
            const float* mp = M + (e * block + ti) * K + k;
            mlo[e] = Vec::loadu(mp);
            mhi[e] = Vec::loadu(mp + Vec::size());
          }
          output_transform(mlo, ylo);
          output_transform(mhi, yhi);
          const Vec blo = a.bias ? Vec::loadu(a.bias + k) : Vec(0.f);
          const Vec bhi = a.bias ? Vec::loadu(a.bias + k + Vec::size()) : Vec(0.f);
          for (int q = 0; q < 4; ++q) {
            if (!inside[q]) continue;
            Vec rlo = ylo[q] + blo, rhi = yhi[q] + bhi;
            if (a.residual) {
              Vec plo, phi;
              load2(a.residual + off[q] + k, plo, phi);
              rlo = rlo + plo;
              rhi = rhi + phi;
            }
            store2(a.out + off[q] + k, rlo, rhi);
          }
        }
        for (; k < k_hi; ++k) {
          float m[16], y[4];
          for (int e = 0; e < 16; ++e) m[e] = M[(e * block + ti) * K + k];
          output_transform(m, y);
          for (int q = 0; q < 4; ++q) {
            if (!inside[q]) continue;
            float r = y[q] + (a.bias ? a.bias[k] : 0.f);
            if (a.residual) r += static_cast<float>(a.residual[off[q] + k]);
            a.out[off[q] + k] = BF(r);
          }
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

}  // namespace cpu
}  // namespace ddpm_fast
