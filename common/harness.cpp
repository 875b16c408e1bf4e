#include "common/harness.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "common/numeric.hpp"
#include "common/progress.hpp"
#include "common/timer.hpp"
#include "common/validate.hpp"
#ifdef ATTN_HAVE_CUDA
#include "common/cuda_utils.hpp"
#include "common/sm_clock.hpp"
#endif

namespace attn {

ProblemData make_problem_data(const AttentionProblem& problem, DType dtype, Layout layout, std::uint64_t seed,
                              float q_stddev) {
  validate_problem(problem);
  // The host copies made here, and about as much again for a run's outputs: refuse early rather than be killed.
  const double input_bytes = static_cast<double>(problem_data_bytes(problem));
  const double available = static_cast<double>(available_bytes(Tier::cpu));
  if (2.0 * input_bytes > 0.9 * available)
    throw ProblemTooLarge(problem.describe() + ": the fp32 host copies of its inputs and outputs need " +
                          format_bytes(2.0 * input_bytes) + "; " + format_bytes(available) + " available");
  progress::begin("generating inputs");
  ProblemData data;
  data.problem = problem;
  data.dtype = dtype;
  data.layout = layout;
  data.q = HostBuffer<float>(problem.q_elements());
  data.k = HostBuffer<float>(problem.kv_elements());
  data.v = HostBuffer<float>(problem.kv_elements());
  data.d_o = HostBuffer<float>(problem.q_elements());
  fill_normal(data.q.span(), seed * 4 + 0, q_stddev);
  fill_normal(data.k.span(), seed * 4 + 1);
  fill_normal(data.v.span(), seed * 4 + 2);
  fill_normal(data.d_o.span(), seed * 4 + 3);
  for (HostBuffer<float>* tensor : {&data.q, &data.k, &data.v, &data.d_o}) round_to_dtype(tensor->span(), dtype);
  return data;
}

std::size_t problem_data_bytes(const AttentionProblem& p) {
  return sizeof(float) * static_cast<std::size_t>(2 * p.q_elements() + 2 * p.kv_elements());
}

std::int64_t StageRun::nonfinite_values() const {
  std::int64_t count = 0;
  for (const HostBuffer<float>* tensor : {&o, &dq, &dk, &dv})
    for (float x : *tensor) count += std::isfinite(x) ? 0 : 1;
  for (float x : lse) count += std::isnan(x) || x == std::numeric_limits<float>::infinity() ? 1 : 0;
  return count;
}

std::size_t available_bytes(Tier tier) {
  if (tier == Tier::cpu) {
    const long pages = sysconf(_SC_AVPHYS_PAGES);
    const long page_size = sysconf(_SC_PAGESIZE);
    return pages > 0 && page_size > 0 ? static_cast<std::size_t>(pages) * static_cast<std::size_t>(page_size) : 0;
  }
#ifdef ATTN_HAVE_CUDA
  std::size_t free_bytes = 0, total_bytes = 0;
  if (cuda::device_available()) {
    cuda::release_cached();
    ATTN_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  }
  return free_bytes;
#else
  return 0;
#endif
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int unit = 0;
  while (bytes >= 1000.0 && unit < 4) {
    bytes /= 1000.0;
    ++unit;
  }
  char text[32];
  std::snprintf(text, sizeof text, unit == 0 ? "%.0f %s" : "%.3g %s", bytes, units[unit]);
  return text;
}

namespace {

const float kPoison = std::numeric_limits<float>::quiet_NaN();

// The bytes a run needs on the tier's memory: inputs and outputs in the tier's dtype, plus the stage's own
// scratch estimate for these options. (The CPU tier's inputs are the ProblemData itself, already allocated.)
void check_fits(const Stage& stage, const TierEntry& entry, const AttentionProblem& p, DType dtype, bool backward,
                const StageOptions& options) {
  const double outputs = static_cast<double>(dtype_size(dtype)) *
                             (1.0 * p.q_elements() + (backward ? 1.0 * p.q_elements() + 2.0 * p.kv_elements() : 0.0)) +
                         4.0 * p.lse_elements();
  const double inputs = static_cast<double>(dtype_size(dtype)) *
                        (1.0 * p.q_elements() + 2.0 * p.kv_elements() + (backward ? 1.0 * p.q_elements() : 0.0));
  const double tensors = outputs + (entry.tier == Tier::gpu ? inputs : 0.0);
  const double scratch = entry.extra_bytes ? static_cast<double>(entry.extra_bytes(p, dtype, backward, options)) : 0.0;
  const double available = static_cast<double>(available_bytes(entry.tier));
  if (tensors + scratch > 0.9 * available)
    throw ProblemTooLarge(stage.name + "/" + tier_name(entry.tier) + ": " + p.describe() + " needs " +
                          format_bytes(scratch) + " of extra memory plus " + format_bytes(tensors) + " for " +
                          (entry.tier == Tier::gpu ? "inputs and outputs; " : "outputs; ") + format_bytes(available) +
                          " available");
}

}  // namespace

std::size_t run_host_bytes(const TierEntry& entry, const AttentionProblem& p, DType dtype, bool backward,
                           const StageOptions& options) {
  const double outputs = sizeof(float) * (1.0 * p.q_elements() + 1.0 * p.lse_elements() +
                                          (backward ? 1.0 * p.q_elements() + 2.0 * p.kv_elements() : 0.0));
  double scratch = 0.0;
  if (entry.tier == Tier::cpu && entry.extra_bytes)
    scratch = static_cast<double>(entry.extra_bytes(p, DType::f32, backward, options));
  else if (entry.tier == Tier::gpu)
    scratch = static_cast<double>(dtype_size(dtype)) * static_cast<double>(std::max(p.q_elements(), p.kv_elements()));  // staging
  const double total = outputs + scratch;
  return total >= 1.8e19 ? std::numeric_limits<std::size_t>::max() : static_cast<std::size_t>(total);
}

void check_can_run(const Stage& stage, Tier tier, const AttentionProblem& problem, DType dtype, bool backward,
                   const StageOptions& options) {
  const std::string who = stage.name + "/" + tier_name(tier);
  const TierEntry* entry = stage.find(tier);
  if (entry == nullptr && tier == Tier::gpu) {
#ifdef ATTN_HAVE_CUDA
    throw std::invalid_argument("tier: " + stage.name + " has no gpu tier");
#else
    throw std::invalid_argument("tier: gpu needs a CUDA device: no CUDA device in this build (the CUDA toolkit was "
                                "not found at configure time, so the GPU tier was not built)");
#endif
  }
  if (entry == nullptr) throw std::invalid_argument("tier: " + stage.name + " has no " + tier_name(tier) + " tier");
  const DType compute = tier == Tier::cpu ? DType::f32 : dtype;
  validate_problem_for(problem, compute, entry->caps, who);
  if (backward && !entry->backward) throw std::invalid_argument("backward: " + who + " has no backward pass");
  check_option_names(*entry, options, who);
#ifdef ATTN_HAVE_CUDA
  if (tier == Tier::gpu && !cuda::device_available())
    throw std::invalid_argument("tier: gpu needs a CUDA device: no CUDA device on this machine");
#endif
  check_fits(stage, *entry, problem, compute, backward, options);
}

// The tier-specific half of PreparedRun: where the tensors live and how a pass is timed.
class PreparedRun::Impl {
 public:
  virtual ~Impl() = default;
  virtual double run(const PassFn& pass, bool backward_pass, StageOptions& options, std::size_t& extra) = 0;
  virtual StageRun outputs() const = 0;
  virtual StageRun take_outputs() { return outputs(); }
};

namespace {

class CpuRun final : public PreparedRun::Impl {
 public:
  CpuRun(const ProblemData& data, bool backward) : p_(data.problem) {
    o_ = HostBuffer<float>(p_.q_elements());
    lse_ = HostBuffer<float>(p_.lse_elements());
    t_.dtype = DType::f32;
    t_.q_strides = data.q_strides();
    t_.kv_strides = data.kv_strides();
    t_.q = data.q.data();
    t_.k = data.k.data();
    t_.v = data.v.data();
    t_.o = o_.data();
    t_.lse = lse_.data();
    if (backward) {
      dq_ = HostBuffer<float>(p_.q_elements());
      dk_ = HostBuffer<float>(p_.kv_elements());
      dv_ = HostBuffer<float>(p_.kv_elements());
      t_.d_o = data.d_o.data();
      t_.dq = dq_.data();
      t_.dk = dk_.data();
      t_.dv = dv_.data();
    }
  }

