// Backward of the fused attention (attention.cpp), fp32, flash-attention-2 style (Dao 2023, Algorithm 2): from
// q, k, v, the forward's output O = softmax(S) V (without the residual, S = q k^T * scale) and its per-query
// log-sum-exp lse_i = ln sum_j e^(S_ij), with dO = dL/dO, per (batch, head):
//   D_i  = sum_c dO_ic O_ic                    (= sum_j P_ij dP_ij, the softmax's row term)
//   for each block pair (query block i, key block j), recomputed, never an N x M matrix:
//     P_ij  = exp(Q_i K_j^T * scale - lse_i)
//     dP_ij = dO_i V_j^T
//     dS_ij = P_ij * (dP_ij - D_i)
//     dV_j += P_ij^T dO_i;   dK_j += scale dS_ij^T Q_i;   dQ_i += scale dS_ij K_j
// The residual's gradient is dO itself (the caller passes it through). The products run in the BLAS torch links
// (sgemm_: MKL on x86), reading and writing every operand in place through its row stride;
// P and dS of one block pair (kQueryBlock x kKeyBlock floats each, per thread) are the only scratch.
//
// Race freedom: every output row is written by exactly one task. With one key block per head (M <= kKeyBlock,
// the U-Net's 16x16 attention) or at least two heads a thread, a task is a whole (batch, head): it owns that
// head's dQ, dK and dV and runs its block pairs in order, accumulating into them (beta = 1 after the first
// contribution). Otherwise (few heads, long sequences) two passes keep the threads busy: tasks (head, key block)
// own dK_j and dV_j, then tasks (head, query block) own dQ_i; each recomputes P and dS for its own blocks (two more
// products per block pair than the single pass, instead of a reduction of per-thread dQ copies).
#include <atomic>
#include <vector>

#include "elementwise.h"
#include "gemm.h"

namespace ddpm_fast {
namespace cpu {
namespace {

// A block pair: 256 queries x 256 keys, P and dS 256 KB each (in L2). The U-Net's 16x16 attention is then one block
// pair a head, its products the size of the reference's (measured at B = 8, one head of 256, one thread: 64-query
// blocks took 1.3x as long as 256).
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 256;

// Row-major C (m x n, ldc) = alpha op(A) op(B) + beta C with op(A) (m x k) = A or A^T and op(B) (k x n) = B or
// B^T of row-major stored A, B: the column-major sgemm of the transposes, C^T = op(B)^T op(A)^T (gemm.h's gemm_rm
// with A transposable). beta = 0: C is not read (BLAS convention), so it may hold anything, NaN included. Without
// a Fortran sgemm_ in torch's libraries, a plain loop.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_) {
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(tb ? "T" : "N", ta ? "T" : "N", &M, &N, &K, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.f;
      for (int64_t p = 0; p < k; ++p)
        acc += (ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
      c[i * ldc + j] = alpha * acc + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
    }
}

// The operands of one (batch, head), each at its first row; `ld` the row strides.
struct Head {
  const float *q, *k, *v, *o, *go, *lse;
  float *dq, *dk, *dv;
  const float* d;  // (N,) D_i
};

struct Sizes {
  int64_t N, M, D, Dv;
  int64_t ldq, ldk, ldv, ldo, ldgo, ldgq, ldgk, ldgv;
  float scale;
};

// One block pair: queries [i0, i0 + ni), keys [j0, j0 + nj). Recomputes P and dS into p and ds (ni x nj, row
// stride nj), then adds dV_j, dK_j (when kv) and dQ_i (when dq) into the outputs; `first_*`: this is the first
// contribution to those rows (beta = 0: they are overwritten).
void block_pair(const Head& h, const Sizes& z, int64_t i0, int64_t ni, int64_t j0, int64_t nj, bool kv, bool first_kv,
                bool dq, bool first_dq, float* p, float* ds) {
  const float *q = h.q + i0 * z.ldq, *k = h.k + j0 * z.ldk, *v = h.v + j0 * z.ldv, *go = h.go + i0 * z.ldgo;
  gemm(false, true, ni, nj, z.D, z.scale, q, z.ldq, k, z.ldk, 0.f, p, nj);    // S = Q_i K_j^T * scale
  gemm(false, true, ni, nj, z.Dv, 1.f, go, z.ldgo, v, z.ldv, 0.f, ds, nj);    // dP = dO_i V_j^T
  // P = exp(S - lse); dS = P (dP - D) * scale (the scale of dQ and dK folded in). Vec::exp is Sleef's: NaN and
  // inf go through as IEEE says (at::vec's exp_u20 clamps a NaN to a finite number).
  for (int64_t r = 0; r < ni; ++r) {
    float* pr = p + r * nj;
    float* dr = ds + r * nj;
    const Vec lse(h.lse[i0 + r]), d(h.d[i0 + r]), scale(z.scale);
    int64_t c = 0;
    for (; c + Vec::size() <= nj; c += Vec::size()) {
      const Vec pv = (Vec::loadu(pr + c) - lse).exp();
      pv.store(pr + c);
      (pv * (Vec::loadu(dr + c) - d) * scale).store(dr + c);
    }
    if (c < nj) {
      const int64_t n = nj - c;
      const Vec pv = (Vec::loadu(pr + c, n) - lse).exp();
      pv.store(pr + c, n);
      (pv * (Vec::loadu(dr + c, n) - d) * scale).store(dr + c, n);
    }
  }
  if (kv) {
    const float beta = first_kv ? 0.f : 1.f;
    gemm(true, false, nj, z.Dv, ni, 1.f, p, nj, go, z.ldgo, beta, h.dv + j0 * z.ldgv, z.ldgv);  // dV_j += P^T dO_i
    gemm(true, false, nj, z.D, ni, 1.f, ds, nj, q, z.ldq, beta, h.dk + j0 * z.ldgk, z.ldgk);    // dK_j += dS^T Q_i
  }
  if (dq)
    gemm(false, false, ni, z.D, nj, 1.f, ds, nj, k, z.ldk, first_dq ? 0.f : 1.f, h.dq + i0 * z.ldgq,
         z.ldgq);  // dQ_i += dS K_j
}

}  // namespace

void attention_backward(const AttentionBackwardArgs& a) {
  const int64_t B = a.batch, H = a.heads, N = a.q_len, M = a.kv_len;
  const Sizes z{N,
                M,
                a.head_dim,
                a.v_dim,
                a.q_strides[2],
                a.k_strides[2],
                a.v_strides[2],
                a.out_strides[2],
                a.go_strides[2],
                a.gq_strides[2],
                a.gk_strides[2],
                a.gv_strides[2],
                a.scale};
  const int64_t qb = (N + kQueryBlock - 1) / kQueryBlock, kb = (M + kKeyBlock - 1) / kKeyBlock;
  std::vector<float> d_all(B * H * N);  // D_i of every query
  auto head = [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    auto at = [&](auto* p, const int64_t* s) { return p + b * s[0] + h * s[1]; };
    return Head{at(a.q, a.q_strides),   at(a.k, a.k_strides),   at(a.v, a.v_strides),
                at(a.out, a.out_strides), at(a.grad_out, a.go_strides), a.lse + bh * N,
                at(a.grad_q, a.gq_strides), at(a.grad_k, a.gk_strides), at(a.grad_v, a.gv_strides),
                d_all.data() + bh * N};
  };

  // D_i = dO_i . O_i, every (batch, head, query) row.
  parallel_for_flushed(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const Head h = head(bh);
      float* d = d_all.data() + bh * N;
      for (int64_t i = 0; i < N; ++i) {
        const float *o = h.o + i * z.ldo, *g = h.go + i * z.ldgo;
        Vec acc(0.f);
        int64_t c = 0;
        for (; c + Vec::size() <= z.Dv; c += Vec::size())
          acc = at::vec::fmadd(Vec::loadu(o + c), Vec::loadu(g + c), acc);
        float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
        for (; c < z.Dv; ++c) s += o[c] * g[c];
        d[i] = s;
      }
    }
  });

