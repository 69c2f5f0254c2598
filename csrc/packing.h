#pragma once
#include <torch/extension.h>

#include <tuple>

namespace fastbert {

// Sequence packing: place N variable-length sequences into rows of max_len tokens,
// first-fit-decreasing (longest first, each into the first row with room; ties keep input order).
// Sequences sit back to back from column 0 of their row; the rest of a row is padding.
//
// lengths: int64 (N,), each in [1, max_len]. Returns
//   row          int64 (N,)            the row of sequence i
//   offset       int64 (N,)            the column where sequence i starts
//   order        int64 (N,)            sequence indices in packed order (by row, then column)
//   cu_seqlens   int32 (N+1,)          prefix sums of the lengths in packed order: the boundaries of
//                                      each sequence in the row-major stream of real tokens
//   indices      int64 (total,)        flat positions row * max_len + column of the real tokens, row-major
//   position_ids int64 (rows, max_len) 0, 1, ... restarting at each sequence; 0 at padding
//   num_rows, max_seqlen
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>
pack_sequences(const at::Tensor& lengths, int64_t max_len);

}  // namespace fastbert
