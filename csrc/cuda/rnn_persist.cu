// Persistent RNN layers (contract in rnn.cuh): the technique of Diamos et al., "Persistent RNNs:
// Stashing Recurrent Weights On-Chip" (ICML 2016), behind cuDNN's persistent algorithm. One
// cooperative kernel runs the whole sequence; each block owns `units` hidden units and keeps
// the matching slice of W_hh in shared memory for all T steps, so the recurrent weights are read
// from HBM once per layer instead of once per step, and there is one launch instead of 2T.
// Steps are separated by a grid-wide barrier (cooperative_groups::grid_group::sync).
//
// Forward step s: block k computes, for its units j and every row b, the gate pre-activations
// h_{t-1}[b] . W_hh[g*H + j] for all gates g of j (so the pointwise update of (b, j) needs no
// other block), applies the cell, writes h_t into the other half of a double buffer; barrier.
// Backward step s (the transposed product): phase A, the pointwise gate gradients of the block's
// units (dh[b, j] for them is in the block's own slice); barrier; phase B, dh_{t-1}[b, j] =
// dgates[b, :G] . W_hh[:, j] for the block's units, from every block's gradients. Phase B
// writes only the block's own dh slice, which is all its next phase A reads, so one barrier a
// step suffices.
//
// The products: a group of kSplit lanes owns kRows weight rows x kBatch rows of the batch and
// splits K between its lanes in float4 pieces (one 16-byte read of a row per lane and step
// of k), then reduces over the group with shuffles. The state rows are read through L2
// (__ldcg): other blocks wrote them before the barrier, L1 is not coherent. fp32 accumulation
// for every dtype; the weights stay in their own dtype in shared memory (16-bit ones twice as
// many per block).
#include <cooperative_groups.h>

#include "rnn_common.cuh"

