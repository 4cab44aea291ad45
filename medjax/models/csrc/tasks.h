// Running a native kernel's work on XLA's intra-op thread pool, shared by medjax's FFI handlers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace medjax {

// Schedules work(t) for t in [0, tasks) on the pool; once all have run, the last task to finish calls
// done() and sets the returned future. The handler returns that future instead of blocking a pool thread,
// which could deadlock when every thread waits for work queued behind it.
template <typename Work, typename Done>
xla::ffi::Future RunTasks(xla::ffi::ThreadPool& pool, int64_t tasks, Work work, Done done) {
  xla::ffi::Promise promise;
  xla::ffi::Future future(promise);
  if (tasks <= 0) {
    done();
    promise.SetAvailable();
    return future;
  }
  auto remaining = std::make_shared<std::atomic<int64_t>>(tasks);
  for (int64_t t = 0; t < tasks; ++t) {
    pool.Schedule([=]() mutable {
      work(t);
      if (remaining->fetch_sub(1) != 1) return;
      done();
      promise.SetAvailable();
    });
  }
  return future;
}

// How many tasks to split m rows of c floats into: one per pool thread, but at least 64 K floats each, so
// that small maps do not pay for threading.
inline int64_t RowTasks(xla::ffi::ThreadPool& pool, int64_t m, int64_t c) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(threads, m * c / (1 << 16)));
}

// RunTasks without a final step.
template <typename Work>
xla::ffi::Future RunTasks(xla::ffi::ThreadPool& pool, int64_t tasks, Work work) {
  return RunTasks(pool, tasks, work, [] {});
}

}  // namespace medjax
