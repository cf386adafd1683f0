// Fused attention, flash-style (Dao et al. 2022) on the CPU: for each (batch, head, block of queries)
//   S = Q_blk K_j^T * scale;  m' = max(m, rowmax S);  P = exp(S - m');  l = l e^{m - m'} + rowsum P;
//   acc = acc e^{m - m'} + P V_j  over key blocks j;   out = acc / l (+ residual)
// and, when asked (training), each query's lse = m + ln l for the backward (attention_backward.cpp)
// with fp32 accumulators, reading q, k and v in place through their row strides: the U-Net's (B, HW, C)
// projections need no transpose or copy.
//
// AVX2 and AVX-512 builds: the products run in this file's own register tiles (6x16 and 8x32: kRows x two
// vectors), on operands packed so that every tile streams contiguous memory. The scores are computed transposed,
// S^T = K Q^T, which puts the queries along the vector lanes: the softmax over keys is then a column operation (no
// horizontal reductions) and the stored P^T is read in place, kRows queries broadcast at a time, by the second
// product O = P V, whose rows are queries again: the last key block's tiles scale by 1 / l, add the residual and
// write the output rows directly (no transpose).
// Scores live in the exp2 domain (scale * log2(e) is folded into the packed queries) and are exponentiated as
// their tile is stored (score_tile below). K and V are packed once per (batch, head) and reused by every query
// block of it; the next head's rows are prefetched meanwhile. Why not MKL for the products (the portable build
// below does that): per call it repacks operands this kernel packs once per head, and the rows of the U-Net's
// (B, HW, 3C) projections, 3C floats apart, alias to a few L1 sets when read in place. At the U-Net's 16x16
// attention this kernel beats MKL on the same products without the softmax (benchmarks/bench_attention.py).
// Portable build: the same flash-style algorithm with the BLAS sgemm torch links (MKL on x86) for the products.
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "elementwise.h"
#include "gemm.h"

namespace ddpm_fast {
namespace cpu {
namespace {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)

// The native vector of the build: 8 floats (AVX2) or 16 (AVX-512); the tiles are written once over it.
#if defined(CPU_CAPABILITY_AVX512)
using fvec = __m512;
constexpr int64_t kVec = 16;
inline fvec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, fvec v) { _mm512_storeu_ps(p, v); }
inline fvec vset1(float x) { return _mm512_set1_ps(x); }
inline fvec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }  // folds into the FMA as {1to16}
inline fvec vfmadd(fvec a, fvec b, fvec c) { return _mm512_fmadd_ps(a, b, c); }
inline fvec vadd(fvec a, fvec b) { return _mm512_add_ps(a, b); }
inline fvec vsub(fvec a, fvec b) { return _mm512_sub_ps(a, b); }
inline fvec vmul(fvec a, fvec b) { return _mm512_mul_ps(a, b); }
inline fvec vmax(fvec a, fvec b) { return _mm512_max_ps(a, b); }  // the second operand when either is NaN
inline fvec vdiv(fvec a, fvec b) { return _mm512_div_ps(a, b); }
inline bool any_greater(fvec a, fvec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }
inline __mmask16 lanes_below(int64_t n) { return n <= 0 ? 0 : n >= kVec ? 0xffff : (1u << n) - 1; }
inline fvec vload_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes_below(n), p); }  // lanes < n
inline void vstore_n(float* p, fvec v, int64_t n) { _mm512_mask_storeu_ps(p, lanes_below(n), v); }
#else
using fvec = __m256;
constexpr int64_t kVec = 8;
inline fvec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, fvec v) { _mm256_storeu_ps(p, v); }
inline fvec vset1(float x) { return _mm256_set1_ps(x); }
inline fvec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline fvec vfmadd(fvec a, fvec b, fvec c) { return _mm256_fmadd_ps(a, b, c); }
inline fvec vadd(fvec a, fvec b) { return _mm256_add_ps(a, b); }
inline fvec vsub(fvec a, fvec b) { return _mm256_sub_ps(a, b); }
inline fvec vmul(fvec a, fvec b) { return _mm256_mul_ps(a, b); }
inline fvec vmax(fvec a, fvec b) { return _mm256_max_ps(a, b); }  // the second operand when either is NaN
inline fvec vdiv(fvec a, fvec b) { return _mm256_div_ps(a, b); }
inline bool any_greater(fvec a, fvec b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) != 0; }
inline __m256i lanes_below(int64_t n) {  // lanes < n set
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(n, kVec)))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline fvec vload_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, lanes_below(n)); }
inline void vstore_n(float* p, fvec v, int64_t n) { _mm256_maskstore_ps(p, lanes_below(n), v); }
#endif