  // Tasks handed out as they are done (a thread that a neighbour on the machine slows takes fewer), each with its
  // own P and dS scratch.
  const int64_t threads = std::max(1, at::get_num_threads());
  auto run = [&](int64_t items, auto&& task) {
    std::atomic<int64_t> next{0};
    parallel_for_flushed(0, std::min(threads, items), 1, [&](int64_t, int64_t) {
      std::vector<float> p(kQueryBlock * kKeyBlock), ds(kQueryBlock * kKeyBlock);
      for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) task(item, p.data(), ds.data());
    });
  };
  auto rows = [](int64_t blk, int64_t size, int64_t n) { return std::min(size, n - blk * size); };

  if (kb == 1 || B * H >= 2 * threads) {  // one task a head: it owns the head's dQ, dK and dV
    run(B * H, [&](int64_t bh, float* p, float* ds) {
      const Head h = head(bh);
      for (int64_t j = 0; j < kb; ++j)
        for (int64_t i = 0; i < qb; ++i)
          block_pair(h, z, i * kQueryBlock, rows(i, kQueryBlock, N), j * kKeyBlock, rows(j, kKeyBlock, M), true,
                     i == 0, true, j == 0, p, ds);
    });
    return;
  }
  // Few heads for the threads: dK_j, dV_j by (head, key block), then dQ_i by (head, query block).
  run(B * H * kb, [&](int64_t item, float* p, float* ds) {
    const Head h = head(item / kb);
    const int64_t j = item % kb;
    for (int64_t i = 0; i < qb; ++i)
      block_pair(h, z, i * kQueryBlock, rows(i, kQueryBlock, N), j * kKeyBlock, rows(j, kKeyBlock, M), true, i == 0,
                 false, false, p, ds);
  });
  run(B * H * qb, [&](int64_t item, float* p, float* ds) {
    const Head h = head(item / qb);
    const int64_t i = item % qb;
    for (int64_t j = 0; j < kb; ++j)
      block_pair(h, z, i * kQueryBlock, rows(i, kQueryBlock, N), j * kKeyBlock, rows(j, kKeyBlock, M), false, false,
                 true, j == 0, p, ds);
  });
}

}  // namespace cpu
}  // namespace ddpm_fast
