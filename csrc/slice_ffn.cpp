// Schema, argument checks, run planning, CPU kernel and Meta kernel of prunenet::slice_ffn_ (see slice_ffn.h).
#include "slice_ffn.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace prunenet {

namespace {

constexpr const char* kOp = "prunenet::slice_ffn_: ";

// Number of elements between the first and one past the last element of `t` (t.numel() > 0).
int64_t extent_elems(const at::Tensor& t) {
  int64_t last = 0;
  for (const auto i : c10::irange(t.dim())) {
    last += (t.size(i) - 1) * t.stride(i);
  }
  return last + 1;
}

// The memory walk in slice_ffn.h needs: the innermost contiguous run first, then neurons, then the
// `before` dim, each stride at least the span of what it steps over (no overlap, addresses increasing).
void check_layout(const at::Tensor& t, int64_t dim, const char* list, size_t index) {
  const auto fail = [&](const char* why) {
    TORCH_CHECK(false, kOp, list, "[", index, "] with shape ", t.sizes(), " and strides ", t.strides(), ": ", why,
                "; pass a contiguous tensor (.contiguous()) or a row-strided view of one");
  };
  if (dim == 0) {
    if (t.dim() == 2 && t.size(1) > 1) {
      if (t.stride(1) != 1) fail("the last dim must be contiguous (stride(1) == 1)");
      if (t.stride(0) < t.size(1)) fail("rows must not overlap (stride(0) >= size(1))");
    } else if (t.stride(0) < 1) {
      fail("neurons must not overlap (stride(0) >= 1)");
    }
  } else {
    if (t.stride(1) < 1) fail("neurons must not overlap (stride(1) >= 1)");
    if (t.size(0) > 1 && t.stride(0) < t.size(1) * t.stride(1)) {
      fail("rows must not overlap and must come one after another in memory (stride(0) >= size(1) * stride(1))");
    }
  }
}

}  // namespace

NeuronLayout neuron_layout(const at::Tensor& t, int64_t dim, int64_t width, int64_t kept) {
  NeuronLayout l;
  l.width = width;
  l.kept = kept;
  l.groups = t.size(dim) / width;
  const bool packed = t.is_contiguous();
  if (dim == 0) {
    const int64_t d = t.dim() == 2 ? t.size(1) : 1;
    l.outer = l.groups;
    l.inner = std::max<int64_t>(d, 1);
    l.src_neuron = t.stride(0);
    l.dst_neuron = packed ? l.inner : l.src_neuron;
  } else {
    l.outer = t.size(0) * l.groups;
    l.inner = 1;
    l.src_before = t.stride(0);
    l.src_neuron = t.stride(1);
    l.dst_before = packed ? l.groups * kept : l.src_before;
    l.dst_neuron = packed ? 1 : l.src_neuron;
  }
  return l;
}

std::vector<Run> plan_runs(const NeuronLayout& l, const int64_t* keep, int64_t scratch_units, int64_t min_run_units,
                           bool allow_local) {
  const int64_t units = l.units();
  const int64_t k = l.kept;
  // [lo, hi) element spans of unit v's sources and destinations. Both increase with v (slice_ffn.h).
  const auto src_lo = [&](int64_t v) {
    return l.row_mode() ? l.src_offset(v / k, keep[v % k]) : l.src_offset(v, keep[0]);
  };
  const auto src_hi = [&](int64_t v) {
    return l.row_mode() ? src_lo(v) + l.inner : l.src_offset(v, keep[k - 1]) + 1;
  };
  const auto dst_lo = [&](int64_t v) { return l.row_mode() ? l.dst_offset(v / k, v % k) : l.dst_offset(v, 0); };
  const auto dst_hi = [&](int64_t v) {
    return l.row_mode() ? dst_lo(v) + l.inner : l.dst_offset(v, k - 1) + 1;
  };
  const auto identity = [&](int64_t v) {
    if (dst_lo(v) != src_lo(v)) return false;
    return l.row_mode() || (keep[k - 1] == k - 1 && l.dst_neuron == l.src_neuron);
  };

  std::vector<Run> runs;
  int64_t u = 0;
  while (u < units && identity(u)) ++u;  // kept prefix already in place (all of it when k == n)
  scratch_units = std::max<int64_t>(scratch_units, 1);
  while (u < units) {
    // Direct: the units whose destinations end at or below the lowest source of the run (that of u):
    // no unit of the run can overwrite a source of the run. dst_hi is increasing: binary search.
    const int64_t limit = src_lo(u);
    int64_t lo = u, hi = units;  // first v with dst_hi(v) > limit
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (dst_hi(mid) <= limit) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const int64_t direct_end = lo;
    if (direct_end > u && (direct_end - u >= min_run_units || direct_end == units)) {
      runs.push_back({u, direct_end, RunKind::kDirect});
      u = direct_end;
      continue;
    }
    // Local: each destination starts at or above the previous unit's sources, so it can only overlap its
    // own (and a forward copy of one unit is always safe).
    if (allow_local) {
      int64_t local_end = u + 1;
      while (local_end < units && dst_lo(local_end) >= src_hi(local_end - 1)) ++local_end;
      if (local_end - u >= min_run_units || local_end == units) {
        runs.push_back({u, local_end, RunKind::kLocal});
        u = local_end;
        continue;
      }
    }
    // Staged: any run is safe through a buffer, since its destinations never reach a later run's
    // sources. Take the larger of what the scratch holds and the (short) direct run.
    const int64_t staged_end = std::min(units, u + scratch_units);
    if (direct_end > staged_end) {
      runs.push_back({u, direct_end, RunKind::kDirect});
      u = direct_end;
    } else {
      runs.push_back({u, staged_end, RunKind::kStaged});
      u = staged_end;
    }
  }
  return runs;
}

