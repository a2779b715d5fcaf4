// Where host-to-device upload time goes on a GPU host: the pieces of prepack's upload path measured
// alone (pinned allocation, DMA, the host copy into pinned chunks with threads started per chunk or
// kept waiting, the pipelined pair, pageable cudaMemcpy, cudaHostRegister, freeing a large buffer).
// Not part of the build; on the GPU machine:
//   nvcc -O2 -std=c++17 -arch=sm_90a -o /tmp/upload_probe bench/cuda_upload_probe.cu && /tmp/upload_probe
// Results: docs/PERF-cuda.md, "Prepack spread".
#include <cuda_runtime.h>
#include <sys/mman.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <algorithm>
using clk = std::chrono::steady_clock;
static double ms(clk::time_point a) { return std::chrono::duration<double, std::milli>(clk::now() - a).count(); }
#define CU(x) do { cudaError_t e = (x); if (e) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1);} } while (0)

struct Pool {
  std::vector<std::thread> th; std::mutex m; std::condition_variable cv, done_cv;
  std::function<void(unsigned)> job; unsigned gen = 0, pending = 0; bool stop = false; unsigned n;
  explicit Pool(unsigned n_) : n(n_) {
    for (unsigned i = 1; i < n; ++i) th.emplace_back([this, i] {
      unsigned seen = 0;
      for (;;) {
        std::unique_lock<std::mutex> l(m);
        cv.wait(l, [&] { return stop || gen != seen; });
        if (stop) return;
        seen = gen; auto j = job; l.unlock();
        j(i);
        l.lock(); if (--pending == 0) done_cv.notify_one();
      }
    });
  }
  void run(std::function<void(unsigned)> j) {
    { std::lock_guard<std::mutex> l(m); job = j; pending = n - 1; ++gen; }
    cv.notify_all(); j(0);
    std::unique_lock<std::mutex> l(m); done_cv.wait(l, [&] { return pending == 0; });
  }
  ~Pool() { { std::lock_guard<std::mutex> l(m); stop = true; } cv.notify_all(); for (auto& t : th) t.join(); }
};

static void spawn_copy(char* d, const char* s, size_t n, unsigned t) {
  std::vector<std::thread> p; size_t piece = (n + t - 1) / t;
  for (unsigned i = 1; i < t; ++i) { size_t b = i * piece, e = std::min(n, b + piece); if (b < e) p.emplace_back([=] { memcpy(d + b, s + b, e - b); }); }
  memcpy(d, s, std::min(n, piece)); for (auto& x : p) x.join();
}
static void pool_copy(Pool& P, char* d, const char* s, size_t n) {
  unsigned t = P.n; size_t piece = (n + t - 1) / t;
  P.run([=](unsigned i) { size_t b = i * piece, e = std::min(n, b + piece); if (b < e) memcpy(d + b, s + b, e - b); });
}

