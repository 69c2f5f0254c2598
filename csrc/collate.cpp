#include "collate.h"

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

#include "masking_rows.h"
#include "packing.h"

namespace fastbert {

namespace {

using namespace masking_rows;

PyTypeObject* ndarray_type() {
  // numpy is loaded already (fastbert.data imports it); looked up once, kept for the process.
  static PyTypeObject* type =
      reinterpret_cast<PyTypeObject*>(py::object(py::module_::import("numpy").attr("ndarray")).release().ptr());
  return type;
}

PyObject* interned(const char* text) { return PyUnicode_InternFromString(text); }

bool is_ndarray(PyObject* obj) { return PyObject_TypeCheck(obj, ndarray_type()); }

bool is_id_container(PyObject* obj) {
  return PyList_Check(obj) || PyTuple_Check(obj) || is_ndarray(obj) || THPVariable_Check(obj);
}

// One id sequence of one example, found in the first pass and copied in the second, once its place
// in the batch is known: a list/tuple of Python ints, a numpy buffer, or an int64 copy of a tensor.
class IdSource {
 public:
  IdSource() = default;
  IdSource(const IdSource&) = delete;
  IdSource& operator=(const IdSource&) = delete;
  ~IdSource() {
    if (has_view_) PyBuffer_Release(&view_);
  }

  // Takes obj if it is in a form read here (true), and learns its length.
  bool open(PyObject* obj) {
    if (PyList_Check(obj) || PyTuple_Check(obj)) {
      list_ = obj;
      length_ = PySequence_Fast_GET_SIZE(obj);
      return true;
    }
    if (is_ndarray(obj)) return open_buffer(obj);
    if (THPVariable_Check(obj)) {
      const at::Tensor& tensor = THPVariable_Unpack(obj);
      if (!tensor.device().is_cpu() || tensor.dim() != 1 || !at::isIntegralType(tensor.scalar_type(), false)) {
        return false;
      }
      tensor_ = tensor.to(at::kLong).contiguous();
      length_ = tensor_.numel();
      return true;
    }
    return false;
  }

  int64_t length() const { return length_; }

  // Writes the ids to out[0, length); false when an entry is not an int64 (the caller's path explains).
  bool copy_to(int64_t* out) const {
    if (list_ != nullptr) {
      PyObject** items = PySequence_Fast_ITEMS(list_);
      for (int64_t i = 0; i < length_; ++i) {
        if (!PyLong_CheckExact(items[i])) return false;  // bool and numpy scalars: the Python path's
        int overflow = 0;
        out[i] = PyLong_AsLongLongAndOverflow(items[i], &overflow);
        if (overflow != 0) return false;
      }
      return true;
    }
    if (tensor_.defined()) {
      std::memcpy(out, tensor_.data_ptr<int64_t>(), length_ * sizeof(int64_t));
      return true;
    }
    const char* base = static_cast<const char*>(view_.buf);
    switch (item_size_) {
      case 1: return is_signed_ ? copy_strided<int8_t>(base, out) : copy_strided<uint8_t>(base, out);
      case 2: return is_signed_ ? copy_strided<int16_t>(base, out) : copy_strided<uint16_t>(base, out);
      case 4: return is_signed_ ? copy_strided<int32_t>(base, out) : copy_strided<uint32_t>(base, out);
      default: return is_signed_ ? copy_strided<int64_t>(base, out) : copy_strided<uint64_t>(base, out);
    }
  }

 private:
  // A 1-D integer array in native byte order, any stride, through the buffer protocol.
  bool open_buffer(PyObject* obj) {
    if (PyObject_GetBuffer(obj, &view_, PyBUF_FORMAT | PyBUF_STRIDES) != 0) {
      PyErr_Clear();
      return false;
    }
    has_view_ = true;
    if (view_.ndim != 1 || view_.format == nullptr) return false;
    const char* format = view_.format;
    const bool little_endian_host = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
    if (*format == '@' || *format == '=' || (*format == '<' && little_endian_host)) ++format;
    if (format[0] == '\0' || format[1] != '\0') return false;
    const char code = format[0];
    is_signed_ = code == 'b' || code == 'h' || code == 'i' || code == 'l' || code == 'q';
    const bool is_unsigned = code == 'B' || code == 'H' || code == 'I' || code == 'L' || code == 'Q';
    item_size_ = view_.itemsize;
    if (!(is_signed_ || is_unsigned) || !(item_size_ == 1 || item_size_ == 2 || item_size_ == 4 || item_size_ == 8)) {
      return false;  // bool, float, ...
    }
    length_ = view_.shape[0];
    return true;
  }

