// One row's exact top-k, shared by the top-k kernels (topk_cpu.cc, factorized_topk_cpu.cc).
//
// Order (the same as XLA's TopK): descending by the IEEE total order
//   -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN,
// ties broken by the lower index first.
//
// Per row (n keys, k winners): a lower bound t on the k-th largest key from group maxima,
// one branch-free pass keeping the keys >= t (about 1.4 k of them on random rows),
// nth_element to the k best and a sort of those k: O(n + k log k).
//
// The ranked value of entry i is cap(x[i]) for a cap the caller names (CapMode), applied
// here in the same float operations XLA runs for cbm_lm.model.concept_topk.cap_logits, so
// ranking the capped row never needs it written out.

#ifndef CBM_LM_MODEL_TOPK_ROW_H_
#define CBM_LM_MODEL_TOPK_ROW_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

namespace cbm_lm {

// cap_logits' modes that are a clamp (the soft tanh cap is left to XLA).
enum CapMode : int32_t { kNoCap = 0, kHardCap = 1, kStraightThroughCap = 2 };

inline bool IsCapMode(int32_t mode) { return mode >= kNoCap && mode <= kStraightThroughCap; }

// XLA's clamp(-c, v, c) (NaN stays NaN), then for straight-through v + (clamp - v): the
// same expression, not its algebraic value, so values past 2c round as XLA rounds them.
inline float Capped(float v, float c, int32_t mode) {
  if (mode == kNoCap) return v;
  const float hard = std::min(std::max(v, -c), c);
  return mode == kHardCap ? hard : v + (hard - v);
}

// Float bits -> unsigned key whose order is the IEEE total order above.
inline uint32_t TotalOrderKey(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// A candidate as one integer whose ascending order is the output order (key descending,
// then index ascending), so selection and sort compare plain uint64s.
inline uint64_t Rank(uint32_t key, int64_t index) {
  return (static_cast<uint64_t>(~key) << 32) | static_cast<uint32_t>(index);
}

// Scratch reused across the rows one thread ranks.
struct RowScratch {
  std::vector<uint32_t> keys;
  std::vector<uint32_t> group_max;
  std::vector<uint32_t> order;   // group_max, reordered by nth_element
  std::vector<uint64_t> buf;
};

// ids of the k largest cap(x[i]), i < n, in output order, and (where vals is given) the
// raw x at them.
inline void TopKRow(const float* x, int64_t n, int64_t k, float clip, int32_t mode,
                    int32_t* out, float* vals, RowScratch& s) {
  // Groups of g keys with at least 2k groups: the k-th largest group maximum t is a
  // lower bound on the k-th largest key (k groups each hold a key >= t), so only keys
  // >= t can be in the top-k; for random rows that is about 1.4 k of the n.
  const int64_t g = std::max<int64_t>(1, std::min<int64_t>(64, n / (2 * k)));
  const int64_t n_groups = (n + g - 1) / g;
  s.keys.resize(n);
  s.group_max.resize(n_groups);
  s.order.resize(n_groups);
  uint32_t* keys = s.keys.data();
  for (int64_t q = 0; q < n_groups; ++q) {
    const int64_t end = std::min(n, (q + 1) * g);
    uint32_t m = 0;
    for (int64_t i = q * g; i < end; ++i) {   // vectorizes
      keys[i] = TotalOrderKey(Capped(x[i], clip, mode));
      m = std::max(m, keys[i]);
    }
    s.group_max[q] = m;
  }
  std::copy(s.group_max.begin(), s.group_max.end(), s.order.begin());
  std::nth_element(s.order.begin(), s.order.begin() + (k - 1), s.order.end(),
                   std::greater<uint32_t>());
  const uint32_t t = s.order[k - 1];
  std::vector<uint64_t>& buf = s.buf;
  buf.resize(n);
  int64_t c = 0;
  for (int64_t q = 0; q < n_groups; ++q) {
    if (s.group_max[q] < t) continue;   // nothing in this group can make the top-k
    const int64_t end = std::min(n, (q + 1) * g);
    for (int64_t i = q * g; i < end; ++i) {   // branch-free compaction of the keys >= t
      buf[c] = Rank(keys[i], i);
      c += keys[i] >= t;
    }
  }
  std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + c);
  std::sort(buf.begin(), buf.begin() + k);
  for (int64_t j = 0; j < k; ++j) out[j] = static_cast<int32_t>(buf[j] & 0xffffffffu);
  if (vals != nullptr) {
    for (int64_t j = 0; j < k; ++j) vals[j] = x[out[j]];
  }
}

}  // namespace cbm_lm

#endif  // CBM_LM_MODEL_TOPK_ROW_H_
