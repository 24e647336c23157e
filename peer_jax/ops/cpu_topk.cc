// Row-wise top-k of an f32 array on the last axis, as an XLA FFI handler for the CPU.
//
// Why: XLA:CPU's TopK runs single-threaded with a ~2 us fixed cost per row; PEER's
// retrieval does three top-k's over T*h rows (two of n = sqrt(N) sub-key scores, one of
// k*k candidates) and they dominate the layer on CPU. This kernel bounds the k-th value
// of a row from block maxima, looks only into the few blocks that can hold a top-k
// element, and splits the rows over XLA's intra-op thread pool.
//
// Order: the same as lax.top_k, a total order on floats (-NaN < -inf < ... < -0 < +0 <
// ... < inf < NaN, via an integer key) with ties broken by the lower index.
// Built at first use by peer_jax/ops/cpu_kernels.py; the reference is lax.top_k.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Integer key whose signed order is the float total order.
inline int32_t OrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits ^ static_cast<int32_t>(static_cast<uint32_t>(bits >> 31) >> 1);
}

// Sorted buffer of the k best (key, index) pairs seen so far, best first: a higher key,
// or an equal key at a lower index (lax.top_k's tie order, whatever the scan order).
struct Best {
  int32_t* keys;
  int32_t* indices;
  int64_t k, size = 0;

  static bool Before(int32_t key_a, int32_t index_a, int32_t key_b, int32_t index_b) {
    return key_a > key_b || (key_a == key_b && index_a < index_b);
  }

  bool Wants(int32_t key, int32_t index) const {
    return size < k || Before(key, index, keys[k - 1], indices[k - 1]);
  }

  void Insert(int32_t key, int32_t index) {
    int64_t pos = size < k ? size : k - 1;
    while (pos > 0 && Before(key, index, keys[pos - 1], indices[pos - 1])) {
      keys[pos] = keys[pos - 1];
      indices[pos] = indices[pos - 1];
      --pos;
    }
    keys[pos] = key;
    indices[pos] = index;
    if (size < k) ++size;
  }
};

// Scratch for one thread: order keys of a row, group maxima, the buffer's keys.
struct Scratch {
  std::unique_ptr<int32_t[]> row_keys, group_max, group_sel, best_keys;
  Scratch(int64_t n, int64_t groups, int64_t k)
      : row_keys(new int32_t[n]), group_max(new int32_t[groups]),
        group_sel(new int32_t[groups]), best_keys(new int32_t[k]) {}
};

// Number of groups a row is split into: about 4k, so that the k-th largest group maximum
// (a lower bound on the k-th largest element) leaves ~k groups to look into.
int64_t NumGroups(int64_t n, int64_t k) {
  return std::max<int64_t>(1, std::min(n, 4 * k));
}

// Top-k of one row of n values into (values, indices), best first.
//
// The row is split into G strided groups, group g = {g, g + G, g + 2G, ...}, so that the
// group maxima are an elementwise max over contiguous slices (vectorised). The k-th
// largest group maximum t0 is a lower bound on the row's k-th largest key (the k largest
// group maxima are k distinct elements), and only groups whose maximum reaches t0 can
// hold a top-k element: their elements >= t0 go through the sorted buffer. Exact, ties
// included.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The first pass is a vectorised key transform + max: AVX2 where the CPU has it.
__attribute__((target_clones("avx2", "default")))
#endif
void TopKRow(const float* row, int64_t n, int64_t k, int64_t groups, Scratch& s,
             float* out_values, int32_t* out_indices) {
  int32_t* __restrict keys = s.row_keys.get();
  int32_t* __restrict gmax = s.group_max.get();
  for (int64_t g = 0; g < groups; ++g) gmax[g] = std::numeric_limits<int32_t>::min();
  for (int64_t start = 0; start < n; start += groups) {
    const int64_t len = std::min(groups, n - start);
    const float* __restrict x = row + start;
    int32_t* __restrict kk = keys + start;
    for (int64_t g = 0; g < len; ++g) {
      kk[g] = OrderKey(x[g]);
      gmax[g] = std::max(gmax[g], kk[g]);
    }
  }
  int32_t t0 = std::numeric_limits<int32_t>::min();
  if (groups > k) {
    int32_t* sel = s.group_sel.get();
    std::copy(gmax, gmax + groups, sel);
    std::nth_element(sel, sel + (k - 1), sel + groups, std::greater<int32_t>());
    t0 = sel[k - 1];
  }
  Best best{s.best_keys.get(), out_indices, k};
  for (int64_t g = 0; g < groups; ++g) {
    if (gmax[g] < t0) continue;
    for (int64_t i = g; i < n; i += groups) {
      const int32_t key = keys[i];
      if (key >= t0 && best.Wants(key, static_cast<int32_t>(i))) {
        best.Insert(key, static_cast<int32_t>(i));
      }
    }
  }
  for (int64_t j = 0; j < k; ++j) out_values[j] = row[out_indices[j]];
}

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices) {
  auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("top_k needs at least one axis");
  const int64_t n = dims.back();
  auto out_dims = values->dimensions();
  const int64_t k = out_dims.size() ? out_dims.back() : 0;
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("top_k needs 1 <= k <= n");
  const int64_t rows = static_cast<int64_t>(x.element_count()) / n;
  const float* x_data = x.typed_data();
  float* v_data = values->typed_data();
  int32_t* i_data = indices->typed_data();
  const int64_t groups = NumGroups(n, k);
  // Blocks of ~64k elements: enough to amortise scheduling, enough blocks to balance.
  const int64_t rows_per_block = std::max<int64_t>(1, (1 << 16) / n);
  peer_jax::ParallelFor(pool, (rows + rows_per_block - 1) / rows_per_block, [&](int64_t b) {
    Scratch scratch(n, groups, k);
    const int64_t end = std::min(rows, (b + 1) * rows_per_block);
    for (int64_t r = b * rows_per_block; r < end; ++r) {
      TopKRow(x_data + r * n, n, k, groups, scratch, v_data + r * k, i_data + r * k);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PeerJaxTopKF32, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
