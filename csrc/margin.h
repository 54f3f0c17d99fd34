// The margin math of DESIGN §1-2, once for C++ and CUDA: psi (the target transform) and psi'.
// The PyTorch twin is fastmargin/margins.py; tests hold the two to each other and to hand
// values. Plain C++, no torch headers: CUDA kernel files include it too.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmargin {

// Same constants as fastmargin/margins.py (the reasons are given there).
constexpr double kCosEps = 1e-7;
constexpr double kNormEps = 1e-12;
constexpr double kPi = 3.14159265358979323846;

// Which psi, with the constants derived from the user's margins on the host once.
struct MarginParams {
  double m1 = 1.0, m2 = 0.0, m3 = 0.0;
  int sphere_m = 0;             // SphereFace integer margin; 0 = not SphereFace
  double sphere_lambda = 0.0;   // SphereFace annealing weight
  bool clamp_theta = false;     // theta_policy 'clamp' (else 'fallback')
  bool detached = false;        // grad_mode 'detached': psi' := 1
  double cos_theta_limit = -1;  // cos(theta*), theta* = (pi - m2) / m1; -1 when never reached
  double fallback_shift = 0.0;  // h: psi = cos - m3 - h past theta* (fastmargin.margins.Margin)

  FM_HD bool is_sphereface() const { return sphere_m > 0; }
  FM_HD bool is_additive_cosine() const { return sphere_m == 0 && m1 == 1.0 && m2 == 0.0; }
};

inline MarginParams make_margin_params(double m1, double m2, double m3, int sphere_m, double sphere_lambda,
                                       bool clamp_theta, bool detached) {
  MarginParams p;
  p.m1 = m1; p.m2 = m2; p.m3 = m3;
  p.sphere_m = sphere_m; p.sphere_lambda = sphere_lambda;
  p.clamp_theta = clamp_theta; p.detached = detached;
  const double theta_limit = (kPi - m2) / m1;
  p.cos_theta_limit = theta_limit < kPi ? std::cos(theta_limit) : -1.0;
  p.fallback_shift = std::fmax(m2 * std::sin(m2) + std::cos(m2), 1.0) + std::cos(theta_limit);
  return p;
}

template <typename T>
FM_HD T clamp_cos(T c) {
  const T lo = T(-1.0 + kCosEps), hi = T(1.0 - kCosEps);
  return c < lo ? lo : (c > hi ? hi : c);
}

// T_m(c) = cos(m theta) and U_{m-1}(c) = sin(m theta) / sin(theta), by recurrence.
template <typename T>
FM_HD void chebyshev_t_u(T c, int m, T* t_m, T* u_m1) {
  T t_prev = T(1), t = c, u_prev = T(0), u = T(1);
  for (int i = 1; i < m; ++i) {
    const T t_next = T(2) * c * t - t_prev;
    const T u_next = T(2) * c * u - u_prev;
    t_prev = t; t = t_next; u_prev = u; u = u_next;
  }
  *t_m = t;
  *u_m1 = u;
}

// SphereFace's branch k = floor(m theta / pi), in [0, m - 1].
template <typename T>
FM_HD int sphereface_k(T c, int m) {
  const int k = static_cast<int>(std::floor(T(m) * std::acos(c) / T(kPi)));
  return k < 0 ? 0 : (k > m - 1 ? m - 1 : k);
}

// psi(cos): the target logit's cosine after the margin (fastmargin.margins.psi).
template <typename T>
FM_HD T psi(T cos, const MarginParams& p) {
  if (p.is_additive_cosine()) return cos - T(p.m3);
  const T c = clamp_cos(cos);
  if (p.is_sphereface()) {
    T t, u;
    chebyshev_t_u(c, p.sphere_m, &t, &u);
    const int k = sphereface_k(c, p.sphere_m);
    const T value = ((k & 1) ? -t : t) - T(2 * k);
    const T lam = T(p.sphere_lambda);
    return (lam * c + value) / (T(1) + lam);
  }
  if (c < T(p.cos_theta_limit)) {  // m1 theta + m2 > pi
    return p.clamp_theta ? T(-1) - T(p.m3) : c - T(p.m3) - T(p.fallback_shift);
  }
  return std::cos(T(p.m1) * std::acos(c) + T(p.m2)) - T(p.m3);
}

// psi'(cos) in closed form (DESIGN §2; fastmargin.margins.psi_grad).
template <typename T>
FM_HD T psi_grad(T cos, const MarginParams& p) {
  if (p.detached || p.is_additive_cosine()) return T(1);
  const T c = clamp_cos(cos);
  if (p.is_sphereface()) {
    T t, u;
    chebyshev_t_u(c, p.sphere_m, &t, &u);
    const int k = sphereface_k(c, p.sphere_m);
    const T grad = T(p.sphere_m) * ((k & 1) ? -u : u);
    const T lam = T(p.sphere_lambda);
    return (lam + grad) / (T(1) + lam);
  }
  if (c < T(p.cos_theta_limit)) return p.clamp_theta ? T(0) : T(1);
  const T angle = T(p.m1) * std::acos(c) + T(p.m2);
  // sin(theta) as sqrt((1 - c)(1 + c)): 1 - c is exact near c = 1, where 1 - c*c cancels.
  return T(p.m1) * std::sin(angle) / std::sqrt((T(1) - c) * (T(1) + c));
}

}  // namespace fastmargin
