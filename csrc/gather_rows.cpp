// Schema, CPU kernel and Meta kernel of prunenet::gather_rows (see gather_rows.h).
#include "gather_rows.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace prunenet {

void check_gather_rows_args(const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK(src.dim() == 1 || src.dim() == 2, "prunenet::gather_rows: src must be 1-D or 2-D, got ", src.dim(),
              "-D with shape ", src.sym_sizes());
  const auto dtype = src.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "prunenet::gather_rows: src dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(src.dim() == 1 || src.sym_size(1) <= 1 || src.sym_stride(1) == 1,
              "prunenet::gather_rows: the last dim of src must be contiguous (src.stride(1) == 1), got strides ",
              src.sym_strides(), "; call src.contiguous() first");
  TORCH_CHECK(index.scalar_type() == at::kLong, "prunenet::gather_rows: index must be int64 (torch.long), got ",
              index.scalar_type());
  TORCH_CHECK(index.dim() == 1, "prunenet::gather_rows: index must be 1-D, got shape ", index.sym_sizes());
  TORCH_CHECK(index.device() == src.device(), "prunenet::gather_rows: index is on ", index.device(),
              " but src is on ", src.device(), "; both must be on the same device");
}

at::Tensor gather_rows_empty_output(const at::Tensor& src, const at::Tensor& index) {
  if (src.dim() == 1) {
    return at::empty_symint({index.sym_size(0)}, src.options());
  }
  return at::empty_symint({index.sym_size(0), src.sym_size(1)}, src.options());
}

void fail_index_out_of_range(int64_t position, int64_t value, int64_t rows) {
  TORCH_CHECK(false, "prunenet::gather_rows: index[", position, "] = ", value, " is out of range for src with ", rows,
              " rows (valid: 0 <= index < ", rows, "; negative indices are not supported)");
}

namespace {

at::Tensor gather_rows_cpu(const at::Tensor& src, const at::Tensor& index) {
  check_gather_rows_args(src, index);
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.size(0);
  const int64_t rows = src.size(0);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  // Every index is validated before anything is copied: a bad index never reads out of bounds.
  for (int64_t i = 0; i < n; ++i) {
    if (ip[i] < 0 || ip[i] >= rows) {
      fail_index_out_of_range(i, ip[i], rows);
    }
  }

  at::Tensor out = gather_rows_empty_output(src, index);
  const int64_t elem = static_cast<int64_t>(src.element_size());
  const int64_t row_bytes = (src.dim() == 2 ? src.size(1) : 1) * elem;
  if (n == 0 || row_bytes == 0) {
    return out;
  }
  const int64_t src_row_step = src.stride(0) * elem;  // bytes between consecutive src rows
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* op = static_cast<char*>(out.mutable_data_ptr());
  // About 32 KiB per task, so tiny rows are not split into one task per row.
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(op + i * row_bytes, sp + ip[i] * src_row_step, static_cast<size_t>(row_bytes));
    }
  });
  return out;
}

// Shapes only (also used by FakeTensor / torch.compile, with symbolic sizes).
at::Tensor gather_rows_meta(const at::Tensor& src, const at::Tensor& index) {
  check_gather_rows_args(src, index);
  return gather_rows_empty_output(src, index);
}

}  // namespace
}  // namespace prunenet

TORCH_LIBRARY(prunenet, m) {
  m.def("gather_rows(Tensor src, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(prunenet, CPU, m) {
  m.impl("gather_rows", &prunenet::gather_rows_cpu);
}

TORCH_LIBRARY_IMPL(prunenet, Meta, m) {
  m.impl("gather_rows", &prunenet::gather_rows_meta);
}
