// CUDA kernels of the graph family: launch parameters and host launchers.
// Plain CUDA on raw pointers (no torch headers), so graph.cu compiles standalone with nvcc; the
// bind layer (graph_bind.cpp) validates the CSR, allocates the tensors and fills these structs.
//
// Every kernel gives one warp to one row of a CSR (the CSR by destination for forward passes, its
// transpose for the gradients of gathered inputs), so each output row has one writer: no atomics,
// bit-identical results from run to run. Features are (rows, F) row-major in the input dtype;
// per-entry and per-node scalars are float32. Launchers return the first CUDA error.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace fastdl::cuda {

enum class GraphDType : int { kFloat32, kFloat16, kBFloat16 };

struct GraphCsr {
  const int64_t* rowptr = nullptr;  // rows + 1
  const int64_t* col = nullptr;     // nnz
  const int64_t* perm = nullptr;    // nnz: scalar index of each entry; null = identity
  int64_t rows = 0;
};

// out[i] = rs[i] * sum_e w[perm e] * cs[col e] * x[col e] + ds[i] * xd[i]; scalars nullable.
// max/min (reduce_max): out[i, f] = max/min_e w[e] * x[col e, f], arg_out the entry (-1 empty).
// max_bwd: over the transpose, out[j, f] = sum_t [arg[col t, f] == perm t] w[perm t] x[col t, f].
struct GraphSpmmParams {
  GraphCsr g;
  const float* w = nullptr;
  const float* cs = nullptr;
  const float* rs = nullptr;
  const float* ds = nullptr;
  const void* x = nullptr;
  const void* xd = nullptr;
  const int64_t* arg = nullptr;
  void* out = nullptr;
  int64_t* arg_out = nullptr;
  int64_t F = 0;
  GraphDType dtype = GraphDType::kFloat32;
};

cudaError_t graph_spmm_sum(const GraphSpmmParams& p, cudaStream_t stream);
cudaError_t graph_spmm_max(const GraphSpmmParams& p, bool is_min, cudaStream_t stream);
cudaError_t graph_spmm_max_bwd(const GraphSpmmParams& p, cudaStream_t stream);

// dots[e] = rs[i] * sum_f mask(e, f) a[i, f] b[col e, f]; mask = (arg[i, f] == e) when arg.
struct GraphEdgeDotParams {
  GraphCsr g;
  const void* a = nullptr;
  const void* b = nullptr;
  const float* rs = nullptr;
  const int64_t* arg = nullptr;
  float* dots = nullptr;
  int64_t F = 0;
  GraphDType dtype = GraphDType::kFloat32;
};

cudaError_t graph_edge_dot(const GraphEdgeDotParams& p, cudaStream_t stream);

// Graph attention (Velickovic et al., 2018), h (N, H, F); see csrc/cpu/graph_params.h.
struct GraphGatParams {
  GraphCsr g;  // the CSR (forward, backward rows) or its transpose (backward nodes)
  const void* h = nullptr;
  const float* att_src = nullptr;
  const float* att_dst = nullptr;
  const float* drop = nullptr;  // nullable
  const void* grad = nullptr;
  float* a_src = nullptr;
  float* a_dst = nullptr;
  float* alpha = nullptr;
  float* dz = nullptr;
  float* g_src = nullptr;
  float* g_dst = nullptr;
  void* out = nullptr;
  int64_t N = 0, H = 0, F = 0;
  float slope = 0.2f;
  GraphDType dtype = GraphDType::kFloat32;
};

cudaError_t graph_gat_fwd(const GraphGatParams& p, cudaStream_t stream);
// rows pass over p.g = the CSR, then nodes pass over `transpose`.
cudaError_t graph_gat_bwd(const GraphGatParams& p, const GraphCsr& transpose, cudaStream_t stream);

}  // namespace fastdl::cuda