namespace {

// What both ops ask of their tensors' dtype and of keep's device (the first tensor sets the dtype).
void check_dtype_and_device(const at::Tensor& first, const at::Tensor& keep, const char* op) {
  const auto dtype = first.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              "tensors must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(keep.device() == first.device(), op, "keep is on ", keep.device(), " but the tensors are on ",
              first.device());
}

// A tensor whose shape the op may change in place: no autograd history to break, metadata not frozen.
void check_resizable(const at::Tensor& t, const char* op, const char* list, size_t index) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && t.requires_grad()), op, list, "[", index,
              "] requires grad; this op has no autograd formula: call it under torch.no_grad()");
  // Tensors whose metadata is frozen (.data / .detach() on some torch versions) would fail in
  // as_strided_ after their data moved: refuse them up front.
  TORCH_CHECK(t.unsafeGetTensorImpl()->allow_tensor_metadata_change(), op, list, "[", index,
              "] was created by .data or .detach(), whose shape cannot change in place; pass the tensor "
              "itself (e.g. the nn.Parameter)");
}

// Two arguments sharing memory would be compacted twice.
void check_no_shared_memory(const std::vector<const at::Tensor*>& all, const char* op) {
  for (const auto i : c10::irange(all.size())) {
    for (size_t j = i + 1; j < all.size(); ++j) {
      const at::Tensor& a = *all[i];
      const at::Tensor& b = *all[j];
      if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) continue;
      const int64_t a0 = a.storage_offset(), a1 = a0 + extent_elems(a);
      const int64_t b0 = b.storage_offset(), b1 = b0 + extent_elems(b);
      TORCH_CHECK(a1 <= b0 || b1 <= a0, op, "tensors ", i, " and ", j,
                  " (rows first, then cols) share memory; each tensor must be passed once");
    }
  }
}

}  // namespace

