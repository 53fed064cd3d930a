// prunenet::slice_ffn_ -- fused, in-place slicing of one FFN's neuron-indexed tensors.
//
//   slice_ffn_(Tensor(a!)[] rows, Tensor(b!)[] cols, Tensor keep, SymInt width, int scratch_bytes) -> ()
//
//   rows:  tensors whose dim 0 holds neurons: (g*n, d) in-projection weights, (g*n,) biases
//   cols:  tensors whose dim 1 holds neurons: (d, g*n) out-projection weights
//          (g = size / n groups, e.g. Phi-3's fused gate_up_proj has g = 2: rows j and n + j are one neuron)
//   keep:  (k,) int64, sorted, unique, in [0, n), on the tensors' device
//   width: n
//
// Afterwards every tensor has g*k entries along its neuron dim (the kept neurons, in order) and lives in
// the same storage: a contiguous tensor is repacked contiguous; a row-strided one keeps its strides and
// only ever writes inside its own elements. On CPU, the freed tail of a contiguous tensor that owns its
// whole storage goes back to the OS (see release_tail in slice_ffn.cpp). All checks run before the first
// write, so a rejected call leaves every input untouched.
//
// Why in place is safe: walk the kept elements in memory order. Each one moves to an address <= its
// source (j <= keep[j], k <= n), and both addresses increase along the walk, so a sequential forward
// copy never overwrites a source it still needs. Parallel copies must keep that property; the plan
// below cuts the walk into runs that can be copied in parallel (see plan_runs).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

// Layout arithmetic is shared by the host (planning, CPU kernel) and the CUDA kernel.
#ifdef __CUDACC__
#define PRUNENET_HOST_DEVICE __host__ __device__
#else
#define PRUNENET_HOST_DEVICE
#endif

namespace prunenet {

// One tensor seen as (A, n) "units" along its neuron dim, with all offsets in elements.
//
// Row mode (inner > 1): a unit is one kept neuron row of `inner` contiguous elements; unit u = a*k + j.
// Column mode (inner == 1): a unit is one outer index a holding k strided elements; unit u = a.
// The outer index a = (before, group) = (a / groups, a % groups); `before` is the row of a cols tensor.
struct NeuronLayout {
  int64_t outer = 0;       // A = before * groups
  int64_t groups = 1;      // g
  int64_t width = 0;       // n
  int64_t kept = 0;        // k
  int64_t inner = 1;       // elements per neuron entry that are contiguous in memory (d for 2-D rows)
  int64_t src_before = 0;  // stride of `before` (cols tensors: stride(0)); 0 when there is no such dim
  int64_t src_neuron = 1;  // stride of the neuron dim
  int64_t dst_before = 0;  // the same two strides after slicing
  int64_t dst_neuron = 1;

  PRUNENET_HOST_DEVICE bool row_mode() const { return inner > 1; }
  PRUNENET_HOST_DEVICE int64_t units() const { return row_mode() ? outer * kept : outer; }
  PRUNENET_HOST_DEVICE int64_t unit_elems() const { return row_mode() ? inner : kept; }
  PRUNENET_HOST_DEVICE int64_t src_offset(int64_t a, int64_t neuron) const {
    return (a / groups) * src_before + ((a % groups) * width + neuron) * src_neuron;
  }
  PRUNENET_HOST_DEVICE int64_t dst_offset(int64_t a, int64_t j) const {
    return (a / groups) * dst_before + ((a % groups) * kept + j) * dst_neuron;
  }
};

// How one run of units [begin, end) is copied.
enum class RunKind {
  kDirect,  // every destination lies below every source of the run: copy all units in parallel
  kLocal,   // each unit's destination overlaps only its own source: units in parallel, each a forward copy
  kStaged,  // through the scratch buffer: gather all sources, then scatter to the destinations
};

struct Run {
  int64_t begin;
  int64_t end;
  RunKind kind;
};

// Layout of `t` (already validated) when slicing `keep.size(0)` of `width` neurons along `dim`.
NeuronLayout neuron_layout(const at::Tensor& t, int64_t dim, int64_t width, int64_t kept);

// The runs that move every non-identity unit of `layout`, in order. A run is parallel-safe given that
// all earlier runs have finished. Staged runs hold at most max(1, scratch_units) units. Direct or local
// runs shorter than min_run_units are replaced by staged ones (more parallel work per run); local runs
// are only used when allow_local (a unit's own forward copy is sequential: fine on CPU, not on a GPU).
std::vector<Run> plan_runs(const NeuronLayout& layout, const int64_t* keep, int64_t scratch_units,
                           int64_t min_run_units, bool allow_local);

// Checks shared by every backend; returns the validated keep on the CPU (or an undefined tensor for
// meta inputs, whose values cannot be read). Raises before anything is written.
at::Tensor check_slice_ffn_args(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                                int64_t scratch_bytes);

// Gives `t` its sliced sizes and strides (same storage, same offset).
void set_sliced_metadata(const at::Tensor& t, int64_t dim, const NeuronLayout& layout);

// prunenet::slice_experts_ -- the same for the fused expert tensors of a mixture-of-experts block:
//
//   slice_experts_(Tensor(a!)[] rows, Tensor(b!)[] cols, Tensor keep, SymInt width, int scratch_bytes) -> ()
//
//   rows:  contiguous tensors whose dim 1 holds neurons: (E, g*n, d) in-projections, (E, g*n) biases
//   cols:  contiguous tensors whose dim 2 holds neurons: (E, d, g*n) out-projections
//   keep:  (E, k) int64: row e is expert e's kept neurons, sorted, unique, in [0, n)
//
// Expert e is sliced in place like one FFN (the walk above, inside its own block), then its packed block
// moves down to e * (its new size): a move to a lower address, done as a forward copy in pieces no longer
// than the distance moved, so no piece overwrites a source still to be read. Every expert keeps the same
// k, so the result is an (E, g*k, ...) tensor in the same storage.
// Checks shared by every backend; returns the validated keep on the CPU (undefined for meta inputs).
at::Tensor check_slice_experts_args(at::TensorList rows, at::TensorList cols, const at::Tensor& keep, int64_t width,
                                    int64_t scratch_bytes);

// Gives a sliced expert tensor its final (E, ...) contiguous sizes and strides.
void set_sliced_expert_metadata(const at::Tensor& t, int64_t dim, int64_t new_neurons);

}  // namespace prunenet
