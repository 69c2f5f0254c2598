#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastbert {

// Dynamic MLM masking of a (batch, seqlen) int64 CPU batch (BERT's 80/10/10 rule).
//
// Each token that is not special is selected with probability mlm_probability (an independent
// Bernoulli draw per token; with word_starts, one draw per word, taken at the word's first piece).
// A selected token becomes mask_token_id (mask_ratio), a uniform random non-special id (random_ratio),
// or stays unchanged (the rest). special_ids (int64, 1-D) are never selected and never drawn as
// replacements; mask_token_id counts as special too.
//
// Random numbers come from a counter-based generator keyed on (seed, row, position), so the result
// depends on the seed only: not on the thread count or on how rows are split between threads.
//
// Returns (masked_ids int64 (batch, seqlen), labels int64 (batch, seqlen): the original id where
// selected, -100 elsewhere). input_ids is not modified.
std::tuple<at::Tensor, at::Tensor> mask_tokens(const at::Tensor& input_ids, const at::Tensor& special_ids,
                                               int64_t mask_token_id, int64_t vocab_size, double mlm_probability,
                                               double mask_ratio, double random_ratio,
                                               const std::optional<at::Tensor>& word_starts, uint64_t seed);

// The raw draws mask_tokens uses at each (row, position), for tests: int64 (batch, seqlen, 3) holding
// the 32-bit selection draw, the 32-bit 80/10/10 draw and the 32-bit random-id draw.
at::Tensor masking_draws(uint64_t seed, int64_t batch, int64_t seqlen);

// Whole-word boundaries: word_starts[b, t] = !is_continuation[input_ids[b, t]].
// is_continuation: bool (vocab_size,), true for WordPiece "##" pieces. Returns bool (batch, seqlen).
at::Tensor word_starts(const at::Tensor& input_ids, const at::Tensor& is_continuation);

}  // namespace fastbert
