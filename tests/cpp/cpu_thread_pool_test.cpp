// The CPU backend's thread pool: every task runs exactly once, workers really take tasks, a task's
// exception reaches the caller, and back-to-back jobs do not leak tasks into each other.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cpu/thread_pool.h"

using qmoe::cpu::ThreadPool;

TEST(CpuThreadPool, RunsEveryTaskOnceAcrossJobs) {
  ThreadPool pool(3);
  for (int job = 0; job < 200; ++job) {
    const int64_t n = 1 + job % 37;
    std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
    pool.parallel_for(n, [&](int64_t i) { hits[size_t(i)].fetch_add(1); });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "job " << job << " task " << i;
  }
}

TEST(CpuThreadPool, WorkersTakeTasks) {
  ThreadPool pool(2);
  std::mutex mu;
  std::set<std::thread::id> ids;
  // Tasks long enough (2 ms each, 40 of them) that a worker wakes and takes some even on a busy machine.
  pool.parallel_for(40, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::lock_guard<std::mutex> lk(mu);
    ids.insert(std::this_thread::get_id());
  });
  EXPECT_EQ(ids.size(), 2u) << "only the calling thread ran tasks";
}

TEST(CpuThreadPool, RethrowsTaskException) {
  ThreadPool pool(2);
  std::atomic<int> ran{0};
  EXPECT_THROW(pool.parallel_for(16,
                                 [&](int64_t i) {
                                   ran.fetch_add(1);
                                   if (i == 5) throw std::runtime_error("task 5");
                                 }),
               std::runtime_error);
  EXPECT_EQ(ran.load(), 16) << "the other tasks still run";
  std::atomic<int> after{0};
  pool.parallel_for(4, [&](int64_t) { after.fetch_add(1); });  // the pool still works after a throw
  EXPECT_EQ(after.load(), 4);
}