  double run(const PassFn& pass, bool backward_pass, StageOptions& options, std::size_t& extra) override {
    if (backward_pass) {
      dq_.fill(kPoison);
      dk_.fill(kPoison);
      dv_.fill(kPoison);
    } else {
      o_.fill(kPoison);
      lse_.fill(kPoison);
    }
    memory::PeakScope scope(memory::Space::host);
    CpuTimer timer;
    timer.start();
    pass(p_, t_, options);
    const double ms = timer.stop_ms();
    extra = std::max(extra, scope.extra_bytes());
    return ms;
  }

  StageRun take_outputs() override {
    StageRun run;
    run.o = std::move(o_);
    run.lse = std::move(lse_);
    run.dq = std::move(dq_);
    run.dk = std::move(dk_);
    run.dv = std::move(dv_);
    return run;
  }

  StageRun outputs() const override {
    StageRun run;
    run.o = copy(o_);
    run.lse = copy(lse_);
    run.dq = copy(dq_);
    run.dk = copy(dk_);
    run.dv = copy(dv_);
    return run;
  }

 private:
  static HostBuffer<float> copy(const HostBuffer<float>& from) {
    HostBuffer<float> to(from.size());
    for (std::size_t i = 0; i < from.size(); ++i) to[i] = from[i];
    return to;
  }
  AttentionProblem p_;
  AttentionTensors t_;
  HostBuffer<float> o_, lse_, dq_, dk_, dv_;
};

#ifdef ATTN_HAVE_CUDA
// A tensor on the device in the run's dtype, uploaded from (or downloaded to) fp32 host values.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(std::size_t n, DType type) : bytes_(n * dtype_size(type)), dtype_(type), count_(n) {}
  void upload(const HostBuffer<float>& host) {
    std::vector<unsigned char> staging(bytes_.size());
    encode(host.span(), dtype_, staging.data());
    ATTN_CUDA_CHECK(cudaMemcpy(bytes_.data(), staging.data(), bytes_.size(), cudaMemcpyHostToDevice));
  }
  HostBuffer<float> download() const {
    std::vector<unsigned char> staging(bytes_.size());
    if (count_ > 0)
      ATTN_CUDA_CHECK(cudaMemcpy(staging.data(), bytes_.data(), bytes_.size(), cudaMemcpyDeviceToHost));
    HostBuffer<float> host(count_);
    decode(staging.data(), dtype_, host.span());
    return host;
  }
  // All-ones bytes are NaN in f32, bf16 and f16 alike.
  void poison() { ATTN_CUDA_CHECK(cudaMemset(bytes_.data(), 0xff, bytes_.size())); }
  void* data() { return bytes_.data(); }

