#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <optional>

namespace fastbert {

// The whole MLM collate step in one call: reads a Python list of examples, pads (or packs) them,
// masks them with mask_tokens (same rule, same seed → same masks) and builds the unpad metadata.
//
// An example is a dict {"input_ids", optional "token_type_ids", optional "next_sentence_label"}, a
// tuple/list (input_ids[, token_type_ids[, next_sentence_label]]), or a bare id sequence. An id
// sequence is a list/tuple of Python ints, a 1-D integer numpy array (native byte order, any stride)
// or a 1-D integer CPU tensor. Labels are Python ints or None.
//
// Returns a dict (the keys of fastbert.data.MLMCollator's batch), or, when some example is in another
// form or breaks a rule (length outside [1, max_len], token_type_ids of another length, labels on
// some examples only, ...), the index of the first such example as a Python int and nothing else:
// the caller then takes its own path, which explains the problem or reads the unusual form.
// Ids outside the vocabulary raise a ValueError, as mask_tokens does.
py::object collate_mlm(const py::object& examples, int64_t max_len, std::optional<int64_t> pad_to_multiple_of,
                       bool packing, bool return_unpad_metadata, int64_t pad_token_id, const at::Tensor& special_ids,
                       int64_t mask_token_id, int64_t vocab_size, double mlm_probability, double mask_ratio,
                       double random_ratio, const std::optional<at::Tensor>& is_continuation, uint64_t seed);

}  // namespace fastbert
