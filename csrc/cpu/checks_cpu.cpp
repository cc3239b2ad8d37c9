// CPU kernel of torchhealth::run_checks: every health check of one step in one
// call, as plain loops over the statistics rows.
//
// The checks are written once in Python (torchhealth/checks.py, the reference,
// which every other device runs): there each check is ~10-50 small tensor ops,
// ~170 in all, and on the CPU every op costs microseconds whatever the number
// of rows (1.5 ms a check on a 54-parameter model, benchmarks/RESULTS.md).
// Here the same arithmetic runs once per row. Every comparison, count, mask and
// extreme is the reference's exactly; each value is the same float64 operations
// in the same order (log and exp by torch's kernels, as the reference's) (tests/test_checks.py::test_the_native_checks_are_the_reference
// compares both on random statistics, layouts and running states).
//
// Inputs (torchhealth/checks.py::_native_checks; the layout's constants are
// packed once, by check_types.py::Layout._native_constants): `data` the int64 statistics rows; per row, `row_ints` [R, 3] (flags,
// parameter, module) and `row_floats` [R, 3] (dtype max, eps, smallest
// normal); per parameter, `param_ints` [P, 2] (its gradient row or R, flags);
// `th` the thresholds and the limits derived from them in Python (so that each
// constant is the reference's own double); `ints` warmup, dead_after,
// num_modules; the running state; the total gradient norm (or None: made here, as
// checks.py::total_grad_norm makes it) and the GradScaler's found_inf (or None).
//
// Returns fired [S], value [S], the masks of every signal concatenated, and
// the new running state (count, mean, var, dead, structural, peak), S = 15
// signals in torchhealth.checks.run_checks order; the total norm is the value
// of the ("exploding", "total") signal.
#include <ATen/ops/empty.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/log.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../stats.h"

