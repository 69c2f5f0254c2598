#include "unpad.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace fastbert {

namespace {

// Reads the mask as 0/1 whatever its integer dtype; any other value is a caller bug.
template <typename T>
void count_rows(const T* mask, int64_t batch, int64_t seqlen, std::vector<int64_t>& counts,
                std::vector<uint8_t>& bad_value) {
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* row = mask + b * seqlen;
      int64_t n = 0;
      for (int64_t t = 0; t < seqlen; ++t) {
        const T v = row[t];
        if (v == T(1)) {
          ++n;
        } else if (v != T(0)) {
          bad_value[b] = 1;
        }
      }
      counts[b] = n;
    }
  });
}

template <typename T>
void write_indices(const T* mask, int64_t batch, int64_t seqlen, const int32_t* cu_seqlens,
                   int64_t* indices) {
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* row = mask + b * seqlen;
      int64_t* out = indices + cu_seqlens[b];
      for (int64_t t = 0; t < seqlen; ++t) {
        if (row[t] == T(1)) *out++ = b * seqlen + t;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, int64_t> unpad_metadata(const at::Tensor& attention_mask) {
  TORCH_CHECK(attention_mask.dim() == 2, "unpad_metadata: attention_mask must be 2-D (batch, seqlen), got ",
              attention_mask.dim(), "-D");
  TORCH_CHECK(attention_mask.device().is_cpu(), "unpad_metadata: attention_mask must be a CPU tensor");
  const auto dtype = attention_mask.scalar_type();
  TORCH_CHECK(dtype == at::kBool || dtype == at::kByte || dtype == at::kChar || dtype == at::kShort ||
                  dtype == at::kInt || dtype == at::kLong,
              "unpad_metadata: attention_mask must be bool or integer, got ", dtype);

  const at::Tensor mask = attention_mask.contiguous();
  const int64_t batch = mask.size(0);
  const int64_t seqlen = mask.size(1);
  std::vector<int64_t> counts(batch, 0);
  std::vector<uint8_t> bad_value(batch, 0);

  AT_DISPATCH_SWITCH(dtype, "unpad_metadata_count",
      AT_DISPATCH_CASE(at::kBool, [&] { count_rows(mask.data_ptr<bool>(), batch, seqlen, counts, bad_value); })
      AT_DISPATCH_CASE_INTEGRAL_TYPES([&] { count_rows(mask.data_ptr<scalar_t>(), batch, seqlen, counts, bad_value); }));
  TORCH_CHECK(std::none_of(bad_value.begin(), bad_value.end(), [](uint8_t v) { return v != 0; }),
              "unpad_metadata: attention_mask values must be 0 or 1");

  at::Tensor cu_seqlens = at::empty({batch + 1}, mask.options().dtype(at::kInt));
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t total = 0;
  int64_t max_seqlen = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    total += counts[b];
    max_seqlen = std::max(max_seqlen, counts[b]);
    TORCH_CHECK(total <= std::numeric_limits<int32_t>::max(),
                "unpad_metadata: more than 2^31-1 real tokens do not fit int32 cu_seqlens");
    cu[b + 1] = static_cast<int32_t>(total);
  }

  at::Tensor indices = at::empty({total}, mask.options().dtype(at::kLong));
  AT_DISPATCH_SWITCH(dtype, "unpad_metadata_indices",
      AT_DISPATCH_CASE(at::kBool, [&] { write_indices(mask.data_ptr<bool>(), batch, seqlen, cu, indices.data_ptr<int64_t>()); })
      AT_DISPATCH_CASE_INTEGRAL_TYPES([&] { write_indices(mask.data_ptr<scalar_t>(), batch, seqlen, cu, indices.data_ptr<int64_t>()); }));
  return {indices, cu_seqlens, max_seqlen};
}

}  // namespace fastbert
