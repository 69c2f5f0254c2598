#pragma once
// Internal to csrc/: BERT's per-row masking, shared by mask_tokens (masking.cpp) and collate_mlm
// (collate.cpp) so that both give the same masks for the same seed. Not a public header.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastbert {
namespace masking_rows {

constexpr int64_t kIgnoreIndex = -100;  // what torch's cross_entropy skips
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;  // 2^64 / golden ratio: the splitmix64 increment
constexpr double kTwoTo32 = 4294967296.0;

// splitmix64's output function: a bijective 64-bit mixer, good enough to turn a counter into
// independent-looking uniform bits.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Counter-based random bits for one row: every (seed, row, position) gets its own draws, computed
// from nothing else, so the output is the same whatever thread handles the row.
class RowDraws {
 public:
  RowDraws(uint64_t seed, int64_t row)
      : key_(mix64(mix64(seed) + kGolden * (static_cast<uint64_t>(row) + 1))) {}

  // High 32 bits: the selection draw; low 32 bits: the 80/10/10 draw.
  uint64_t token(int64_t pos) const { return mix64(key_ + kGolden * (2 * static_cast<uint64_t>(pos) + 1)); }
  // The draw that picks the random replacement id (only needed for the few "random" tokens).
  uint32_t pick(int64_t pos) const {
    return static_cast<uint32_t>(mix64(key_ + kGolden * (2 * static_cast<uint64_t>(pos) + 2)) >> 32);
  }

