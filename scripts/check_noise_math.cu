// GPU check: the noise transform's radius functions (csrc/fastflow_step.h) against
// the CUDA math library on every input the transform gives them: log_uniform_f32
// against logf on each of the 2^23 uniforms u = (2m + 1) 2^-24, and sqrt_radius_f32
// against sqrtf on each -2 log u. Both must agree bit for bit (the Triton kernel uses
// libdevice's logf and sqrt_rn, and the two kernels must draw the same normals).
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc scripts/check_noise_math.cu -o /tmp/check_noise_math && /tmp/check_noise_math
//
// Exit status 0 when nothing differs.
#include <cuda_runtime.h>
#include <stdio.h>

#include "fastflow_step.h"

__global__ void compare(unsigned long long* differ) {
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t m = blockIdx.x * blockDim.x + threadIdx.x; m < (1u << 23); m += stride) {
    const float u = __fmul_rn(static_cast<float>((m << 1) | 1u), 0x1p-24f);
    const float log_u = logf(u);
    if (__float_as_uint(fastflow::log_uniform_f32(u)) != __float_as_uint(log_u)) atomicAdd(&differ[0], 1ull);
    const float x = __fmul_rn(-2.0f, log_u);
    if (__float_as_uint(fastflow::sqrt_radius_f32(x)) != __float_as_uint(sqrtf(x))) atomicAdd(&differ[1], 1ull);
  }
}

int main() {
  unsigned long long* differ;
  unsigned long long host[2] = {0, 0};
  if (cudaMalloc(&differ, sizeof host) != cudaSuccess || cudaMemset(differ, 0, sizeof host) != cudaSuccess) {
    fprintf(stderr, "check_noise_math: no GPU memory\n");
    return 2;
  }
  compare<<<4096, 256>>>(differ);
  const cudaError_t err = cudaMemcpy(host, differ, sizeof host, cudaMemcpyDeviceToHost);
  if (err != cudaSuccess) {
    fprintf(stderr, "check_noise_math: %s\n", cudaGetErrorString(err));
    return 2;
  }
  printf("check_noise_math: of %u uniforms, log_uniform_f32 differs from logf on %llu, sqrt_radius_f32 from sqrtf on %llu\n",
         1u << 23, host[0], host[1]);
  return host[0] != 0 || host[1] != 0;
}