at::Tensor check_slice_ffn_args(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                                int64_t scratch_bytes) {
  TORCH_CHECK(width >= 1, kOp, "width (the FFN width n) must be >= 1, got ", width);
  TORCH_CHECK(scratch_bytes >= 0, kOp, "scratch_bytes must be >= 0, got ", scratch_bytes);
  TORCH_CHECK(!rows.empty() || !cols.empty(), kOp, "no tensors to slice (rows and cols are both empty)");
  TORCH_CHECK(keep.scalar_type() == at::kLong, kOp, "keep must be int64 (torch.long), got ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == 1, kOp, "keep must be 1-D, got shape ", keep.sizes());
  const int64_t k = keep.size(0);
  TORCH_CHECK(k >= 1 && k <= width, kOp, "keep must hold between 1 and width = ", width, " neurons, got ", k);

  const at::Tensor& first = rows.empty() ? cols[0] : rows[0];
  check_dtype_and_device(first, keep, kOp);
  const auto dtype = first.scalar_type();
  std::vector<const at::Tensor*> all;
  const auto check_tensor = [&](const at::Tensor& t, int64_t dim, const char* list, size_t index) {
    TORCH_CHECK(t.device() == first.device() && t.scalar_type() == dtype, kOp, list, "[", index, "] is ",
                t.scalar_type(), " on ", t.device(), ", expected ", dtype, " on ", first.device(),
                " like the first tensor");
    if (dim == 0) {
      TORCH_CHECK(t.dim() == 1 || t.dim() == 2, kOp, list, "[", index, "] must be 1-D or 2-D, got shape ", t.sizes());
    } else {
      TORCH_CHECK(t.dim() == 2, kOp, list, "[", index, "] must be 2-D, got shape ", t.sizes());
    }
    TORCH_CHECK(t.size(dim) >= width && t.size(dim) % width == 0, kOp, list, "[", index, "] has shape ", t.sizes(),
                ": dim ", dim, " must be a positive multiple of width = ", width);
    check_resizable(t, kOp, list, index);
    check_layout(t, dim, list, index);
    all.push_back(&t);
  };
  for (const auto i : c10::irange(rows.size())) check_tensor(rows[i], 0, "rows", i);
  for (const auto i : c10::irange(cols.size())) check_tensor(cols[i], 1, "cols", i);

  check_no_shared_memory(all, kOp);

  if (keep.is_meta()) {
    return at::Tensor();
  }
  // Values last: a bad index is reported before anything is written.
  at::Tensor keep_cpu = keep.to(at::kCPU).contiguous();
  const int64_t* kp = keep_cpu.const_data_ptr<int64_t>();
  for (const auto i : c10::irange(k)) {
    TORCH_CHECK(kp[i] >= 0 && kp[i] < width, kOp, "keep[", i, "] = ", kp[i], " is out of range [0, ", width, ")");
    TORCH_CHECK(i == 0 || kp[i] > kp[i - 1], kOp, "keep must be sorted and unique, but keep[", i - 1, "] = ",
                kp[i - 1], " and keep[", i, "] = ", kp[i]);
  }
  return keep_cpu;
}

at::Tensor check_slice_experts_args(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                                    int64_t scratch_bytes) {
  constexpr const char* kExp = "prunenet::slice_experts_: ";
  TORCH_CHECK(width >= 1, kExp, "width (the expert width n) must be >= 1, got ", width);
  TORCH_CHECK(scratch_bytes >= 0, kExp, "scratch_bytes must be >= 0, got ", scratch_bytes);
  TORCH_CHECK(!rows.empty() || !cols.empty(), kExp, "no tensors to slice (rows and cols are both empty)");
  TORCH_CHECK(keep.scalar_type() == at::kLong, kExp, "keep must be int64 (torch.long), got ", keep.scalar_type());
  TORCH_CHECK(keep.dim() == 2, kExp, "keep must be 2-D (experts, kept), got shape ", keep.sizes());
  const int64_t experts = keep.size(0), k = keep.size(1);
  TORCH_CHECK(experts >= 1, kExp, "keep must have a row per expert, got shape ", keep.sizes());
  TORCH_CHECK(k >= 1 && k <= width, kExp, "keep must hold between 1 and width = ", width, " neurons, got ", k);
  const at::Tensor& first = rows.empty() ? cols[0] : rows[0];
  check_dtype_and_device(first, keep, kExp);
  const auto dtype = first.scalar_type();
  std::vector<const at::Tensor*> all;
  const auto check_tensor = [&](const at::Tensor& t, int64_t dim, const char* list, size_t index) {
    TORCH_CHECK(t.device() == first.device() && t.scalar_type() == dtype, kExp, list, "[", index, "] is ",
                t.scalar_type(), " on ", t.device(), ", expected ", dtype, " on ", first.device());
    TORCH_CHECK(dim == 1 ? (t.dim() == 2 || t.dim() == 3) : t.dim() == 3, kExp, list, "[", index,
                "] must be (E, g*n, d) or (E, g*n) for rows, (E, d, g*n) for cols; got shape ", t.sizes());
    TORCH_CHECK(t.size(0) == experts, kExp, list, "[", index, "] has ", t.size(0), " experts, keep has ", experts);
    TORCH_CHECK(t.size(dim) >= width && t.size(dim) % width == 0, kExp, list, "[", index, "] has shape ",
                t.sizes(), ": dim ", dim, " must be a positive multiple of width = ", width);
    TORCH_CHECK(t.is_contiguous(), kExp, list, "[", index, "] must be contiguous");
    check_resizable(t, kExp, list, index);
    all.push_back(&t);
  };
  for (const auto i : c10::irange(rows.size())) check_tensor(rows[i], 1, "rows", i);
  for (const auto i : c10::irange(cols.size())) check_tensor(cols[i], 2, "cols", i);
  check_no_shared_memory(all, kExp);
  if (keep.is_meta()) {
    return at::Tensor();
  }
  at::Tensor keep_cpu = keep.to(at::kCPU).contiguous();
  const int64_t* kp = keep_cpu.const_data_ptr<int64_t>();
  for (const auto e : c10::irange(experts)) {
    const int64_t* row = kp + e * k;
    for (const auto i : c10::irange(k)) {
      TORCH_CHECK(row[i] >= 0 && row[i] < width, kExp, "keep[", e, ", ", i, "] = ", row[i],
                  " is out of range [0, ", width, ")");
      TORCH_CHECK(i == 0 || row[i] > row[i - 1], kExp, "keep[", e, "] must be sorted and unique, but keep[", e,
                  ", ", i - 1, "] = ", row[i - 1], " and keep[", e, ", ", i, "] = ", row[i]);
    }
  }
  return keep_cpu;
}

void set_sliced_expert_metadata(const at::Tensor& t, int64_t dim, int64_t new_neurons) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[dim] = new_neurons;
  std::vector<int64_t> strides(sizes.size());
  int64_t step = 1;
  for (int64_t i = static_cast<int64_t>(sizes.size()) - 1; i >= 0; --i) {
    strides[i] = step;
    step *= std::max<int64_t>(sizes[i], 1);
  }
  t.as_strided_(sizes, strides);
}