// Tile rows: the broadcast operand (keys of S^T, queries of O). AVX2: 6 rows x 2 vectors, 12 of the 16 registers
// accumulate. AVX-512: 8 x 2, 16 of 32, and a 32-query panel splits into whole tiles (6 rows left a 2-row tile).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kRows = 8;
#else
constexpr int64_t kRows = 6;
#endif
constexpr int64_t kCols = 2 * kVec;  // tile columns, two vectors: a panel of kCols queries (S^T) or channels (O)
constexpr int64_t kQueryBlock = 64;  // queries per task: four panels (AVX2) or two (AVX-512)
constexpr int64_t kKeyBlock = 512;   // keys per online-softmax step: S^T (512 x 64) stays in L2
constexpr int64_t kPad = 8;          // floats after each packed tile: room for pack_k's 8-float stores

// The scores are exponentiated as their tile is stored, against a per-query reference ref instead of the final
// maximum: P^T = 2^(S^T - ref). ref stays within kSlack of the running maximum from below (so P <= 2^kSlack,
// no overflow; some P >= 1, no underflow of all of them) and is raised, with the rows already stored and their
// sum rescaled, only when a tile's maximum passes ref + kSlack: at the first tile, and seldom after.
constexpr float kSlack = 8.f;

// 2^max(z, -125): within exp2_in_range's domain and above the denormals (which cost microcode assists), where
// 2^-125 is nothing next to the reference's 1. max returns its second operand when either is NaN, so a NaN score
// passes on to the output.
inline fvec exp2_softmax(fvec z) { return exp2_in_range(vmax(vset1(-125.f), z)); }

// Raises ref[0..kCols) to max(ref, tile maxima t) and rescales the panel's `done` rows stored before this tile
// (from `first`, kCols floats each) and their column sums sum[0..kCols) by 2^(old ref - new ref).
void raise_reference(fvec t0, fvec t1, float* ref, float* sum, float* first, int64_t done) {
  const fvec old0 = vload(ref), old1 = vload(ref + kVec);
  const fvec new0 = vmax(t0, old0), new1 = vmax(t1, old1);
  const fvec f0 = exp2_softmax(vsub(old0, new0)), f1 = exp2_softmax(vsub(old1, new1));
  for (int64_t i = 0; i < done; ++i) {
    float* row = first + i * kCols;
    vstore(row, vmul(vload(row), f0));
    vstore(row + kVec, vmul(vload(row + kVec), f1));
  }
  vstore(sum, vmul(vload(sum), f0));
  vstore(sum + kVec, vmul(vload(sum + kVec), f1));
  vstore(ref, new0);
  vstore(ref + kVec, new1);
}

// acc[r] (two vectors: c0[r], c1[r]) = sum_k a[k * LDA + r] * b[k][0..kCols) for r < R: the tiles' common core,
// R broadcasts and two loads per k, 2R accumulators (every loop over r is unrolled, so they stay in registers).
template <int R, int LDA>
inline void accumulate(int64_t K, const float* a, const float* b, fvec (&c0)[R], fvec (&c1)[R]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = vset1(0.f);
  for (int64_t k = 0; k < K; ++k, a += LDA, b += kCols) {
    const fvec b0 = vload(b), b1 = vload(b + kVec);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const fvec x = vbroadcast(a + r);
      c0[r] = vfmadd(x, b0, c0[r]);
      c1[r] = vfmadd(x, b1, c1[r]);
    }
  }
}

// The tiles are kept out of line (score_tile, value_tile): inlined into the block loop, GCC spilled three of the
// twelve accumulators to the stack (measured: 51 instead of 77 GFLOP/s at four heads).

