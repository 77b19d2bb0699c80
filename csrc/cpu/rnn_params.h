// The interface between csrc/cpu/rnn.cpp (torch-facing: checks, GEMMs, time loop, threading) and
// the fused per-step pointwise kernels of the LSTM/GRU compiled once per ISA (csrc/cpu/isa/*.cpp):
// one params struct on raw pointers and a table of plain function pointers.
//
// Every pointer is of the accumulation type A (float, or double for float64 tensors). Sequence
// tensors are per position, (T, B, width) contiguous; row b of a step sits at position pos[b]
// (pos[b] < 0: sequence b has ended, the row is skipped and its state left as it is).
#pragma once

#include <cstdint>

namespace fastdl::cpu {

struct RnnStep {
  const int64_t* pos;  // (B) position of each row in this step, -1 when finished
  int64_t B, H;
  // Forward: gx (T, B, G) input projection and bx (G) the input-side bias added to it as it is
  // read (LSTM b_ih + b_hh, GRU b_ih; zeros without bias, never null: no pass over gx adds it);
  // gh (B, G) this step's recurrent projection (GRU: + b_hh).
  const void* gx;
  const void* bx;
  const void* gh;
  // LSTM forward: c (B, H) cell state, updated in place; out (B, H) gets r = o * tanh(c) (the
  // hidden state, or what the projection multiplies); y (T, B, H) gets it too when not null.
  // GRU forward: h (B, H) the state before the step (read only), out (B, H) the new one (h is
  // double-buffered); y (T, B, H) gets it too.
  void* c;
  void* h;
  void* out;
  void* y;
  // Saved for BPTT (forward writes, backward reads), (T, B, 4H): LSTM [i, f, g, o] activated,
  // GRU [r, z, n, W_hn h + b_hn]; cs (T, B, H): LSTM cell states.
  void* gates;
  void* cs;
  // Backward: dh (B, H) gradient flowing into this step's output from later steps (LSTM with
  // projection: already through w_hr); gy (T, B, H) the gradient of y, or null; prev (T, B, H)
  // the state before each position (LSTM c_{t-1}, GRU h_{t-1}).
  const void* dh;
  const void* gy;
  const void* prev;
  // Backward outputs: dgates (T, B, 4H), LSTM: d(pre-activation) of [i, f, g, o]; GRU: d of
  // [r_pre, z_pre, W_hn h + b_hn, n_pre] (the h-side gates first so rows [0, 3H) multiply w_hh).
  // LSTM: dc (B, H) updated in place to dL/dc_{t-1}. GRU: dh_direct (B, H) = dL/dh_{t-1}
  // through z * h_{t-1}, to which rnn.cpp adds dgates[:, :3H] @ w_hh.
  void* dgates;
  void* dc;
  void* dh_direct;
  // Hidden units [j0, j1) of each row (j1 == 0: up to H), a thread's own slice in the fused
  // sequence loops of rnn.cpp; the default 0, 0 is all units. Forward: gh holds this block's
  // gates as 4 (GRU: 3) runs of j1 - j0 columns from column 4 * j0 (3 * j0), the thread's slice
  // of the recurrent GEMM; with the default that is the usual gate order.
  int64_t j0, j1;
};

using RnnStepFn = void (*)(const RnnStep&, int64_t b0, int64_t b1);

// The small-batch forward over a whole sequence: each thread owns a range of hidden units and per
// step computes their recurrent GEMV (every gate of a unit together) fused with the pointwise
// update, reading the previous h from one buffer and writing the next into the other, so one
// barrier per step separates the steps. (LSTM without projection, and GRU.)
struct RnnSeqFwd {
  const void* gx;      // (T, B, G) input projection
  const void* bx;      // (G) its bias, as RnnStep::bx
  const void* wp;      // w_hh per block of kSeqUnits units: [block][k][gate][unit], zeros past H
  const void* bh;      // GRU: b_hh (3H) or null
  const int64_t* len;  // (B) lengths, or null (every sequence has T steps)
  void* h[2];          // (B, H) each: step s reads h[s % 2] and writes h[(s + 1) % 2]
  void* c;             // LSTM cell state (B, H), updated in place
  void* y;             // (T, B, H)
  void* gates;         // (T, B, 4H), as RnnStep
  void* cs;            // LSTM (T, B, H)
  int64_t T, B, H;
  bool reverse;
};

// Step s for hidden units [j0, j1) of every row.
using RnnSeqStepFn = void (*)(const RnnSeqFwd&, int64_t s, int64_t j0, int64_t j1);

// Hidden units per register block of the sequence kernels; threads split units in these blocks.
constexpr int64_t kSeqUnits = 16;

// [0]: A = float, [1]: A = double. Each call handles rows [b0, b1) of one step.
struct RnnKernels {
  RnnStepFn lstm_fwd[2];
  RnnStepFn lstm_bwd[2];
  RnnStepFn gru_fwd[2];
  RnnStepFn gru_bwd[2];
  // The sequence kernels' [2]: A = float with bfloat16 weights (RnnSeqFwd::wp).
  RnnSeqStepFn lstm_seq_fwd[3];
  RnnSeqStepFn gru_seq_fwd[3];
};

// One table per ISA, defined in csrc/cpu/isa/{avx512,avx2,scalar}.cpp.
const RnnKernels& rnn_kernels_scalar();
#if defined(__x86_64__)
const RnnKernels& rnn_kernels_avx2();
const RnnKernels& rnn_kernels_avx512();
#endif

}  // namespace fastdl::cpu
