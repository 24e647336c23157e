// The PEER expert path's three memory-bound primitives as XLA FFI CPU kernels:
//
//   gather_dot    out[t, m] = table[idx[t, m]] · x[t]                    (T, M)
//   gather_wsum   out[t]    = Σ_m coef[t, m] · table[idx[t, m]]          (T, D)
//   scatter_outer out       = zeros(N, D); out[idx[t, m]] += a[t, m] · x[t]
//
// Why: on CPU, XLA materialises every (tokens, M, D) gather in memory before the dot or
// the weighted sum (a fresh buffer per chunk, single-threaded), and its scatter-add is
// single-threaded. These kernels read each selected row once, straight into the dot or
// the sum, and split the work over XLA's intra-op thread pool: tokens for the gathers;
// disjoint row blocks of the output for the scatter, so there are no races and every row
// sums its contributions in (t, m) order (deterministic). Everything is f32.
// Built at first use by peer_jax/ops/cpu_kernels.py; the references are the XLA paths in
// peer_jax/ops/experts.py (tests/test_cpu_experts.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEER_JAX_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define PEER_JAX_CLONES
#endif

// Eight partial sums let the compiler vectorise without reassociating (-ffast-math).
PEER_JAX_CLONES
float Dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  }
  float tail = 0;
  for (; j < d; ++j) tail += a[j] * b[j];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) +
         tail;
}

PEER_JAX_CLONES
void Axpy(float alpha, const float* __restrict x, float* __restrict y, int64_t d) {
  for (int64_t j = 0; j < d; ++j) y[j] += alpha * x[j];
}

// Rows are ~1 KiB at random places in a table of GiBs: fetch the row `ahead` pairs in
// advance so several rows are in flight (the hardware prefetcher only follows one row).
constexpr int64_t kAhead = 8;

inline void PrefetchRow(const float* row, int64_t d) {
  for (int64_t j = 0; j < d; j += 16) __builtin_prefetch(row + j);
}

// Tokens per parallel block: enough rows (M per token) to amortise scheduling.
int64_t TokenBlock(int64_t m) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(m, 1)); }

ffi::Error CheckShapes(const ffi::Buffer<ffi::F32>& table, const ffi::Buffer<ffi::S32>& idx,
                       int64_t tokens, int64_t d) {
  auto t = table.dimensions();
  auto i = idx.dimensions();
  if (t.size() != 2 || i.size() != 2 || i[0] != tokens || t[1] != d) {
    return ffi::Error::InvalidArgument("expected table (N, D), idx (T, M), rows (T, D)");
  }
  return ffi::Error::Success();
}

ffi::Error GatherDotImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                         ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> x,
                         ffi::ResultBuffer<ffi::F32> out) {
  const int64_t tokens = x.dimensions()[0], d = x.dimensions()[1];
  if (auto e = CheckShapes(table, idx, tokens, d); e.failure()) return e;
  const int64_t m = idx.dimensions()[1];
  const float* tab = table.typed_data();
  const int32_t* ids = idx.typed_data();
  const float* xs = x.typed_data();
  float* o = out->typed_data();
  const int64_t block = TokenBlock(m);
  peer_jax::ParallelFor(pool, (tokens + block - 1) / block, [&](int64_t b) {
    const int64_t end = std::min(tokens, (b + 1) * block);
    const int64_t last = end * m;
    for (int64_t p = b * block * m; p < last; ++p) {
      if (p + kAhead < last) PrefetchRow(tab + static_cast<int64_t>(ids[p + kAhead]) * d, d);
      o[p] = Dot(tab + static_cast<int64_t>(ids[p]) * d, xs + (p / m) * d, d);
    }
  });
  return ffi::Error::Success();
}

