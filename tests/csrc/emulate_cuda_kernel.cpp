// Test harness: the CUDA kernel's per-thread code (csrc/step_kernel_body.h) run on
// the CPU, one emulated thread after another, behind the same argument handling as
// the real operators (csrc/step_host.h). Built by tests/csrc/test_cuda_kernel_emulated.py.
#include <torch/python.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "step_host.h"
#include "step_kernel_body.h"
#include "step_plans.h"

namespace {

// Whether two launches' parameters describe the same launch: every field equal, but
// the dtype of a tensor the launch does not have (never read) may differ.
bool same_launch(const fastflow::StepParams& a, const fastflow::StepParams& b) {
  for (int j = 0; j < fastflow::kMaxHistory; ++j) {
    if (a.history[j] != b.history[j]) return false;
    if (j < a.num_history && a.history_dtype[j] != b.history_dtype[j]) return false;
  }
  const auto same_dtype = [](const void* tensor, int da, int db) { return tensor == nullptr || da == db; };
  return a.z == b.z && a.out == b.out && a.model_out == b.model_out && a.model_out_uncond == b.model_out_uncond &&
         a.noise == b.noise && a.x_out == b.x_out && a.model_in_out == b.model_in_out && a.seeds == b.seeds &&
         a.table == b.table && a.step_ptr == b.step_ptr && a.step == b.step && a.table_rows == b.table_rows &&
         a.batch == b.batch && a.numel == b.numel && a.clip == b.clip && a.z_dtype == b.z_dtype &&
         a.model_out_dtype == b.model_out_dtype && same_dtype(a.model_out_uncond, a.uncond_dtype, b.uncond_dtype) &&
         same_dtype(a.noise, a.noise_dtype, b.noise_dtype) && same_dtype(a.x_out, a.x_out_dtype, b.x_out_dtype) &&
         same_dtype(a.model_in_out, a.model_in_dtype, b.model_in_dtype) && a.table_dtype == b.table_dtype &&
         a.step_is_int32 == b.step_is_int32 && a.num_history == b.num_history && a.use_noise == b.use_noise &&
         a.has_clip == b.has_clip && a.model_in_double == b.model_in_double && a.vectorized == b.vectorized;
}

// As fused_step_kernel: the kernel's copy of the parameters with the launcher's
// invariants and the plan's values pinned, then every emulated thread of the grid
// (see fused_step_emulated). A plan the launcher picks must not change the launch:
// checked here on every emulated launch.
template <typename T, bool kDraw, typename Plan = fastflow::GenericPlan>
void run_grid(fastflow::StepParams p, int64_t threads, int64_t rows) {
  fastflow::pin_launch_invariants<T, kDraw>(p);
  const fastflow::StepParams before = p;
  Plan::pin(p);
  TORCH_CHECK(same_launch(before, p), "a plan changed the parameters of a launch it matched");
  const int64_t items_per_sample = fastflow::items_per_sample<T, kDraw, Plan>(p);
  int64_t x_stride = threads > 0 ? std::min(threads, items_per_sample) : items_per_sample;
  int64_t y_stride = rows > 0 ? std::min(rows, p.batch) : p.batch;
  if (threads < 0) {  // the launcher's grid
    const fastflow::StepGrid g = fastflow::step_grid<T, kDraw, Plan>(p);
    x_stride = g.threads * g.blocks_x;
    y_stride = g.rows;
  }
  for (int64_t y = 0; y < y_stride; ++y) {
    // Threads past the sample's last item return at once on the device; they are not emulated.
    for (int64_t t = 0; t < std::min(x_stride, items_per_sample); ++t) {
      fastflow::fused_step_items<T, kDraw, Plan>(p, items_per_sample, y, y_stride, t, x_stride);
    }
  }
}

// Instantiation <T, kDraw> in the plan the launcher picks for the launch (step_plans.h).
template <typename T, bool kDraw>
void run_launch(const fastflow::StepParams& p, int64_t threads, int64_t rows) {
  fastflow::with_launch_plan<T, kDraw>(p, [&](auto plan) { run_grid<T, kDraw, decltype(plan)>(p, threads, rows); });
}

// `threads`: emulated threads along a sample's items (0: one per item, -1: the
// launcher's grid, step_grid, rows then ignored); `rows`: emulated grid rows along the
// batch (<= 0: one per sample), as the launcher's 2-D grid.
void fused_step_emulated(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                         const std::optional<at::Tensor>& model_out_uncond, const std::vector<at::Tensor>& history,
                         const at::Tensor& table, int64_t step, const std::optional<at::Tensor>& step_tensor,
                         const std::optional<at::Tensor>& seeds, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& x_out, const std::optional<at::Tensor>& model_in_out,
                         std::optional<double> clip, bool use_noise, int64_t threads, int64_t rows) {
  fastflow::PreparedStep s = fastflow::prepare_step(z, out, model_out, model_out_uncond, history, table, step,
                                                    step_tensor, seeds, noise, x_out, model_in_out, clip, use_noise);
  if (s.empty) return;
  // The same instantiation choice as the launcher in csrc/step_kernel.cu, each with its own item width.
  if (s.compute_double) {
    run_launch<double, true>(s.p, threads, rows);
  } else if (fastflow::draws_noise(s.p)) {
    run_launch<float, true>(s.p, threads, rows);
  } else {
    run_launch<float, false>(s.p, threads, rows);
  }
  s.finish();
}

const char* const kDtypeNames[] = {"float32", "float16", "bfloat16", "float64"};

std::string plan_name(fastflow::GenericPlan) { return "generic"; }
std::string plan_name(fastflow::AlignedPlan) { return "aligned"; }
template <int kZ, int kModelOut, int kXOut, bool kModelIn, bool kNoClip, bool kGuided>
std::string plan_name(fastflow::DrawPlan<kZ, kModelOut, kXOut, kModelIn, kNoClip, kGuided>) {
  return std::string("draw ") + kDtypeNames[kZ] + " " + kDtypeNames[kModelOut] +
         (kXOut == fastflow::kNoTensor ? "" : std::string(" x_out ") + kDtypeNames[kXOut]) +
         (kModelIn ? " model_in" : "") + (kNoClip ? " no_clip" : "") + (kGuided ? " guided" : "");
}
template <int kZ, int kModelOut, int kXOut>
std::string plan_name(fastflow::DtypePlan<kZ, kModelOut, kXOut>) {
  return std::string("dtypes ") + kDtypeNames[kZ] + " " + kDtypeNames[kModelOut] + " x_out " + kDtypeNames[kXOut];
}

// The plan the float kernel runs for a launch of these arguments, as the launcher picks
// it: "generic", "draw <state> <model output>[ x_out <dtype>][ model_in]" or "aligned"
// (drawing noise) or "dtypes <state> <model output> x_out <dtype>" (not drawing).
std::string launch_plan(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out,
                        const std::optional<at::Tensor>& model_out_uncond, const std::vector<at::Tensor>& history,
                        const at::Tensor& table, const std::optional<at::Tensor>& seeds,
                        const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& x_out,
                        const std::optional<at::Tensor>& model_in_out, std::optional<double> clip, bool use_noise) {
  fastflow::PreparedStep s = fastflow::prepare_step(z, out, model_out, model_out_uncond, history, table, 0,
                                                    std::nullopt, seeds, noise, x_out, model_in_out, clip, use_noise);
  TORCH_CHECK(!s.compute_double, "a float64 launch has no plans");
  std::string name;
  const auto describe = [&](auto plan) { name = plan_name(plan); };
  if (fastflow::draws_noise(s.p)) {
    fastflow::with_launch_plan<float, true>(s.p, describe);
  } else {
    fastflow::with_launch_plan<float, false>(s.p, describe);
  }
  return name;
}

template <typename... Plans>
std::vector<std::string> plan_names(fastflow::PlanList<Plans...>) {
  return {plan_name(Plans{})...};
}

// Every plan of the drawing or the deterministic float kernel, in the launcher's order.
std::vector<std::string> plans(bool draw) {
  if (draw) return plan_names(fastflow::PlansOf<float, true>::type{});
  return plan_names(fastflow::PlansOf<float, false>::type{});
}

// The launcher's grid (threads, blocks along x, rows) for `batch` samples of `numel`
// elements, for the deterministic (draw false) or the drawing float kernel, the latter
// in items of `width` (4: GenericPlan's, 8: AlignedPlan's and most DrawPlans').
std::tuple<int64_t, int64_t, int64_t> launch_grid(int64_t numel, int64_t batch, bool draw, int64_t width) {
  fastflow::StepParams p;
  p.numel = numel;
  p.batch = batch;
  TORCH_CHECK(width == 4 || width == 8, "the drawing kernel's items are 4 or 8 wide");
  fastflow::StepGrid g;
  if (!draw) {
    g = fastflow::step_grid<float, false, fastflow::GenericPlan>(p);
  } else if (width == 4) {
    g = fastflow::step_grid<float, true, fastflow::GenericPlan>(p);
  } else {
    g = fastflow::step_grid<float, true, fastflow::AlignedPlan>(p);
  }
  return {g.threads, g.blocks_x, g.rows};
}

bool vectorized(const at::Tensor& z, const at::Tensor& out, const at::Tensor& model_out) {
  return fastflow::prepare_step(z, out, model_out, std::nullopt, {}, at::zeros({1, fastflow::kNumCoefs}), 0,
                                std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt, std::nullopt,
                                false)
             .p.vectorized != 0;
}

// The GPU kernels' float32 normal transform (fastflow_step.h) run on the host, for
// words [N, 4] (int64 holding uint32): float32 normals [N, 4].
at::Tensor normals_f32(const at::Tensor& words) {
  TORCH_CHECK(words.scalar_type() == at::kLong && words.dim() == 2 && words.size(1) == 4, "words must be int64 [N, 4]");
  const at::Tensor w = words.contiguous();
  at::Tensor out = at::empty({w.size(0), 4}, w.options().dtype(at::kFloat));
  const int64_t* src = w.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < w.size(0); ++i) {
    fastflow::Words4 x;
    for (int j = 0; j < 4; ++j) x.x[j] = static_cast<uint32_t>(src[4 * i + j]);
    fastflow::words_to_normals_f32(x, dst + 4 * i);
  }
  return out;
}

