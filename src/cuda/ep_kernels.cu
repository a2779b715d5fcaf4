// Expert-parallel kernels (ep_kernels.h). None of them is on the FC hot path: they move rows, count
// routes and sum a few fp32 vectors, so they are written for clarity and determinism (no float
// atomics; every sum in a fixed order), not tuned. docs/MULTIGPU.md explains where each one runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ep_kernels.h"
#include "qmoe/expert_parallel.h"

namespace qmoe::cuda {

namespace {

__device__ __forceinline__ void store_t(void* p, int64_t i, Elt e, float v) {
  // Round to nearest even, like the single-GPU combine's store.
  switch (e) {
    case Elt::f32: static_cast<float*>(p)[i] = v; break;
    case Elt::f16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case Elt::bf16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
  }
}

// Mirrors combine_kernel (cuda_kernels.cu) with routes outside the slice skipped: for a whole layer
// (e_first = 0, e_count = E) it computes the same fp32 value before rounding.
__global__ void combine_partial_kernel(CombineArgs a, int e_first, int e_count) {
  const int64_t h = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h >= a.H) return;
  float* out = static_cast<float*>(a.out);
  for (int64_t t = blockIdx.y; t < a.T; t += gridDim.y) {
    float acc = 0.f;
    for (int j = 0; j < a.k; ++j) {
      const int64_t slot = t * a.k + j;
      const int e = a.route_e[slot] - e_first;
      if (e < 0 || e >= e_count) continue;  // another rank's expert: its y row was never written
      float y = a.y[slot * a.H + h];
      for (int s = 1; s < a.splits; ++s) y += a.y[(s * a.slots + slot) * a.H + h];
      if (a.bias2) y += a.bias2[int64_t(e) * a.H + h];
      acc += a.route_w[slot] * y;
    }
    out[t * a.H + h] = acc;
  }
}

constexpr int kPlanThreads = 256;

__device__ __forceinline__ uint32_t dest_mask(const EpPlanArgs& a, int64_t t) {
  uint32_t m = 0;
  for (int j = 0; j < a.k; ++j) m |= 1u << owner_of_expert(a.E, a.world, a.route_e[t * a.k + j]);
  return m;
}

// One block. Thread i owns tokens [i * per, (i + 1) * per): counts its rows per destination, the
// counts are scanned per destination in thread order, then each thread writes its positions. Rows for
// one destination therefore keep token order, and the plan does not depend on scheduling.
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(EpPlanArgs a) {
  __shared__ int cnt[kPlanThreads][kEpMaxWorld];
  __shared__ int base[kEpMaxWorld];
  const int tid = threadIdx.x, G = a.world;
  const int64_t per = (a.n + kPlanThreads - 1) / kPlanThreads;
  const int64_t t0 = tid * per, t1 = t0 + per < a.n ? t0 + per : a.n;
  for (int g = 0; g < G; ++g) cnt[tid][g] = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t m = dest_mask(a, t);
    for (int g = 0; g < G; ++g) cnt[tid][g] += (m >> g) & 1u;
  }
  __syncthreads();
  if (tid < G) {  // exclusive scan over threads, destination tid
    int run = 0;
    for (int i = 0; i < kPlanThreads; ++i) {
      const int c = cnt[i][tid];
      cnt[i][tid] = run;
      run += c;
    }
    base[tid] = run;  // total for now
  }
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int g = 0; g < G; ++g) {
      const int c = base[g];
      a.send_counts[g] = c;
      base[g] = run;
      run += c;
    }
  }
  __syncthreads();
  int pos[kEpMaxWorld];
  for (int g = 0; g < G; ++g) pos[g] = base[g] + cnt[tid][g];
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t m = dest_mask(a, t);
    for (int g = 0; g < G; ++g) a.send_pos[t * G + g] = ((m >> g) & 1u) ? pos[g]++ : -1;
  }
}