  template <typename T>
  bool copy_strided(const char* base, int64_t* out) const {
    const Py_ssize_t stride = view_.strides[0];
    if (stride == static_cast<Py_ssize_t>(sizeof(T))) {  // the usual case: contiguous, a loop GCC vectorizes
      const T* values = reinterpret_cast<const T*>(base);
      if constexpr (std::is_same_v<T, uint64_t>) {
        for (int64_t i = 0; i < length_; ++i) {
          if (values[i] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
        }
      }
      for (int64_t i = 0; i < length_; ++i) out[i] = static_cast<int64_t>(values[i]);
      return true;
    }
    for (int64_t i = 0; i < length_; ++i) {
      T value;
      std::memcpy(&value, base + i * stride, sizeof(T));
      if constexpr (std::is_same_v<T, uint64_t>) {
        if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
      }
      out[i] = static_cast<int64_t>(value);
    }
    return true;
  }

  PyObject* list_ = nullptr;
  at::Tensor tensor_;
  Py_buffer view_{};
  bool has_view_ = false;
  bool is_signed_ = false;
  Py_ssize_t item_size_ = 0;
  int64_t length_ = 0;
};

// The parts of one example (borrowed references; types and label may be null). False: another form.
bool split_example(PyObject* example, PyObject*& ids, PyObject*& types, PyObject*& label) {
  static PyObject* const kInputIds = interned("input_ids");
  static PyObject* const kTokenTypeIds = interned("token_type_ids");
  static PyObject* const kNextSentenceLabel = interned("next_sentence_label");
  ids = types = label = nullptr;
  if (PyDict_Check(example)) {
    ids = PyDict_GetItem(example, kInputIds);
    types = PyDict_GetItem(example, kTokenTypeIds);
    label = PyDict_GetItem(example, kNextSentenceLabel);
  } else if (PyList_Check(example) || PyTuple_Check(example)) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(example);
    if (n == 0) return false;
    PyObject** items = PySequence_Fast_ITEMS(example);
    if (PyLong_CheckExact(items[0])) {
      ids = example;  // a bare list of ids
    } else if (n <= 3 && is_id_container(items[0])) {
      ids = items[0];
      types = n > 1 ? items[1] : nullptr;
      label = n > 2 ? items[2] : nullptr;
    }
  } else if (is_ndarray(example) || THPVariable_Check(example)) {
    ids = example;
  }
  if (types == Py_None) types = nullptr;
  if (label == Py_None) label = nullptr;
  return ids != nullptr;
}

// What the first pass learns of the examples, in input order.
struct Examples {
  std::vector<IdSource> ids;
  std::vector<IdSource> types;
  std::vector<bool> has_types;
  std::vector<int64_t> lengths;
  std::vector<int64_t> labels;  // next_sentence_label, 0 where absent
  int64_t num_labelled = 0;

  explicit Examples(size_t count) : ids(count), types(count), has_types(count), lengths(count), labels(count) {}
};

// First pass: the form and length of every example; returns the index of the first one not taken, or -1.
int64_t scan(PyObject* items, int64_t max_len, Examples& examples) {
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
  PyObject** item = PySequence_Fast_ITEMS(items);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject *ids, *types, *label;
    if (!split_example(item[i], ids, types, label) || !examples.ids[i].open(ids)) return i;
    const int64_t length = examples.ids[i].length();
    if (length < 1 || length > max_len) return i;
    examples.lengths[i] = length;
    examples.has_types[i] = types != nullptr;
    if (types != nullptr && (!examples.types[i].open(types) || examples.types[i].length() != length)) return i;
    if (label != nullptr) {
      if (!PyLong_CheckExact(label)) return i;
      int overflow = 0;
      examples.labels[i] = PyLong_AsLongLongAndOverflow(label, &overflow);
      if (overflow != 0) return i;
      ++examples.num_labelled;
    }
    if (examples.num_labelled != 0 && examples.num_labelled != i + 1) return i;  // labels on some examples only
  }
  return -1;
}

at::Tensor to_tensor(const std::vector<int64_t>& values) {
  at::Tensor tensor = at::empty({static_cast<int64_t>(values.size())}, at::dtype(at::kLong));
  std::copy(values.begin(), values.end(), tensor.data_ptr<int64_t>());
  return tensor;
}

}  // namespace

