// The Hopper wgmma FC kernels (fc_sm90.cu): the large-batch path of the CUDA backend on sm_90a.
// Same FcArgs and packed layout as launch_fc1/launch_fc2 (cuda_kernels.h), with three differences
// the host must honour: work items hold up to sm90_width tokens (launch_group with that chunk), x is
// the converted copy in mma order gathered into expert order, one row per slot (launch_convert_input
// with mma_order and gather; FcArgs::slots rows), and fc1 writes `a` in mma order, so fc1 and fc2 both
// run here or both on the SM80 kernels. fc2 writes one split (splits = 1).
#pragma once

#include <cuda_runtime.h>

#include "cuda_kernels.h"

namespace qmoe::cuda {

// Tokens per work item (the kernel's wgmma n, passed as FcArgs::nt = n / 8) for an average of `avg`
// tokens per touched expert: the smallest of 8, 16, 32, 64, 128 with room for a third more tokens,
// so most experts' tokens fit one item while few token columns go to waste -- except that 32 serves
// up to 32 tokens per expert: two blocks per SM there beat width 64's fuller items (H100, 32 tokens
// per expert on four shapes: 10 of 12 cases 1.04-1.20x faster than width 64, the other two, 8-bit,
// 2-3% slower; docs/PERF-cuda.md). The default dispatch runs these kernels from 16 tokens per expert
// (kWgmmaCrossover, cuda_backend.cpp), so widths 8 and 16 serve only CudaGemm::sm90 (forced).
constexpr int sm90_width(int64_t avg) {
  return avg <= 6 ? 8 : avg <= 12 ? 16 : avg <= 32 ? 32 : avg <= 48 ? 64 : 128;
}
// Width 192: the wgmma kernels run items of up to 192 tokens (those of at most 128 run 128 wide) where
// sm90_wide_serves says they can and sm90_wide_pays says it pays: an expert of 129-192 tokens is then
// one item, its weights dequantized once instead of twice. Pays: with the experts' counts spread as
// Normal(avg, sqrt(avg (1 - k / E))), width 192 needs under 0.9 times the items of width 128 and at
// most 1.02 times its token columns (mixtral and qwen3-30b-a3b at 128 or 512 tokens per expert: 0.67
// the items, the same columns; gpt-oss-20b at 256: 0.8 the items but 1.11 the columns).
bool sm90_wide_pays(double avg, int64_t k, int64_t E);
// Width 192's layers: those with row-wise scales or DQ (fc_uses_dq), whose loops keep no
// per-block partial sums next to its 96 accumulators per thread, with three consumer warpgroups.
bool sm90_wide_serves(Elt ct, Elt scale_elt, const MatrixGeom& g);
// Widths up to this one run two blocks per SM (their accumulators leave room for it).
constexpr int kSm90TwoBlockMaxWidth = 32;

// True when `device` is a Hopper GPU and this build holds the sm_90a kernels.
bool sm90_available(int device);
// True when the kernel serves this matrix's scale blocks (row-wise, or blocks of >= 32 k).
bool sm90_serves(const MatrixGeom& g);
// Once per device, outside any capture: raises the kernels' shared-memory limit.
cudaError_t init_sm90_kernels();
// Launch errors are returned (a tensor map the driver refuses among them), not left pending.
cudaError_t launch_fc1_sm90(const FcArgs& a, cudaStream_t st);
cudaError_t launch_fc2_sm90(const FcArgs& a, cudaStream_t st);

}  // namespace qmoe::cuda
