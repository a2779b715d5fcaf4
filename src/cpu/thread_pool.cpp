#include "cpu/thread_pool.h"

#include <chrono>

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
    published_.store(generation_, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::work(Job& job) {
  for (;;) {
    const int64_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.n) return;
    try {
      (*job.fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(job.err_mu);
      if (!job.error) job.error = std::current_exception();
    }
    job.done.fetch_add(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    // Spin ~50 us before sleeping: FC1, FC2 and combine come back to back.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    while (published_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
      for (int i = 0; i < 16; ++i) QMOE_CPU_RELAX();
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      job = job_;
    }
    if (job) work(*job);
  }
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = job;
    ++generation_;
    published_.store(generation_, std::memory_order_release);
  }
  cv_.notify_all();
  work(*job);
  // Tasks taken by workers may still run; wait for them (not for idle workers).
  for (int spins = 0; job->done.load(std::memory_order_acquire) != n; ++spins) {
    if (spins < 4096)
      QMOE_CPU_RELAX();
    else
      std::this_thread::yield();
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (job_ == job) job_.reset();  // late workers find nothing to do; fn goes out of scope next
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace qmoe::cpu
