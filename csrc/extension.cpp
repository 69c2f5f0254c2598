// Python bindings of fastbert._C: one line per function; each job lives in its own file.
#include <torch/extension.h>

#include "collate.h"
#include "masking.h"
#include "packing.h"
#include "unpad.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbert C++ ops: unpad metadata, MLM masking, sequence packing, the MLM collate step (CPU)";
  m.def("unpad_metadata", &fastbert::unpad_metadata, py::arg("attention_mask"),
        "(indices int64, cu_seqlens int32, max_seqlen) of the real tokens of a (batch, seqlen) 0/1 mask");
  m.def("mask_tokens", &fastbert::mask_tokens, py::arg("input_ids"), py::arg("special_ids"),
        py::arg("mask_token_id"), py::arg("vocab_size"), py::arg("mlm_probability"), py::arg("mask_ratio"),
        py::arg("random_ratio"), py::arg("word_starts"), py::arg("seed"),
        "(masked_ids, labels) of a (batch, seqlen) int64 batch: BERT's 80/10/10 dynamic masking");
  m.def("masking_draws", &fastbert::masking_draws, py::arg("seed"), py::arg("batch"), py::arg("seqlen"),
        "int64 (batch, seqlen, 3): the selection, 80/10/10 and random-id draws mask_tokens uses (for tests)");
  m.def("word_starts", &fastbert::word_starts, py::arg("input_ids"), py::arg("is_continuation"),
        "bool (batch, seqlen): True where the token is not a WordPiece continuation piece");
  m.def("collate_mlm", &fastbert::collate_mlm, py::arg("examples"), py::arg("max_len"), py::arg("pad_to_multiple_of"),
        py::arg("packing"), py::arg("return_unpad_metadata"), py::arg("pad_token_id"), py::arg("special_ids"),
        py::arg("mask_token_id"), py::arg("vocab_size"), py::arg("mlm_probability"), py::arg("mask_ratio"),
        py::arg("random_ratio"), py::arg("is_continuation"), py::arg("seed"),
        "MLMCollator's batch dict from a list of examples (pad or pack, mask, unpad metadata), or the index "
        "of the first example in a form it does not read");
  m.def("pack_sequences", &fastbert::pack_sequences, py::arg("lengths"), py::arg("max_len"),
        "first-fit-decreasing packing: (row, offset, order, cu_seqlens, indices, position_ids, num_rows, "
        "max_seqlen)");
}
