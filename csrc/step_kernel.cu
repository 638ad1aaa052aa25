// CUDA kernels of fastflow: one pass per step-plan stage, plus the noise and raw
// Philox kernels used for initial noise and tests.
//
// Light includes only (no torch): this file compiles with plain
// `nvcc -arch=sm_90 -c csrc/step_kernel.cu`.
//
// Work item = 8 consecutive elements of one sample (the start is a multiple of 8,
// so it holds whole Philox groups of 4: one Philox call serves 4 elements). When
// every pointer and every sample start is 16-byte aligned, a full item is moved
// with 16-byte loads and stores; the last item of a sample and unaligned tensors
// use scalar accesses. Indexing is int64 throughout. The coefficient row and the
// step index are read on the device, so a launch needs no host-side value and is
// safe to capture in a CUDA graph. Dtypes are launch parameters (warp-uniform
// switches), which keeps one kernel per compute type instead of one per dtype mix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastflow_cuda.h"
#include "fastflow_step.h"

namespace fastflow {
namespace {

constexpr int kVec = 8;
constexpr int kThreads = 256;

__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)));
}
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) { return __uint_as_float((bits & 0xFFFFu) << 16); }
__device__ __forceinline__ uint32_t float_to_half_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ uint32_t float_to_bf16_bits(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <typename T>
__device__ __forceinline__ T load1(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat32:
      return static_cast<T>(static_cast<const float*>(base)[i]);
    case kFloat16:
      return static_cast<T>(half_bits_to_float(static_cast<const unsigned short*>(base)[i]));
    case kBFloat16:
      return static_cast<T>(bf16_bits_to_float(static_cast<const unsigned short*>(base)[i]));
    default:
      return static_cast<T>(static_cast<const double*>(base)[i]);
  }
}

// Rounds once to the storage type (half types from double go through float, as torch's own copy does).
template <typename T>
__device__ __forceinline__ void store1(void* base, int dtype, int64_t i, T v) {
  switch (dtype) {
    case kFloat32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      break;
    case kFloat16:
      static_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(float_to_half_bits(static_cast<float>(v)));
      break;
    case kBFloat16:
      static_cast<unsigned short*>(base)[i] = static_cast<unsigned short>(float_to_bf16_bits(static_cast<float>(v)));
      break;
    default:
      static_cast<double*>(base)[i] = static_cast<double>(v);
      break;
  }
}

// Eight elements from a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void load8(const void* base, int dtype, int64_t off, T v[kVec]) {
  switch (dtype) {
    case kFloat32: {
      const float4* s = reinterpret_cast<const float4*>(static_cast<const float*>(base) + off);
      const float4 a = s[0];
      const float4 b = s[1];
      v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
      v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
      break;
    }
    case kFloat16:
    case kBFloat16: {
      const uint4 r = *reinterpret_cast<const uint4*>(static_cast<const unsigned short*>(base) + off);
      const uint32_t w[4] = {r.x, r.y, r.z, r.w};
      const bool half = dtype == kFloat16;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[2 * j] = static_cast<T>(half ? half_bits_to_float(w[j]) : bf16_bits_to_float(w[j]));
        v[2 * j + 1] = static_cast<T>(half ? half_bits_to_float(w[j] >> 16) : bf16_bits_to_float(w[j] >> 16));
      }
      break;
    }
    default: {
      const double2* s = reinterpret_cast<const double2*>(static_cast<const double*>(base) + off);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const double2 d = s[j];
        v[2 * j] = static_cast<T>(d.x);
        v[2 * j + 1] = static_cast<T>(d.y);
      }
      break;
    }
  }
}

