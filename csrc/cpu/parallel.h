// Task scheduling shared by the CPU ops (csrc/cpu/*.cpp).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <ATen/Parallel.h>

namespace fastdl::cpu {

// at::parallel_for with the tasks [0, n) handed out as the threads ask: each thread runs
// body(claim) once (building its scratch), and claim(begin, end) gives it its next `grain`
// tasks, false when none are left. An even split up front leaves one core idle at the end when
// the other was slowed (a shared machine) or given the heavier tasks; which thread runs a task
// does not change its result.
template <typename F>
void parallel_claim(int64_t n, int64_t grain, const F& body) {
  std::atomic<int64_t> next{0};
  const auto claim = [&](int64_t& begin, int64_t& end) {
    begin = next.fetch_add(grain);
    end = std::min(n, begin + grain);
    return begin < n;
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { body(claim); });
}

}  // namespace fastdl::cpu
