// prunenet::gather_rows -- shared declarations for the CPU/Meta (gather_rows.cpp) and CUDA
// (gather_rows_cuda.cu) kernels.
//
//   gather_rows(Tensor src, Tensor index) -> Tensor
//   src:   (R,) or (R, C), float32/float16/bfloat16, any row stride, last dim contiguous
//   index: (N,) int64 on src's device, every value in [0, R)
//   out:   (N,) or (N, C), contiguous, out[i] = src[index[i]]
#pragma once

#include <ATen/core/Tensor.h>

namespace prunenet {

// Dtype/shape/layout/device checks shared by every backend. Works on symbolic shapes (Meta /
// FakeTensor), so it does not look at index *values*; each real kernel checks those itself
// before it copies anything.
void check_gather_rows_args(const at::Tensor& src, const at::Tensor& index);

// A new contiguous tensor of shape (index.size(0),) + src.shape[1:] with src's dtype and device.
at::Tensor gather_rows_empty_output(const at::Tensor& src, const at::Tensor& index);

// Message for an index value outside [0, rows).
[[noreturn]] void fail_index_out_of_range(int64_t position, int64_t value, int64_t rows);

}  // namespace prunenet
