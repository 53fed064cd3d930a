// CUDA kernel of prunenet::gather_rows (see gather_rows.h). Compiled only in the CUDA variant.
#include "gather_rows.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace prunenet {
namespace {

// One thread per output element, grid-stride. T is an unsigned integer of the element's size:
// this is a copy, so the float type does not matter.
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ index, T* __restrict__ out,
                                   int64_t n, int64_t cols, int64_t src_row_stride) {
  const int64_t total = n * cols;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = k / cols;
    const int64_t j = k - i * cols;
    out[k] = src[index[i] * src_row_stride + j];
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& src, const at::Tensor& index) {
  check_gather_rows_args(src, index);
  const c10::cuda::CUDAGuard guard(src.device());
  const at::Tensor idx = index.contiguous();
  const int64_t n = idx.size(0);
  const int64_t rows = src.size(0);
  if (n > 0) {
    // Validate on the host before launching (one device sync), so a bad index never reads out of
    // bounds and the error is an ordinary RuntimeError, not a device-side assert.
    const auto min_max = at::aminmax(idx);
    const at::Tensor lo_hi = at::stack({std::get<0>(min_max), std::get<1>(min_max)}).cpu();
    const int64_t lo = lo_hi.const_data_ptr<int64_t>()[0];
    const int64_t hi = lo_hi.const_data_ptr<int64_t>()[1];
    if (lo < 0 || hi >= rows) {
      const int64_t bad = lo < 0 ? lo : hi;
      const int64_t position = idx.eq(bad).nonzero().select(0, 0).item<int64_t>();
      fail_index_out_of_range(position, bad, rows);
    }
  }

  at::Tensor out = gather_rows_empty_output(src, index);
  const int64_t cols = src.dim() == 2 ? src.size(1) : 1;
  if (n == 0 || cols == 0) {
    return out;
  }
  constexpr int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n * cols + threads - 1) / threads, 8192));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (src.element_size() == 4) {
    gather_rows_kernel<uint32_t><<<blocks, threads, 0, stream>>>(
        static_cast<const uint32_t*>(src.const_data_ptr()), idx.const_data_ptr<int64_t>(),
        static_cast<uint32_t*>(out.mutable_data_ptr()), n, cols, src.stride(0));
  } else {
    gather_rows_kernel<uint16_t><<<blocks, threads, 0, stream>>>(
        static_cast<const uint16_t*>(src.const_data_ptr()), idx.const_data_ptr<int64_t>(),
        static_cast<uint16_t*>(out.mutable_data_ptr()), n, cols, src.stride(0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace prunenet

TORCH_LIBRARY_IMPL(prunenet, CUDA, m) {
  m.impl("gather_rows", &prunenet::gather_rows_cuda);
}
