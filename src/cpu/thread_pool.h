// A small fixed thread pool for the CPU backend: parallel_for over task indices, the calling thread
// working too. Tasks are handed out through an atomic counter (dynamic scheduling), so which thread
// runs a task never changes what the task computes: results do not depend on the thread count.
//
// The caller waits for its *tasks* to finish, not for every worker to check in: on a loaded machine a
// sleeping worker may take milliseconds to be scheduled, and the caller simply does its share of the
// work instead. Each job is a shared object, so a worker that wakes late finds it exhausted and drops
// it. Cost per parallel_for: a few microseconds when workers are spinning (they spin ~50 us after a
// job, covering back-to-back FC1/FC2/combine calls), a futex wake otherwise.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace qmoe::cpu {

class ThreadPool {
 public:
  // threads: total threads including the caller (>= 1).
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return int(workers_.size()) + 1; }
  // Runs fn(i) for i in [0, n); returns when all are done. The first exception thrown by a task is
  // rethrown here (remaining tasks still run). One parallel_for at a time (the backend serializes).
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  struct Job {
    const std::function<void(int64_t)>* fn = nullptr;
    int64_t n = 0;
    std::atomic<int64_t> next{0}, done{0};
    std::mutex err_mu;
    std::exception_ptr error;
  };
  static void work(Job& job);
  void worker_loop();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;   // guarded by mu_
  uint64_t generation_ = 0;    // guarded by mu_
  std::atomic<uint64_t> published_{0};
  bool stop_ = false;
};

}  // namespace qmoe::cpu
