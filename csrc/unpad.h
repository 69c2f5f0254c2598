#pragma once
#include <torch/extension.h>

#include <tuple>

namespace fastbert {

// Metadata to drop padding from a (batch, seqlen) attention mask (nonzero = real token):
// indices  int64 (total,)     flat positions b*seqlen + t of the real tokens, row-major order
// cu_seqlens int32 (batch+1,) prefix sums of the per-row real-token counts
// max_seqlen                  the largest per-row count
std::tuple<at::Tensor, at::Tensor, int64_t> unpad_metadata(const at::Tensor& attention_mask);

}  // namespace fastbert