namespace fastdl::cuda {
namespace {

namespace cg = cooperative_groups;
using namespace detail;
using namespace rnn;

constexpr int kThreads = 256;
constexpr int kSplit = 8;    // lanes sharing one dot product (K split)
constexpr int kBatch = 4;    // batch rows per lane group
constexpr int kBwdRows = 4;  // columns of W_hh per lane group in the backward product
// Above this batch the step's product is a real GEMM that cuBLAS runs on tensor cores faster
// than this CUDA-core matrix-vector scheme; small batches are where persistence pays. An
// estimate from FMA counts (not yet measured on a GPU): tune it on the H200 run.
constexpr int64_t kMaxBatch = 256;

template <Cell C>
constexpr int kGates = C == Cell::kLstm ? 4 : 3;

// Shared-memory geometry of one block: `rows` weight rows of K elements, `stride` apart (padded
// by 16 bytes so that rows of different lane groups start in different banks).
struct Layout {
  int units = 0;
  int rows = 0;
  int stride = 0;
  size_t smem = 0;
};

Layout layout(const RnnPersistParams& p, bool backward, int blocks_wanted, int elem) {
  Layout l;
  const int H = int(p.H), gates = p.cell == Cell::kLstm ? 4 : 3;
  l.units = (H + blocks_wanted - 1) / blocks_wanted;
  const int K = backward ? gates * H : H;
  l.rows = backward ? (l.units + kBwdRows - 1) / kBwdRows * kBwdRows : gates * l.units;
  l.stride = K + 16 / elem;
  l.smem = size_t(l.rows) * size_t(l.stride) * size_t(elem);
  return l;
}

// acc[i][t] = sum_k w[i * wstep + k] * a[t][k] over the whole K; every lane of a kSplit group
// calls it with its own ks and gets the full sums. K % 4 == 0, rows 16-byte aligned.
template <int NR, typename T>
__device__ __forceinline__ void dot_tile(const T* w, int wstep, const float* const (&a)[kBatch],
                                         int K, int ks, float (&acc)[NR][kBatch]) {
#pragma unroll
  for (int i = 0; i < NR; ++i)
#pragma unroll
    for (int t = 0; t < kBatch; ++t) acc[i][t] = 0.f;
#pragma unroll 2
  for (int k = ks * 4; k < K; k += kSplit * 4) {
    float4 av[kBatch];
#pragma unroll
    for (int t = 0; t < kBatch; ++t) av[t] = __ldcg(reinterpret_cast<const float4*>(a[t] + k));
#pragma unroll
    for (int i = 0; i < NR; ++i) {
      const float4 wv = load4(w + i * wstep + k);
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        acc[i][t] = fmaf(wv.x, av[t].x, acc[i][t]);
        acc[i][t] = fmaf(wv.y, av[t].y, acc[i][t]);
        acc[i][t] = fmaf(wv.z, av[t].z, acc[i][t]);
        acc[i][t] = fmaf(wv.w, av[t].w, acc[i][t]);
      }
    }
  }
#pragma unroll
  for (int o = kSplit / 2; o > 0; o /= 2)
#pragma unroll
    for (int i = 0; i < NR; ++i)
#pragma unroll
      for (int t = 0; t < kBatch; ++t) acc[i][t] += __shfl_xor_sync(0xffffffffu, acc[i][t], o);
}

template <typename T>
__device__ __forceinline__ T* smem_weights() {
  extern __shared__ float4 smem[];  // float4: 16-byte aligned rows
  return reinterpret_cast<T*>(smem);
}

template <typename T, Cell C>
__global__ void __launch_bounds__(kThreads, 1)
    persist_fwd_kernel(const RnnPersistParams p, const Layout l) {
  constexpr int NG = kGates<C>;
  const int H = int(p.H), j0 = blockIdx.x * l.units, nu = min(l.units, H - j0);
  const int64_t B = p.sch.B, G = int64_t(NG) * H, S = 4 * int64_t(H);
  // Row g * units + u of the slice is W_hh row g * H + j0 + u: the gates of one unit are
  // l.units * stride apart, so a lane group reads all of them with one base pointer.
  T* w = smem_weights<T>();
  const T* whh = static_cast<const T*>(p.w_hh);
  for (int idx = threadIdx.x; idx < l.rows * H; idx += kThreads) {
    const int r = idx / H, k = idx - r * H, g = r / l.units, u = r - g * l.units;
    w[r * l.stride + k] = u < nu ? whh[(int64_t(g) * H + j0 + u) * H + k] : from_float<T>(0.f);
  }
  __syncthreads();

  const cg::grid_group grid = cg::this_grid();
  const int ks = threadIdx.x % kSplit;
  const int64_t groups = (B + kBatch - 1) / kBatch, items = nu * groups;
  T* y = static_cast<T*>(p.y);
  for (int64_t s = 0; s < p.sch.T; ++s) {
    const float* hprev = p.h + (s & 1) * B * H;
    float* hnext = p.h + ((s + 1) & 1) * B * H;
    // Block-uniform trip count: every lane reaches the shuffles of dot_tile.
    for (int64_t base = 0; base < items; base += kThreads / kSplit) {
      const int64_t item = base + threadIdx.x / kSplit;
      const bool valid = item < items;
      const int u = valid ? int(item / groups) : 0;
      const int64_t b0 = valid ? item % groups * kBatch : 0;
      const float* a[kBatch];
#pragma unroll
      for (int t = 0; t < kBatch; ++t) a[t] = hprev + min(b0 + t, B - 1) * H;
      float acc[NG][kBatch];
      dot_tile<NG>(w + u * l.stride, l.units * l.stride, a, H, ks, acc);
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        const int64_t b = b0 + t;
        if (!valid || ks != t || b >= B) continue;
        const int64_t j = j0 + u, at = b * H + j, pos = position(p.sch, s, b);
        if (pos < 0) {  // ended: the state carries over to the next buffer
          hnext[at] = __ldcg(hprev + at);
          continue;
        }
        const int64_t row = pos * B + b;
        float px[4] = {}, ph[4] = {}, sv[4];
#pragma unroll
        for (int g = 0; g < NG; ++g) {
          px[g] = p.gx[row * G + g * H + j] + (p.bias_x != nullptr ? p.bias_x[g * H + j] : 0.f);
          ph[g] = acc[g][t] + (p.bias_h != nullptr ? p.bias_h[g * H + j] : 0.f);
        }
        float c = C == Cell::kLstm ? p.c[at] : 0.f;
        const float out = cell_fwd<C>(px, ph, c, C == Cell::kGru ? __ldcg(hprev + at) : 0.f, sv);
        if constexpr (C == Cell::kLstm) {
          p.c[at] = c;
          p.cs[row * H + j] = c;
        }
        hnext[at] = out;
        y[row * H + j] = from_float<T>(out);
        store_saved(p.gates + row * S, j, H, sv);
      }
    }
    grid.sync();
  }
}