// Block per token: its row is copied to each planned position (16-byte words where everything is
// 16-byte aligned, else 2-byte words: T is 2 or 4 bytes), lanes < k copy the routes.
__global__ void pack_kernel(EpPackArgs a) {
  const bool wide = ((reinterpret_cast<uintptr_t>(a.x) | reinterpret_cast<uintptr_t>(a.send_x) | a.row_bytes) & 15) == 0;
  for (int64_t t = blockIdx.x; t < a.n; t += gridDim.x) {
    for (int g = 0; g < a.world; ++g) {
      const int p = a.send_pos[t * a.world + g];
      if (p < 0) continue;
      const uint8_t* src = a.x + t * a.row_bytes;
      uint8_t* dst = a.send_x + int64_t(p) * a.row_bytes;
      if (wide) {
        for (int64_t i = threadIdx.x; i < a.row_bytes / 16; i += blockDim.x)
          reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
      } else {
        for (int64_t i = threadIdx.x; i < a.row_bytes / 2; i += blockDim.x)
          reinterpret_cast<uint16_t*>(dst)[i] = reinterpret_cast<const uint16_t*>(src)[i];
      }
      for (int j = threadIdx.x; j < a.k; j += blockDim.x) {
        a.send_e[int64_t(p) * a.k + j] = a.route_e[t * a.k + j];
        a.send_w[int64_t(p) * a.k + j] = a.route_w[t * a.k + j];
      }
    }
  }
}

__global__ void count_kernel(const int* route_e, int64_t slots, int* counts) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < slots; i += int64_t(gridDim.x) * blockDim.x)
    atomicAdd(&counts[route_e[i]], 1);
}

__global__ void gather_sum_kernel(EpGatherSumArgs a) {
  const int64_t h = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (h >= a.H) return;
  for (int64_t t = blockIdx.y; t < a.n; t += gridDim.y) {
    float acc = 0.f;
    for (int g = 0; g < a.world; ++g) {
      const int p = a.send_pos[t * a.world + g];
      if (p >= 0) acc += a.back[int64_t(p) * a.H + h];
    }
    store_t(a.out, t * a.H + h, a.out_elt, acc);
  }
}

__global__ void convert_kernel(const float* in, void* out, Elt e, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_t(out, i, e, in[i]);
}

unsigned blocks_for(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : b > 65535 * 16 ? 65535 * 16 : b);
}

}  // namespace

void launch_combine_partial(const CombineArgs& a, int e_first, int e_count, cudaStream_t st) {
  if (a.T == 0) return;
  const dim3 grid(unsigned((a.H + 127) / 128), unsigned(a.T < 65535 ? a.T : 65535));
  combine_partial_kernel<<<grid, 128, 0, st>>>(a, e_first, e_count);
}

void launch_ep_plan(const EpPlanArgs& a, cudaStream_t st) {
  plan_kernel<<<1, kPlanThreads, 0, st>>>(a);  // n = 0 still writes send_counts = 0
}

void launch_ep_pack(const EpPackArgs& a, cudaStream_t st) {
  if (a.n == 0) return;
  pack_kernel<<<unsigned(a.n < 65535 ? a.n : 65535), 128, 0, st>>>(a);
}

void launch_ep_count(const int* route_e, int64_t slots, int* counts, cudaStream_t st) {
  if (slots == 0) return;
  count_kernel<<<blocks_for(slots, 256), 256, 0, st>>>(route_e, slots, counts);
}

void launch_ep_gather_sum(const EpGatherSumArgs& a, cudaStream_t st) {
  if (a.n == 0) return;
  const dim3 grid(unsigned((a.H + 127) / 128), unsigned(a.n < 65535 ? a.n : 65535));
  gather_sum_kernel<<<grid, 128, 0, st>>>(a);
}

void launch_ep_convert(const float* in, void* out, Elt out_elt, int64_t n, cudaStream_t st) {
  if (n == 0) return;
  convert_kernel<<<blocks_for(n, 256), 256, 0, st>>>(in, out, out_elt, n);
}

}  // namespace qmoe::cuda
