// Backward of the fused GroupNorm + optional SiLU with the per-(batch, channel) add (group_norm.cpp), fp32, in
// two passes over x and the output gradient g, from the forward's saved per-(sample, group) mean and rstd of
// h = x + add (no saved activations):
//   xhat = (h - mean) * rstd,  y = xhat * w_c + b_c,  dy = g * silu'(y) = g * s (1 + y (1 - s)), s = sigmoid(y)
//   pass 1, per (b, c): S0 = sum x, S1 = sum dy, S2 = sum dy * xhat (SiLU recomputed from the statistics)
//   per (b, g), N = Cg * HW: m1 = sum_c w_c S1 / N, m2 = sum_c w_c S2 / N
//   pass 2: dx = rstd * (w_c dy - m1 - xhat m2)
// The sums go out as (B, C, 3) so the caller forms d(weight) = sum_b S2, d(bias) = sum_b S1 and
// d(add)[b, c] = sum_hw dx from them (B x C numbers).
#include <cmath>
#include <vector>

#include "elementwise.h"

namespace ddpm_fast {
namespace cpu {
namespace {

inline Vec sigmoid(const Vec& y) { return Vec(1.f) / (Vec(1.f) + y.neg().exp()); }
inline float sigmoid(float y) { return 1.f / (1.f + std::exp(-y)); }

// The pre-activation gradient dy and xhat of one element (or one vector of them).
template <typename V>
inline V pre_grad(const V& x, const V& g, const V& shift, const V& rstd, const V& w, const V& b, bool silu, V& xhat) {
  xhat = (x - shift) * rstd;  // shift = mean - add
  if (!silu) return g;
  const V y = xhat * w + b;
  const V s = sigmoid(y);
  return g * s * (V(1.f) + y * (V(1.f) - s));
}

struct Channel {  // one channel's constants in sample b
  float shift, rstd, w, b;
};

inline Channel channel(const GroupNormBackwardArgs& a, int64_t b, int64_t c) {
  const int64_t G = a.groups, Cg = a.channels / G, bg = b * G + c / Cg;
  return Channel{a.mean[bg] - (a.add ? a.add[b * a.channels + c] : 0.f), a.rstd[bg], a.weight ? a.weight[c] : 1.f,
                 a.bias ? a.bias[c] : 0.f};
}

// Pass 1 over one contiguous run of n elements of one channel: S0, S1, S2 added into s[0..3).
void run_sums(const GroupNormBackwardArgs& a, const Channel& k, const float* x, const float* g, int64_t n,
              float* s) {
  const Vec vs(k.shift), vr(k.rstd), vw(k.w), vb(k.b);
  Vec s0(0.f), s1(0.f), s2(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    Vec xh;
    const Vec dy = pre_grad(xv, Vec::loadu(g + i), vs, vr, vw, vb, a.silu, xh);
    s0 = s0 + xv;
    s1 = s1 + dy;
    s2 = at::vec::fmadd(dy, xh, s2);
  }
  auto sum = [](const Vec& v) { return at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, v); };
  float t0 = sum(s0), t1 = sum(s1), t2 = sum(s2);
  for (; i < n; ++i) {
    float xh;
    const float dy = pre_grad(x[i], g[i], k.shift, k.rstd, k.w, k.b, a.silu, xh);
    t0 += x[i];
    t1 += dy;
    t2 += dy * xh;
  }
  s[0] += t0;
  s[1] += t1;
  s[2] += t2;
}

// Pass 2 over one contiguous run of one channel: dx = rstd (w dy - m1 - xhat m2).
void run_grad(const GroupNormBackwardArgs& a, const Channel& k, float m1, float m2, const float* x, const float* g,
              int64_t n, float* dx) {
  const Vec vs(k.shift), vr(k.rstd), vw(k.w), vb(k.b), v1(m1), v2(m2);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec xh;
    const Vec dy = pre_grad(Vec::loadu(x + i), Vec::loadu(g + i), vs, vr, vw, vb, a.silu, xh);
    (vr * (vw * dy - v1 - xh * v2)).store(dx + i);
  }
  for (; i < n; ++i) {
    float xh;
    const float dy = pre_grad(x[i], g[i], k.shift, k.rstd, k.w, k.b, a.silu, xh);
    dx[i] = k.rstd * (k.w * dy - m1 - xh * m2);
  }
}

// m1, m2 of group g of sample b from its channels' sums.
inline void group_means(const GroupNormBackwardArgs& a, int64_t b, int64_t g, float& m1, float& m2) {
  const int64_t C = a.channels, Cg = C / a.groups;
  double t1 = 0, t2 = 0;
  for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
    const double w = a.weight ? a.weight[c] : 1.0;
    t1 += w * a.sums[(b * C + c) * 3 + 1];
    t2 += w * a.sums[(b * C + c) * 3 + 2];
  }
  const double n = static_cast<double>(Cg * a.spatial);
  m1 = static_cast<float>(t1 / n);
  m2 = static_cast<float>(t2 / n);
}