template <typename T, Cell C>
__global__ void __launch_bounds__(kThreads, 1)
    persist_bwd_kernel(const RnnPersistParams p, const Layout l) {
  constexpr int NG = kGates<C>;
  const int H = int(p.H), j0 = blockIdx.x * l.units, nu = min(l.units, H - j0);
  const int G = NG * H;
  const int64_t B = p.sch.B, S = 4 * int64_t(H);
  // Row u of the slice is column j0 + u of W_hh (G, H): K = G runs along the row.
  T* w = smem_weights<T>();
  const T* whh = static_cast<const T*>(p.w_hh);
  for (int idx = threadIdx.x; idx < l.rows * G; idx += kThreads) {
    const int k = idx / l.rows, u = idx - k * l.rows;  // u fastest: coalesced reads of W_hh
    w[u * l.stride + k] = u < nu ? whh[int64_t(k) * H + j0 + u] : from_float<T>(0.f);
  }
  __syncthreads();

  const cg::grid_group grid = cg::this_grid();
  const int ks = threadIdx.x % kSplit;
  const int64_t groups = (B + kBatch - 1) / kBatch, items = l.rows / kBwdRows * groups;
  const T* gy = static_cast<const T*>(p.gy);
  for (int64_t s = p.sch.T - 1; s >= 0; --s) {
    // Phase A: gate gradients of this block's units.
    for (int64_t idx = threadIdx.x; idx < nu * B; idx += kThreads) {
      const int64_t b = idx / nu, j = j0 + idx % nu, at = b * H + j;
      const int64_t pos = position(p.sch, s, b);
      if (pos < 0) continue;
      const int64_t row = pos * B + b;
      const float d = p.dh[at] + (gy != nullptr ? to_float(gy[row * H + j]) : 0.f);
      float sv[4], dg[4];
      load_saved(p.gates + row * S, j, H, sv);
      float dc = C == Cell::kLstm ? p.dc[at] : 0.f;
      const float direct = cell_bwd<C>(d, dc, sv, C == Cell::kLstm ? p.cs[row * H + j] : 0.f,
                                       p.prev[row * H + j], dg);
      if constexpr (C == Cell::kLstm) p.dc[at] = dc;
      if constexpr (C == Cell::kGru) p.direct[at] = direct;
      store_saved(p.dgates + row * S, j, H, dg);
    }
    grid.sync();
    // Phase B: dh_{t-1} for this block's units from all gate gradients of the step. Rows of
    // ended sequences keep dh; their dot products read the (read-only) saved gates instead.
    for (int64_t base = 0; base < items; base += kThreads / kSplit) {
      const int64_t item = base + threadIdx.x / kSplit;
      const bool valid = item < items;
      const int u0 = valid ? int(item / groups) * kBwdRows : 0;
      const int64_t b0 = valid ? item % groups * kBatch : 0;
      const float* a[kBatch];
      int64_t pos[kBatch];
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        pos[t] = b0 + t < B ? position(p.sch, s, b0 + t) : -1;
        a[t] = pos[t] >= 0 ? p.dgates + (pos[t] * B + b0 + t) * S : p.gates;
      }
      float acc[kBwdRows][kBatch];
      dot_tile<kBwdRows>(w + u0 * l.stride, l.stride, a, G, ks, acc);
#pragma unroll
      for (int t = 0; t < kBatch; ++t) {
        if (!valid || ks != t || pos[t] < 0) continue;
#pragma unroll
        for (int i = 0; i < kBwdRows; ++i) {
          if (u0 + i >= nu) continue;
          const int64_t at = (b0 + t) * H + j0 + u0 + i;
          p.dh[at] = acc[i][t] + (C == Cell::kGru ? p.direct[at] : 0.f);
        }
      }
    }
    __syncthreads();  // phase A of the next step reads dh written by other threads of the block
  }
}

template <typename T, Cell C>
void* kernel_of(bool backward) {
  return backward ? reinterpret_cast<void*>(persist_bwd_kernel<T, C>)
                  : reinterpret_cast<void*>(persist_fwd_kernel<T, C>);
}

void* kernel_for(const RnnPersistParams& p, bool backward) {
  void* k = nullptr;
  dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    k = p.cell == Cell::kLstm ? kernel_of<T, Cell::kLstm>(backward)
                              : kernel_of<T, Cell::kGru>(backward);
  });
  return k;
}

int elem_size(DType d) {
  return d == DType::kFloat32 ? 4 : 2;
}

// The layout and grid for p on the current device; grid 0 when the persistent kernel does not
// apply. Sets the kernel's dynamic shared memory limit as a side effect.
int plan(const RnnPersistParams& p, bool backward, Layout& l) {
  if (p.H % 4 != 0 || p.sch.B == 0 || p.sch.B > kMaxBatch || p.sch.T == 0) return 0;
  // The backward's ended rows read the saved gates as a stand-in row with float4 loads.
  if (backward && reinterpret_cast<uintptr_t>(p.gates) % 16 != 0) return 0;
  int dev = 0, coop = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
      !coop)
    return 0;
  const int sms = sm_count();
  l = layout(p, backward, std::min<int>(sms, int(p.H)), elem_size(p.dtype));
  const int grid = int((p.H + l.units - 1) / l.units);
  if (l.smem > size_t(optin)) return 0;
  void* k = kernel_for(p, backward);
  int per_sm = 0;
  if (cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(l.smem)) !=
          cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, kThreads, l.smem) != cudaSuccess ||
      int64_t(per_sm) * sms < grid) {
    cudaGetLastError();  // a refusal here only means "take the stepwise path"
    return 0;
  }
  return grid;
}

cudaError_t launch(const RnnPersistParams& p, bool backward, cudaStream_t stream) {
  Layout l;
  const int grid = plan(p, backward, l);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  void* args[] = {const_cast<RnnPersistParams*>(&p), &l};
  return cudaLaunchCooperativeKernel(kernel_for(p, backward), dim3(unsigned(grid)), dim3(kThreads),
                                     args, l.smem, stream);
}

}  // namespace

int rnn_persist_plan(const RnnPersistParams& p, bool backward) {
  Layout l;
  return plan(p, backward, l);
}

cudaError_t rnn_persist_fwd(const RnnPersistParams& p, cudaStream_t stream) {
  return launch(p, false, stream);
}

cudaError_t rnn_persist_bwd(const RnnPersistParams& p, cudaStream_t stream) {
  return launch(p, true, stream);
}

}  // namespace fastdl::cuda
