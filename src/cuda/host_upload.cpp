#include "host_upload.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "qmoe/error.h"

namespace qmoe::cuda {

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw Error(std::string("cuda backend: ") + what + ": " + cudaGetErrorString(e));
  }
}

// memcpy split over `threads` threads (pieces of >= 1 MiB; smaller copies stay on this thread).
void parallel_memcpy(void* dst, const void* src, size_t n, unsigned threads) {
  const size_t min_piece = size_t(1) << 20;
  const unsigned t = unsigned(std::max<size_t>(1, std::min<size_t>(threads, n / min_piece)));
  if (t == 1) {
    std::memcpy(dst, src, n);
    return;
  }
  std::vector<std::thread> pool;
  const size_t piece = (n + t - 1) / t;
  for (unsigned i = 1; i < t; ++i) {
    const size_t b = i * piece, e = std::min(n, b + piece);
    if (b < e)
      pool.emplace_back([=] { std::memcpy(static_cast<char*>(dst) + b, static_cast<const char*>(src) + b, e - b); });
  }
  std::memcpy(dst, src, std::min(n, piece));
  for (auto& th : pool) th.join();
}

}  // namespace

HostUploader::HostUploader(cudaStream_t stream, size_t chunk_bytes) : stream_(stream), chunk_(chunk_bytes) {
  threads_ = std::clamp(std::thread::hardware_concurrency() / 2, 1u, 8u);
  try {
    for (int i = 0; i < 2; ++i) {
      check(cudaHostAlloc(&pinned_[i], chunk_, cudaHostAllocDefault), "pinned staging buffer");
      check(cudaEventCreateWithFlags(&done_[i], cudaEventDisableTiming), "staging event");
    }
  } catch (...) {
    release();
    throw;
  }
}

HostUploader::~HostUploader() { release(); }

void HostUploader::release() {
  for (int i = 0; i < 2; ++i) {
    if (done_[i]) cudaEventSynchronize(done_[i]), cudaEventDestroy(done_[i]);
    if (pinned_[i]) cudaFreeHost(pinned_[i]);
    done_[i] = nullptr, pinned_[i] = nullptr;
  }
}

void HostUploader::copy(void* dst, const void* src, size_t n) {
  for (size_t off = 0; off < n; off += chunk_) {
    const size_t len = std::min(chunk_, n - off);
    const int b = next_;
    next_ ^= 1;
    check(cudaEventSynchronize(done_[b]), "staging event");  // its previous DMA has drained
    parallel_memcpy(pinned_[b], static_cast<const char*>(src) + off, len, threads_);
    check(cudaMemcpyAsync(static_cast<char*>(dst) + off, pinned_[b], len, cudaMemcpyHostToDevice, stream_),
          "upload to the device");
    check(cudaEventRecord(done_[b], stream_), "staging event");
  }
}

}  // namespace qmoe::cuda
