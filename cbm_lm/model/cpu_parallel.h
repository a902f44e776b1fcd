// Splitting a kernel's work over XLA:CPU's intra-op thread pool (the FFI ThreadPool).
//
// ParallelFor(pool, total, block, body) runs body(begin, end) over [0, total) in blocks
// handed out from a shared counter. The calling thread works too, then waits only for the
// blocks a pool thread has claimed, so a busy pool costs parallelism, never a deadlock.
// The counters are shared_ptr-owned: a pool task that starts after the call returned
// finds no block left and touches no buffer.

#ifndef CBM_LM_MODEL_CPU_PARALLEL_H_
#define CBM_LM_MODEL_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace cbm_lm {

template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, int64_t block, Body body) {
  if (total <= 0) return;
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const int64_t n_blocks = (total + block - 1) / block;
  auto run = [state, n_blocks, total, block, body]() {
    for (int64_t b; (b = state->next.fetch_add(1)) < n_blocks;) {
      body(b * block, std::min(total, (b + 1) * block));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t helpers = std::min<int64_t>(threads, n_blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run]() { run(); });
  run();
  while (state->done.load(std::memory_order_acquire) < n_blocks) std::this_thread::yield();
}

// Rows per block: about four blocks per thread (balance), at most 64 rows.
inline int64_t RowBlock(xla::ffi::ThreadPool& pool, int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(64, rows / (4 * threads) + 1));
}

}  // namespace cbm_lm

#endif  // CBM_LM_MODEL_CPU_PARALLEL_H_
