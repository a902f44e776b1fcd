// Exact row-wise top-k indices for XLA:CPU, as an XLA FFI custom call.
//
// Why not lax.top_k: XLA:CPU runs TopK as one std::partial_sort per row on a single
// thread (O(n log k) per row); at the concept heads' shapes (2048 rows x 8192 concepts,
// k = 128) that is ~100 ms of a ~2 s train step. This kernel is O(n) per row and splits
// the rows over XLA's intra-op thread pool.
//
// Order (the same as XLA's TopK): descending by the IEEE total order
//   -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN,
// ties broken by the lower index first. Input x [R, n] f32 (leading dims flattened),
// output ids [R, k] s32, row r's ids sorted by that order.
//
// Per row: topk_row.h (O(n + k log k)).
//
// A second target ranks capped logits: CbmTopKCapped(x; clip, mode) -> (ids, x[ids]) ranks
// cap(x) (topk_row.h's Capped, cap_logits' clamp modes) and returns the raw x at the
// winners, so the concept heads' selection neither writes cap(z) [N,C] nor gathers from z.

#include <cstdint>
#include <string>

#include "cpu_parallel.h"
#include "topk_row.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Both targets: ids [R, k] of each row's k largest cap(x), and where vals is given the raw
// x at them, after checking the shapes the FFI cannot (``what`` names the target).
ffi::Error RankRows(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, float clip, int32_t mode,
                    ffi::ResultBuffer<ffi::S32>& ids, float* vals, const char* what) {
  auto invalid = [what](const char* why) {
    return ffi::Error::InvalidArgument(std::string(what) + ": " + why);
  };
  const auto dims = x.dimensions();
  if (dims.size() < 1) return invalid("x must have rank >= 1");
  if (!cbm_lm::IsCapMode(mode)) return invalid("mode must be 0 (none), 1 (hard) or 2");
  const int64_t n = dims.back();
  const int64_t rows = n == 0 ? 0 : x.element_count() / n;
  const int64_t k = ids->dimensions().back();
  if (k < 1 || k > n) return invalid("need 1 <= k <= n");
  const float* xp = x.typed_data();
  int32_t* out = ids->typed_data();
  cbm_lm::ParallelFor(pool, rows, cbm_lm::RowBlock(pool, rows), [=](int64_t begin, int64_t end) {
    thread_local cbm_lm::RowScratch scratch;   // reused across the rows and calls of one thread
    for (int64_t r = begin; r < end; ++r) {
      cbm_lm::TopKRow(xp + r * n, n, k, clip, mode, out + r * k,
                      vals == nullptr ? nullptr : vals + r * k, scratch);
    }
  });
  return ffi::Error::Success();
}

ffi::Error TopKIndicesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::ResultBuffer<ffi::S32> ids) {
  return RankRows(pool, x, 0.0f, cbm_lm::kNoCap, ids, nullptr, "topk_indices");
}

ffi::Error TopKCappedImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, float clip,
                          int32_t mode, ffi::ResultBuffer<ffi::S32> ids,
                          ffi::ResultBuffer<ffi::F32> vals) {
  return RankRows(pool, x, clip, mode, ids, vals->typed_data(), "topk_capped");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbmTopKIndices, TopKIndicesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbmTopKCapped, TopKCappedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("clip")
                                  .Attr<int32_t>("mode")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