void set_sliced_metadata(const at::Tensor& t, int64_t dim, const NeuronLayout& l) {
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[dim] = l.groups * l.kept;
  std::vector<int64_t> strides = t.strides().vec();
  if (t.is_contiguous()) {  // repacked: contiguous strides of the new shape
    int64_t step = 1;
    for (int64_t i = t.dim() - 1; i >= 0; --i) {
      strides[i] = step;
      step *= std::max<int64_t>(sizes[i], 1);
    }
  }
  t.as_strided_(sizes, strides);
}

namespace {

// ------------------------------------------------------------------------------------------------ CPU

// Unit v's elements, gathered in order, to dst (element stride dst_step). Row mode: one contiguous row
// (memmove: in a local run it may overlap its own source). Column mode: k strided elements, copied
// forward, which is what makes a unit's in-place copy safe.
template <typename T>
void copy_unit(const NeuronLayout& l, const int64_t* keep, const T* base, int64_t v, T* dst, int64_t dst_step) {
  if (l.row_mode()) {
    const T* src = base + l.src_offset(v / l.kept, keep[v % l.kept]);
    std::memmove(dst, src, static_cast<size_t>(l.inner) * sizeof(T));
    return;
  }
  const T* src = base + l.src_offset(v, 0);
  for (int64_t j = 0; j < l.kept; ++j) {
    dst[j * dst_step] = src[keep[j] * l.src_neuron];
  }
}

// Where unit v goes, and the stride of its elements there.
int64_t unit_dst_offset(const NeuronLayout& l, int64_t v) {
  return l.row_mode() ? l.dst_offset(v / l.kept, v % l.kept) : l.dst_offset(v, 0);
}

template <typename T>
void run_cpu(const NeuronLayout& l, const int64_t* keep, T* base, const Run& run, T* scratch) {
  const int64_t unit_elems = l.unit_elems();
  const int64_t step = l.row_mode() ? 1 : l.dst_neuron;
  // About 64 KiB per task: enough work to amortise a task, small enough to split a run over the threads.
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / (unit_elems * static_cast<int64_t>(sizeof(T))));
  if (run.kind != RunKind::kStaged) {
    at::parallel_for(run.begin, run.end, grain, [&](int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) copy_unit(l, keep, base, v, base + unit_dst_offset(l, v), step);
    });
    return;
  }
  at::parallel_for(run.begin, run.end, grain, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v) copy_unit(l, keep, base, v, scratch + (v - run.begin) * unit_elems, 1);
  });
  at::parallel_for(run.begin, run.end, grain, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v) {
      const T* src = scratch + (v - run.begin) * unit_elems;
      T* dst = base + unit_dst_offset(l, v);
      if (step == 1) {
        std::memcpy(dst, src, static_cast<size_t>(unit_elems) * sizeof(T));
      } else {
        for (int64_t j = 0; j < unit_elems; ++j) dst[j * step] = src[j];
      }
    }
  });
}

