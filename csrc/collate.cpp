#include "collate.h"

#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "masking.h"
#include "packing.h"

namespace fastbert {

namespace {

constexpr int64_t kIgnoreIndex = -100;

// The examples' ids and segment ids copied back to back (input order), with their lengths and labels.
struct Staged {
  std::vector<int64_t> ids;
  std::vector<int64_t> types;  // zeros for an example without token_type_ids
  std::vector<int64_t> lengths;
  std::vector<int64_t> labels;
  int64_t num_labelled = 0;
};

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

// A list/tuple made only of Python ints (bool and numpy scalars are left to the caller's path).
bool append_python_ints(PyObject* seq, std::vector<int64_t>& out) {
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  const size_t start = out.size();
  out.resize(start + n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyLong_CheckExact(items[i])) return false;
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(items[i], &overflow);
    if (overflow != 0) return false;
    out[start + i] = value;
  }
  return true;
}

template <typename T>
bool append_strided(const char* base, Py_ssize_t stride, Py_ssize_t n, std::vector<int64_t>& out) {
  const size_t start = out.size();
  out.resize(start + n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    T value;
    std::memcpy(&value, base + i * stride, sizeof(T));
    if constexpr (std::is_same_v<T, uint64_t>) {
      if (value > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    }
    out[start + i] = static_cast<int64_t>(value);
  }
  return true;
}

// A 1-D integer numpy array in native byte order, read through the buffer protocol (any stride).
bool append_ndarray(PyObject* obj, std::vector<int64_t>& out) {
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_FORMAT | PyBUF_STRIDES) != 0) {
    PyErr_Clear();
    return false;
  }
  struct Release {
    Py_buffer* view;
    ~Release() { PyBuffer_Release(view); }
  } release{&view};
  if (view.ndim != 1 || view.format == nullptr) return false;
  const char* format = view.format;
  const bool little_endian_host = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
  if (*format == '@' || *format == '=' || (*format == '<' && little_endian_host)) ++format;
  if (format[0] == '\0' || format[1] != '\0') return false;
  const char code = format[0];
  const bool is_signed = code == 'b' || code == 'h' || code == 'i' || code == 'l' || code == 'q';
  const bool is_unsigned = code == 'B' || code == 'H' || code == 'I' || code == 'L' || code == 'Q';
  if (!is_signed && !is_unsigned) return false;  // bool, float, ...
  const char* base = static_cast<const char*>(view.buf);
  const Py_ssize_t n = view.shape[0];
  const Py_ssize_t stride = view.strides[0];
  switch (view.itemsize) {
    case 1: return is_signed ? append_strided<int8_t>(base, stride, n, out) : append_strided<uint8_t>(base, stride, n, out);
    case 2: return is_signed ? append_strided<int16_t>(base, stride, n, out) : append_strided<uint16_t>(base, stride, n, out);
    case 4: return is_signed ? append_strided<int32_t>(base, stride, n, out) : append_strided<uint32_t>(base, stride, n, out);
    case 8: return is_signed ? append_strided<int64_t>(base, stride, n, out) : append_strided<uint64_t>(base, stride, n, out);
    default: return false;
  }
}