py::object collate_mlm(const py::object& examples, int64_t max_len, std::optional<int64_t> pad_to_multiple_of,
                       bool packing, bool return_unpad_metadata, int64_t pad_token_id, const at::Tensor& special_ids,
                       int64_t mask_token_id, int64_t vocab_size, double mlm_probability, double mask_ratio,
                       double random_ratio, const std::optional<at::Tensor>& is_continuation, uint64_t seed) {
  PyObject* items = examples.ptr();
  TORCH_CHECK_TYPE(PyList_Check(items) || PyTuple_Check(items), "collate_mlm: examples must be a list or tuple");
  const int64_t count = PySequence_Fast_GET_SIZE(items);
  TORCH_CHECK_VALUE(count >= 1, "collate_mlm: needs at least one example");
  TORCH_CHECK_VALUE(max_len >= 1, "collate_mlm: max_len must be >= 1, got ", max_len);
  TORCH_CHECK_VALUE(!pad_to_multiple_of.has_value() || *pad_to_multiple_of >= 1,
                    "collate_mlm: pad_to_multiple_of must be >= 1");
  TORCH_CHECK_VALUE(!packing || return_unpad_metadata, "collate_mlm: packing needs the unpad metadata");
  const MaskingTables tables(special_ids, mask_token_id, vocab_size, mlm_probability, mask_ratio, random_ratio);
  TORCH_CHECK_VALUE(pad_token_id >= 0 && pad_token_id < vocab_size, "collate_mlm: pad_token_id ", pad_token_id,
                    " is outside the vocabulary [0, ", vocab_size, ")");
  const bool* continuation = nullptr;
  at::Tensor continuation_table;
  if (is_continuation.has_value()) {
    continuation_table = is_continuation->contiguous();
    TORCH_CHECK(continuation_table.device().is_cpu() && continuation_table.scalar_type() == at::kBool &&
                    continuation_table.dim() == 1 && continuation_table.numel() == vocab_size,
                "collate_mlm: is_continuation must be a bool CPU tensor of vocab_size entries");
    continuation = continuation_table.data_ptr<bool>();
  }

  Examples staged(count);
  const int64_t unreadable = scan(items, max_len, staged);
  if (unreadable >= 0) return py::int_(unreadable);

  // The layout: where each example's first token goes (flat position), and the unpad metadata.
  int64_t rows, width, max_seqlen;
  std::vector<int64_t> start(count);
  at::Tensor indices, cu_seqlens, position_ids, order;
  const int64_t total = std::accumulate(staged.lengths.begin(), staged.lengths.end(), int64_t{0});
  TORCH_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), "collate_mlm: ", total,
                    " tokens in one batch overflow the int32 cu_seqlens");
  if (packing) {
    int64_t num_rows;
    at::Tensor row, offset;
    std::tie(row, offset, order, cu_seqlens, indices, position_ids, num_rows, max_seqlen) =
        pack_sequences(to_tensor(staged.lengths), max_len);
    rows = num_rows;
    width = max_len;
    const int64_t* row_of = row.data_ptr<int64_t>();
    const int64_t* offset_of = offset.data_ptr<int64_t>();
    for (int64_t i = 0; i < count; ++i) start[i] = row_of[i] * width + offset_of[i];
  } else {
    max_seqlen = *std::max_element(staged.lengths.begin(), staged.lengths.end());
    width = max_seqlen;
    if (pad_to_multiple_of.has_value()) {
      width = std::min((width + *pad_to_multiple_of - 1) / *pad_to_multiple_of * *pad_to_multiple_of, max_len);
    }
    rows = count;
    cu_seqlens = at::empty({count + 1}, at::dtype(at::kInt));
    indices = at::empty({total}, at::dtype(at::kLong));
    int32_t* cu = cu_seqlens.data_ptr<int32_t>();
    int64_t* index = indices.data_ptr<int64_t>();
    cu[0] = 0;
    for (int64_t i = 0; i < count; ++i) {
      start[i] = i * width;
      cu[i + 1] = cu[i] + static_cast<int32_t>(staged.lengths[i]);
      for (int64_t t = 0; t < staged.lengths[i]; ++t) *index++ = start[i] + t;
    }
  }

  // Second pass: the unmasked ids (in the output buffer, masked in place below), segments, mask.
  at::Tensor masked_ids = at::full({rows, width}, pad_token_id, at::dtype(at::kLong));
  at::Tensor token_type_ids = at::zeros({rows, width}, at::dtype(at::kLong));
  at::Tensor attention_mask = at::zeros({rows, width}, at::dtype(at::kLong));
  at::Tensor labels = at::empty({rows, width}, at::dtype(at::kLong));
  int64_t* ids_out = masked_ids.data_ptr<int64_t>();
  int64_t* types_out = token_type_ids.data_ptr<int64_t>();
  int64_t* mask_out = attention_mask.data_ptr<int64_t>();
  int64_t* labels_out = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    if (!staged.ids[i].copy_to(ids_out + start[i])) return py::int_(i);
    if (staged.has_types[i] && !staged.types[i].copy_to(types_out + start[i])) return py::int_(i);
    std::fill_n(mask_out + start[i], staged.lengths[i], 1);
  }

  // Masking, row by row, with mask_tokens' rule and draws on the padded batch: the same masks.
  const MaskingRule rule = tables.rule();
  std::vector<int64_t> first_bad(rows, -1);
  std::vector<int64_t> row_masked(rows, 0);
  {
    py::gil_scoped_release no_gil;  // no Python object is touched in here
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / width), [&](int64_t begin, int64_t end) {
      std::vector<int64_t> row_ids(width);  // the unmasked row, in L1 while the output row is written
      std::vector<uint8_t> starts(continuation != nullptr ? width : 0);
      for (int64_t b = begin; b < end; ++b) {
        int64_t* out = ids_out + b * width;
        int64_t* lab = labels_out + b * width;
        std::copy_n(out, width, row_ids.data());
        const RowDraws draws(seed, b);
        if (continuation == nullptr) {
          first_bad[b] = mask_row(rule, draws, row_ids.data(), out, lab, width);
        } else {
          for (int64_t t = 0; t < width; ++t) {
            const int64_t id = row_ids[t];
            starts[t] = out_of_vocab(rule, id) || !continuation[id];  // out of range: mask_row reports it
          }
          first_bad[b] = mask_row_whole_word(rule, draws, row_ids.data(), reinterpret_cast<const bool*>(starts.data()),
                                             out, lab, width);
        }
        if (first_bad[b] >= 0) {
          out[first_bad[b]] = row_ids[first_bad[b]];  // for the message below
          continue;
        }
        int64_t n = 0;
        for (int64_t t = 0; t < width; ++t) n += lab[t] != kIgnoreIndex;
        row_masked[b] = n;
      }
    });
  }
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK_VALUE(first_bad[b] < 0, "input_ids[", b, ", ", first_bad[b], "] = ", ids_out[b * width + first_bad[b]],
                      " is outside the vocabulary [0, ", vocab_size, ")");
  }

  // Flat indices of the masked tokens, so that the model's MLM gather needs no device sync.
  const int64_t num_masked = std::accumulate(row_masked.begin(), row_masked.end(), int64_t{0});
  at::Tensor masked_positions = at::empty({num_masked}, at::dtype(at::kLong));
  int64_t* position = masked_positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    if (row_masked[b] == 0) continue;
    const int64_t* lab = labels_out + b * width;
    for (int64_t t = 0; t < width; ++t) {
      if (lab[t] != kIgnoreIndex) *position++ = b * width + t;
    }
  }

  py::dict batch;
  batch["input_ids"] = masked_ids;
  batch["attention_mask"] = attention_mask;
  batch["token_type_ids"] = token_type_ids;
  batch["labels"] = labels;
  batch["masked_positions"] = masked_positions;
  if (staged.num_labelled == count) {
    at::Tensor next_sentence_label = at::empty({count}, at::dtype(at::kLong));
    int64_t* nsp = next_sentence_label.data_ptr<int64_t>();
    const int64_t* packed_order = packing ? order.data_ptr<int64_t>() : nullptr;
    for (int64_t k = 0; k < count; ++k) nsp[k] = staged.labels[packing ? packed_order[k] : k];
    batch["next_sentence_label"] = next_sentence_label;
  }
  if (packing) batch["position_ids"] = position_ids;
  if (return_unpad_metadata) {
    batch["indices"] = indices;
    batch["cu_seqlens"] = cu_seqlens;
    batch["max_seqlen"] = py::int_(max_seqlen);
  }
  return batch;
}

}  // namespace fastbert