// R rows of one panel's P^T (row r at c + r * kCols): the scores K Q^T of R keys (packed K tile a, (D, kRows)) for
// the panel's kCols queries (packed Q^T b, (D, kCols)), exponentiated against the reference. col holds
// ref[0..kCols) then sum[0..kCols); the panel's `done` earlier rows are at c - done * kCols.
template <int R>
__attribute__((noinline)) void score_tile(int64_t D, const float* a, const float* b, float* c, float* col,
                                          int64_t done) {
  fvec c0[R], c1[R];
  accumulate<R, kRows>(D, a, b, c0, c1);
  fvec t0 = vset1(-std::numeric_limits<float>::infinity()), t1 = t0;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {  // a NaN score is skipped here (max returns its second operand)
    t0 = vmax(c0[r], t0);
    t1 = vmax(c1[r], t1);
  }
  const fvec slack = vset1(kSlack);
  if (__builtin_expect(any_greater(t0, vadd(vload(col), slack)) || any_greater(t1, vadd(vload(col + kVec), slack)),
                       0))
    raise_reference(t0, t1, col, col + kCols, c - done * kCols, done);
  const fvec ref0 = vload(col), ref1 = vload(col + kVec);
  fvec s0 = vload(col + kCols), s1 = vload(col + kCols + kVec);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c0[r] = exp2_softmax(vsub(c0[r], ref0));
    c1[r] = exp2_softmax(vsub(c1[r], ref1));
    s0 = vadd(s0, c0[r]);
    s1 = vadd(s1, c1[r]);
  }
  vstore(col + kCols, s0);
  vstore(col + kCols + kVec, s1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    vstore(c + r * kCols, c0[r]);
    vstore(c + r * kCols + kVec, c1[r]);
  }
}

// Where a value tile's sums go. Rows are queries, the kCols columns value channels of which `width` are real.
//   kStore:   acc                                     into the block's accumulator rows (first key block of several)
//   kRescale: acc + prev * corr[r]                    into the same rows (middle key blocks)
//   kOutput:  (acc [+ prev * corr[r]]) * inv_l[r] [+ res]  into the output (last key block)
enum class Sink { kStore, kRescale, kOutput };
struct ValueRows {
  float* prev;        // the block's accumulator rows (several key blocks only)
  int64_t ld_prev;
  bool earlier;       // prev holds earlier key blocks' sums, to be rescaled and added
  const float* corr;  // per-query factors of the earlier blocks' sums
  const float* inv_l;
  const float* res;   // residual rows, or nullptr
  int64_t ld_res;
  float* out;
  int64_t ld_out;
  int width;
};

// out (kCols floats, `width` of them real) = y, plus the residual row if any; partial rows by masked loads/stores.
inline void store_row(float* out, const float* res, fvec y0, fvec y1, int width) {
  if (width == kCols) {
    if (res) {
      y0 = vadd(y0, vload(res));
      y1 = vadd(y1, vload(res + kVec));
    }
    vstore(out, y0);
    vstore(out + kVec, y1);
    return;
  }
  if (res) {
    y0 = vadd(y0, vload_n(res, width));
    y1 = vadd(y1, vload_n(res + kVec, width - kVec));
  }
  vstore_n(out, y0, width);
  vstore_n(out + kVec, y1, width - kVec);
}

// R query rows of O = P V for kCols value channels: a is the panel's P^T from query r on ((nk, kCols): query r's
// probabilities at a[k * kCols + r]), b one packed V tile ((nk, kCols)).
template <int R, Sink S>
__attribute__((noinline)) void value_tile(int64_t nk, const float* a, const float* b, const ValueRows& o) {
  fvec c0[R], c1[R];
  accumulate<R, kCols>(nk, a, b, c0, c1);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* prev = o.prev ? o.prev + r * o.ld_prev : nullptr;
    if (S == Sink::kRescale || (S == Sink::kOutput && o.earlier)) {
      const fvec f = vbroadcast(o.corr + r);
      c0[r] = vfmadd(vload(prev), f, c0[r]);
      c1[r] = vfmadd(vload(prev + kVec), f, c1[r]);
    }
    if constexpr (S == Sink::kOutput) {
      const fvec inv = vbroadcast(o.inv_l + r);
      store_row(o.out + r * o.ld_out, o.res ? o.res + r * o.ld_res : nullptr, vmul(c0[r], inv), vmul(c1[r], inv),
                o.width);
    } else {
      vstore(prev, c0[r]);
      vstore(prev + kVec, c1[r]);
    }
  }
}

