// Compile-time plans of the CUDA step kernels: which runtime switches of a launch's
// parameters (StepParams) a kernel instantiation fixes, and the host-side choice of
// the instantiation for a launch. The kernels (step_kernel.cu) pin a plan's values
// into their copy of the parameters, so the compiler drops the paths the plan rules
// out; the CPU emulation of the kernel (tests/csrc/emulate_cuda_kernel.cpp) picks and
// pins plans the same way.
#pragma once

#include "fastflow_step.h"

namespace fastflow {

// Compile-time plans of the float drawing kernel. It is issue-bound: every runtime
// switch of the plan (storage dtypes, guidance, history, outputs, the scalar path)
// costs instructions per item, and on an H100 at 19.4M elements fixing all of them
// took it from 82.0 to 70.8 us, while no group alone saved more than 2.7 us
// (benchmarks/cuda_step_variants.cu); the plans below took a DDPM step from 81.9 to
// 72.1 us there, 91.7 to 85.3 us when it writes the next model input, and 2 % off
// with x_hat written (commit 69179cd's run). A DrawPlan fixes them for the stochastic steps
// that have no history (DDPM, ancestral Euler, DDIM with eta, LCM) in the usual pairs
// of state and model-output dtypes, unguided with or without the x_hat and
// next-model-input outputs, guided without x_hat; every other drawing launch runs
// GenericPlan. The launcher
// (and the CPU emulation of the kernel) runs the first plan of DrawPlans that matches
// the launch's parameters, and a plan's pin only writes the values its matches
// checked (or, for DtypePlan below, dtypes of tensors the launch does not have), so
// a specialized kernel computes exactly what the generic one does.
//
// A plan also sets the drawing kernel's item width (kDrawWidth, elements per work
// item: kItemWidth in step_kernel_body.h), measured per plan: wide items (8) save
// per-item instructions but hold more registers.
struct GenericPlan {
  static constexpr int kDrawWidth = 4;
  FF_HD static bool matches(const StepParams&) { return true; }
  FF_HD static void pin(StepParams&) {}
};

// Any drawing launch whose tensors are aligned for vector accesses, in items of 8: the
// drawing launches no DrawPlan covers (stored predictions, other dtypes, guidance with
// x_hat). On an H200 an SDE-DPM++ 2M step (one stored prediction, x_hat written) at
// 19.4M elements took 98.2 us in items of 8 against 103.4 in GenericPlan's 4
// (benchmarks/results/h200-2026-11-27-5374fcd/kernel_variants.md, v12 against v11).
struct AlignedPlan {
  static constexpr int kDrawWidth = 8;
  FF_HD static bool matches(const StepParams& p) { return p.vectorized != 0; }
  FF_HD static void pin(StepParams& p) { p.vectorized = 1; }
};

// Tells the device compiler a pointer the plan requires is there (no effect on the host).
FF_HD void assume_present(const void* ptr) {
#if defined(__CUDA_ARCH__)
  __builtin_assume(ptr != nullptr);
#else
  (void)ptr;
#endif
}

// A plan's dtype for an output tensor the launches it covers do not have.
constexpr int kNoTensor = -1;

// State (z, out) of dtype kZ, model output of dtype kModelOut, no history, a float32
// table, 16-byte-aligned tensors; x_hat written in kXOut (or not: kNoTensor); the
// next model input written (kModelIn, in kModelOut) or not; with kNoClip, no
// clipping; with kGuided, a guidance pair (both outputs in kModelOut) whose model
// input, when written, is doubled for the next guided call, else unguided with a
// single model input. The step index's source (and clipping, without kNoClip) stay
// runtime switches. kNoClip plans serve float32 states: on an H200 the variant
// benchmark's "all fixed" kernel, which also fixes clipping and the step index's
// source, ran the float32/bfloat16 DDPM step at 19.4M elements in 63.4 us against
// the plan's 67.2 (67.6 against 72.1 with the next model input; commit b702e8c's
// run), and of those two switches clipping is tested per element, the step index
// read once per thread. With them, the DDPM step of the benchmark suite at 19.4M
// elements went from 1.09x to 1.04x of the Triton kernel's time (64.7 against 62.4
// us, commit 938929b's run on another H200). The b702e8c run timed a guided drawing
// plan (then a candidate in benchmarks/cuda_step_variants.cu, now these kGuided
// plans) at 72.1 us against the generic kernel's 90.4, 82.8 against 104.7 with the
// doubled model input.
template <int kZ, int kModelOut, int kXOut, bool kModelIn, bool kNoClip = false, bool kGuided = false>
struct DrawPlan {
  // Items of 8 without x_hat; with it, 8 made the float32/bfloat16 DDPM step slower (92.7 against 74.8 us).
  static constexpr int kDrawWidth = kXOut == kNoTensor ? 8 : 4;
  FF_HD static bool matches(const StepParams& p) {
    const bool guidance = kGuided ? p.model_out_uncond != nullptr && p.uncond_dtype == kModelOut
                                  : p.model_out_uncond == nullptr;
    return (!kNoClip || p.has_clip == 0) && guidance && p.vectorized != 0 && p.num_history == 0 &&
           p.table_dtype == kFloat32 && p.z_dtype == kZ && p.model_out_dtype == kModelOut &&
           (p.x_out != nullptr) == (kXOut != kNoTensor) && (kXOut == kNoTensor || p.x_out_dtype == kXOut) &&
           (p.model_in_out != nullptr) == kModelIn &&
           (!kModelIn || (p.model_in_dtype == kModelOut && p.model_in_double == (kGuided ? 1 : 0)));
  }
  // The kernel's copy of the parameters gets the values matches checked: the compiler drops the other paths.
  FF_HD static void pin(StepParams& p) {
    if constexpr (kNoClip) p.has_clip = 0;
    p.vectorized = 1;
    if constexpr (kGuided) {
      p.uncond_dtype = kModelOut;
      assume_present(p.model_out_uncond);
    } else {
      p.model_out_uncond = nullptr;
    }
    p.num_history = 0;
    p.table_dtype = kFloat32;
    p.z_dtype = kZ;
    p.model_out_dtype = kModelOut;
    if constexpr (kXOut != kNoTensor) {
      p.x_out_dtype = kXOut;
      assume_present(p.x_out);
    } else {
      p.x_out = nullptr;
    }
    if constexpr (kModelIn) {
      p.model_in_dtype = kModelOut;
      p.model_in_double = kGuided ? 1 : 0;
      assume_present(p.model_in_out);
    } else {
      p.model_in_out = nullptr;
    }
  }
};

template <typename... Plans>
struct PlanList {};

// The four output choices of one dtype pair (x_hat in the state's dtype).
template <int kZ, int kModelOut, bool kNoClip = false>
using DrawPlansOf = PlanList<DrawPlan<kZ, kModelOut, kNoTensor, false, kNoClip>,
                             DrawPlan<kZ, kModelOut, kNoTensor, true, kNoClip>,
                             DrawPlan<kZ, kModelOut, kZ, false, kNoClip>, DrawPlan<kZ, kModelOut, kZ, true, kNoClip>>;
// Guided steps of a float32 state without clipping, x_hat or stored predictions (a guided Sampler loop of
// DDPM, ancestral Euler or DDIM with eta): with and without the doubled model input.
template <int kModelOut>
using GuidedDrawPlansOf = PlanList<DrawPlan<kFloat32, kModelOut, kNoTensor, false, true, true>,
                                   DrawPlan<kFloat32, kModelOut, kNoTensor, true, true, true>>;
// A 16-bit state's x_hat in float32 (the drop-ins of schedulers that upcast a half sample write it so).
template <int kZ>
using FloatXDrawPlansOf = PlanList<DrawPlan<kZ, kZ, kFloat32, false>, DrawPlan<kZ, kZ, kFloat32, true>>;

template <typename... Lists>
struct ConcatPlans;
template <typename List>
struct ConcatPlans<List> {
  using type = List;
};
template <typename... A, typename... B, typename... Rest>
struct ConcatPlans<PlanList<A...>, PlanList<B...>, Rest...> {
  using type = typename ConcatPlans<PlanList<A..., B...>, Rest...>::type;
};

// float32 state with a float32, bfloat16 or float16 model, without clipping first (guided too), then with
// clipping a runtime switch; and all-bfloat16 or all-float16 steps (also with a float32 x_hat), clipping a
// runtime switch; then any other aligned launch (AlignedPlan): 43 kernels.
using DrawPlans = typename ConcatPlans<DrawPlansOf<kFloat32, kFloat32, true>, DrawPlansOf<kFloat32, kBFloat16, true>,
                                       DrawPlansOf<kFloat32, kFloat16, true>, GuidedDrawPlansOf<kFloat32>,
                                       GuidedDrawPlansOf<kBFloat16>, GuidedDrawPlansOf<kFloat16>,
                                       DrawPlansOf<kFloat32, kFloat32>, DrawPlansOf<kFloat32, kBFloat16>,
                                       DrawPlansOf<kFloat32, kFloat16>, DrawPlansOf<kBFloat16, kBFloat16>,
                                       DrawPlansOf<kFloat16, kFloat16>, FloatXDrawPlansOf<kBFloat16>,
                                       FloatXDrawPlansOf<kFloat16>, PlanList<AlignedPlan>>::type;

// Dtype plans of the deterministic kernel. It is memory-bound at large sizes, where
// fixing its switches saved nothing (all of them: 1.6 % slower), but a small step is
// mostly the latency of its first loads, which wait behind the runtime dtype
// switches: on an H100 fixing the dtypes alone took a (1,16,128,128) step from 5.92 to
// 5.31 us, and left 19.4M elements at 68.5 against 68.8 us (82.2 against 82.6 with the
// next model input written; benchmarks/cuda_step_variants.cu, "dtypes fixed", commit
// a3af18e's run; the plan <kFloat32, kBFloat16> compiles to that variant's code). A
// DtypePlan fixes every storage dtype and leaves the options to the launch: state,
// stored predictions and explicit noise in kZ; x_hat in kXOut; model outputs (both of
// a guidance pair) and the next model input in kModelOut; a float32 table.
template <int kZ, int kModelOut, int kXOut = kZ>
struct DtypePlan {
  static constexpr int kDrawWidth = 8;  // never draws: the deterministic kernel's items are 8 wide
  FF_HD static bool matches(const StepParams& p) {
    bool history_in_z = true;
    for (int j = 0; j < p.num_history; ++j) history_in_z = history_in_z && p.history_dtype[j] == kZ;
    return p.table_dtype == kFloat32 && p.z_dtype == kZ && p.model_out_dtype == kModelOut && history_in_z &&
           (p.model_out_uncond == nullptr || p.uncond_dtype == kModelOut) &&
           (p.noise == nullptr || p.noise_dtype == kZ) && (p.x_out == nullptr || p.x_out_dtype == kXOut) &&
           (p.model_in_out == nullptr || p.model_in_dtype == kModelOut);
  }
  // Every dtype, also those of tensors the launch lacks (which it never reads).
  FF_HD static void pin(StepParams& p) {
    p.z_dtype = kZ;
    p.model_out_dtype = kModelOut;
    p.uncond_dtype = kModelOut;
    p.noise_dtype = kZ;
    p.x_out_dtype = kXOut;
    p.model_in_dtype = kModelOut;
    p.table_dtype = kFloat32;
    for (int j = 0; j < kMaxHistory; ++j) p.history_dtype[j] = kZ;
  }
};

// The same dtype pairs as DrawPlans (a 16-bit state's x_hat also in float32): 7 kernels.
using DtypePlans =
    PlanList<DtypePlan<kFloat32, kFloat32>, DtypePlan<kFloat32, kBFloat16>, DtypePlan<kFloat32, kFloat16>,
             DtypePlan<kBFloat16, kBFloat16>, DtypePlan<kFloat16, kFloat16>,
             DtypePlan<kBFloat16, kBFloat16, kFloat32>, DtypePlan<kFloat16, kFloat16, kFloat32>>;

// Calls f(Plan{}) with the first plan of the list that matches p, GenericPlan when none does (host side).
template <typename F>
inline void with_first_plan(const StepParams&, F&& f, PlanList<>) {
  f(GenericPlan{});
}
template <typename F, typename Plan, typename... Rest>
inline void with_first_plan(const StepParams& p, F&& f, PlanList<Plan, Rest...>) {
  if (Plan::matches(p)) {
    f(Plan{});
  } else {
    with_first_plan(p, f, PlanList<Rest...>{});
  }
}

// The plans of kernel instantiation <T, kDraw>: DrawPlans for the float drawing
// kernel, DtypePlans for the float deterministic one, none for double compute.
template <typename T, bool kDraw>
struct PlansOf {
  using type = PlanList<>;
};
template <>
struct PlansOf<float, true> {
  using type = DrawPlans;
};
template <>
struct PlansOf<float, false> {
  using type = DtypePlans;
};

// Calls f(Plan{}) with the plan instantiation <T, kDraw> runs for p (host side): what
// the launcher launches and the CPU emulation emulates.
template <typename T, bool kDraw, typename F>
inline void with_launch_plan(const StepParams& p, F&& f) {
  with_first_plan(p, f, typename PlansOf<T, kDraw>::type{});
}

}  // namespace fastflow