namespace torchhealth {
namespace {

// Row flags (check_types.py::Layout._native_constants).
constexpr int64_t kGrad = 1, kParam = 2, kState = 4, kLowp = 8, kDense = 16, kCandidate = 32;
constexpr int64_t kTrainable = 1, kMissing = 2;
// Gradient status (torchhealth.check_types).
constexpr int64_t kUndecided = 0, kStructural = 1, kLearns = 2, kUnreached = 3;
// Thresholds, in checks.py::_native_checks order.
enum Th : int {
  kMaxNorm, kMaxParamNorm2, kSpikeFactor, kLogSpikeFactor, kSpikeZscore, kMinAlpha, kMinNorm,
  kLimit, kLimit2, kMaxZeroFraction, kHeadroom, kOverflowHorizon, kMaxSubnormalFraction,
  kStructuralRms, kStructuralRms2, kNumTh
};

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kTiny = std::numeric_limits<double>::min();  // torch.finfo(float64).tiny

// max and min as torch's amax/amin/clamp take them: a NaN wins.
double nan_max(double a, double b) { return std::isnan(a) || a > b ? a : b; }
double nan_min(double a, double b) { return std::isnan(a) || a < b ? a : b; }
// clamp(x, min=lo) / clamp(x, max=hi): NaN stays NaN.
double clamp_min(double x, double lo) { return x < lo ? lo : x; }
double clamp_max(double x, double hi) { return x > hi ? hi : x; }

struct Signals {
  std::vector<uint8_t> fired;
  std::vector<double> value;
  std::vector<uint8_t> masks;
  // A signal: its mask (appended), its value; fired = any(mask) unless info.
  void add(const std::vector<uint8_t>& mask, double v, bool info = false) {
    bool any = false;
    for (uint8_t m : mask) any = any || m;
    fired.push_back(!info && any);
    value.push_back(v);
    masks.insert(masks.end(), mask.begin(), mask.end());
  }
};

std::vector<at::Tensor> run_checks_cpu(
    const at::Tensor& data, const at::Tensor& row_ints, const at::Tensor& row_floats,
    const at::Tensor& param_ints, at::ArrayRef<double> th, at::IntArrayRef ints,
    const at::Tensor& count_t, const at::Tensor& mean_t, const at::Tensor& var_t,
    const at::Tensor& dead_t, const at::Tensor& structural_t, const at::Tensor& peak_t,
    const std::optional<at::Tensor>& total_opt, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(th.size() == kNumTh && ints.size() == 3, "run_checks: bad constants");
  const auto d = data.contiguous(), ri = row_ints.contiguous(), rf = row_floats.contiguous(),
             pi = param_ints.contiguous();
  const int64_t R = d.size(0), P = pi.size(0), C = d.size(1);
  TORCH_CHECK(d.scalar_type() == at::kLong && C >= kCols && ri.size(0) == R && rf.size(0) == R,
              "run_checks: rows and constants disagree");
  const int64_t* s = d.data_ptr<int64_t>();
  const int64_t* rint = ri.data_ptr<int64_t>();
  const double* rflt = rf.data_ptr<double>();
  const int64_t* pint = pi.data_ptr<int64_t>();
  const int64_t warmup = ints[0], dead_after = ints[1], num_modules = ints[2];
  const auto dead_old = dead_t.contiguous(), structural_old = structural_t.contiguous(),
             peak_old = peak_t.contiguous();
  TORCH_CHECK(ri.size(1) == 3 && rf.size(1) == 3 && pi.size(1) == 2 && ri.scalar_type() == at::kLong &&
                  rf.scalar_type() == at::kDouble && pi.scalar_type() == at::kLong &&
                  dead_old.numel() == P && structural_old.numel() == P && peak_old.numel() == P &&
                  dead_old.scalar_type() == at::kLong && structural_old.scalar_type() == at::kLong &&
                  peak_old.scalar_type() == at::kDouble,
              "run_checks: the layout's constants and the running state disagree");
  for (int64_t i = 0; i < R; ++i) {
    const int64_t j = rint[i * 3 + 1], m = rint[i * 3 + 2];
    TORCH_CHECK(j >= 0 && j < P && m >= 0 && m < num_modules, "run_checks: row ", i, " names no parameter");
  }
  for (int64_t j = 0; j < P; ++j) {
    TORCH_CHECK(pint[j * 2] >= 0 && pint[j * 2] <= R, "run_checks: parameter ", j, " names no row");
  }
  // 0-d inputs, read in place (a CPU kernel reading its inputs, not a host sync).
  TORCH_CHECK(count_t.scalar_type() == at::kLong && mean_t.scalar_type() == at::kDouble &&
                  var_t.scalar_type() == at::kDouble && count_t.numel() == 1 && mean_t.numel() == 1 &&
                  var_t.numel() == 1,
              "run_checks: bad running state");
  bool scaler_inf = false;
  if (found_inf.has_value()) {
    const at::Tensor f = found_inf->scalar_type() == at::kFloat ? *found_inf : found_inf->to(at::kDouble);
    TORCH_CHECK(f.numel() == 1, "run_checks: found_inf must hold one value");
    scaler_inf = f.scalar_type() == at::kFloat ? *f.data_ptr<float>() > 0 : *f.data_ptr<double>() > 0;
  }

  auto col = [&](int64_t i, int c) { return s[i * C + c]; };
  auto fcol = [&](int64_t i, int c) {
    const int64_t bits = s[i * C + c];
    double x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
  };
  auto flag = [&](int64_t i, int64_t f) { return (rint[i * 3] & f) != 0; };
  auto pgrad = [&](int64_t j) { return pint[j * 2]; };
  bool others_learn = false;  // some trainable parameter has a gradient
  for (int64_t j = 0; j < P; ++j) others_learn = others_learn || ((pint[j * 2 + 1] & kTrainable) && pgrad(j) < R);

  // Per row: what several checks read. `grad_sumsq`: a gradient row's sum of
  // squares, 0 for other rows (checks.py::_grad_sumsq), a tensor for torch's sum.
  std::vector<uint8_t> ok(R), grad_ok(R), grad_bad(R);
  std::vector<int64_t> nonfinite(R), finite(R);
  std::vector<double> ms(R), sumsq(R);
  const at::Tensor grad_sumsq_t = at::empty({R}, at::kDouble);
  double* grad_sumsq = grad_sumsq_t.data_ptr<double>();
  bool any_grad_bad = false;
  for (int64_t i = 0; i < R; ++i) {
    nonfinite[i] = col(i, kNan) + col(i, kPosInf) + col(i, kNegInf);
    finite[i] = col(i, kNumel) - nonfinite[i];
    ok[i] = nonfinite[i] == 0;
    grad_ok[i] = flag(i, kGrad) && ok[i];
    grad_bad[i] = flag(i, kGrad) && !ok[i];
    any_grad_bad = any_grad_bad || grad_bad[i];
    sumsq[i] = fcol(i, kSumSq);
    grad_sumsq[i] = flag(i, kGrad) ? sumsq[i] : 0.0;
    ms[i] = sumsq[i] / static_cast<double>(std::max<int64_t>(finite[i], 1));
  }
  const bool clean = !any_grad_bad;
  // The total norm given, or made by torch's own sum (its order, its rounding),
  // as checks.py::total_grad_norm makes it.
  const at::Tensor total_t = total_opt.has_value() ? *total_opt : at::sqrt(at::sum(grad_sumsq_t));
  TORCH_CHECK(total_t.scalar_type() == at::kDouble && total_t.numel() == 1, "run_checks: bad total norm");
  const double total = *total_t.data_ptr<double>();
  Signals out;

  // -- nonfinite: gradients (unless the scaler found inf), parameters, state.
  {
    std::vector<uint8_t> g(R), p(R), st(R);
    double vg = 0, vp = 0, vs = 0;
    for (int64_t i = 0; i < R; ++i) {
      const double n = static_cast<double>(nonfinite[i]);
      g[i] = grad_bad[i] && !scaler_inf;
      p[i] = !ok[i] && flag(i, kParam);
      st[i] = !ok[i] && flag(i, kState);
      vg += g[i] ? n : 0.0;
      vp += p[i] ? n : 0.0;
      vs += st[i] ? n : 0.0;
    }
    out.add(g, vg);
    out.add(p, vp);
    out.add(st, vs);
  }

  // -- exploding: limits on the total and per-parameter norms, and spikes.
  int64_t count = *count_t.data_ptr<int64_t>();
  double mean = *mean_t.data_ptr<double>(), var = *var_t.data_ptr<double>();
  bool exploded;
  {
    std::vector<uint8_t> big(R);
    double top = R ? -kInf : 0.0;  // the largest gradient sum of squares (0 with no row)
    for (int64_t i = 0; i < R; ++i) {
      big[i] = grad_ok[i] && sumsq[i] > th[kMaxParamNorm2];
      top = nan_max(top, grad_sumsq[i]);
    }
    // log and exp by torch's own kernels (vectorised ones, e.g. SLEEF's, may
    // differ from std::log/std::exp in the last bit): the reference's values exactly.
    const double x = *at::log(total_t).data_ptr<double>();
    const double dx = x - mean;
    const bool warm = count >= warmup;
    const double margin = clamp_min(std::sqrt(clamp_min(var, 0.0)) * th[kSpikeZscore], th[kLogSpikeFactor]);
    const bool spike = warm && clean && dx > margin;
    const double ratio = warm ? *at::exp(at::scalar_tensor(dx, at::kDouble)).data_ptr<double>() : 0.0;
    const bool learn = std::fabs(x) < kInf && clean && !spike && !scaler_inf;
    count += learn;
    const double alpha = clamp_min(1.0 / static_cast<double>(std::max<int64_t>(count, 1)), th[kMinAlpha]);
    const double delta = learn ? dx : 0.0;
    mean = mean + alpha * delta;
    var = learn ? (1 - alpha) * (var + alpha * delta * delta) : var;
    const bool over = clean && total > th[kMaxNorm];
    out.add({over}, total);
    out.add(big, std::sqrt(top));
    out.add({spike}, ratio);
    exploded = over || spike;
  }

  // -- structural: gradients zero by construction (the status of each parameter).
  std::vector<int64_t> status(P);
  std::vector<uint8_t> excluded(R), newly_structural(P);
  double structural_value;
  {
    std::vector<double> msg(R), mod_ref(num_modules, 0.0);
    for (int64_t i = 0; i < R; ++i) {
      msg[i] = grad_ok[i] ? ms[i] : 0.0;
      double& r = mod_ref[rint[i * 3 + 2]];
      r = nan_max(r, msg[i]);
    }
    std::vector<uint8_t> quiet_rows(R);
    double top2 = 0.0;
    for (int64_t i = 0; i < R; ++i) {
      const double ref = mod_ref[rint[i * 3 + 2]];
      const bool cand = flag(i, kCandidate);
      const double bound2 = cand ? th[kStructuralRms2] : clamp_max(rflt[i * 3 + 1], th[kStructuralRms2]);
      quiet_rows[i] = grad_ok[i] && ref > 0 && msg[i] <= bound2 * ref && (cand || msg[i] > 0);
      top2 = nan_max(top2, quiet_rows[i] ? msg[i] / clamp_min(ref, kTiny) : 0.0);
    }
    const int64_t* old = structural_old.data_ptr<int64_t>();
    for (int64_t j = 0; j < P; ++j) {
      const int64_t r = pgrad(j);
      const bool quiet = r < R && quiet_rows[r], seen = r < R && grad_ok[r];
      const bool was = old[j] == kStructural;
      const bool first = (old[j] == kUndecided || old[j] == kUnreached) && seen && (pint[j * 2 + 1] & kTrainable);
      const bool keep = was && (quiet || !seen);
      status[j] = first || was ? ((first && quiet) || keep ? kStructural : kLearns) : old[j];
      newly_structural[j] = first && quiet;
    }
    for (int64_t i = 0; i < R; ++i) excluded[i] = status[rint[i * 3 + 1]] == kStructural && flag(i, kGrad);
    structural_value = std::sqrt(top2);
  }

  // -- vanishing: a tiny total norm, a tiny RMS next to the largest, mostly zeros.
  {
    std::vector<uint8_t> g(R), small(R), sparse(R);
    std::vector<double> frac(R);
    bool any_g = false;
    double top = -kInf;
    for (int64_t i = 0; i < R; ++i) {
      g[i] = grad_ok[i] && !excluded[i];
      any_g = any_g || g[i];
      top = nan_max(top, g[i] ? ms[i] : -kInf);
    }
    double rel_min = kInf, zeros_max = -kInf;
    for (int64_t i = 0; i < R; ++i) {
      const double rel2 = ms[i] / clamp_min(top, kTiny);
      small[i] = g[i] && rel2 < th[kLimit2] && top > 0 && !exploded;
      frac[i] = static_cast<double>(col(i, kZero) + col(i, kSubnormal)) /
                static_cast<double>(std::max<int64_t>(col(i, kNumel), 1));
      sparse[i] = g[i] && flag(i, kDense) && frac[i] > th[kMaxZeroFraction];
      rel_min = nan_min(rel_min, small[i] ? rel2 : kInf);
      zeros_max = nan_max(zeros_max, sparse[i] ? frac[i] : -kInf);
    }
    const bool low = any_g && clean && total < th[kMinNorm];
    out.add({low}, total);
    out.add(small, R ? std::sqrt(rel_min) : kInf);
    out.add(sparse, zeros_max);
  }
  out.add(newly_structural, structural_value, /*info=*/true);

  // -- headroom (float16/bfloat16/float8): near overflow, on course to it, underflow.
  std::vector<double> peak(peak_old.data_ptr<double>(), peak_old.data_ptr<double>() + P);
  {
    std::vector<uint8_t> near(R), course(R), under(R);
    double use_max = -kInf, soonest = kInf, sub_max = -kInf;
    bool any_lowp = false;
    std::vector<double> use(R);
    for (int64_t i = 0; i < R; ++i) {
      if (!flag(i, kLowp)) continue;
      any_lowp = true;
      const double tiny = rflt[i * 3 + 2];
      use[i] = fcol(i, kAbsMax) / rflt[i * 3];
      near[i] = use[i] >= th[kHeadroom] && ok[i];
      const double subn = static_cast<double>(col(i, kSubnormal));
      const double sub = subn / static_cast<double>(std::max<int64_t>(finite[i] - col(i, kZero), 1));
      under[i] = sub > th[kMaxSubnormalFraction] && sumsq[i] < subn * tiny * tiny;
      const double prev = peak[rint[i * 3 + 1]];
      const double growth = use[i] - prev;
      const double left = growth > 0 ? (1 - use[i]) / clamp_min(growth, kTiny) : kInf;
      course[i] = flag(i, kParam) && ok[i] && !near[i] && prev > 0 && use[i] >= 0x1p-6 &&
                  left <= th[kOverflowHorizon];
      use_max = nan_max(use_max, use[i]);
      sub_max = nan_max(sub_max, sub);
      soonest = nan_min(soonest, course[i] ? left : kInf);
    }
    // The peaks are read above (the previous check's), then replaced here: a
    // parameter's peak is its parameter row's use (0 unless low precision and
    // finite); without a low-precision row, every peak is 0.
    if (!any_lowp) std::fill(peak.begin(), peak.end(), 0.0);
    for (int64_t i = 0; any_lowp && i < R; ++i) {
      if (flag(i, kParam)) peak[rint[i * 3 + 1]] = flag(i, kLowp) && ok[i] ? use[i] : 0.0;
    }
    out.add(near, use_max);
    out.add(course, soonest);
    out.add(under, sub_max);
  }

  // -- dead: no gradient (None or all zero) for dead_after checks; unreached parameters.
  std::vector<int64_t> counts(P);
  {
    const int64_t* dead = dead_old.data_ptr<int64_t>();
    std::vector<uint8_t> mask(P), newly(P);
    int64_t top = 0;
    for (int64_t j = 0; j < P; ++j) {
      const int64_t r = pgrad(j);
      const bool now = r >= R || col(r, kZero) == col(r, kNumel);
      const int64_t pf = pint[j * 2 + 1];
      int64_t c = now && (pf & kTrainable) ? dead[j] + 1 : 0;
      newly[j] = status[j] == kUndecided && (pf & kMissing) && c >= dead_after && others_learn;
      if (newly[j]) status[j] = kUnreached;
      if (status[j] == kStructural || status[j] == kUnreached) c = 0;
      counts[j] = c;
      mask[j] = c >= dead_after;
      top = j == 0 ? c : std::max(top, c);
    }
    out.add(mask, static_cast<double>(top));
    out.add(newly, static_cast<double>(dead_after), /*info=*/true);
  }

  auto bools = [](const std::vector<uint8_t>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kBool);
    std::copy(v.begin(), v.end(), t.data_ptr<bool>());
    return t;
  };
  auto doubles = [](const std::vector<double>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kDouble);
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t;
  };
  auto longs = [](const std::vector<int64_t>& v) {
    at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  return {bools(out.fired), doubles(out.value), bools(out.masks),
          at::scalar_tensor(count, at::kLong), at::scalar_tensor(mean, at::kDouble),
          at::scalar_tensor(var, at::kDouble), longs(counts), longs(status), doubles(peak)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchhealth, CPU, m) { m.impl("run_checks", &run_checks_cpu); }

}  // namespace torchhealth
