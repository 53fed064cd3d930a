// CUDA kernel of prunenet::slice_ffn_ (see slice_ffn.h). Compiled only in the CUDA variant.
//
// The host plans the runs (plan_runs, shared with the CPU kernel) from a host copy of `keep` (the checks
// need it there anyway) and launches one kernel per direct run and two per staged run (gather into the
// scratch buffer, scatter from it), all on the current stream, so each run starts after the previous
// one has finished. Local runs are not used: a unit's in-place copy is a sequential forward walk.
//
// Memory: the op allocates nothing but the scratch buffer (at most max(scratch_bytes, one unit), from
// the caching allocator). The tail freed by slicing is NOT returned: a CUDA tensor's storage is one
// caching-allocator block that cannot shrink, so torch.cuda.memory_allocated() is unchanged until the
// tensor is freed. To give that memory back, clone the sliced tensor (peak: its new size) and drop the
// old one, or save and reload the model.
#include "slice_ffn.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace prunenet {
namespace {

enum class Move : int { kDirect = 0, kToScratch = 1, kFromScratch = 2 };

// Moves the elements of units [begin, begin + total / unit_elems): one thread per element, grid-stride.
// V is the moved word: the element itself, or (row mode, when sizes, strides and address allow) a
// 4/8/16-byte vector of elements, so consecutive threads read and write consecutive words (coalesced).
template <typename V, Move kMove>
__global__ void move_units_kernel(NeuronLayout l, const int64_t* __restrict__ keep, V* base, V* scratch,
                                  int64_t begin, int64_t total) {
  const int64_t unit_elems = l.unit_elems();
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t v = begin + e / unit_elems;
    const int64_t i = e - (v - begin) * unit_elems;
    int64_t src, dst;
    if (l.row_mode()) {
      const int64_t a = v / l.kept, j = v - a * l.kept;
      src = l.src_offset(a, keep[j]) + i;
      dst = l.dst_offset(a, j) + i;
    } else {
      src = l.src_offset(v, keep[i]);
      dst = l.dst_offset(v, i);
    }
    if constexpr (kMove == Move::kDirect) {
      base[dst] = base[src];
    } else if constexpr (kMove == Move::kToScratch) {
      scratch[e] = base[src];
    } else {
      base[dst] = scratch[e];
    }
  }
}

