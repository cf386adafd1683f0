// Per-timestep scalar coefficients of the DDPM noising and reverse step, in double precision from
// the float64 schedule (abar = alphas_cumprod). Ho et al. 2020: eq. 4 (q_sample), eq. 15 (x_0 from
// epsilon), eq. 6-7 (posterior mean and variance); v-prediction from Salimans & Ho 2022.
// The elementwise kernels apply them in fp32.
#pragma once

#include <stdint.h>

#include "macros.h"

#if !defined(__CUDACC__)
#include <cmath>
#endif

namespace ddpm_fast {

enum PredictionType : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum VarianceType : int { kFixedSmall = 0, kFixedLarge = 1 };

// x_t = a * x_0 + b * eps
struct QSampleCoeffs {
  float a, b;
};

HOST_DEVICE QSampleCoeffs q_sample_coeffs(double abar_t) {
  return {static_cast<float>(sqrt(abar_t)), static_cast<float>(sqrt(1.0 - abar_t))};
}

// x_0   = (px * x_t + pm * m) * q               (m: the model output; eq. 15 as (x_t - sqrt(1-abar) eps) / sqrt(abar),
//                                                  so the cancellation happens before the 1/sqrt(abar) amplification)
// mean  = c0 * clip(x_0) + c1 * x_t + cm * m      (eq. 7: cm = 0; DDIM's direction term uses cm)
//       = kx * x_t + km * m                       (folded in double when there is no clipping)
// x_t-1 = mean + sigma * z
struct StepCoeffs {
  float px, pm, q, c0, c1, cm, kx, km, sigma;
};

// abar_prev is abar at the previous timestep (1 when t is the last step); sigma is 0 when last_step.
HOST_DEVICE StepCoeffs step_coeffs(double abar_t, double abar_prev, int prediction_type, int variance_type,
                                   bool last_step) {
  const double alpha_t = abar_t / abar_prev;  // the step's own alpha (also right for respaced steps)
  const double beta_t = 1.0 - alpha_t;
  double px, pm, q;
  if (prediction_type == kEpsilon) {
    px = 1.0;
    pm = -sqrt(1.0 - abar_t);
    q = 1.0 / sqrt(abar_t);
  } else if (prediction_type == kSample) {
    px = 0.0;
    pm = 1.0;
    q = 1.0;
  } else {  // kVPrediction
    px = sqrt(abar_t);
    pm = -sqrt(1.0 - abar_t);
    q = 1.0;
  }
  const double c0 = sqrt(abar_prev) * beta_t / (1.0 - abar_t);
  const double c1 = sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t);
  double variance = variance_type == kFixedLarge ? beta_t : (1.0 - abar_prev) / (1.0 - abar_t) * beta_t;
  variance = variance > 1e-20 ? variance : 1e-20;  // diffusers' clamp
  StepCoeffs k;
  k.px = static_cast<float>(px);
  k.pm = static_cast<float>(pm);
  k.q = static_cast<float>(q);
  k.c0 = static_cast<float>(c0);
  k.c1 = static_cast<float>(c1);
  k.cm = 0.0f;
  k.kx = static_cast<float>(c0 * q * px + c1);
  k.km = static_cast<float>(c0 * q * pm);
  k.sigma = last_step ? 0.0f : static_cast<float>(sqrt(variance));
  return k;
}

// Sample b's coefficients as the kernels take them: from a given table row [px, pm, q, c0, c1, cm, sigma] (DDIM,
// drop-in schedulers reproducing their own rounding) with kx and km folded, or from the schedule; t_prev is the
// previous timestep (t - 1 unless respaced, -1 for none). No noise at t == 0 either way.
HOST_DEVICE StepCoeffs step_coeffs_for(int64_t t, int64_t t_prev, const double* abar, const float* given,
                                       int prediction_type, int variance_type) {
  if (given) {
    const float* c = given;
    return {c[0], c[1], c[2], c[3], c[4], c[5], c[3] * c[2] * c[0] + c[4], c[3] * c[2] * c[1] + c[5],
            t == 0 ? 0.f : c[6]};
  }
  const double abar_prev = t_prev >= 0 ? abar[t_prev] : 1.0;
  return step_coeffs(abar[t], abar_prev, prediction_type, variance_type, /*last_step=*/t == 0);
}

// Sample b's noising coefficients: a given [a, b] row, or from abar_t.
HOST_DEVICE QSampleCoeffs q_sample_coeffs_for(int64_t t, const double* abar, const float* given) {
  return given ? QSampleCoeffs{given[0], given[1]} : q_sample_coeffs(abar[t]);
}

}  // namespace ddpm_fast