// Eight elements to a 16-byte aligned address.
template <typename T>
__device__ __forceinline__ void store8(void* base, int dtype, int64_t off, const T v[kVec]) {
  switch (dtype) {
    case kFloat32: {
      float4* d = reinterpret_cast<float4*>(static_cast<float*>(base) + off);
      d[0] = make_float4(static_cast<float>(v[0]), static_cast<float>(v[1]), static_cast<float>(v[2]),
                         static_cast<float>(v[3]));
      d[1] = make_float4(static_cast<float>(v[4]), static_cast<float>(v[5]), static_cast<float>(v[6]),
                         static_cast<float>(v[7]));
      break;
    }
    case kFloat16:
    case kBFloat16: {
      const bool half = dtype == kFloat16;
      uint32_t w[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float a = static_cast<float>(v[2 * j]);
        const float b = static_cast<float>(v[2 * j + 1]);
        const uint32_t lo = half ? float_to_half_bits(a) : float_to_bf16_bits(a);
        const uint32_t hi = half ? float_to_half_bits(b) : float_to_bf16_bits(b);
        w[j] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(static_cast<unsigned short*>(base) + off) = make_uint4(w[0], w[1], w[2], w[3]);
      break;
    }
    default: {
      double2* d = reinterpret_cast<double2*>(static_cast<double*>(base) + off);
#pragma unroll
      for (int j = 0; j < 4; ++j) d[j] = make_double2(static_cast<double>(v[2 * j]), static_cast<double>(v[2 * j + 1]));
      break;
    }
  }
}

// One element through the plan with scalar accesses (xi: its normal when drawing noise).
template <typename T>
__device__ __forceinline__ void step_element(const StepParams& p, const Coefs<T>& k, int64_t i, T xi, bool guided,
                                             bool has_clip, T clip) {
  const T z = load1<T>(p.z, p.z_dtype, i);
  T o = load1<T>(p.model_out, p.model_out_dtype, i);
  if (guided) o = guide(k, o, load1<T>(p.model_out_uncond, p.uncond_dtype, i));
  const T x = data_prediction(k, z, o, has_clip, clip);
  T zn = update_base(k, z, x);
#pragma unroll
  for (int j = 0; j < kMaxHistory; ++j) {  // unrolled: k.c stays in registers
    if (j < p.num_history) zn = add_term(k, kH0 + j, zn, load1<T>(p.history[j], p.history_dtype[j], i));
  }
  if (p.use_noise) {
    if (p.noise != nullptr) xi = load1<T>(p.noise, p.noise_dtype, i);
    zn = add_term(k, kCN, zn, xi);
  }
  if (p.x_out != nullptr) store1(p.x_out, p.x_out_dtype, i, x);
  if (p.model_in_out != nullptr) {
    const T mi = mul_rn(k.c[kCIN], zn);
    store1(p.model_in_out, p.model_in_dtype, i, mi);
    if (p.model_in_double) store1(p.model_in_out, p.model_in_dtype, i + p.batch * p.numel, mi);
  }
  store1(p.out, p.z_dtype, i, zn);
}

// The slow path for an item that cannot use 16-byte accesses (a sample's last,
// partial item, or unaligned tensors): one element at a time, one Philox per group.
// Its loop stays rolled so it does not raise the vector path's register count.
template <typename T>
__device__ __forceinline__ void step_item_scalar(const StepParams& p, const Coefs<T>& k, int64_t b, int64_t e0,
                                                 int n, uint32_t step32) {
  const bool guided = p.model_out_uncond != nullptr;
  const bool has_clip = p.has_clip != 0;
  const T clip = static_cast<T>(p.clip);
  const bool draw = p.use_noise && p.noise == nullptr;
  const int64_t off = b * p.numel + e0;
#pragma unroll 1
  for (int g = 0; g < n; g += 4) {
    T v[4] = {T(0), T(0), T(0), T(0)};
    if (draw) {
      words_to_normals(noise_words(static_cast<uint64_t>(p.seeds[b]), static_cast<uint64_t>((e0 + g) >> 2), step32,
                                   kStepTag),
                       v);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (g + j < n) step_element(p, k, off + g + j, v[j], guided, has_clip, clip);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(const StepParams p, int64_t items_per_sample) {
  const int64_t total = p.batch * items_per_sample;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total) return;
  const int64_t step = load_step_index(p);
  const Coefs<T> k = load_coefs<T>(p, step);
  const uint32_t step32 = static_cast<uint32_t>(step);
  const T clip = static_cast<T>(p.clip);
  const bool guided = p.model_out_uncond != nullptr;
  const bool use_noise = p.use_noise != 0;
  const bool has_clip = p.has_clip != 0;
  const int nh = p.num_history;
  const bool small = total <= 0xFFFFFFFFll;  // 32-bit division is several times cheaper than 64-bit
  const uint32_t ips32 = static_cast<uint32_t>(items_per_sample);
  for (; item < total; item += stride) {
    const int64_t b = small ? static_cast<int64_t>(static_cast<uint32_t>(item) / ips32) : item / items_per_sample;
    const int64_t e0 = (item - b * items_per_sample) * kVec;
    const int64_t off = b * p.numel + e0;
    const int n = static_cast<int>(p.numel - e0 < kVec ? p.numel - e0 : kVec);
    if (!(p.vectorized && n == kVec)) {
      step_item_scalar(p, k, b, e0, n, step32);
      continue;
    }

    // Fold each input into the result as soon as it is loaded: few arrays stay live.
    T x[kVec], zn[kVec];
    {
      T z[kVec], o[kVec];
      load8(p.z, p.z_dtype, off, z);
      load8(p.model_out, p.model_out_dtype, off, o);
      if (guided) {
        T ou[kVec];
        load8(p.model_out_uncond, p.uncond_dtype, off, ou);
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = guide(k, o[i], ou[i]);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        x[i] = data_prediction(k, z[i], o[i], has_clip, clip);
        zn[i] = update_base(k, z[i], x[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < kMaxHistory; ++j) {
      if (j < nh) {
        T h[kVec];
        load8(p.history[j], p.history_dtype[j], off, h);
#pragma unroll
        for (int i = 0; i < kVec; ++i) zn[i] = add_term(k, kH0 + j, zn[i], h[i]);
      }
    }
    if (use_noise) {
      T xi[kVec];
      if (p.noise != nullptr) {
        load8(p.noise, p.noise_dtype, off, xi);
      } else {
        const uint64_t seed = static_cast<uint64_t>(p.seeds[b]);
#pragma unroll
        for (int g = 0; g < kVec / 4; ++g) {
          words_to_normals(noise_words(seed, static_cast<uint64_t>(e0 >> 2) + g, step32, kStepTag), &xi[4 * g]);
        }
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) zn[i] = add_term(k, kCN, zn[i], xi[i]);
    }
    if (p.x_out != nullptr) store8(p.x_out, p.x_out_dtype, off, x);
    if (p.model_in_out != nullptr) {
      T mi[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) mi[i] = mul_rn(k.c[kCIN], zn[i]);
      store8(p.model_in_out, p.model_in_dtype, off, mi);
      if (p.model_in_double) store8(p.model_in_out, p.model_in_dtype, off + p.batch * p.numel, mi);
    }
    store8(p.out, p.z_dtype, off, zn);
  }
}

__global__ void __launch_bounds__(kThreads)
    noise_kernel(const int64_t* seeds, int64_t groups, int64_t batch, int64_t numel, int64_t step,
                 const void* step_ptr, int step_is_int32, uint32_t tag, float* out) {
  const int64_t total = batch * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= total) return;
  if (step_ptr != nullptr) {
    step = step_is_int32 ? static_cast<int64_t>(*static_cast<const int32_t*>(step_ptr))
                         : *static_cast<const int64_t*>(step_ptr);
  }
  const uint32_t step32 = static_cast<uint32_t>(step);
  const bool vec = (numel & 3) == 0 && (reinterpret_cast<uintptr_t>(out) & 15u) == 0;
  for (; item < total; item += stride) {
    const int64_t b = item / groups;
    const int64_t g = item - b * groups;
    float v[4];
    words_to_normals(noise_words(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(g), step32, tag), v);
    float* dst = out + b * numel + 4 * g;
    if (vec) {
      *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      const int64_t n = numel - 4 * g < 4 ? numel - 4 * g : 4;
      for (int64_t j = 0; j < n; ++j) dst[j] = v[j];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    philox_kernel(const int64_t* counter, const int64_t* key, int64_t rows, int rounds, int64_t* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows; i += stride) {
    const Words4 w = philox4x32(static_cast<uint32_t>(counter[4 * i]), static_cast<uint32_t>(counter[4 * i + 1]),
                                static_cast<uint32_t>(counter[4 * i + 2]), static_cast<uint32_t>(counter[4 * i + 3]),
                                static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]), rounds);
#pragma unroll
    for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<int64_t>(w.x[j]);
  }
}

unsigned int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = 0x7FFFFFFF;  // the kernels loop over the rest
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

}  // namespace

int launch_fused_step_cuda(const StepParams& p, bool compute_double, void* stream) {
  const int64_t items_per_sample = (p.numel + kVec - 1) / kVec;
  const int64_t total = p.batch * items_per_sample;
  if (total == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (compute_double) {
    fused_step_kernel<double><<<grid_for(total), kThreads, 0, s>>>(p, items_per_sample);
  } else {
    fused_step_kernel<float><<<grid_for(total), kThreads, 0, s>>>(p, items_per_sample);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_noise_cuda(const int64_t* seeds, int64_t batch, int64_t numel, int64_t step, const void* step_ptr,
                      int step_is_int32, uint32_t tag, float* out, void* stream) {
  const int64_t groups = (numel + 3) / 4;
  if (batch * groups == 0) return 0;
  noise_kernel<<<grid_for(batch * groups), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      seeds, groups, batch, numel, step, step_ptr, step_is_int32, tag, out);
  return static_cast<int>(cudaGetLastError());
}

int launch_philox_cuda(const int64_t* counter, const int64_t* key, int64_t rows, int rounds, int64_t* out,
                       void* stream) {
  if (rows == 0) return 0;
  philox_kernel<<<grid_for(rows), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(counter, key, rows, rounds, out);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace fastflow