 private:
  uint64_t key_;
};

// A probability as a threshold on a 32-bit uniform draw u: the event is u < threshold.
// floor(p * 2^32) is exact in double arithmetic, so Python computes the same number.
inline uint64_t threshold(double p) { return static_cast<uint64_t>(std::floor(p * kTwoTo32)); }

struct MaskingRule {
  const uint8_t* is_special;     // (vocab_size,) 1 = never selected, never a replacement
  const int64_t* specials;       // the distinct special ids, ascending
  int64_t num_specials;
  uint64_t num_replacements;     // vocab_size - num_specials
  int64_t vocab_size;
  int64_t mask_token_id;
  uint64_t select_below;         // selection draw < this → selected
  uint64_t mask_below;           // 80/10/10 draw < this → [MASK]
  uint64_t random_below;         // else draw < this → random id; else unchanged
};

// The n-th non-special id in ascending order: n shifted past every special id at or below it (a
// handful, and only for the ~1.5% random replacements; a table of all non-special ids cost a 240 KB
// allocation per call).
inline int64_t nth_replacement(const MaskingRule& rule, uint64_t n) {
  int64_t id = static_cast<int64_t>(n);
  for (int64_t i = 0; i < rule.num_specials && rule.specials[i] <= id; ++i) ++id;
  return id;
}

// Writes one token's masked id and label with bit masks, not branches (but for the rare random
// replacement): whether a token is selected is a coin flip no branch predictor can learn, and GCC
// turned the equivalent ?: into branches.
inline void write_token(const MaskingRule& rule, const RowDraws& draws, int64_t pos, uint64_t draw, int64_t id,
                        bool selected, int64_t* out, int64_t* labels) {
  const uint64_t action = draw & 0xFFFFFFFFull;
  const bool to_mask = selected & (action < rule.mask_below);
  const int64_t keep_label = static_cast<int64_t>(selected) - 1;  // all ones when not selected
  const int64_t use_mask = -static_cast<int64_t>(to_mask);        // all ones when → [MASK]
  labels[pos] = (id & ~keep_label) | (kIgnoreIndex & keep_label);
  out[pos] = (rule.mask_token_id & use_mask) | (id & ~use_mask);
  // One unsigned range test (action - mask_below wraps when action < mask_below): GCC split the
  // three-way && into branches, one of which mispredicted on every selection draw.
  const uint64_t to_random = static_cast<uint64_t>(selected) &
                             static_cast<uint64_t>(action - rule.mask_below < rule.random_below - rule.mask_below);
  if (__builtin_expect(to_random, 0)) {
    // Lemire's multiply-shift maps a 32-bit draw onto [0, n) without a division.
    out[pos] = nth_replacement(rule, (static_cast<uint64_t>(draws.pick(pos)) * rule.num_replacements) >> 32);
  }
}

inline bool out_of_vocab(const MaskingRule& rule, int64_t id) {
  return __builtin_expect(static_cast<uint64_t>(id) >= static_cast<uint64_t>(rule.vocab_size), 0);
}

// The row functions take the rule by value and the rows as __restrict__ pointers: otherwise every
// store to out/labels may alias the rule, and GCC reloaded its fields from memory for each token.

// One row, one Bernoulli draw per token. Returns the first out-of-range column, or -1.
inline int64_t mask_row(const MaskingRule rule, const RowDraws draws, const int64_t* __restrict__ in,
                 int64_t* __restrict__ out, int64_t* __restrict__ labels, int64_t seqlen) {
  for (int64_t t = 0; t < seqlen; ++t) {
    const int64_t id = in[t];
    if (out_of_vocab(rule, id)) return t;
    const uint64_t draw = draws.token(t);
    const bool selected = !rule.is_special[id] & ((draw >> 32) < rule.select_below);
    write_token(rule, draws, t, draw, id, selected, out, labels);
  }
  return -1;
}

// One row, one Bernoulli draw per word (taken at its first piece); every piece of a selected word
// gets its own 80/10/10 draw, as in Google's BERT. A special token ends the current word, and a
// continuation piece with no word to continue starts one.
inline int64_t mask_row_whole_word(const MaskingRule rule, const RowDraws draws, const int64_t* __restrict__ in,
                            const bool* __restrict__ starts, int64_t* __restrict__ out,
                            int64_t* __restrict__ labels, int64_t seqlen) {
  bool in_word = false;
  bool word_selected = false;
  for (int64_t t = 0; t < seqlen; ++t) {
    const int64_t id = in[t];
    if (out_of_vocab(rule, id)) return t;
    const uint64_t draw = draws.token(t);
    const bool special = rule.is_special[id];
    const bool new_word = starts[t] | !in_word;
    word_selected = (new_word & ((draw >> 32) < rule.select_below)) | (!new_word & word_selected);
    in_word = !special;
    write_token(rule, draws, t, draw, id, !special & word_selected, out, labels);
  }
  return -1;
}


// The rule of one masking call and the tables it points into (keep this object alive while masking).
class MaskingTables {
 public:
  // Checks every argument (a ValueError naming the problem) and builds the tables. special_ids: int64 1-D.
  MaskingTables(const at::Tensor& special_ids, int64_t mask_token_id, int64_t vocab_size, double mlm_probability,
                double mask_ratio, double random_ratio) {
    TORCH_CHECK_VALUE(vocab_size > 0 && vocab_size <= std::numeric_limits<int32_t>::max(),
                      "mask_tokens: vocab_size must be in [1, 2^31), got ", vocab_size);
    TORCH_CHECK_VALUE(mask_token_id >= 0 && mask_token_id < vocab_size, "mask_tokens: mask_token_id ",
                      mask_token_id, " is outside the vocabulary [0, ", vocab_size, ")");
    for (double p : {mlm_probability, mask_ratio, random_ratio}) {
      TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "mask_tokens: probabilities must be in [0, 1], got ", p);
    }
    TORCH_CHECK_VALUE(threshold(mask_ratio) + threshold(random_ratio) <= threshold(1.0),
                      "mask_tokens: mask_ratio + random_ratio must be <= 1, got ", mask_ratio, " + ", random_ratio);
    TORCH_CHECK(special_ids.device().is_cpu() && special_ids.scalar_type() == at::kLong && special_ids.dim() == 1,
                "mask_tokens: special_ids must be a 1-D int64 CPU tensor");
    is_special_.assign(vocab_size, 0);
    const at::Tensor specials = special_ids.contiguous();
    const int64_t* special = specials.data_ptr<int64_t>();
    for (int64_t i = 0; i < specials.numel(); ++i) {
      TORCH_CHECK_VALUE(special[i] >= 0 && special[i] < vocab_size, "mask_tokens: special token id ", special[i],
                        " is outside the vocabulary [0, ", vocab_size, ")");
      sorted_specials_.push_back(special[i]);
    }
    sorted_specials_.push_back(mask_token_id);
    // Sorting the few special ids, not scanning the whole vocabulary for them (30k steps per batch).
    std::sort(sorted_specials_.begin(), sorted_specials_.end());
    sorted_specials_.erase(std::unique(sorted_specials_.begin(), sorted_specials_.end()), sorted_specials_.end());
    for (int64_t id : sorted_specials_) is_special_[id] = 1;
    const int64_t num_replacements = vocab_size - static_cast<int64_t>(sorted_specials_.size());
    TORCH_CHECK_VALUE(num_replacements > 0 || threshold(random_ratio) == 0,
                      "mask_tokens: random_ratio > 0 but every id in the vocabulary is special");
    rule_ = MaskingRule{is_special_.data(),
                        sorted_specials_.data(),
                        static_cast<int64_t>(sorted_specials_.size()),
                        static_cast<uint64_t>(num_replacements),
                        vocab_size,
                        mask_token_id,
                        threshold(mlm_probability),
                        threshold(mask_ratio),
                        threshold(mask_ratio) + threshold(random_ratio)};
  }
  MaskingTables(const MaskingTables&) = delete;
  MaskingTables& operator=(const MaskingTables&) = delete;

  const MaskingRule& rule() const { return rule_; }

 private:
  std::vector<uint8_t> is_special_;
  std::vector<int64_t> sorted_specials_;
  MaskingRule rule_{};
};

}  // namespace masking_rows
}  // namespace fastbert
