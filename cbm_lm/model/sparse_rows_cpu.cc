// A few table rows per token, without forming the [N,S,V] gather: XLA FFI kernels for CPU.
//
//   mix(w, ids, T)[n]       = sum_s w[n,s] T[ids[n,s]]            w [N,S], T [C,V] -> [N,V]
//   pick(q, ids, T)[n,s]    = q[n] . T[ids[n,s]]                  q [N,V]          -> [N,S]
//   scatter(a, ids, b)[c]   = sum_{n,s: ids[n,s] = c} a[n,s] b[n] a [N,S], b [N,V] -> [C,V]
//
// (scatter is the table gradient of both: dT of mix is scatter(w, ids, g), of pick
// scatter(g, ids, q).) Ids outside [0, C) contribute nothing. All f32; leading dims of
// w / q / ids / b are flattened into N. Why not XLA's gather: XLA:CPU materializes the
// [N,S,V] rows (134 MB for 2048 tokens x 32 concepts x 512) and scatters as much back in
// the backward. mix and pick split tokens over XLA's intra-op thread pool; scatter splits
// table rows, each thread summing its rows' contributions in token order (deterministic).

#include <algorithm>
#include <cstdint>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using cbm_lm::ParallelFor;
using cbm_lm::RowBlock;

// x . y with kLanes independent partial sums: a float sum vectorizes only as lanes
// (reassociating one running sum would need -ffast-math).
inline float Dot(const float* __restrict x, const float* __restrict y, int64_t v) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= v; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[d + l] * y[d + l];
  }
  float acc = 0.0f;
  for (; d < v; ++d) acc += x[d] * y[d];
  for (int64_t l = 0; l < kLanes; ++l) acc += lanes[l];
  return acc;
}

ffi::Error MixImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> ids,
                   ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t s = w.dimensions().back();
  const int64_t n = s ? w.element_count() / s : 0;
  const int64_t c = table.dimensions().front(), v = table.dimensions().back();
  const float* wp = w.typed_data();
  const int32_t* ip = ids.typed_data();
  const float* tp = table.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, n, RowBlock(pool, n), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* __restrict o = op + i * v;
      std::fill(o, o + v, 0.0f);
      for (int64_t j = 0; j < s; ++j) {
        const int32_t id = ip[i * s + j];
        if (id < 0 || id >= c) continue;
        const float a = wp[i * s + j];
        const float* __restrict row = tp + static_cast<int64_t>(id) * v;
        for (int64_t d = 0; d < v; ++d) o[d] += a * row[d];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error PickImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> ids,
                    ffi::Buffer<ffi::F32> table, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t s = ids.dimensions().back();
  const int64_t n = s ? ids.element_count() / s : 0;
  const int64_t c = table.dimensions().front(), v = table.dimensions().back();
  const float* qp = q.typed_data();
  const int32_t* ip = ids.typed_data();
  const float* tp = table.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, n, RowBlock(pool, n), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict x = qp + i * v;
      for (int64_t j = 0; j < s; ++j) {
        const int32_t id = ip[i * s + j];
        op[i * s + j] = (id >= 0 && id < c) ? Dot(x, tp + static_cast<int64_t>(id) * v, v) : 0.0f;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error ScatterImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::S32> ids,
                       ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out) {
  const int64_t s = ids.dimensions().back();
  const int64_t n = s ? ids.element_count() / s : 0;
  const int64_t c = out->dimensions().front(), v = out->dimensions().back();
  const float* ap = a.typed_data();
  const int32_t* ip = ids.typed_data();
  const float* bp = b.typed_data();
  float* op = out->typed_data();
  // Each thread owns a range of table rows and walks every (n, s) in order: the sum for a
  // row is always taken in the same order, whatever the thread count.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t rows_per = std::max<int64_t>(1, (c + threads - 1) / threads);
  ParallelFor(pool, c, rows_per, [=](int64_t begin, int64_t end) {
    std::fill(op + begin * v, op + end * v, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float* __restrict x = bp + i * v;
      for (int64_t j = 0; j < s; ++j) {
        const int32_t id = ip[i * s + j];
        if (id < begin || id >= end) continue;
        const float w = ap[i * s + j];
        float* __restrict row = op + static_cast<int64_t>(id) * v;
        for (int64_t d = 0; d < v; ++d) row[d] += w * x[d];
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// All three take (f32 [N,S] or [N,V], s32 ids [N,S], f32 [C,V] or [N,V]) -> f32.
#define CBM_ROWS_HANDLER(name, impl)                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                     \
                                ffi::Ffi::Bind()                \
                                    .Ctx<ffi::ThreadPool>()     \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Arg<ffi::Buffer<ffi::S32>>() \
                                    .Arg<ffi::Buffer<ffi::F32>>() \
                                    .Ret<ffi::Buffer<ffi::F32>>());

CBM_ROWS_HANDLER(CbmRowsMix, MixImpl)
CBM_ROWS_HANDLER(CbmRowsPick, PickImpl)
CBM_ROWS_HANDLER(CbmRowsScatter, ScatterImpl)