// f(std::integral_constant<int, R>) for R = rows (1..kRows): a tile of the rows left at an edge.
template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 1>{});
  }
}

inline void score_rows(int64_t rows, int64_t D, const float* a, const float* b, float* c, float* col, int64_t done) {
  with_rows(rows, [&](auto R) { score_tile<decltype(R)::value>(D, a, b, c, col, done); });
}

template <Sink S>
inline void value_rows(int64_t rows, int64_t nk, const float* a, const float* b, const ValueRows& o) {
  with_rows(rows, [&](auto R) { value_tile<decltype(R)::value, S>(nk, a, b, o); });
}

inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Q^T in panels of kCols queries, times s: qp[panel][d][0..kCols); queries past nq are zeros.
void pack_q(int64_t nq, int64_t D, const float* q, int64_t ldq, float s, float* qp) {
  const __m256 vs = _mm256_set1_ps(s);
  for (int64_t i0 = 0; i0 < nq; i0 += 8) {  // eight queries of a panel
    float* dst = qp + (i0 / kCols) * D * kCols + i0 % kCols;
    int64_t d = 0;
    if (i0 + 8 <= nq) {
      for (; d + 8 <= D; d += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(q + (i0 + j) * ldq + d);
        transpose8x8(r);
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (d + j) * kCols, _mm256_mul_ps(r[j], vs));
      }
    }
    for (; d < D; ++d)
      for (int64_t j = 0; j < 8; ++j) dst[d * kCols + j] = i0 + j < nq ? q[(i0 + j) * ldq + d] * s : 0.f;
  }
  for (int64_t i0 = (nq + 7) / 8 * 8; i0 % kCols; i0 += 8) {  // the last panel's eights past the queries
    float* dst = qp + (i0 / kCols) * D * kCols + i0 % kCols;
    for (int64_t d = 0; d < D; ++d) _mm256_storeu_ps(dst + d * kCols, _mm256_setzero_ps());
  }
}

// K rows (nk x D) in tiles of kRows keys: kp[tile][d][0..kRows), tile stride D * kRows + kPad.
void pack_k(int64_t nk, int64_t D, const float* k, int64_t ldk, float* kp) {
  static_assert(kRows <= 8);
  for (int64_t r0 = 0; r0 < nk; r0 += kRows) {
    float* dst = kp + (r0 / kRows) * (D * kRows + kPad);
    const int64_t rows = std::min(kRows, nk - r0);
    int64_t d = 0;
    if (rows == kRows) {
      for (; d + 8 <= D; d += 8) {
        __m256 r[8];
        for (int j = 0; j < 8; ++j) r[j] = j < kRows ? _mm256_loadu_ps(k + (r0 + j) * ldk + d) : _mm256_setzero_ps();
        transpose8x8(r);
        // 8-float stores of kRows-float rows: each overlaps the next row, written after it; the last one the pad
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (d + j) * kRows, r[j]);
      }
    }
    for (; d < D; ++d)
      for (int64_t j = 0; j < kRows; ++j) dst[d * kRows + j] = j < rows ? k[(r0 + j) * ldk + d] : 0.f;
  }
}

// V rows (nk x Dv) in tiles of kCols columns: vp[tile][k][0..kCols), tile stride nk * kCols, columns past Dv zeros.
// Row by row, so each row of V is read once, in order.
void pack_v(int64_t nk, int64_t Dv, const float* v, int64_t ldv, float* vp) {
  const int64_t tiles = (Dv + kCols - 1) / kCols, stride = nk * kCols, whole = Dv / kCols;
  for (int64_t k = 0; k < nk; ++k) {
    const float* row = v + k * ldv;
    float* dst = vp + k * kCols;
    for (int64_t t = 0; t < whole; ++t) {
      vstore(dst + t * stride, vload(row + t * kCols));
      vstore(dst + t * stride + kVec, vload(row + t * kCols + kVec));
    }
    for (int64_t t = whole; t < tiles; ++t)
      for (int64_t j = 0; j < kCols; ++j) dst[t * stride + j] = t * kCols + j < Dv ? row[t * kCols + j] : 0.f;
  }
}