// NCHW: one task per (sample, group), whose channels are contiguous runs of HW.
void backward_nchw(const GroupNormBackwardArgs& a) {
  const int64_t C = a.channels, HW = a.spatial, G = a.groups, Cg = C / G;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, Cg * HW));
  parallel_for_flushed(0, a.batch * G, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / G, g = item % G;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        float* s = a.sums + (b * C + c) * 3;
        s[0] = s[1] = s[2] = 0.f;
        const int64_t off = (b * C + c) * HW;
        run_sums(a, channel(a, b, c), a.x + off, a.grad + off, HW, s);
      }
      float m1, m2;
      group_means(a, b, g, m1, m2);
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const int64_t off = (b * C + c) * HW;
        run_grad(a, channel(a, b, c), m1, m2, a.x + off, a.grad + off, HW, a.grad_x + off);
      }
    }
  });
}

// NHWC: one task per sample; each pixel row holds the C channels, vectorised across channels with the per-channel
// constants in arrays.
void backward_nhwc(const GroupNormBackwardArgs& a) {
  const int64_t C = a.channels, HW = a.spatial, Cg = C / a.groups;
  parallel_for_flushed(0, a.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shift(C), rstd(C), w(C), bias(C), s0(C), s1(C), s2(C), m1(C), m2(C);
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const Channel k = channel(a, b, c);
        shift[c] = k.shift, rstd[c] = k.rstd, w[c] = k.w, bias[c] = k.b;
        s0[c] = s1[c] = s2[c] = 0.f;
      }
      const float* x = a.x + b * HW * C;
      const float* g = a.grad + b * HW * C;
      float* dx = a.grad_x + b * HW * C;
      for (int64_t p = 0; p < HW; ++p) {
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) {
          const Vec xv = Vec::loadu(x + p * C + c);
          Vec xh;
          const Vec dy = pre_grad(xv, Vec::loadu(g + p * C + c), Vec::loadu(&shift[c]), Vec::loadu(&rstd[c]),
                                  Vec::loadu(&w[c]), Vec::loadu(&bias[c]), a.silu, xh);
          (Vec::loadu(&s0[c]) + xv).store(&s0[c]);
          (Vec::loadu(&s1[c]) + dy).store(&s1[c]);
          at::vec::fmadd(dy, xh, Vec::loadu(&s2[c])).store(&s2[c]);
        }
        for (; c < C; ++c) {
          float xh;
          const float dy = pre_grad(x[p * C + c], g[p * C + c], shift[c], rstd[c], w[c], bias[c], a.silu, xh);
          s0[c] += x[p * C + c];
          s1[c] += dy;
          s2[c] += dy * xh;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        float* s = a.sums + (b * C + c) * 3;
        s[0] = s0[c], s[1] = s1[c], s[2] = s2[c];
      }
      for (int64_t gi = 0; gi < a.groups; ++gi) {
        float g1, g2;
        group_means(a, b, gi, g1, g2);
        for (int64_t c = gi * Cg; c < (gi + 1) * Cg; ++c) m1[c] = g1, m2[c] = g2;
      }
      for (int64_t p = 0; p < HW; ++p) {
        int64_t c = 0;
        for (; c + Vec::size() <= C; c += Vec::size()) {
          Vec xh;
          const Vec vr = Vec::loadu(&rstd[c]), vw = Vec::loadu(&w[c]);
          const Vec dy = pre_grad(Vec::loadu(x + p * C + c), Vec::loadu(g + p * C + c), Vec::loadu(&shift[c]), vr,
                                  vw, Vec::loadu(&bias[c]), a.silu, xh);
          (vr * (vw * dy - Vec::loadu(&m1[c]) - xh * Vec::loadu(&m2[c]))).store(dx + p * C + c);
        }
        for (; c < C; ++c) {
          float xh;
          const float dy = pre_grad(x[p * C + c], g[p * C + c], shift[c], rstd[c], w[c], bias[c], a.silu, xh);
          dx[p * C + c] = rstd[c] * (w[c] * dy - m1[c] - xh * m2[c]);
        }
      }
    }
  });
}

}  // namespace

void group_norm_backward(const GroupNormBackwardArgs& a) { a.nhwc ? backward_nhwc(a) : backward_nchw(a); }

}  // namespace cpu
}  // namespace ddpm_fast
