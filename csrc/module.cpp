// The Python module prunenet._C. Loading the shared library runs the static TORCH_LIBRARY_*
// registrations in slice_ffn.cpp (and slice_ffn_cuda.cu), which define torch.ops.prunenet.*;
// this file only adds a few build facts. Tensors never cross pybind11 here: the ops are called
// through the dispatcher (torch.ops.prunenet), so torch's own pybind11 type casters are not needed.
#include <pybind11/pybind11.h>

#ifndef PRUNENET_WITH_CUDA
#define PRUNENET_WITH_CUDA 0
#endif
#ifndef PRUNENET_TORCH_VERSION
#define PRUNENET_TORCH_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "prunenet native ops; importing this module registers torch.ops.prunenet.*";
  m.def(
      "cuda_built", [] { return PRUNENET_WITH_CUDA != 0; },
      "True if the CUDA kernels were compiled in (torch.ops.prunenet.* then accept CUDA tensors).");
  m.def(
      "torch_version", [] { return PRUNENET_TORCH_VERSION; },
      "torch.__version__ of the torch this extension was built against.");
}
