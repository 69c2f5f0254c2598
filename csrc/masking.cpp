#include "masking.h"

#include <ATen/Parallel.h>

#include <vector>

#include "masking_rows.h"

namespace fastbert {

namespace {

using namespace masking_rows;

void check_ids(const at::Tensor& ids, const char* name) {
  TORCH_CHECK(ids.device().is_cpu(), "mask_tokens: ", name, " must be a CPU tensor, got ", ids.device());
  TORCH_CHECK(ids.scalar_type() == at::kLong, "mask_tokens: ", name, " must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2, "mask_tokens: ", name, " must be 2-D (batch, seqlen), got ", ids.dim(), "-D");
}

// The fewest rows worth handing to a thread: waking one costs about as much as masking ~8k tokens,
// so small batches stay on the calling thread.
int64_t row_grain(int64_t seqlen) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, seqlen)); }

// Raises a ValueError naming the first out-of-range id (first_bad[b] = its column in row b, or -1).
void check_ids_in_range(const std::vector<int64_t>& first_bad, const at::Tensor& ids, int64_t vocab_size) {
  const int64_t* data = ids.data_ptr<int64_t>();
  const int64_t seqlen = ids.size(1);
  for (size_t b = 0; b < first_bad.size(); ++b) {
    if (first_bad[b] >= 0) {
      TORCH_CHECK_VALUE(false, "input_ids[", b, ", ", first_bad[b], "] = ", data[b * seqlen + first_bad[b]],
                        " is outside the vocabulary [0, ", vocab_size, ")");
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mask_tokens(const at::Tensor& input_ids, const at::Tensor& special_ids,
                                               int64_t mask_token_id, int64_t vocab_size, double mlm_probability,
                                               double mask_ratio, double random_ratio,
                                               const std::optional<at::Tensor>& word_starts, uint64_t seed) {
  check_ids(input_ids, "input_ids");
  const MaskingTables tables(special_ids, mask_token_id, vocab_size, mlm_probability, mask_ratio, random_ratio);
  const MaskingRule rule = tables.rule();

  const at::Tensor ids = input_ids.contiguous();
  const int64_t batch = ids.size(0);
  const int64_t seqlen = ids.size(1);

  at::Tensor starts;
  if (word_starts.has_value()) {
    starts = word_starts->contiguous();
    TORCH_CHECK(starts.device().is_cpu() && starts.scalar_type() == at::kBool,
                "mask_tokens: word_starts must be a bool CPU tensor");
    TORCH_CHECK_VALUE(starts.sizes() == ids.sizes(), "mask_tokens: word_starts has shape ", starts.sizes(),
                      " but input_ids has shape ", ids.sizes());
  }

  at::Tensor masked = at::empty_like(ids);
  at::Tensor labels = at::empty_like(ids);
  const int64_t* in = ids.data_ptr<int64_t>();
  int64_t* out = masked.data_ptr<int64_t>();
  int64_t* lab = labels.data_ptr<int64_t>();
  const bool* start = starts.defined() ? starts.data_ptr<bool>() : nullptr;
  std::vector<int64_t> first_bad(batch, -1);

  at::parallel_for(0, batch, row_grain(seqlen), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t offset = b * seqlen;
      const RowDraws draws(seed, b);
      first_bad[b] = start == nullptr
                         ? mask_row(rule, draws, in + offset, out + offset, lab + offset, seqlen)
                         : mask_row_whole_word(rule, draws, in + offset, start + offset, out + offset,
                                               lab + offset, seqlen);
    }
  });
  check_ids_in_range(first_bad, ids, vocab_size);
  return {masked, labels};
}

at::Tensor masking_draws(uint64_t seed, int64_t batch, int64_t seqlen) {
  TORCH_CHECK_VALUE(batch >= 0 && seqlen >= 0, "masking_draws: batch and seqlen must be >= 0");
  at::Tensor draws = at::empty({batch, seqlen, 3}, at::dtype(at::kLong));
  int64_t* out = draws.data_ptr<int64_t>();
  at::parallel_for(0, batch, row_grain(seqlen), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const RowDraws row(seed, b);
      for (int64_t t = 0; t < seqlen; ++t) {
        const uint64_t draw = row.token(t);
        int64_t* cell = out + (b * seqlen + t) * 3;
        cell[0] = static_cast<int64_t>(draw >> 32);
        cell[1] = static_cast<int64_t>(draw & 0xFFFFFFFFull);
        cell[2] = static_cast<int64_t>(row.pick(t));
      }
    }
  });
  return draws;
}

at::Tensor word_starts(const at::Tensor& input_ids, const at::Tensor& is_continuation) {
  check_ids(input_ids, "input_ids");
  TORCH_CHECK(is_continuation.device().is_cpu() && is_continuation.scalar_type() == at::kBool &&
                  is_continuation.dim() == 1,
              "word_starts: is_continuation must be a 1-D bool CPU tensor (one entry per vocabulary id)");
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor table = is_continuation.contiguous();
  const int64_t vocab_size = table.numel();
  const int64_t batch = ids.size(0);
  const int64_t seqlen = ids.size(1);
  at::Tensor starts = at::empty(ids.sizes(), ids.options().dtype(at::kBool));
  const int64_t* in = ids.data_ptr<int64_t>();
  const bool* continuation = table.data_ptr<bool>();
  bool* out = starts.data_ptr<bool>();
  std::vector<int64_t> first_bad(batch, -1);

  at::parallel_for(0, batch, row_grain(seqlen), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0; t < seqlen; ++t) {
        const int64_t id = in[b * seqlen + t];
        if (static_cast<uint64_t>(id) >= static_cast<uint64_t>(vocab_size)) {
          first_bad[b] = t;
          break;
        }
        out[b * seqlen + t] = !continuation[id];
      }
    }
  });
  check_ids_in_range(first_bad, ids, vocab_size);
  return starts;
}

}  // namespace fastbert
