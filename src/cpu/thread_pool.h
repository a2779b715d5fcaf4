// A small fixed thread pool for the CPU backend: parallel_for over task indices, the calling thread
// working too. Tasks are handed out through an atomic counter (dynamic scheduling), so which thread
// runs a task never changes what the task computes: results do not depend on the thread count.
//
// Cost: a parallel_for wakes the workers (a short spin, then a condition variable) and joins them; a
// few microseconds when they are spinning, ~50 us after they fell asleep. The backend issues three per
// layer call (FC1, FC2, combine).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
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
  // rethrown here (remaining tasks still run). Not reentrant: one parallel_for at a time.
  void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void drain();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;  // bumped per job, guarded by mu_
  std::atomic<uint64_t> gen_seen_{0};
  bool stop_ = false;

  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> busy_{0};  // workers still inside the current job
  std::mutex err_mu_;
  std::exception_ptr error_;
};

}  // namespace qmoe::cpu