ffi::Error GatherWsumImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> table,
                          ffi::Buffer<ffi::S32> idx, ffi::Buffer<ffi::F32> coef,
                          ffi::ResultBuffer<ffi::F32> out) {
  const int64_t tokens = out->dimensions()[0], d = out->dimensions()[1];
  if (auto e = CheckShapes(table, idx, tokens, d); e.failure()) return e;
  const int64_t m = idx.dimensions()[1];
  const float* tab = table.typed_data();
  const int32_t* ids = idx.typed_data();
  const float* c = coef.typed_data();
  float* o = out->typed_data();
  const int64_t block = TokenBlock(m);
  peer_jax::ParallelFor(pool, (tokens + block - 1) / block, [&](int64_t b) {
    const int64_t end = std::min(tokens, (b + 1) * block);
    const int64_t last = end * m;
    for (int64_t t = b * block; t < end; ++t) {
      float* row = o + t * d;
      std::fill(row, row + d, 0.0f);
      for (int64_t p = t * m; p < (t + 1) * m; ++p) {
        if (p + kAhead < last) PrefetchRow(tab + static_cast<int64_t>(ids[p + kAhead]) * d, d);
        Axpy(c[p], tab + static_cast<int64_t>(ids[p]) * d, row, d);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterOuterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> idx,
                            ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> x,
                            ffi::ResultBuffer<ffi::F32> out) {
  const int64_t n = out->dimensions()[0], d = out->dimensions()[1];
  const int64_t tokens = x.dimensions()[0];
  if (idx.dimensions().size() != 2 || idx.dimensions()[0] != tokens ||
      x.dimensions()[1] != d) {
    return ffi::Error::InvalidArgument("expected idx (T, M), a (T, M), x (T, D), out (N, D)");
  }
  const int64_t m = idx.dimensions()[1];
  const int64_t pairs = tokens * m;
  const int32_t* ids = idx.typed_data();
  const float* coef = a.typed_data();
  const float* xs = x.typed_data();
  float* o = out->typed_data();
  // Output rows in blocks of ~256 KiB (L2-sized). A counting sort groups the pairs by
  // block (stable, so each row still sums in (t, m) order); each block is then zeroed and
  // receives its pairs while its rows are in cache, instead of a cold read-modify-write
  // of a random row per pair after a separate fill of the whole table.
  const int64_t rows_per_block = std::max<int64_t>(1, (256 << 10) / (d * 4));
  const int64_t num_blocks = (n + rows_per_block - 1) / rows_per_block;
  std::vector<int64_t> start(num_blocks + 1, 0);
  for (int64_t p = 0; p < pairs; ++p) ++start[ids[p] / rows_per_block + 1];
  for (int64_t b = 0; b < num_blocks; ++b) start[b + 1] += start[b];
  std::vector<int32_t> order(pairs);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[fill[ids[p] / rows_per_block]++] = p;
  }
  const int64_t blocks_per_task = 16;
  const int64_t tasks = (num_blocks + blocks_per_task - 1) / blocks_per_task;
  peer_jax::ParallelFor(pool, tasks, [&](int64_t task) {
    const int64_t b_end = std::min(num_blocks, (task + 1) * blocks_per_task);
    for (int64_t b = task * blocks_per_task; b < b_end; ++b) {
      const int64_t lo = b * rows_per_block, hi = std::min(n, lo + rows_per_block);
      std::memset(o + lo * d, 0, sizeof(float) * (hi - lo) * d);
      for (int64_t q = start[b]; q < start[b + 1]; ++q) {
        const int64_t p = order[q];
        Axpy(coef[p], xs + (p / m) * d, o + static_cast<int64_t>(ids[p]) * d, d);
      }
    }
  });
  return ffi::Error::Success();
}

// Both gathers: (table f32 (N, D), idx s32 (T, M), per-token f32 operand) -> f32.
auto GatherBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxGatherDotF32, GatherDotImpl, GatherBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxGatherWsumF32, GatherWsumImpl, GatherBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxScatterOuterF32, ScatterOuterImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
