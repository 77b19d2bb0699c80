// CUDA kernels of the rnn family: launch parameters and host launchers (semantics of the ops in
// csrc/ops.cpp, block "rnn"). Plain CUDA on raw pointers (no torch headers): the bind layer
// (rnn_bind.cpp) checks and allocates the tensors, runs the GEMMs through cuBLAS (at::mm) and
// calls these launchers on the current stream.
//
// Two ways through a layer:
// - persistent (rnn_persist.cu): one cooperative kernel for the whole sequence that keeps its
//   slice of W_hh in shared memory across time steps and syncs the grid between steps, for
//   hidden sizes whose weights fit on chip (rnn_persist_plan) and no projection;
// - stepwise (rnn_step.cu): per step the recurrent GEMM (bind layer) and one fused pointwise
//   kernel for the gates and the state update (forward) or the gate gradients (backward).
// Everything is computed in float32; sequence tensors are (T, B, width) contiguous, indexed by
// position; y, gy, h0 in the layer's dtype, the rest float32. Every launcher returns the first
// CUDA error it met and launches nothing for empty inputs.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "norm.cuh"

namespace fastdl::cuda {

enum class Cell : int { kLstm, kGru };

// Which sequences take part in processing step s and at which position (csrc/ops.cpp):
// row b is active iff s < len[b]; its position is s, or len[b] - 1 - s when reverse.
struct RnnSchedule {
  const int64_t* lengths = nullptr;  // (B,) int64 on the device, nullable (all of length T)
  int64_t T = 0;
  int64_t B = 0;
  bool reverse = false;
};

// One fused pointwise step of the stepwise path. Gate blocks are H wide in torch's order
// (LSTM i, f, g, o; GRU r, z, n); G = 4H or 3H, S = 4H the width of the saved gates.
struct RnnStepParams {
  Cell cell = Cell::kLstm;
  DType dtype = DType::kFloat32;  // of y and gy
  RnnSchedule sch;
  int64_t step = 0;
  int64_t H = 0;
  int64_t P = 0;  // width of h (proj_size or H)
  // Forward. gx (T, B, G): x W_ih^T per position; gh (B, G): h_{t-1} W_hh^T of this step.
  // bias_x (G) is added to gx (the LSTM's b_ih + b_hh, the GRU's b_ih), bias_h (G) to gh (the
  // GRU's b_hh, which n needs apart); both nullable.
  const float* gx = nullptr;
  const float* gh = nullptr;
  const float* bias_x = nullptr;
  const float* bias_h = nullptr;
  float* c = nullptr;  // (B, H) LSTM cell state, updated in place
  float* h = nullptr;  // (B, H) hidden state, updated in place; null for an LSTM with projection
  // (B, P) the hidden state rounded to `dtype` beside h, nullable: what a 16-bit recurrent GEMM
  // multiplies (tensor cores), while the state itself stays float32 across steps.
  void* h_lo = nullptr;
  float* r = nullptr;      // (B, H) LSTM with projection: o * tanh(c), what W_hr multiplies
  void* y = nullptr;       // (T, B, H) output; null for an LSTM with projection
  float* gates = nullptr;  // (T, B, S) saved: LSTM [i, f, g, o]; GRU [r, z, n, W_hn h + b_hn]
  float* cs = nullptr;     // (T, B, H) saved LSTM cell states
  // Backward. dh (B, H): gradient reaching this step's output from later steps (LSTM with
  // projection: already through W_hr); gy (T, B, H): grad of y, nullable (null with projection);
  // prev (T, B, H): c_{t-1} (LSTM) or h_{t-1} (GRU) per position.
  const float* dh = nullptr;
  const void* gy = nullptr;
  const float* prev = nullptr;
  float* dgates = nullptr;  // (T, B, S): LSTM d[i, f, g, o]_pre; GRU d[r_pre, z_pre, ghn, n_pre]
  float* dc = nullptr;      // (B, H) LSTM: dL/dc, updated in place to dL/dc_{t-1}
  // dh_{t-1} = dh_base + dg_step W_hh (one addmm in the bind layer): dg_step (B, G) is this
  // step's gate gradient (zero for ended rows); dh_base (B, P) is the GRU's direct z * d (0 for
  // the LSTM) on active rows and dh_keep (B, P), the unchanged state gradient, on ended rows.
  float* dg_step = nullptr;
  float* dh_base = nullptr;
  const float* dh_keep = nullptr;
};

cudaError_t rnn_step_fwd(const RnnStepParams& p, cudaStream_t stream);
cudaError_t rnn_step_bwd(const RnnStepParams& p, cudaStream_t stream);

// LSTM projection, forward: after hp = r W_hr^T (B, P), h[b] = hp[b] and y[pos][b] = hp[b] for
// the rows active in `step` (ended rows keep their state).
struct RnnProjParams {
  DType dtype = DType::kFloat32;  // of y and gy
  RnnSchedule sch;
  int64_t step = 0;
  int64_t P = 0;
  const float* hp = nullptr;  // forward (B, P)
  float* h = nullptr;         // (B, P)
  void* h_lo = nullptr;       // (B, P) h rounded to dtype, nullable (RnnStepParams::h_lo)
  void* y = nullptr;          // (T, B, P)
  // Backward: dhp = dh + gy[pos] on active rows, 0 on ended ones, written to dhp_step (B, P)
  // (what W_hr multiplies this step) and dhp_seq (T, B, P) (for grad_w_hr).
  const float* dh = nullptr;
  const void* gy = nullptr;  // nullable
  float* dhp_step = nullptr;
  float* dhp_seq = nullptr;
};

cudaError_t rnn_proj_fwd(const RnnProjParams& p, cudaStream_t stream);
cudaError_t rnn_proj_bwd(const RnnProjParams& p, cudaStream_t stream);

// The state before each position, (T, B, D) float32: seq shifted by one step against the
// processing direction, init (B, D) at each sequence's first processed position, zero past a
// sequence's end. seq has `dtype` (y) or is float32 (cs) when seq_float.
struct RnnPrevParams {
  DType dtype = DType::kFloat32;
  bool seq_float = false;
  RnnSchedule sch;
  int64_t D = 0;
  const void* seq = nullptr;
  const float* init = nullptr;
  float* out = nullptr;
};

cudaError_t rnn_prev_states(const RnnPrevParams& p, cudaStream_t stream);

// The whole layer in one cooperative kernel (no projection: P = H). Forward: h (2, B, H) float32
// double buffer, h[0] = h0 on entry, the final state in h[T % 2] on exit; c (B, H) in place.
// Backward: dh (B, H) and dc (B, H) hold grad_hn / grad_cn on entry and grad_h0 / grad_c0 on
// exit; direct (B, H) is GRU scratch.
struct RnnPersistParams {
  Cell cell = Cell::kLstm;
  DType dtype = DType::kFloat32;  // of w_hh, y, gy
  RnnSchedule sch;
  int64_t H = 0;
  const void* w_hh = nullptr;  // (G, H) contiguous
  const float* gx = nullptr;
  const float* bias_x = nullptr;
  const float* bias_h = nullptr;
  float* h = nullptr;
  float* c = nullptr;
  void* y = nullptr;
  float* gates = nullptr;
  float* cs = nullptr;
  const void* gy = nullptr;
  const float* prev = nullptr;
  float* dgates = nullptr;
  float* dh = nullptr;
  float* dc = nullptr;
  float* direct = nullptr;
};

// The grid of the persistent kernel for these sizes on the current device, or 0 when it does
// not apply (weights do not fit in shared memory, too few co-resident blocks, batch too large
// for a CUDA-core matrix-vector product to beat cuBLAS, H not a multiple of 4, no cooperative
// launch): the caller then takes the stepwise path.
int rnn_persist_plan(const RnnPersistParams& p, bool backward);
cudaError_t rnn_persist_fwd(const RnnPersistParams& p, cudaStream_t stream);
cudaError_t rnn_persist_bwd(const RnnPersistParams& p, cudaStream_t stream);

}  // namespace fastdl::cuda
