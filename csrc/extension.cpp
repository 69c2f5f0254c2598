// Python bindings of fastbert._C: one line per function; each job lives in its own file.
#include <torch/extension.h>

#include "unpad.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbert C++ ops: unpad metadata, MLM masking, sequence packing (CPU)";
  m.def("unpad_metadata", &fastbert::unpad_metadata, py::arg("attention_mask"),
        "(indices int64, cu_seqlens int32, max_seqlen) of the real tokens of a (batch, seqlen) 0/1 mask");
}
