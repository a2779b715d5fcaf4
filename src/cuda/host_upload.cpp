#include "host_upload.h"

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <string>
#include <system_error>
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

}  // namespace

// memcpy split over the calling thread and a fixed set of workers that wait between copies.
// Starting threads for every chunk instead cost a quarter to half of the copy rate (H100 host, 8
// threads, 16 MB chunks: 34 GB/s started per chunk, 46 GB/s kept; docs/PERF-cuda.md, "Prepack spread").
class HostUploader::Workers {
 public:
  explicit Workers(unsigned threads) {
    try {
      for (unsigned i = 1; i < threads; ++i) pool_.emplace_back([this, i] { serve(i); });
    } catch (const std::system_error&) {
      // Fewer workers than asked (the system refused a thread): the copies still split over those there are.
    }
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : pool_) t.join();
  }

  // dst[0, n) = src[0, n); returns when every piece has been copied. Pieces are >= 1 MiB, so a small
  // copy stays on the calling thread.
  void copy(void* dst, const void* src, size_t n) {
    const size_t min_piece = size_t(1) << 20;
    const size_t parts = std::max<size_t>(1, std::min<size_t>(pool_.size() + 1, n / min_piece));
    if (parts == 1) {
      std::memcpy(dst, src, n);
      return;
    }
    const size_t piece = (n + parts - 1) / parts;
    {
      std::lock_guard<std::mutex> l(mu_);
      dst_ = static_cast<char*>(dst), src_ = static_cast<const char*>(src), n_ = n, piece_ = piece;
      busy_ = unsigned(pool_.size());
      ++generation_;
    }
    wake_.notify_all();
    copy_piece(0, static_cast<char*>(dst), static_cast<const char*>(src), n, piece);
    std::unique_lock<std::mutex> l(mu_);
    done_.wait(l, [&] { return busy_ == 0; });
  }

 private:
  static void copy_piece(unsigned i, char* dst, const char* src, size_t n, size_t piece) {
    const size_t b = std::min(n, i * piece), e = std::min(n, b + piece);
    if (b < e) std::memcpy(dst + b, src + b, e - b);
  }

  void serve(unsigned index) {
    unsigned seen = 0;
    std::unique_lock<std::mutex> l(mu_);
    for (;;) {
      wake_.wait(l, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      char* dst = dst_;
      const char* src = src_;
      const size_t n = n_, piece = piece_;
      l.unlock();
      copy_piece(index, dst, src, n, piece);
      l.lock();
      if (--busy_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> pool_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  char* dst_ = nullptr;
  const char* src_ = nullptr;
  size_t n_ = 0, piece_ = 0;
  unsigned generation_ = 0, busy_ = 0;
  bool stop_ = false;
};

HostUploader::HostUploader(cudaStream_t stream, size_t chunk_bytes) : stream_(stream), chunk_(chunk_bytes) {
  if (!chunk_) return;
  // Any failure here leaves the uploader unstaged (copy() then copies directly); the error is cleared.
  auto give_up = [&] {
    cudaGetLastError();
    release();
  };
  for (int i = 0; i < 2; ++i) {
    void* p = nullptr;
    if (cudaHostAlloc(&p, chunk_, cudaHostAllocDefault) != cudaSuccess) {
      give_up();
      return;
    }
    pinned_[i] = p;
    cudaEvent_t ev = nullptr;
    if (cudaEventCreateWithFlags(&ev, cudaEventDisableTiming) != cudaSuccess) {
      give_up();
      return;
    }
    done_[i] = ev;
  }
  workers_ = std::make_unique<Workers>(std::clamp(std::thread::hardware_concurrency() / 2, 1u, 8u));
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
  if (!staged()) {  // the runtime stages pageable memory itself and returns once src has been read
    if (n) check(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, stream_), "upload to the device");
    return;
  }
  for (size_t off = 0; off < n; off += chunk_) {
    const size_t len = std::min(chunk_, n - off);
    const int b = next_;
    next_ ^= 1;
    check(cudaEventSynchronize(done_[b]), "staging event");  // its previous DMA has drained
    workers_->copy(pinned_[b], static_cast<const char*>(src) + off, len);
    check(cudaMemcpyAsync(static_cast<char*>(dst) + off, pinned_[b], len, cudaMemcpyHostToDevice, stream_),
          "upload to the device");
    check(cudaEventRecord(done_[b], stream_), "staging event");
  }
}

}  // namespace qmoe::cuda