bool append_tensor(PyObject* obj, std::vector<int64_t>& out) {
  const at::Tensor& tensor = THPVariable_Unpack(obj);
  if (!tensor.device().is_cpu() || tensor.dim() != 1 || !at::isIntegralType(tensor.scalar_type(), false)) {
    return false;
  }
  const at::Tensor ids = tensor.to(at::kLong).contiguous();
  out.insert(out.end(), ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
  return true;
}

// Appends an id sequence to out; returns its length, or -1 when it is in no form read here.
int64_t append_sequence(PyObject* obj, std::vector<int64_t>& out) {
  const size_t before = out.size();
  bool ok = false;
  if (PyList_Check(obj) || PyTuple_Check(obj)) {
    ok = append_python_ints(obj, out);
  } else if (is_ndarray(obj)) {
    ok = append_ndarray(obj, out);
  } else if (THPVariable_Check(obj)) {
    ok = append_tensor(obj, out);
  }
  return ok ? static_cast<int64_t>(out.size() - before) : -1;
}

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

// Reads every example; returns the index of the first one it cannot take, or -1.
int64_t stage(PyObject* examples, int64_t max_len, Staged& staged) {
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(examples);
  PyObject** items = PySequence_Fast_ITEMS(examples);
  staged.lengths.reserve(count);
  staged.labels.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject *ids, *types, *label;
    if (!split_example(items[i], ids, types, label)) return i;
    const int64_t length = append_sequence(ids, staged.ids);
    if (length < 1 || length > max_len) return i;
    if (types == nullptr) {
      staged.types.resize(staged.ids.size(), 0);
    } else if (append_sequence(types, staged.types) != length) {
      return i;
    }
    staged.lengths.push_back(length);
    if (label != nullptr) {
      if (!PyLong_CheckExact(label)) return i;
      int overflow = 0;
      staged.labels.push_back(PyLong_AsLongLongAndOverflow(label, &overflow));
      if (overflow != 0) return i;
      ++staged.num_labelled;
    } else {
      staged.labels.push_back(0);
    }
    if (staged.num_labelled != 0 && staged.num_labelled != i + 1) return i;  // labels on some examples only
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
  TORCH_CHECK_VALUE(PySequence_Fast_GET_SIZE(items) >= 1, "collate_mlm: needs at least one example");
  TORCH_CHECK_VALUE(max_len >= 1, "collate_mlm: max_len must be >= 1, got ", max_len);
  TORCH_CHECK_VALUE(!pad_to_multiple_of.has_value() || *pad_to_multiple_of >= 1,
                    "collate_mlm: pad_to_multiple_of must be >= 1");
  TORCH_CHECK_VALUE(!packing || return_unpad_metadata, "collate_mlm: packing needs the unpad metadata");
  TORCH_CHECK_VALUE(pad_token_id >= 0 && pad_token_id < vocab_size, "collate_mlm: pad_token_id ", pad_token_id,
                    " is outside the vocabulary [0, ", vocab_size, ")");

  Staged staged;
  const int64_t unreadable = stage(items, max_len, staged);
  if (unreadable >= 0) return py::int_(unreadable);

  at::Tensor input_ids, masked_ids, labels, attention_mask, token_type_ids, masked_positions, next_sentence_label;
  at::Tensor indices, cu_seqlens, position_ids, order;
  int64_t max_seqlen = 0;
  {
    py::gil_scoped_release no_gil;  // no Python object is touched in here
    const int64_t count = static_cast<int64_t>(staged.lengths.size());
    const int64_t total = static_cast<int64_t>(staged.ids.size());
    int64_t rows, width;
    std::vector<int64_t> start(count);  // flat position of example i's first token
    if (packing) {
      int64_t num_rows;
      at::Tensor row, offset;
      std::tie(row, offset, order, cu_seqlens, indices, position_ids, num_rows, max_seqlen) =
          pack_sequences(to_tensor(staged.lengths), max_len);
      rows = num_rows;
      width = max_len;
      const int64_t* rows_of = row.data_ptr<int64_t>();
      const int64_t* offsets = offset.data_ptr<int64_t>();
      for (int64_t i = 0; i < count; ++i) start[i] = rows_of[i] * width + offsets[i];
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

    input_ids = at::full({rows, width}, pad_token_id, at::dtype(at::kLong));
    token_type_ids = at::zeros({rows, width}, at::dtype(at::kLong));
    attention_mask = at::zeros({rows, width}, at::dtype(at::kLong));
    int64_t* ids_out = input_ids.data_ptr<int64_t>();
    int64_t* types_out = token_type_ids.data_ptr<int64_t>();
    int64_t* mask_out = attention_mask.data_ptr<int64_t>();
    int64_t source = 0;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = staged.lengths[i];
      std::copy_n(staged.ids.data() + source, n, ids_out + start[i]);
      std::copy_n(staged.types.data() + source, n, types_out + start[i]);
      std::fill_n(mask_out + start[i], n, 1);
      source += n;
    }

    // The same masking call as fastbert.masking.mask_tokens on the padded batch: same seed, same masks.
    std::optional<at::Tensor> starts;
    if (is_continuation.has_value()) starts = word_starts(input_ids, *is_continuation);
    std::tie(masked_ids, labels) = mask_tokens(input_ids, special_ids, mask_token_id, vocab_size, mlm_probability,
                                               mask_ratio, random_ratio, starts, seed);

    // Flat indices of the masked tokens, so that the model's MLM gather needs no device sync.
    const int64_t* label = labels.data_ptr<int64_t>();
    const int64_t slots = rows * width;
    int64_t num_masked = 0;
    for (int64_t p = 0; p < slots; ++p) num_masked += label[p] != kIgnoreIndex;
    masked_positions = at::empty({num_masked}, at::dtype(at::kLong));
    int64_t* position = masked_positions.data_ptr<int64_t>();
    for (int64_t p = 0; p < slots; ++p) {
      if (label[p] != kIgnoreIndex) *position++ = p;
    }

    if (staged.num_labelled == count) {
      next_sentence_label = at::empty({count}, at::dtype(at::kLong));
      int64_t* nsp = next_sentence_label.data_ptr<int64_t>();
      const int64_t* packed_order = packing ? order.data_ptr<int64_t>() : nullptr;
      for (int64_t k = 0; k < count; ++k) nsp[k] = staged.labels[packing ? packed_order[k] : k];
    }

  }
  py::dict batch;
  batch["input_ids"] = masked_ids;
  batch["attention_mask"] = attention_mask;
  batch["token_type_ids"] = token_type_ids;
  batch["labels"] = labels;
  batch["masked_positions"] = masked_positions;
  if (next_sentence_label.defined()) batch["next_sentence_label"] = next_sentence_label;
  if (packing) batch["position_ids"] = position_ids;
  if (return_unpad_metadata) {
    batch["indices"] = indices;
    batch["cu_seqlens"] = cu_seqlens;
    batch["max_seqlen"] = py::int_(max_seqlen);
  }
  return batch;
}

}  // namespace fastbert