// The end of one panel's key block, online across blocks: given the block's reference ref and the
// column sums of its P^T, corr = 2^(m - ref) rescales the earlier blocks' l and O; l = l * corr + sum, m = ref;
// after the last block inv_l = 1 / l.
void finish_panel(const float* ref_sum, float* m, float* l, float* corr, float* inv_l) {
  for (int h = 0; h < kCols; h += kVec) {  // on the first block m = -inf: corr = 2^-125 multiplies l = 0
    const fvec ref = vload(ref_sum + h), c = exp2_softmax(vsub(vload(m + h), ref));
    const fvec lh = vfmadd(vload(l + h), c, vload(ref_sum + kCols + h));
    vstore(l + h, lh);
    vstore(m + h, ref);
    vstore(corr + h, c);
    if (inv_l) vstore(inv_l + h, vdiv(vset1(1.f), lh));
  }
}

// Fetches the rows of a (rows x width) fp32 operand with row stride ld toward the cache in `calls` even slices,
// one prefetch per line: spread between the tiles, the misses overlap the arithmetic instead of queueing.
struct RowFetcher {
  const float* p;
  int64_t ld, rows, width, per_call, next = 0;
  RowFetcher(const float* p, int64_t ld, int64_t rows, int64_t width, int64_t calls)
      : p(p), ld(ld), rows(rows), width(width), per_call((rows + calls - 1) / calls) {}
  template <_mm_hint Hint>
  void step() {
    const int64_t end = std::min(rows, next + per_call);
    for (; next < end; ++next)
      for (int64_t c = 0; c < width; c += 16) _mm_prefetch(p + next * ld + c, Hint);
  }
};

// One thread's working buffers, carved from one allocation at 64-byte boundaries: the tiles' rows are then whole
// cache lines (from malloc's 16-byte alignment, half of their vector loads would split lines).
struct Scratch {
  std::vector<float> storage;
  float *qp, *kp, *vp, *st, *ot, *m, *l, *corr, *inv_l;

  void carve(int64_t qp_n, int64_t kp_n, int64_t vp_n, int64_t st_n, int64_t ot_n, int64_t rows_n) {
    constexpr int64_t kLine = 16;  // floats per cache line
    auto up = [](int64_t n) { return (n + kLine - 1) / kLine * kLine; };
    const int64_t total = up(qp_n) + up(kp_n) + up(vp_n) + up(st_n) + up(ot_n) + 4 * up(rows_n) + kLine;
    if (static_cast<int64_t>(storage.size()) < total) storage.resize(total);
    float* p = storage.data();
    p += (kLine - reinterpret_cast<uintptr_t>(p) / sizeof(float) % kLine) % kLine;
    for (auto [dst, n] : {std::pair{&qp, qp_n}, {&kp, kp_n}, {&vp, vp_n}, {&st, st_n}, {&ot, ot_n}, {&m, rows_n},
                          {&l, rows_n}, {&corr, rows_n}, {&inv_l, rows_n}}) {
      *dst = p;
      p += up(n);
    }
  }
};

// This thread's scratch, reused across calls (no page faults on the hot path). Fetched once per task through an
// opaque call: a thread_local named inside the loop cost a __tls_get_addr call (PIC) after every tile call.
__attribute__((noinline)) Scratch& thread_scratch() {
  thread_local Scratch w;
  return w;
}

