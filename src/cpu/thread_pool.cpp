#include "cpu/thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QMOE_CPU_RELAX() _mm_pause()
#else
#define QMOE_CPU_RELAX() std::this_thread::yield()
#endif

namespace qmoe::cpu {

ThreadPool::ThreadPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    ++generation_;
    gen_seen_.store(generation_, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::drain() {
  for (;;) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return;
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    // Spin briefly first: back-to-back parallel_for calls (FC1 then FC2) then cost no wake-up.
    for (int spin = 0; spin < 20000 && gen_seen_.load(std::memory_order_acquire) == seen; ++spin) QMOE_CPU_RELAX();
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
    }
    drain();
    busy_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  error_ = nullptr;
  fn_ = &fn;
  n_ = n;
  next_.store(0, std::memory_order_relaxed);
  busy_.store(int(workers_.size()), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++generation_;
    gen_seen_.store(generation_, std::memory_order_release);
  }
  cv_.notify_all();
  drain();
  while (busy_.load(std::memory_order_acquire) != 0) QMOE_CPU_RELAX();
  fn_ = nullptr;
  if (error_) std::rethrow_exception(error_);
}

}  // namespace qmoe::cpu