 private:
  DeviceBuffer<unsigned char> bytes_;
  DType dtype_ = DType::f32;
  std::size_t count_ = 0;
};

class GpuRun final : public PreparedRun::Impl {
 public:
  GpuRun(const ProblemData& data, bool backward) : p_(data.problem) {
    const DType dtype = data.dtype;
    q_ = DeviceTensor(p_.q_elements(), dtype);
    k_ = DeviceTensor(p_.kv_elements(), dtype);
    v_ = DeviceTensor(p_.kv_elements(), dtype);
    o_ = DeviceTensor(p_.q_elements(), dtype);
    lse_ = DeviceTensor(p_.lse_elements(), DType::f32);
    q_.upload(data.q);
    k_.upload(data.k);
    v_.upload(data.v);
    t_.dtype = dtype;
    t_.q_strides = data.q_strides();
    t_.kv_strides = data.kv_strides();
    t_.q = q_.data();
    t_.k = k_.data();
    t_.v = v_.data();
    t_.o = o_.data();
    t_.lse = static_cast<float*>(lse_.data());
    if (backward) {
      d_o_ = DeviceTensor(p_.q_elements(), dtype);
      dq_ = DeviceTensor(p_.q_elements(), dtype);
      dk_ = DeviceTensor(p_.kv_elements(), dtype);
      dv_ = DeviceTensor(p_.kv_elements(), dtype);
      d_o_.upload(data.d_o);
      t_.d_o = d_o_.data();
      t_.dq = dq_.data();
      t_.dk = dk_.data();
      t_.dv = dv_.data();
    }
  }

  double run(const PassFn& pass, bool backward_pass, StageOptions& options, std::size_t& extra) override {
    if (backward_pass) {
      dq_.poison();
      dk_.poison();
      dv_.poison();
    } else {
      o_.poison();
      lse_.poison();
    }
    memory::PeakScope scope(memory::Space::device);
    timer_.start();
    pass(p_, t_, options);
    ATTN_CUDA_CHECK_LAUNCH();
    const double ms = timer_.stop_ms();
    ATTN_CUDA_CHECK(cudaDeviceSynchronize());  // an asynchronous fault surfaces here, right after its pass
    extra = std::max(extra, scope.extra_bytes());
    return ms;
  }

