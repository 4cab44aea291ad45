// Running a native kernel's work on XLA's intra-op thread pool, shared by medjax's FFI handlers.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

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

// RunTasks without a final step.
template <typename Work>
xla::ffi::Future RunTasks(xla::ffi::ThreadPool& pool, int64_t tasks, Work work) {
  return RunTasks(pool, tasks, work, [] {});
}

// How many tasks to split m rows of c floats into: one per pool thread, but at least 64 K floats each, so
// that small maps do not pay for threading.
inline int64_t RowTasks(xla::ffi::ThreadPool& pool, int64_t m, int64_t c) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(threads, m * c / (1 << 16)));
}

// Splits rows [0, m) of an (m, c) array into RowTasks chunks and runs rows(t, r0, r1) for each (t the
// chunk's index) on the pool, then done().
template <typename Rows, typename Done>
xla::ffi::Future RunRowTasks(xla::ffi::ThreadPool& pool, int64_t m, int64_t c, Rows rows, Done done) {
  const int64_t tasks = RowTasks(pool, m, c);
  const int64_t chunk = (m + tasks - 1) / tasks;
  return RunTasks(
      pool, tasks, [=](int64_t t) { rows(t, t * chunk, std::min(m, (t + 1) * chunk)); }, done);
}

template <typename Rows>
xla::ffi::Future RunRowTasks(xla::ffi::ThreadPool& pool, int64_t m, int64_t c, Rows rows) {
  return RunRowTasks(pool, m, c, rows, [] {});
}

// Two sums of c columns from `tasks` tasks: work(t, s0, s1) adds task t's sums into its own c doubles s0 and
// s1 (zero at first); once every task has run, the tasks' sums are added in task order into out0 and out1
// (c floats each), so the result does not depend on scheduling.
template <typename Work>
xla::ffi::Future RunTaskSums(xla::ffi::ThreadPool& pool, int64_t tasks, int64_t c, float* out0, float* out1,
                             Work work) {
  auto partial = std::make_shared<std::vector<double>>(2 * tasks * c, 0.0);
  auto task_sums = [=](int64_t t) {
    double* mine = partial->data() + 2 * t * c;
    work(t, mine, mine + c);
  };
  auto add_tasks = [=]() {
    for (int64_t k = 0; k < c; ++k) {
      double total0 = 0.0, total1 = 0.0;
      for (int64_t u = 0; u < tasks; ++u) {
        total0 += (*partial)[2 * u * c + k];
        total1 += (*partial)[2 * u * c + c + k];
      }
      out0[k] = static_cast<float>(total0);
      out1[k] = static_cast<float>(total1);
    }
  };
  return RunTasks(pool, tasks, task_sums, add_tasks);
}

// Two per-column sums over the rows of an (m, c) array: rows(r0, r1, s0, s1) adds rows [r0, r1)'s sums into
// its chunk's doubles (RunTaskSums), the rows split as RunRowTasks splits them.
template <typename Rows>
xla::ffi::Future RunColumnSums(xla::ffi::ThreadPool& pool, int64_t m, int64_t c, float* out0, float* out1,
                               Rows rows) {
  const int64_t tasks = RowTasks(pool, m, c);
  const int64_t chunk = (m + tasks - 1) / tasks;
  return RunTaskSums(pool, tasks, c, out0, out1, [=](int64_t t, double* s0, double* s1) {
    rows(t * chunk, std::min(m, (t + 1) * chunk), s0, s1);
  });
}

}  // namespace medjax