void attention_tiles(const AttentionArgs& a) {
  const int64_t B = a.batch, H = a.heads, N = a.q_len, M = a.kv_len, D = a.head_dim, Dv = a.v_dim;
  const int64_t blocks = (N + kQueryBlock - 1) / kQueryBlock, KB = std::min(kKeyBlock, M);
  const int64_t k_tiles = (KB + kRows - 1) / kRows, v_tiles = (Dv + kCols - 1) / kCols, ldot = v_tiles * kCols;
  const bool one_key_block = M <= kKeyBlock;  // then K and V are packed once per (batch, head)
  const float s = a.scale * 1.4426950408889634f;  // scores in the exp2 domain
  // Work is handed out as it is done, a whole head (its query blocks) at a time so that its K and V are packed
  // once (single blocks when there are fewer than two heads a thread): a thread that a neighbour on the machine
  // slows takes fewer (measured on a shared 2-core machine, in process: 0-34% faster than a static split, median
  // of paired rounds; no change on one thread). Each thread claims its next chunk before running the current one,
  // so the next head's rows can be fetched meanwhile.
  const int64_t items = B * H * blocks, threads = std::max(1, at::get_num_threads());
  const int64_t chunk = B * H >= 2 * threads ? blocks : 1;
  std::atomic<int64_t> claimed{0};
  parallel_for_flushed(0, threads, 1, [&](int64_t, int64_t) {
    Scratch& w = thread_scratch();
    w.carve(kQueryBlock * D, k_tiles * (D * kRows + kPad), v_tiles * KB * kCols, KB * kQueryBlock,
            one_key_block ? 0 : kQueryBlock * ldot, kQueryBlock);
    int64_t packed = -1;  // the (batch, head) whose K and V are in w.kp / w.vp
    int64_t begin = claimed.fetch_add(chunk), end = std::min(begin + chunk, items);
    int64_t after = begin < items ? claimed.fetch_add(chunk) : items;  // the first item of this thread's next chunk
    for (int64_t item = begin; item < items; ++item) {
      if (item == end) {  // on to the chunk claimed ahead, and claim the one after it
        if (after >= items) break;
        item = after;
        end = std::min(after + chunk, items);
        after = claimed.fetch_add(chunk);
      }
      const int64_t following = item + 1 < end ? item + 1 : after;  // this thread's next item (>= items: none)
      const int64_t bh = item / blocks, b = bh / H, h = bh % H;
      const int64_t q0 = (item % blocks) * kQueryBlock, nq = std::min(kQueryBlock, N - q0);
      const int64_t panels = (nq + kCols - 1) / kCols;
      const float* q = a.q + b * a.q_strides[0] + h * a.q_strides[1] + q0 * a.q_strides[2];
      const float* k = a.k + b * a.k_strides[0] + h * a.k_strides[1];
      const float* v = a.v + b * a.v_strides[0] + h * a.v_strides[1];
      // the next (batch, head) this thread will pack: its rows are prefetched while this block computes
      const int64_t next = following / blocks;
      const bool prefetch = one_key_block && following < items && next != bh;
      const float* k_next = prefetch ? a.k + (next / H) * a.k_strides[0] + (next % H) * a.k_strides[1] : nullptr;
      const float* v_next = prefetch ? a.v + (next / H) * a.v_strides[0] + (next % H) * a.v_strides[1] : nullptr;

      float* o = a.out + b * a.out_strides[0] + h * a.out_strides[1] + q0 * a.out_strides[2];
      const float* r = a.residual ? a.residual + b * a.res_strides[0] + h * a.res_strides[1] + q0 * a.res_strides[2]
                                  : nullptr;
      const float* q_next = nullptr;  // the next block's queries
      int64_t nq_next = 0;
      if (following < items) {
        const int64_t q0n = (following % blocks) * kQueryBlock;
        nq_next = std::min(kQueryBlock, N - q0n);
        q_next = a.q + (next / H) * a.q_strides[0] + (next % H) * a.q_strides[1] + q0n * a.q_strides[2];
      }
      pack_q(nq, D, q, a.q_strides[2], s, w.qp);
      std::fill(w.m, w.m + kQueryBlock, -std::numeric_limits<float>::infinity());
      std::fill(w.l, w.l + kQueryBlock, 0.f);
      for (int64_t k0 = 0; k0 < M; k0 += KB) {
        const int64_t nk = std::min(KB, M - k0);
        if (!one_key_block || packed != bh) {
          pack_k(nk, D, k + k0 * a.k_strides[2], a.k_strides[2], w.kp);
          pack_v(nk, Dv, v + k0 * a.v_strides[2], a.v_strides[2], w.vp);
          packed = bh;
        }
        // Panel by panel (kCols queries): P^T (nk x kCols) = 2^(K Q^T - ref), then O (kCols x Dv) = P V, kRows
        // queries by kCols value channels per tile, added to the earlier key blocks' O rescaled, and on the last key
        // block divided by l and written out (+ residual). The panel's P^T stays in L1 through both products; the
        // packed K and V tiles stream from L2. Meanwhile the next head's rows, the residual rows and the next block's
        // queries are fetched, a slice before each tile, not in bursts.
        const int64_t row_tiles = (kCols + kRows - 1) / kRows;  // value tiles per panel and V tile, at most
        const int64_t calls = panels * ((nk + kRows - 1) / kRows + v_tiles * row_tiles);
        const bool first_block = k0 == 0, last_block = k0 + KB >= M;
        RowFetcher next_k{k_next, a.k_strides[2], prefetch ? M : 0, D, calls};
        RowFetcher next_v{v_next, a.v_strides[2], prefetch ? M : 0, Dv, calls};
        RowFetcher res{r, a.res_strides[2], last_block && r ? nq : 0, Dv, calls};
        RowFetcher next_q{q_next, a.q_strides[2], last_block ? nq_next : 0, D, calls};
        RowFetcher out_rows{o, a.out_strides[2], last_block ? nq : 0, Dv, calls};  // to be written: no RFO stall
        auto fetch_slice = [&] {
          next_k.step<_MM_HINT_T1>();
          next_v.step<_MM_HINT_T1>();
          res.step<_MM_HINT_T0>();
          next_q.step<_MM_HINT_T0>();
          out_rows.step<_MM_HINT_T0>();
        };
        for (int64_t p = 0; p < panels; ++p) {
          const int64_t pq0 = p * kCols, pq = std::min(kCols, nq - pq0);  // the panel's queries in the block
          float* st = w.st + p * nk * kCols;
          alignas(64) float ref_sum[2 * kCols];  // the panel's reference maxima, then its column sums of P^T
          std::copy(w.m + pq0, w.m + pq0 + kCols, ref_sum);
          std::fill(ref_sum + kCols, ref_sum + 2 * kCols, 0.f);
          for (int64_t r0 = 0; r0 < nk; r0 += kRows) {
            fetch_slice();
            score_rows(std::min(kRows, nk - r0), D, w.kp + (r0 / kRows) * (D * kRows + kPad), w.qp + p * D * kCols,
                       st + r0 * kCols, ref_sum, r0);
          }
          finish_panel(ref_sum, w.m + pq0, w.l + pq0, w.corr + pq0, last_block ? w.inv_l + pq0 : nullptr);
          if (last_block && a.lse) {  // for the backward: ln sum_j e^(scale q k_j) = ln 2 (m + log2 l) (exp2 domain)
            float* lse = a.lse + bh * N + q0 + pq0;
            for (int64_t j = 0; j < pq; ++j) lse[j] = (w.m[pq0 + j] + std::log2(w.l[pq0 + j])) * 0.6931471805599453f;
          }
          for (int64_t t = 0; t < v_tiles; ++t) {
            const float* vt = w.vp + t * nk * kCols;
            for (int64_t r0 = 0; r0 < pq; r0 += kRows) {
              fetch_slice();
              const int64_t i = pq0 + r0, rows = std::min(kRows, pq - r0);  // queries i .. i + rows of the block
              const ValueRows rows_out{one_key_block ? nullptr : w.ot + i * ldot + t * kCols,
                                 ldot,
                                 !first_block,
                                 w.corr + i,
                                 w.inv_l + i,
                                 r ? r + i * a.res_strides[2] + t * kCols : nullptr,
                                 a.res_strides[2],
                                 o + i * a.out_strides[2] + t * kCols,
                                 a.out_strides[2],
                                 static_cast<int>(std::min(kCols, Dv - t * kCols))};
              if (last_block)
                value_rows<Sink::kOutput>(rows, nk, st + r0, vt, rows_out);
              else if (first_block)
                value_rows<Sink::kStore>(rows, nk, st + r0, vt, rows_out);
              else
                value_rows<Sink::kRescale>(rows, nk, st + r0, vt, rows_out);
            }
          }
        }
      }
    }
  });
}