  StageRun outputs() const override {
    StageRun run;
    run.o = o_.download();
    run.lse = lse_.download();
    run.dq = dq_.download();
    run.dk = dk_.download();
    run.dv = dv_.download();
    return run;
  }

 private:
  AttentionProblem p_;
  AttentionTensors t_;
  DeviceTensor q_, k_, v_, o_, lse_, d_o_, dq_, dk_, dv_;
  CudaEventTimer timer_;
};
#endif

}  // namespace

PreparedRun::PreparedRun(const Stage& stage, Tier tier, const ProblemData& data, bool backward, const StageOptions& options) {
  check_can_run(stage, tier, data.problem, data.dtype, backward, options);
  entry_ = stage.find(tier);
  who_ = stage.name + "/" + tier_name(tier);
  if (tier == Tier::cpu) {
    impl_ = std::make_unique<CpuRun>(data, backward);
    return;
  }
#ifdef ATTN_HAVE_CUDA
  impl_ = std::make_unique<GpuRun>(data, backward);
#endif
}

PreparedRun::~PreparedRun() = default;

double PreparedRun::forward(StageOptions& options) {
  check_option_names(*entry_, options, who_);
  return impl_->run(entry_->forward, false, options, forward_extra_);
}

double PreparedRun::backward(StageOptions& options) {
  check_option_names(*entry_, options, who_);
  return impl_->run(entry_->backward, true, options, backward_extra_);
}

StageRun PreparedRun::take_outputs() {
  StageRun run = impl_->take_outputs();
  run.forward_extra_bytes = forward_extra_;
  run.backward_extra_bytes = backward_extra_;
  return run;
}

StageRun PreparedRun::outputs() const {
  StageRun run = impl_->outputs();
  run.forward_extra_bytes = forward_extra_;
  run.backward_extra_bytes = backward_extra_;
  return run;
}

StageRun run_stage(const Stage& stage, Tier tier, const ProblemData& data, const RunSettings& settings) {
  if (settings.repeats < 1 || settings.warmup < 0) throw std::invalid_argument("repeats: must be >= 1 (warmup >= 0)");
  PreparedRun prepared(stage, tier, data, settings.backward, settings.options);
  StageOptions options = settings.options;
  std::vector<double> forward_times, backward_times;
  // Each counter a pass reports, over the timed runs: the backward's are kept apart from the forward's (named
  // "backward_" + name), so that a counter both passes report (a planning time, say) shows both.
  std::map<std::string, std::vector<double>> counter_values;
  auto keep_counters = [&](const std::string& prefix) {
    for (const auto& [name, value] : options.counters) counter_values[prefix + name].push_back(value);
    options.counters.clear();
  };
  const std::string who = stage.name + "/" + tier_name(tier);
  // On the GPU, the SM clock right after each timed pass (counters sm_mhz and backward_sm_mhz): the GPU lowers it
  // under its power cap while nvidia-smi still reports the maximum, and a pass's time moves with it.
  auto keep_clock = [&]([[maybe_unused]] const std::string& name) {
#ifdef ATTN_HAVE_CUDA
    if (tier == Tier::gpu) counter_values[name].push_back(cuda::sm_clock_mhz());
#endif
  };
  const int runs = settings.warmup + settings.repeats;
  for (int r = 0; r < runs; ++r) {
    const bool timed = r >= settings.warmup;
    const std::string which = runs > 1 ? " (run " + std::to_string(r + 1) + " of " + std::to_string(runs) + ")" : "";
    options.counters.clear();
    progress::begin(who + " forward" + which);
    const double forward_ms = prepared.forward(options);
    if (timed) {
      keep_counters("");
      keep_clock("sm_mhz");
    }
    options.counters.clear();
    if (settings.backward) progress::begin(who + " backward" + which);
    const double backward_ms = settings.backward ? prepared.backward(options) : 0.0;
    if (!timed) continue;
    keep_counters("backward_");
    if (settings.backward) keep_clock("backward_sm_mhz");
    forward_times.push_back(forward_ms);
    backward_times.push_back(backward_ms);
  }
  progress::begin("");
  StageRun run = prepared.take_outputs();
  run.forward_ms = median(forward_times);
  run.backward_ms = median(backward_times);
  // The median of each, as for the times (a counter that is a time, such as FP8's attention_ms, varies too).
  for (auto& [name, values] : counter_values) run.counters[name] = median(values);
  return run;
}

}  // namespace attn