// Gives the pages past the sliced data back to the OS: madvise(MADV_DONTNEED) on the whole pages between
// the new and the old end, then records the new size in the storage. Only for a contiguous tensor that
// owns its entire, allocator-made storage (not a view into a bigger buffer, not a file mapping or
// from_blob memory). Not `untyped_storage().resize_()`: on CPU that allocates the new size and copies
// into it, which is exactly the peak this op exists to avoid. The virtual range stays mapped until
// the storage is freed, so a stale view of the old size reads zeros rather than faulting.
void release_tail(const at::Tensor& t, int64_t old_bytes, int64_t new_bytes) {
  const c10::Storage& storage = t.storage();
  if (!storage.resizable() || storage.allocator() == nullptr || t.storage_offset() != 0 ||
      static_cast<int64_t>(storage.nbytes()) != old_bytes || new_bytes >= old_bytes) {
    return;
  }
#ifdef __linux__
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<uintptr_t>(storage.data());
  const uintptr_t from = (start + static_cast<uintptr_t>(new_bytes) + page - 1) / page * page;
  const uintptr_t to = (start + static_cast<uintptr_t>(old_bytes)) / page * page;
  if (to > from) {
    (void)madvise(reinterpret_cast<void*>(from), to - from, MADV_DONTNEED);  // best effort
  }
#endif
  storage.unsafeGetStorageImpl()->set_nbytes(static_cast<size_t>(new_bytes));
}

template <typename T>
void slice_tensor_cpu(const at::Tensor& t, int64_t dim, int64_t width, const at::Tensor& keep_cpu,
                      int64_t scratch_bytes, at::Tensor& scratch) {
  const int64_t k = keep_cpu.size(0);
  const int64_t* keep = keep_cpu.const_data_ptr<int64_t>();
  const NeuronLayout l = neuron_layout(t, dim, width, k);
  const bool packed = t.is_contiguous();
  const int64_t old_bytes = t.numel() * t.element_size();
  T* base = static_cast<T*>(t.data_ptr());
  // Up to four scratch buffers (16 MiB by default): one serial forward walk (always safe, see
  // slice_ffn.h). It copies each element once, where staged runs would copy much of such a tensor
  // twice, and it starts no parallel region: on shared cores every region can wait a scheduler slice
  // for a descheduled thread (measured on 2 busy cores: OPT-125m's FFN 42 ms planned vs 18 ms for
  // index_select; serial copies of a few MiB take about a millisecond).
  if (t.numel() > 0 && old_bytes <= std::min<int64_t>(int64_t{16} << 20, 4 * scratch_bytes)) {
    const int64_t step = l.row_mode() ? 1 : l.dst_neuron;
    for (int64_t v = 0; v < l.units(); ++v) copy_unit(l, keep, base, v, base + unit_dst_offset(l, v), step);
  } else if (t.numel() > 0) {
    const int64_t unit_bytes = l.unit_elems() * static_cast<int64_t>(sizeof(T));
    const int64_t scratch_units = std::max<int64_t>(1, scratch_bytes / unit_bytes);
    // A direct run shorter than 256 KiB is staged instead: a parallel region per tiny run costs more
    // than the second copy, and the scratch is reused anyway.
    const int64_t min_run_units = std::max<int64_t>(1, (int64_t{256} << 10) / unit_bytes);
    const std::vector<Run> runs = plan_runs(l, keep, scratch_units, min_run_units, /*allow_local=*/true);
    for (const Run& run : runs) {
      if (run.kind == RunKind::kStaged) {
        const int64_t need = (run.end - run.begin) * unit_bytes;
        if (!scratch.defined() || scratch.numel() < need) {
          scratch = at::empty({need}, t.options().dtype(at::kByte));
        }
      }
      run_cpu<T>(l, keep, base, run, scratch.defined() ? static_cast<T*>(scratch.data_ptr()) : nullptr);
    }
  }
  set_sliced_metadata(t, dim, l);
  if (packed) {
    release_tail(t, old_bytes, t.numel() * t.element_size());
  }
}

