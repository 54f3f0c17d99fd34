// The margin math of docs/design.md §1 and §3, once for C++ and CUDA: psi (the target transform), psi'
// and the non-target transform.
// fastmargin/margins.py (PyTorch) and kernels/margin.py (Triton) compute the same expressions
// with the same branches; tests/test_margin_math.py holds the three to each other. Plain C++,
// no torch headers: the CUDA kernel files include it too.
#pragma once

#include <cmath>
#include <cstdint>

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

// Which psi: fastmargin.margins' ADDITIVE, ARC, COMBINED, SPHERE.
enum Kind : int { kAdditive = 0, kArc = 1, kCombined = 2, kSphere = 3 };

// The rows of the params tensor (fastmargin.margins.PARAMS, same order).
enum Param : int {
  kScale, kM1, kM2, kM3, kSphereLambda, kCosM2, kSinM2, kCosLo, kCosHi, kClampGrad,
  kCosThetaLimit, kBeyondSlope, kBeyondShift, kTopLimit, kTopValue,
  kNtLo, kNtHi, kNtA0, kNtA1, kNtA2, kNumParams
};

// fastmargin.margins.Margin.flags: the branches, fixed for a call.
struct MarginFlags {
  int kind = kAdditive;
  int sphere_m = 0;         // SphereFace's integer margin (kind kSphere)
  bool nontarget = false;   // the non-target transform is on (nontarget below)
  bool detached = false;    // grad_mode 'detached': psi' := 1
};

// One row's params: column `row` of the (kNumParams, R) params tensor, read through its
// strides (stride_row 0 when every row shares column 0).
template <typename T>
struct MarginParams {
  T v[kNumParams];
  FM_HD T operator[](int i) const { return v[i]; }
};

template <typename T>
FM_HD MarginParams<T> margin_row(const T* params, int64_t stride_param, int64_t stride_row, int64_t row) {
  MarginParams<T> p;
  for (int i = 0; i < kNumParams; ++i) p.v[i] = params[i * stride_param + row * stride_row];
  return p;
}

template <typename T>
FM_HD T clamp_cos(T c, const MarginParams<T>& p) {
  return c < p[kCosLo] ? p[kCosLo] : (c > p[kCosHi] ? p[kCosHi] : c);  // NaN stays NaN
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

// SphereFace's k = floor(m theta / pi), in [0, m - 1], and (-1)^k.
template <typename T>
FM_HD void sphereface_sign_k(T c, int m, T* sign, T* k) {
  T kk = std::floor(T(m) * std::acos(c) / T(kPi));
  kk = kk < T(0) ? T(0) : (kk > T(m - 1) ? T(m - 1) : kk);
  *k = kk;
  *sign = (static_cast<int>(kk) & 1) ? T(-1) : T(1);
}

// sqrt((1 - c)(1 + c)): 1 - c is exact near c = 1 (Sterbenz), where 1 - c*c cancels.
template <typename T>
FM_HD T sin_theta(T c) {
  return std::sqrt((T(1) - c) * (T(1) + c));
}

// psi(cos): the target logit's cosine after the margin (fastmargin.margins.target_value).
// Every theta policy is numbers in p: the line beyond_slope c - beyond_shift below
// cos_theta_limit, top_value above top_limit, cos(m1 theta + m2) between, less m3.
template <typename T>
FM_HD T psi(T cos, const MarginParams<T>& p, const MarginFlags& f) {
  if (f.kind == kAdditive) return cos - p[kM3];
  const T c = clamp_cos(cos, p);
  if (f.kind == kSphere) {
    T t, u, sign, k;
    chebyshev_t_u(c, f.sphere_m, &t, &u);
    sphereface_sign_k(c, f.sphere_m, &sign, &k);
    const T lam = p[kSphereLambda];
    return (lam * c + (sign * t - T(2) * k)) / (T(1) + lam);
  }
  const T inside = f.kind == kArc ? c * p[kCosM2] - sin_theta(c) * p[kSinM2]  // cos(theta + m2), no angle
                                  : std::cos(p[kM1] * std::acos(c) + p[kM2]);
  const T top = c > p[kTopLimit] ? p[kTopValue] : inside;
  return (c < p[kCosThetaLimit] ? p[kBeyondSlope] * c - p[kBeyondShift] : top) - p[kM3];
}

// psi'(cos) in closed form (docs/design.md §3; fastmargin.margins.target_grad). Outside
// [cos_lo, cos_hi] the clamp passes clamp_grad times psi' at the bound (1: straight-through).
template <typename T>
FM_HD T psi_grad(T cos, const MarginParams<T>& p, const MarginFlags& f) {
  if (f.detached || f.kind == kAdditive) return T(1);
  const T c = clamp_cos(cos, p);
  const T gate = (cos < p[kCosLo] || cos > p[kCosHi]) ? p[kClampGrad] : T(1);
  if (f.kind == kSphere) {
    T t, u, sign, k;
    chebyshev_t_u(c, f.sphere_m, &t, &u);
    sphereface_sign_k(c, f.sphere_m, &sign, &k);
    const T lam = p[kSphereLambda];
    return gate * (lam + T(f.sphere_m) * sign * u) / (T(1) + lam);
  }
  // ARC: sin(theta + m2) / sin(theta) = cos(m2) + sin(m2) c / sin(theta)
  const T inside = f.kind == kArc ? p[kCosM2] + p[kSinM2] * c / sin_theta(c)
                                  : p[kM1] * std::sin(p[kM1] * std::acos(c) + p[kM2]) / sin_theta(c);
  const T top = c > p[kTopLimit] ? T(0) : inside;
  return gate * (c < p[kCosThetaLimit] ? p[kBeyondSlope] : top);
}

// The non-target transform of a cosine (flag nontarget; fastmargin.margins.nontarget_value):
// nt_a0 + c (nt_a1 + nt_a2 c) above nt_hi (CurricularFace's c (t + c), the interclass
// filter's 0, AdaFace's clamp), nt_lo below nt_lo (AdaFace's clamp), else c. NaN stays NaN.
// The kernels pass a row's five numbers, loaded once a row block, to the first form.
template <typename T>
FM_HD T nontarget(T c, T lo, T hi, T a0, T a1, T a2) {
  return c > hi ? a0 + c * (a1 + a2 * c) : (c < lo ? lo : c);
}

template <typename T>
FM_HD T nontarget(T c, const MarginParams<T>& p) {
  return nontarget(c, p[kNtLo], p[kNtHi], p[kNtA0], p[kNtA1], p[kNtA2]);
}

// d nontarget / dc (fastmargin.margins.nontarget_grad).
template <typename T>
FM_HD T nontarget_grad(T c, T lo, T hi, T a1, T a2) {
  return c > hi ? a1 + T(2) * a2 * c : (c < lo ? T(0) : T(1));
}

template <typename T>
FM_HD T nontarget_grad(T c, const MarginParams<T>& p) {
  return nontarget_grad(c, p[kNtLo], p[kNtHi], p[kNtA1], p[kNtA2]);
}

}  // namespace fastmargin