#else  // portable build: the products in BLAS

// Query rows per task (S and the accumulator stay in L2) and keys per online-softmax step.
constexpr int64_t kQueryBlock = 128;
constexpr int64_t kKeyBlock = 512;

// p[i] = exp(p[i] - m), returns the sum.
inline float exp_shift_sum(float* p, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec e = (Vec::loadu(p + i) - vm).exp_u20();
    e.store(p + i);
    acc = acc + e;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) {
    p[i] = std::exp(p[i] - m);
    s += p[i];
  }
  return s;
}

inline float row_max(const float* p, int64_t n) {
  Vec acc(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(p + i));
  float m = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, acc);
  for (; i < n; ++i) m = std::max(m, p[i]);
  return m;
}

void attention_blas(const AttentionArgs& a) {
  const int64_t B = a.batch, H = a.heads, N = a.q_len, M = a.kv_len, D = a.head_dim, Dv = a.v_dim;
  const int64_t blocks = (N + kQueryBlock - 1) / kQueryBlock;
  const int64_t KB = std::min(kKeyBlock, M);
  parallel_for_flushed(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(kQueryBlock * KB), acc(kQueryBlock * Dv), m(kQueryBlock), l(kQueryBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, b = bh / H, h = bh % H;
      const int64_t q0 = (item % blocks) * kQueryBlock, nq = std::min(kQueryBlock, N - q0);
      const float* q = a.q + b * a.q_strides[0] + h * a.q_strides[1] + q0 * a.q_strides[2];
      const float* k = a.k + b * a.k_strides[0] + h * a.k_strides[1];
      const float* v = a.v + b * a.v_strides[0] + h * a.v_strides[1];
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t k0 = 0; k0 < M; k0 += KB) {
        const int64_t nk = std::min(KB, M - k0);
        gemm_rm(true, nq, nk, D, a.scale, q, a.q_strides[2], k + k0 * a.k_strides[2], a.k_strides[2], 0.f, s.data(),
                nk);
        for (int64_t i = 0; i < nq; ++i) {
          float* row = s.data() + i * nk;
          const float m_new = std::max(m[i], row_max(row, nk));
          const float correction = std::exp(m[i] - m_new);  // 0 on the first block (m = -inf)
          l[i] = l[i] * correction + exp_shift_sum(row, nk, m_new);
          m[i] = m_new;
          if (k0 > 0) {
            float* arow = acc.data() + i * Dv;
            for (int64_t j = 0; j < Dv; ++j) arow[j] *= correction;
          }
        }
        gemm_rm(false, nq, Dv, nk, 1.f, s.data(), nk, v + k0 * a.v_strides[2], a.v_strides[2], k0 > 0 ? 1.f : 0.f,
                acc.data(), Dv);
      }
      float* o = a.out + b * a.out_strides[0] + h * a.out_strides[1] + q0 * a.out_strides[2];
      const float* r = a.residual ? a.residual + b * a.res_strides[0] + h * a.res_strides[1] + q0 * a.res_strides[2]
                                  : nullptr;
      if (a.lse)  // for the backward: ln sum_j e^(scale q k_j)
        for (int64_t i = 0; i < nq; ++i) a.lse[bh * N + q0 + i] = m[i] + std::log(l[i]);
      for (int64_t i = 0; i < nq; ++i) {
        const Vec inv(1.f / l[i]);
        const float* arow = acc.data() + i * Dv;
        float* orow = o + i * a.out_strides[2];
        const float* rrow = r ? r + i * a.res_strides[2] : nullptr;
        int64_t j = 0;
        for (; j + Vec::size() <= Dv; j += Vec::size()) {
          Vec y = Vec::loadu(arow + j) * inv;
          if (rrow) y = y + Vec::loadu(rrow + j);
          y.store(orow + j);
        }
        for (; j < Dv; ++j) orow[j] = arow[j] / l[i] + (rrow ? rrow[j] : 0.f);
      }
    }
  });
}

#endif

}  // namespace

void attention(const AttentionArgs& a) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  attention_tiles(a);
#else
  attention_blas(a);
#endif
}

}  // namespace cpu
}  // namespace ddpm_fast