void slice_ffn_cpu(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                   int64_t scratch_bytes) {
  const at::Tensor keep_cpu = check_slice_ffn_args(rows, cols, keep, width, scratch_bytes);
  at::Tensor scratch;  // allocated on the first staged run, at most max(scratch_bytes, one unit)
  const auto slice = [&](const at::Tensor& t, int64_t dim) {
    if (t.element_size() == 4) {
      slice_tensor_cpu<uint32_t>(t, dim, width, keep_cpu, scratch_bytes, scratch);
    } else {
      slice_tensor_cpu<uint16_t>(t, dim, width, keep_cpu, scratch_bytes, scratch);
    }
  };
  for (const at::Tensor& t : rows) slice(t, 0);
  for (const at::Tensor& t : cols) slice(t, 1);
}

// Each expert sliced as one FFN (slice_tensor_cpu on its (g*n, ...) view, packed at the start of its own
// block), then moved down to its place in the packed (E, g*k, ...) tensor. The move goes to a lower address
// (e * new_size <= e * old_size), so memmove's forward copy is safe.
void slice_experts_cpu(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                       int64_t scratch_bytes) {
  const at::Tensor keep_cpu = check_slice_experts_args(rows, cols, keep, width, scratch_bytes);
  const int64_t experts = keep_cpu.size(0), k = keep_cpu.size(1);
  at::Tensor scratch;
  const auto slice = [&](const at::Tensor& t, int64_t dim) {
    const int64_t groups = t.size(dim) / width;
    const int64_t old_expert = t.numel() / experts;
    const int64_t new_expert = old_expert / (groups * width) * (groups * k);
    const int64_t old_bytes = t.numel() * t.element_size();
    auto* base = static_cast<char*>(t.data_ptr());
    for (const auto e : c10::irange(experts)) {
      const at::Tensor view = t.select(0, e);  // (g*n, d), (g*n,) or (d, g*n): contiguous
      const at::Tensor keep_e = keep_cpu.select(0, e);
      if (t.element_size() == 4) {
        slice_tensor_cpu<uint32_t>(view, dim - 1, width, keep_e, scratch_bytes, scratch);
      } else {
        slice_tensor_cpu<uint16_t>(view, dim - 1, width, keep_e, scratch_bytes, scratch);
      }
      if (e > 0 && new_expert < old_expert) {
        std::memmove(base + e * new_expert * t.element_size(), base + e * old_expert * t.element_size(),
                     static_cast<size_t>(new_expert * t.element_size()));
      }
    }
    set_sliced_expert_metadata(t, dim, groups * k);
    release_tail(t, old_bytes, t.numel() * t.element_size());
  };
  for (const at::Tensor& t : rows) slice(t, 1);
  for (const at::Tensor& t : cols) slice(t, 2);
}

void slice_experts_meta(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                        int64_t scratch_bytes) {
  check_slice_experts_args(rows, cols, keep, width, scratch_bytes);
  const int64_t k = keep.size(1);
  for (const at::Tensor& t : rows) set_sliced_expert_metadata(t, 1, t.size(1) / width * k);
  for (const at::Tensor& t : cols) set_sliced_expert_metadata(t, 2, t.size(2) / width * k);
}

// Shapes only, for FakeTensor / torch.compile: the same checks (minus index values) and new metadata.
void slice_ffn_meta(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                    int64_t scratch_bytes) {
  check_slice_ffn_args(rows, cols, keep, width, scratch_bytes);
  const int64_t k = keep.size(0);
  for (const at::Tensor& t : rows) set_sliced_metadata(t, 0, neuron_layout(t, 0, width, k));
  for (const at::Tensor& t : cols) set_sliced_metadata(t, 1, neuron_layout(t, 1, width, k));
}

}  // namespace
}  // namespace prunenet

TORCH_LIBRARY(prunenet, m) {
  m.def("slice_ffn_(Tensor(a!)[] rows, Tensor(b!)[] cols, Tensor keep, int width, int scratch_bytes=4194304) -> ()");
  m.def(
      "slice_experts_(Tensor(a!)[] rows, Tensor(b!)[] cols, Tensor keep, int width, int scratch_bytes=4194304) -> ()");
}

TORCH_LIBRARY_IMPL(prunenet, CPU, m) {
  m.impl("slice_ffn_", &prunenet::slice_ffn_cpu);
  m.impl("slice_experts_", &prunenet::slice_experts_cpu);
}

TORCH_LIBRARY_IMPL(prunenet, Meta, m) {
  m.impl("slice_ffn_", &prunenet::slice_ffn_meta);
  m.impl("slice_experts_", &prunenet::slice_experts_meta);
}
