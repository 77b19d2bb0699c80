// The interface between csrc/cpu/graph.cpp (torch-facing: checks, allocation, threading) and the
// graph kernels compiled once per ISA (csrc/cpu/isa/*.cpp): launch parameters on raw pointers and
// a table of plain function pointers.
//
// Every kernel walks the rows [r0, r1) of a compressed sparse row structure (CsrView): the CSR
// by destination node for forward passes, its transpose (by source node) for the gradients of
// the gathered inputs, so every output row has one writer and no atomics are needed. A kernel
// returns false as soon as it meets a column index outside [0, num_cols), before reading any
// row that index would address (the bind layer then raises).
//
// Element types: T is the feature dtype (float, double or bfloat16); A is the accumulation type
// (double for float64, float otherwise). Per-edge and per-node scalars are A.
#pragma once

#include <cstdint>

namespace fastdl::cpu {

enum GraphDtype : int { kGF32 = 0, kGF64 = 1, kGBF16 = 2, kNumGraphDtypes = 3 };

struct CsrView {
  const int64_t* rowptr;  // rows + 1
  const int64_t* col;     // nnz, in [0, num_cols)
  const int64_t* perm;    // nnz: index of each entry's scalar in `w`; null = identity
  int64_t num_cols;
  int64_t perm_size;  // perm entries must lie in [0, perm_size)
};

// Weighted sum over rows, features (rows, F) contiguous:
//   out[i] = rs[i] * sum_{e in row i} w[perm(e)] * cs[col e] * x[col e] + ds[i] * xd[i]
// Every scalar pointer may be null (factor 1, or no diagonal term when ds is null).
// spmm_sum runs in one pass or several (csrc/cpu/graph.cpp): a pass takes the entries whose
// col lies in [col_lo, col_hi) of each row of at most kWindowRow entries, and the longer rows
// whole in the pass at col_lo = 0; that pass writes out, the later ones add to it (so out,
// rounded to T between passes, should be float or double). One pass: col_lo = 0, col_hi >=
// num_cols.
// The max/min variants take out[i, f] = max/min over e of w[e] * x[col e, f] (0 for empty rows)
// and write arg_out[i, f] = the entry e attaining it (-1 for empty rows). Their backward to x
// runs over the transpose (`col` = destination, `perm` = CSR entry) and adds w[p] * x[i, f]
// where arg[i, f] == p.
struct SpmmArgs {
  CsrView g;
  const void* w;       // A, nullable
  const void* cs;      // A (num_cols), nullable
  const void* rs;      // A (rows), nullable
  const void* ds;      // A (rows), nullable
  const void* x;       // T (num_cols, F)
  const void* xd;      // T (rows, F), with ds
  const int64_t* arg;  // max/min backward: (num_cols, F)
  void* out;           // T (rows, F)
  int64_t* arg_out;    // max/min forward: (rows, F)
  int64_t F;
  int64_t col_lo = 0, col_hi = INT64_MAX;  // spmm_sum's pass; the default: one pass
};

// Rows longer than this go whole in spmm_sum's first pass (a pass gathers a row's entries of
// its window into arrays on the stack).
constexpr int64_t kWindowRow = 256;

// Per-entry dot products over rows of a CSR:
//   out[e] = rs[i] * cs[col e] * sum_f mask(e, f) * a[i, f] * b[col e, f]
// where mask(e, f) = (arg[i, f] == e) when arg is given, else 1. Entries are numbered in CSR
// order; out is A.
struct EdgeDotArgs {
  CsrView g;
  const void* a;  // T (rows, F)
  const void* b;  // T (num_cols, F)
  const void* rs;
  const void* cs;
  const int64_t* arg;
  void* out;
  int64_t F;
};

// Graph attention (Velickovic et al., 2018) with H heads on h (N, H, F); scalars per node and
// head are (N, H), per entry and head (nnz, H), all A. Forward over the CSR by destination:
//   z_e = a_src[col e] + a_dst[i], alpha_e = softmax over row i of LeakyReLU(z_e),
//   out[i] = sum_e alpha_e * drop_e * h[col e]          (drop: null, or 0 or 1/(1-p) per entry)
// Backward: rows pass over the CSR writes dz (nnz, H) and g_dst (N, H); the nodes pass over the
// transpose writes grad_h and g_src.
struct GatArgs {
  CsrView g;            // the CSR (forward, backward rows pass) or its transpose (nodes pass)
  const void* h;        // T (N, H, F)
  const void* att_src;  // A (H, F)
  const void* att_dst;  // A (H, F)
  const void* drop;     // A (nnz, H), nullable
  const void* grad;     // T (N, H, F): grad_out, backward only
  void* a_src;          // A (N, H)
  void* a_dst;          // A (N, H)
  void* alpha;          // A (nnz, H)
  void* dz;             // A (nnz, H), backward
  void* g_src;          // A (N, H), backward
  void* g_dst;          // A (N, H), backward
  void* out;            // T (N, H, F): forward output or grad_h
  int64_t H, F;
  double slope;
};

using SpmmFn = bool (*)(const SpmmArgs&, int64_t r0, int64_t r1);
using EdgeDotFn = bool (*)(const EdgeDotArgs&, int64_t r0, int64_t r1);
using GatFn = bool (*)(const GatArgs&, int64_t r0, int64_t r1);

struct GraphKernels {
  SpmmFn spmm_sum[kNumGraphDtypes];
  SpmmFn spmm_max[kNumGraphDtypes][2];     // [dtype][is_min]
  SpmmFn spmm_max_bwd_x[kNumGraphDtypes];  // transpose rows
  EdgeDotFn edge_dot[kNumGraphDtypes];
  GatFn gat_scores[kNumGraphDtypes];     // nodes [r0, r1): a_src, a_dst (never fails)
  GatFn gat_fwd[kNumGraphDtypes];        // CSR rows
  GatFn gat_bwd_rows[kNumGraphDtypes];   // CSR rows: dz, g_dst
  GatFn gat_bwd_nodes[kNumGraphDtypes];  // transpose rows: grad_h, g_src
};

// One table per ISA, defined in csrc/cpu/isa/{avx512,avx2,scalar}.cpp.
const GraphKernels& graph_kernels_scalar();
#if defined(__x86_64__)
const GraphKernels& graph_kernels_avx2();
const GraphKernels& graph_kernels_avx512();
#endif

}  // namespace fastdl::cpu
