// How fast a GPU reads a buffer of one layer's size the way the one-token FC kernels do
// (docs/PERF-cuda.md, "What one read of a layer's bytes achieves"): many warps, each streaming its own
// contiguous region 512 bytes (16 per lane) at a time with a few pieces in flight, against the same
// bytes read in interleaved 512-byte pieces (warp w takes pieces w, w + W, ...), the pattern of the
// benchmark's 2 GiB read-bandwidth kernel. One kernel per read, timed with events around it (so the
// launch is included, as a layer's first kernel pays it). Not part of the build; on the GPU machine:
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/stream_probe bench/cuda_stream_probe.cu
//   /tmp/stream_probe [bytes]    (default 117440512: mixtral's fc1 at one token, int4)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CU(x)                                                                  \
  do {                                                                         \
    cudaError_t e = (x);                                                       \
    if (e) {                                                                   \
      std::printf("%s: %s\n", #x, cudaGetErrorString(e));                      \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

// Warp w reads `pieces` 512-byte pieces: contiguous ones from its region (piece w * pieces + i), or
// interleaved (piece i * W + w). D pieces are loaded before any is used.
template <int D>
__global__ void probe(const uint4* p, int pieces, bool contiguous, unsigned* sink) {
  const int lane = threadIdx.x & 31;
  const size_t W = size_t(gridDim.x) * blockDim.x / 32, w = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  uint32_t acc = 0;
  for (int i = 0; i < pieces; i += D) {
    uint4 v[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const size_t piece = contiguous ? w * pieces + i + d : (size_t(i) + d) * W + w;
      v[d] = __ldcs(p + piece * 32 + lane);
    }
#pragma unroll
    for (int d = 0; d < D; ++d) acc ^= v[d].x ^ v[d].y ^ v[d].z ^ v[d].w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads; practically never taken
}

template <int D>
double gbps(const uint4* p, size_t bytes, int warps, bool contiguous, unsigned* sink) {
  const int pieces = int(bytes / 512 / warps) / D * D;  // whole rounds
  const int blocks = warps / 4;
  cudaEvent_t a, b;
  CU(cudaEventCreate(&a));
  CU(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int r = 0; r < 15; ++r) {
    CU(cudaEventRecord(a));
    probe<D><<<blocks, 128>>>(p, pieces, contiguous, sink);
    CU(cudaEventRecord(b));
    CU(cudaEventSynchronize(b));
    float ms;
    CU(cudaEventElapsedTime(&ms, a, b));
    if (r >= 3) ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  return double(size_t(pieces) * warps * 512) / (ts[ts.size() / 2] * 1e-3) / 1e9;
}

int main(int argc, char** argv) {
  cudaDeviceProp prop{};
  CU(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  // Default: a mixtral fc1 at one token (int4), 117 MB, twice L2; argv[1] another size in bytes.
  // Rotated over 8 copies so that each run reads from DRAM.
  const size_t bytes = argc > 1 ? size_t(std::atoll(argv[1])) / 65536 * 65536 : size_t(117440512), copies = 8;
  void* buf;
  unsigned* sink;
  CU(cudaMalloc(&buf, bytes * copies));
  CU(cudaMalloc(&sink, 4));
  CU(cudaMemset(buf, 0x5a, bytes * copies));
  std::printf("device: %s, %d SMs, %.1f MB per read\n", prop.name, sms, bytes / 1e6);
  std::printf("%-14s %9s %6s %12s %12s\n", "warps", "region", "depth", "contig GB/s", "interl GB/s");
  int run = 0;
  auto row = [&](int warps, auto depth_tag) {
    constexpr int D = decltype(depth_tag)::value;
    if (bytes / 512 / size_t(warps) < size_t(D)) return;  // fewer pieces per warp than in flight
    const uint4* p = static_cast<const uint4*>(buf) + (run++ % copies) * (bytes / 16);
    const double c = gbps<D>(p, bytes, warps, true, sink);
    const double i = gbps<D>(p, bytes, warps, false, sink);
    std::printf("%-14d %8.1fK %6d %12.0f %12.0f\n", warps, double(bytes) / warps / 1024, D, c, i);
  };
  for (const int per_sm : {16, 28, 56}) row(sms * per_sm, std::integral_constant<int, 8>{});  // all resident
  // The fc1 kernel's shape: 16 KB per warp (half a mixtral tile), in waves of 28 warps per SM.
  const int w16 = int(bytes / 16384) / 4 * 4;
  row(w16, std::integral_constant<int, 4>{});
  row(w16, std::integral_constant<int, 8>{});
  row(w16, std::integral_constant<int, 16>{});
  CU(cudaFree(buf));
  return 0;
}
