// Splitting a kernel's work over XLA:CPU's intra-op thread pool (FFI ThreadPool context).
#ifndef PEER_JAX_OPS_CPU_PARALLEL_H_
#define PEER_JAX_OPS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace peer_jax {

// Runs fn(block) for block in [0, num_blocks) on the calling thread and up to
// pool.num_threads() helpers, which claim blocks from a shared counter. Returns when every
// block is done. A helper that starts after the blocks ran out touches nothing, so the
// caller never waits on a helper that the pool has not started (no deadlock when the pool
// is busy); `busy` counts only helpers inside the loop.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t num_blocks, Fn fn) {
  if (num_blocks <= 0) return;
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> busy{0};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, num_blocks, &fn] {
    for (;;) {
      const int64_t b = shared->next.fetch_add(1);
      if (b >= num_blocks) return;
      fn(b);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), num_blocks - 1);
  for (int64_t t = 0; t < helpers; ++t) {
    // `fn` lives on the caller's stack: a helper may only call it while the caller waits,
    // which `busy` (raised before claiming a block) guarantees.
    pool.Schedule([shared, num_blocks, fnp = &fn] {
      shared->busy.fetch_add(1);
      for (;;) {
        const int64_t b = shared->next.fetch_add(1);
        if (b >= num_blocks) break;
        (*fnp)(b);
      }
      shared->busy.fetch_sub(1);
    });
  }
  run();
  while (shared->busy.load() != 0) std::this_thread::yield();
}

}  // namespace peer_jax

#endif  // PEER_JAX_OPS_CPU_PARALLEL_H_
