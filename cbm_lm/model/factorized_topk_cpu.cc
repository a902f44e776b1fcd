// Top-k of a factorized concept head's capped logits without forming them, for XLA:CPU.
//
//   z = q ut          q [R, r], ut [r, n]  (r the head's rank, n its concepts)
//   ids  [R, k]       the k largest cap(z[row, :]) per row (topk_row.h's order and cap)
//   vals [R, k]       z at those ids (raw, uncapped)
//
// Why: XLA:CPU writes z [R, n] (2048 x 8192 floats at Steerling's proportions) from a
// rank-32 product at about a fifth of the matmul peak, then reads it back to cap and to
// rank it; this kernel scores a block of rows into a buffer that stays in cache and ranks
// it there. z[row, c] sums q[row, j] ut[j, c] over j in order (one fused multiply-add per
// j), the same on every CPU and for any split of the rows over threads or devices, so a
// row's ids never depend on the split; they can differ from XLA's own product (another
// summation order, as on other platforms) only where two logits tie to within rounding.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_parallel.h"
#include "topk_row.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 8;    // rows scored together: each ut load feeds kRows FMAs
constexpr int64_t kCols = 32;   // columns per tile: kRows x kCols accumulators (registers
                                // under AVX-512, partly spilled to L1 under AVX2)

// z[i, c] for rows [0, m) of q (m <= kRows) into z (m x n, row-major).
void ScoreRows(const float* q, int64_t m, int64_t r, const float* ut, int64_t n, float* z) {
  int64_t c0 = 0;
  for (; c0 + kCols <= n; c0 += kCols) {
    float acc[kRows][kCols] = {};
    for (int64_t j = 0; j < r; ++j) {
      const float* u = ut + j * n + c0;
      for (int64_t i = 0; i < kRows; ++i) {
        const float a = i < m ? q[i * r + j] : 0.0f;
        for (int64_t c = 0; c < kCols; ++c) acc[i][c] = __builtin_fmaf(a, u[c], acc[i][c]);
      }
    }
    for (int64_t i = 0; i < m; ++i) std::copy(acc[i], acc[i] + kCols, z + i * n + c0);
  }
  for (int64_t i = 0; i < m; ++i) {   // the last n % kCols columns
    for (int64_t c = c0; c < n; ++c) {
      float s = 0.0f;
      for (int64_t j = 0; j < r; ++j) s = __builtin_fmaf(q[i * r + j], ut[j * n + c], s);
      z[i * n + c] = s;
    }
  }
}

ffi::Error FactorizedTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                              ffi::Buffer<ffi::F32> ut, float clip, int32_t mode,
                              ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> vals) {
  const auto q_dims = q.dimensions();
  const auto ut_dims = ut.dimensions();
  if (q_dims.size() < 1 || ut_dims.size() != 2 || q_dims.back() != ut_dims[0])
    return ffi::Error::InvalidArgument("factorized_topk: need q [..., r] and ut [r, n]");
  if (!cbm_lm::IsCapMode(mode))
    return ffi::Error::InvalidArgument("factorized_topk: mode must be 0 (none), 1 (hard) or 2");
  const int64_t r = ut_dims[0], n = ut_dims[1];
  if (r < 1) return ffi::Error::InvalidArgument("factorized_topk: need rank r >= 1");
  const int64_t rows = q.element_count() / r;
  const int64_t k = ids->dimensions().back();
  if (k < 1 || k > n) return ffi::Error::InvalidArgument("factorized_topk: need 1 <= k <= n");
  const float* qp = q.typed_data();
  const float* up = ut.typed_data();
  int32_t* out = ids->typed_data();
  float* val = vals->typed_data();
  const int64_t blocks = (rows + kRows - 1) / kRows;
  const int64_t per_task = std::max<int64_t>(1, cbm_lm::RowBlock(pool, blocks) / 2);
  cbm_lm::ParallelFor(pool, blocks, per_task, [=](int64_t begin, int64_t end) {
    thread_local cbm_lm::RowScratch scratch;
    thread_local std::vector<float> z;   // kRows x n scores: stays in L2 (256 KiB at n 8192)
    z.resize(kRows * n);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row0 = b * kRows, m = std::min(kRows, rows - row0);
      ScoreRows(qp + row0 * r, m, r, up, n, z.data());
      for (int64_t i = 0; i < m; ++i) {
        const int64_t row = row0 + i;
        cbm_lm::TopKRow(z.data() + i * n, n, k, clip, mode, out + row * k, val + row * k,
                        scratch);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CbmFactorizedTopK, FactorizedTopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("clip")
                                  .Attr<int32_t>("mode")
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