int main() {
  const size_t N = size_t(768) << 20;
  printf("hw threads %u\n", std::thread::hardware_concurrency());
  char* src = (char*)malloc(N);
  auto t0 = clk::now();
  for (size_t i = 0; i < N; i += 8) *(uint64_t*)(src + i) = i * 0x9E3779B97F4A7C15ull;
  printf("fill 768 MB: %.1f ms\n", ms(t0));
  void* dev; CU(cudaMalloc(&dev, N));
  for (size_t chunk_mb : {4, 16, 64}) {
    size_t C = chunk_mb << 20; void* pin[2];
    t0 = clk::now();
    CU(cudaHostAlloc(&pin[0], C, 0)); CU(cudaHostAlloc(&pin[1], C, 0));
    printf("chunk %zu MB: cudaHostAlloc x2 %.2f ms\n", chunk_mb, ms(t0));
    cudaStream_t st; CU(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t ev[2]; CU(cudaEventCreateWithFlags(&ev[0], cudaEventDisableTiming)); CU(cudaEventCreateWithFlags(&ev[1], cudaEventDisableTiming));
    // DMA only
    for (int rep = 0; rep < 2; ++rep) {
      t0 = clk::now();
      for (size_t off = 0; off < N; off += C) CU(cudaMemcpyAsync((char*)dev + off, pin[(off / C) & 1], C, cudaMemcpyHostToDevice, st));
      CU(cudaStreamSynchronize(st));
      double t = ms(t0); printf("  dma only: %.1f ms = %.1f GB/s\n", t, N / t / 1e6);
    }
    for (unsigned thr : {1u, 2u, 4u, 8u, 12u, 16u}) {
      Pool P(thr);
      for (int mode = 0; mode < 2; ++mode) {
        // host copy only
        t0 = clk::now();
        for (size_t off = 0; off < N; off += C) mode ? pool_copy(P, (char*)pin[(off / C) & 1], src + off, C) : spawn_copy((char*)pin[(off / C) & 1], src + off, C, thr);
        double th = ms(t0);
        // pipeline
        double tp[3];
        for (int rep = 0; rep < 3; ++rep) {
          t0 = clk::now(); int b = 0;
          for (size_t off = 0; off < N; off += C, b ^= 1) {
            CU(cudaEventSynchronize(ev[b]));
            mode ? pool_copy(P, (char*)pin[b], src + off, C) : spawn_copy((char*)pin[b], src + off, C, thr);
            CU(cudaMemcpyAsync((char*)dev + off, pin[b], C, cudaMemcpyHostToDevice, st));
            CU(cudaEventRecord(ev[b], st));
          }
          CU(cudaStreamSynchronize(st)); tp[rep] = ms(t0);
        }
        printf("  threads %2u %s: host copy %.1f ms = %.1f GB/s; pipeline %.1f %.1f %.1f ms = %.1f GB/s best\n", thr, mode ? "pool " : "spawn", th, N / th / 1e6,
               tp[0], tp[1], tp[2], N / std::min({tp[0], tp[1], tp[2]}) / 1e6);
      }
    }
    cudaFreeHost(pin[0]); cudaFreeHost(pin[1]); cudaStreamDestroy(st);
  }
  for (int rep = 0; rep < 2; ++rep) {
    t0 = clk::now(); CU(cudaMemcpy(dev, src, N, cudaMemcpyHostToDevice));
    double t = ms(t0); printf("pageable cudaMemcpy: %.1f ms = %.1f GB/s\n", t, N / t / 1e6);
  }
  for (int rep = 0; rep < 2; ++rep) {
    t0 = clk::now(); CU(cudaHostRegister(src, N, cudaHostRegisterDefault)); double tr = ms(t0);
    t0 = clk::now(); CU(cudaMemcpy(dev, src, N, cudaMemcpyHostToDevice)); double tc = ms(t0);
    t0 = clk::now(); CU(cudaHostUnregister(src)); double tu = ms(t0);
    printf("register %.1f ms, copy %.1f ms (%.1f GB/s), unregister %.1f ms\n", tr, tc, N / tc / 1e6, tu);
  }
  // device alloc + memset of a mixtral layer, and free of the source
  for (int rep = 0; rep < 2; ++rep) {
    void* d2; t0 = clk::now(); CU(cudaMalloc(&d2, N)); double ta = ms(t0);
    t0 = clk::now(); CU(cudaMemset(d2, 0, N)); CU(cudaDeviceSynchronize()); double tm = ms(t0);
    t0 = clk::now(); CU(cudaFree(d2)); printf("cudaMalloc 768 MB %.2f ms, memset %.2f ms, free %.2f ms\n", ta, tm, ms(t0));
  }
  t0 = clk::now(); free(src); printf("free(768 MB pageable) %.1f ms\n", ms(t0));
  // A buffer that was never registered, touched by memset (printed so the compiler keeps it).
  char* s2 = (char*)malloc(N); memset(s2, 1, N);
  const int probe = ((volatile char*)s2)[N / 2];
  t0 = clk::now(); free(s2); printf("free(768 MB pageable, memset, byte %d) %.1f ms\n", probe, ms(t0));
  return 0;
}
