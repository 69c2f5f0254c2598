#include "packing.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

namespace fastbert {

namespace {

// Free space per row in a max-tree, so "the first row with at least n free tokens" takes O(log rows).
// Rows not opened yet are all free, and lie to the right of the opened ones, so the leftmost fit is
// first-fit.
class FreeSpaceTree {
 public:
  FreeSpaceTree(int64_t rows, int64_t capacity) {
    leaves_ = 1;
    while (leaves_ < rows) leaves_ *= 2;
    free_.assign(2 * leaves_, 0);
    for (int64_t i = 0; i < rows; ++i) free_[leaves_ + i] = capacity;
    for (int64_t node = leaves_ - 1; node >= 1; --node) free_[node] = std::max(free_[2 * node], free_[2 * node + 1]);
  }

  // The leftmost row with at least `need` free tokens (the caller guarantees one exists).
  int64_t first_fit(int64_t need) const {
    int64_t node = 1;
    while (node < leaves_) node = free_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return node - leaves_;
  }

  int64_t free_in(int64_t row) const { return free_[leaves_ + row]; }

  void take(int64_t row, int64_t amount) {
    int64_t node = leaves_ + row;
    free_[node] -= amount;
    for (node /= 2; node >= 1; node /= 2) free_[node] = std::max(free_[2 * node], free_[2 * node + 1]);
  }

 private:
  int64_t leaves_;
  std::vector<int64_t> free_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t>
pack_sequences(const at::Tensor& lengths, int64_t max_len) {
  TORCH_CHECK(lengths.device().is_cpu(), "pack_sequences: lengths must be a CPU tensor, got ", lengths.device());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "pack_sequences: lengths must be int64, got ",
              lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1, "pack_sequences: lengths must be 1-D, got ", lengths.dim(), "-D");
  TORCH_CHECK_VALUE(max_len >= 1, "pack_sequences: max_len must be >= 1, got ", max_len);

  const at::Tensor lens_tensor = lengths.contiguous();
  const int64_t* lens = lens_tensor.data_ptr<int64_t>();
  const int64_t count = lens_tensor.numel();
  int64_t total = 0;
  int64_t max_seqlen = 0;
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK_VALUE(lens[i] >= 1 && lens[i] <= max_len, "pack_sequences: lengths[", i, "] = ", lens[i],
                      " is outside [1, max_len=", max_len, "]");
    total += lens[i];
    max_seqlen = std::max(max_seqlen, lens[i]);
  }
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(),
                    "pack_sequences: more than 2^31-1 tokens do not fit int32 cu_seqlens");

  // First-fit-decreasing; a stable sort keeps equal lengths in input order (deterministic output).
  std::vector<int64_t> by_length(count);
  std::iota(by_length.begin(), by_length.end(), 0);
  std::stable_sort(by_length.begin(), by_length.end(), [&](int64_t a, int64_t b) { return lens[a] > lens[b]; });
  at::Tensor row = at::empty({count}, lens_tensor.options());
  at::Tensor offset = at::empty({count}, lens_tensor.options());
  int64_t* row_of = row.data_ptr<int64_t>();
  int64_t* offset_of = offset.data_ptr<int64_t>();
  FreeSpaceTree tree(std::max<int64_t>(count, 1), max_len);
  int64_t num_rows = 0;
  for (int64_t i : by_length) {
    const int64_t r = tree.first_fit(lens[i]);
    row_of[i] = r;
    offset_of[i] = max_len - tree.free_in(r);
    tree.take(r, lens[i]);
    num_rows = std::max(num_rows, r + 1);
  }

  // Packed order: by row, then by column (a stable counting sort by row of the assignment order).
  std::vector<int64_t> row_start(num_rows + 1, 0);
  for (int64_t i = 0; i < count; ++i) ++row_start[row_of[i] + 1];
  std::partial_sum(row_start.begin(), row_start.end(), row_start.begin());
  at::Tensor order = at::empty({count}, lens_tensor.options());
  int64_t* packed = order.data_ptr<int64_t>();
  std::vector<int64_t> next(row_start.begin(), row_start.end() - 1);
  for (int64_t i : by_length) packed[next[row_of[i]]++] = i;  // assignment order: columns grow per row

  at::Tensor cu_seqlens = at::empty({count + 1}, lens_tensor.options().dtype(at::kInt));
  at::Tensor indices = at::empty({total}, lens_tensor.options());
  at::Tensor position_ids = at::zeros({num_rows, max_len}, lens_tensor.options());
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t* index = indices.data_ptr<int64_t>();
  int64_t* positions = position_ids.data_ptr<int64_t>();
  cu[0] = 0;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = packed[k];
    const int64_t start = row_of[i] * max_len + offset_of[i];
    for (int64_t t = 0; t < lens[i]; ++t) {
      index[cu[k] + t] = start + t;
      positions[start + t] = t;
    }
    cu[k + 1] = cu[k] + static_cast<int32_t>(lens[i]);
  }
  return {row, offset, order, cu_seqlens, indices, position_ids, num_rows, max_seqlen};
}

}  // namespace fastbert