template <typename V>
void launch_move(Move move, const NeuronLayout& l, const int64_t* keep, void* base, void* scratch, int64_t begin,
                 int64_t total, cudaStream_t stream) {
  constexpr int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, 8192));
  V* b = static_cast<V*>(base);
  V* s = static_cast<V*>(scratch);
  switch (move) {
    case Move::kDirect:
      move_units_kernel<V, Move::kDirect><<<blocks, threads, 0, stream>>>(l, keep, b, s, begin, total);
      break;
    case Move::kToScratch:
      move_units_kernel<V, Move::kToScratch><<<blocks, threads, 0, stream>>>(l, keep, b, s, begin, total);
      break;
    case Move::kFromScratch:
      move_units_kernel<V, Move::kFromScratch><<<blocks, threads, 0, stream>>>(l, keep, b, s, begin, total);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Bytes per moved word: the widest of 16/8/4 bytes that divides the row, both neuron strides and the
// base address (row mode only; column-mode units are gathers of single elements).
int64_t word_bytes(const NeuronLayout& l, int64_t elem, const void* base) {
  if (!l.row_mode()) {
    return elem;
  }
  const auto address = reinterpret_cast<uintptr_t>(base);
  for (const int64_t bytes : {int64_t{16}, int64_t{8}, int64_t{4}}) {
    if (bytes > elem && (l.inner * elem) % bytes == 0 && (l.src_neuron * elem) % bytes == 0 &&
        (l.dst_neuron * elem) % bytes == 0 && address % static_cast<uintptr_t>(bytes) == 0) {
      return bytes;
    }
  }
  return elem;
}

void move(int64_t bytes, Move how, const NeuronLayout& l, const int64_t* keep, void* base, void* scratch,
          int64_t begin, int64_t total, cudaStream_t stream) {
  switch (bytes) {
    case 16:
      return launch_move<uint4>(how, l, keep, base, scratch, begin, total, stream);
    case 8:
      return launch_move<uint2>(how, l, keep, base, scratch, begin, total, stream);
    case 4:
      return launch_move<uint32_t>(how, l, keep, base, scratch, begin, total, stream);
    default:
      return launch_move<uint16_t>(how, l, keep, base, scratch, begin, total, stream);
  }
}

// Slices one tensor (validated) along `dim`: `keep_host` for the plan, `keep_dev` (the same k values on the
// device) for the kernels; `scratch` is grown on demand and reused across calls.
void slice_tensor_cuda(const at::Tensor& t, int64_t dim, int64_t width, const int64_t* keep_host,
                       const int64_t* keep_dev, int64_t k, int64_t scratch_bytes, at::Tensor& scratch,
                       cudaStream_t stream) {
  const NeuronLayout layout = neuron_layout(t, dim, width, k);
  if (t.numel() > 0) {
    void* base = t.data_ptr();
    const int64_t elem = t.element_size();
    const int64_t bytes = word_bytes(layout, elem, base);
    NeuronLayout l = layout;  // in words of `bytes`
    if (bytes != elem) {
      const int64_t f = bytes / elem;
      l.inner /= f;
      l.src_neuron /= f;
      l.dst_neuron /= f;
    }
    const int64_t unit_bytes = l.unit_elems() * bytes;
    const int64_t scratch_units = std::max<int64_t>(1, scratch_bytes / unit_bytes);
    // On a GPU every run costs a launch: a direct run is only worth it when it moves at least what a
    // staged run would.
    const std::vector<Run> runs = plan_runs(l, keep_host, scratch_units, scratch_units, /*allow_local=*/false);
    for (const Run& run : runs) {
      const int64_t total = (run.end - run.begin) * l.unit_elems();
      if (run.kind == RunKind::kStaged) {
        if (!scratch.defined() || scratch.numel() < total * bytes) {
          scratch = at::empty({total * bytes}, t.options().dtype(at::kByte));
        }
        move(bytes, Move::kToScratch, l, keep_dev, base, scratch.data_ptr(), run.begin, total, stream);
        move(bytes, Move::kFromScratch, l, keep_dev, base, scratch.data_ptr(), run.begin, total, stream);
      } else {
        move(bytes, Move::kDirect, l, keep_dev, base, nullptr, run.begin, total, stream);
      }
    }
  }
  set_sliced_metadata(t, dim, layout);
}

void slice_ffn_cuda(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                    int64_t scratch_bytes) {
  const at::Tensor keep_cpu = check_slice_ffn_args(rows, cols, keep, width, scratch_bytes);
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor keep_dev = keep.contiguous();
  const int64_t k = keep_cpu.size(0);
  const int64_t* host = keep_cpu.const_data_ptr<int64_t>();
  const int64_t* dev = keep_dev.const_data_ptr<int64_t>();
  at::Tensor scratch;
  for (const at::Tensor& t : rows) slice_tensor_cuda(t, 0, width, host, dev, k, scratch_bytes, scratch, stream);
  for (const at::Tensor& t : cols) slice_tensor_cuda(t, 1, width, host, dev, k, scratch_bytes, scratch, stream);
}

// Moves `bytes` from `src` down to `dst` (dst < src, the ranges may overlap): device copies of at most
// src - dst bytes each, in stream order, so no copy overwrites bytes a later one reads.
void move_down(char* dst, const char* src, int64_t bytes, cudaStream_t stream) {
  const int64_t piece = src - dst;
  for (int64_t done = 0; done < bytes; done += piece) {
    const int64_t n = std::min(piece, bytes - done);
    C10_CUDA_CHECK(cudaMemcpyAsync(dst + done, src + done, static_cast<size_t>(n), cudaMemcpyDeviceToDevice, stream));
  }
}

void slice_experts_cuda(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                        int64_t scratch_bytes) {
  const at::Tensor keep_cpu = check_slice_experts_args(rows, cols, keep, width, scratch_bytes);
  const c10::cuda::CUDAGuard guard(keep.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor keep_dev = keep.contiguous();
  const int64_t experts = keep_cpu.size(0), k = keep_cpu.size(1);
  at::Tensor scratch;
  const auto slice = [&](const at::Tensor& t, int64_t dim) {
    const int64_t groups = t.size(dim) / width;
    const int64_t elem = t.element_size();
    const int64_t old_expert = t.numel() / experts * elem;
    const int64_t new_expert = old_expert / (groups * width) * (groups * k);
    auto* base = static_cast<char*>(t.data_ptr());
    for (int64_t e = 0; e < experts; ++e) {
      const at::Tensor view = t.select(0, e);
      slice_tensor_cuda(view, dim - 1, width, keep_cpu.const_data_ptr<int64_t>() + e * k,
                        keep_dev.const_data_ptr<int64_t>() + e * k, k, scratch_bytes, scratch, stream);
      if (e > 0 && new_expert < old_expert) {
        move_down(base + e * new_expert, base + e * old_expert, new_expert, stream);
      }
    }
    set_sliced_expert_metadata(t, dim, groups * k);
  };
  for (const at::Tensor& t : rows) slice(t, 1);
  for (const at::Tensor& t : cols) slice(t, 2);
}

}  // namespace
}  // namespace prunenet

TORCH_LIBRARY_IMPL(prunenet, CUDA, m) {
  m.impl("slice_ffn_", &prunenet::slice_ffn_cuda);
  m.impl("slice_experts_", &prunenet::slice_experts_cuda);
}
