// CUDA kernels of the attention family: launch parameters and host launchers.
// Plain CUDA on raw pointers (no torch headers), so attention_fwd.cu / attention_bwd.cu compile
// standalone with nvcc; the bind layer (attention_bind.cpp) checks and allocates the tensors
// (csrc/common/attention.h) and fills these structs. Semantics (band, dropout RNG, lse, fully
// masked rows) are those of the schema block in csrc/ops.cpp and csrc/common/attention_math.h.
//
// One struct serves dense and varlen attention. A query row is addressed as
//   q + b * q_sb + h * q_sh + (start_q + i) * q_sr + c * q_sd
// where, dense, b is the batch, start_q = 0 and the sequence lengths are Sq/Sk; varlen (cu_q and
// cu_k set), b is the sequence index n, the batch strides are 0, start_q = cu_q[n] and the
// lengths are cu_q[n + 1] - cu_q[n] (Sq/Sk are then max_seqlen_q/k, the launch grid).
// Every query row has a "row id": (b * Hq + h) * Sq + i dense, h * Tq + cu_q[n] + i varlen; it
// indexes lse, delta and the dropout counter offset + row_id * ctr_ld + col_id, with ctr_ld =
// Sk / Tk and col_id = j / cu_k[n] + j (the counters of the schema). Every launcher returns the
// first CUDA error it met (cudaSuccess otherwise) and launches nothing for empty inputs.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace fastdl::cuda::attn {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

// Strides (in elements) of a (batch, head, row, column) view; dense outputs are contiguous.
struct Strides {
  int64_t b = 0, h = 0, r = 0, d = 1;
};

struct AttnParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides sq, sk, sv;
  const float* mask = nullptr;    // additive float32 (B, Hq, Sq, Sk) view, nullable (dense only)
  Strides smask;                  // (b, h, i, j) strides of mask
  const int64_t* cu_q = nullptr;  // (B + 1,) int64 on the device; varlen iff set
  const int64_t* cu_k = nullptr;
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0;
  int64_t Tq = 0, Tk = 0;  // varlen: total tokens (row ids and dropout counters)
  float scale = 1.f;
  // Dropout: keep iff fastdl_dropout_keep(seed, counter, threshold); kept values times
  // keep_scale; drop_all for p >= 1 (nothing kept). dropout = false for p == 0.
  bool dropout = false, drop_all = false;
  uint32_t threshold = 0;
  float keep_scale = 1.f;
  uint64_t seed = 0, offset = 0;
  int64_t window_left = -1, window_right = -1;
  bool bottom_right = false;
  DType dtype = DType::kFloat32;
};

// Forward: out (q's layout of Strides `so`, q's dtype; contiguous in practice) and lse (float32,
// by row id). `workspace` holds the split-K partials of the decode path (size from
// attention_fwd_workspace_bytes; nullable when that is 0).
struct AttnFwdParams : AttnParams {
  void* out = nullptr;
  Strides so;
  float* lse = nullptr;
  void* workspace = nullptr;
};

// The decode path's split count (1: none) and its workspace, for a given device.
int attention_fwd_splits(const AttnFwdParams& p, int device);
size_t attention_fwd_workspace_bytes(const AttnFwdParams& p, int splits);
cudaError_t attention_fwd(const AttnFwdParams& p, int splits, cudaStream_t stream);

// Backward (FlashAttention-2, Algorithm 2; deterministic: no atomics): grad_out strided like
// q; out/lse from the forward; delta = rowsum(grad_out * out) float32 by row id (computed by the
// caller). dq is written in out's layout (Strides so), dk/dv in k's contiguous layout (Strides
// sdk), all in q's dtype; dmask, nullable, is the full float32 (B, Hq, Sq, Sk) gradient of the
// additive mask, ZEROED by the caller (blocks skipped by the band do not write).
struct AttnBwdParams : AttnParams {
  const void* grad_out = nullptr;
  Strides sdo;
  const float* lse = nullptr;
  const float* delta = nullptr;
  void* dq = nullptr;
  Strides so;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides sdk;
  float* dmask = nullptr;
};

cudaError_t attention_bwd(const AttnBwdParams& p, cudaStream_t stream);

}  // namespace fastdl::cuda::attn