// log_uniform_f32 (fastflow_step.h) on the host for float32 uniforms u.
at::Tensor log_uniform_f32(const at::Tensor& u) {
  TORCH_CHECK(u.scalar_type() == at::kFloat, "u must be float32");
  const at::Tensor x = u.contiguous();
  at::Tensor out = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) dst[i] = fastflow::log_uniform_f32(src[i]);
  return out;
}

// cos_sin_pi (fastflow_step.h) on the host for float32 angles v: (cos(pi v), sin(pi v)).
std::tuple<at::Tensor, at::Tensor> cos_sin_pi(const at::Tensor& v) {
  TORCH_CHECK(v.scalar_type() == at::kFloat, "v must be float32");
  const at::Tensor x = v.contiguous();
  at::Tensor c = at::empty_like(x);
  at::Tensor s = at::empty_like(x);
  const float* src = x.data_ptr<float>();
  float* cd = c.data_ptr<float>();
  float* sd = s.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) fastflow::cos_sin_pi(src[i], cd[i], sd[i]);
  return {c, s};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_step", &fused_step_emulated);
  m.def("vectorized", &vectorized);
  m.def("step_grid", &launch_grid, pybind11::arg("numel"), pybind11::arg("batch"), pybind11::arg("draw"),
        pybind11::arg("width") = 4);
  m.def("launch_plan", &launch_plan);
  m.def("plans", &plans);
  m.def("normals_f32", &normals_f32);
  m.def("cos_sin_pi", &cos_sin_pi);
  m.def("log_uniform_f32", &log_uniform_f32);
}
