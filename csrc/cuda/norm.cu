// LayerNorm / RMSNorm kernels (Ba et al. 2016; Zhang & Sennrich 2019); contract in norm.cuh.
//
// Forward: a row is handled by `tpr` threads (a power of two, several rows per block when rows
// are short), each owning 16-byte vectors strided by tpr so that a warp's loads coalesce. A row
// of up to kMaxRowThreads * kElems elements stays in registers between the statistics and the
// output, so x is read once; longer rows go in tiles of that size and are read twice. The variance
// is the exact two-pass one per tile, tiles merged with Chan et al.'s parallel update: never E[x^2]
// - E[x]^2, which cancels catastrophically when |mean| >> std. Backward: dx = rstd * (g - mean(g) -
// xhat * mean(g * xhat)) with g = dy * w (RMSNorm drops mean(g)), dw = sum(dy * xhat), db = sum(dy)
// over rows. dw/db are accumulated in registers by threads that keep the same columns for every row
// they visit, written per block to a partial buffer and summed over blocks in a fixed order:
// deterministic, no float atomics.
#include "norm_common.cuh"

namespace fastdl::cuda {
namespace {

using namespace detail;

constexpr int kRowBlock = 256;       // threads per block (more when one row needs more)
constexpr int kMaxRowThreads = 512;  // most threads on one row
// Elements a thread holds per tile: 16 floats or 8 packed registers of bf16/fp16, which leaves
// the backward room for its dw/db accumulators (twice as many floats) without spilling.
constexpr int kElems = 16;

// How rows map on threads: blockDim = (tpr, rows per block); a tile is tpr * kElems columns.
struct RowLayout {
  int tpr = 1;
  int tiles = 1;
  int tile_cols = 0;
  bool aligned = false;  // all vectors 16-byte aligned (cols % N == 0, aligned pointers)
};

RowLayout row_layout(int64_t cols, bool aligned) {
  int tpr = 1;
  while (tpr < kMaxRowThreads && int64_t(tpr) * kElems < cols) tpr *= 2;
  const int tile = tpr * kElems;
  return {tpr, int((cols + tile - 1) / tile), tile, aligned};
}

dim3 row_block(const RowLayout& l) {
  return dim3(l.tpr, std::max(1, kRowBlock / l.tpr));
}

// Sums v over the tpr threads of a row, in a fixed order; every thread of the row gets the
// (bitwise identical) result. `red` holds blockDim / 32 * K floats.
template <int K>
__device__ __forceinline__ void row_sum(float (&v)[K], int tpr, float* red) {
  for (int o = min(tpr, kWarp) / 2; o > 0; o /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], o);
  }
  if (tpr <= kWarp) return;
  const int warps = tpr / kWarp;
  float* r = red + threadIdx.y * warps * K;
  if (threadIdx.x % kWarp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) r[threadIdx.x / kWarp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = 0.f;
    for (int w = 0; w < warps; ++w) v[k] += r[w * K + k];
  }
  __syncthreads();
}

// Column (within its tile) of a thread's vector `item`: vectors are strided by tpr.
template <int N>
__device__ __forceinline__ int item_col(int item, int tpr) {
  return (item * tpr + int(threadIdx.x)) * N;
}

// Rows are visited in a block-uniform loop (every thread reaches each barrier); a row past the
// end is read as an empty one.
__device__ __forceinline__ int64_t first_row() {
  return int64_t(blockIdx.x) * blockDim.y;
}
__device__ __forceinline__ int64_t row_stride() {
  return int64_t(gridDim.x) * blockDim.y;
}

// Tile t of a row: its offset in the (rows, cols) matrix and its number of valid columns.
struct TileSpan {
  int64_t col0, off;
  int len;
};

__device__ __forceinline__ TileSpan tile_span(int64_t row, int64_t rows, int64_t cols, int t,
                                              int tile_cols) {
  const int64_t c0 = int64_t(t) * tile_cols;
  if (row >= rows) return {c0, 0, 0};
  return {c0, row * cols + c0, int(std::min<int64_t>(cols - c0, tile_cols))};
}

__device__ __forceinline__ const float* advance(const float* p, int64_t k) {
  return p == nullptr ? p : p + k;
}

template <typename T, bool RMS, bool RESIDUAL>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_fwd_kernel(const NormFwdParams p, const RowLayout l) {
  constexpr int N = Vec<T>::N, kItems = kElems / N;
  __shared__ float red[kMaxRowThreads / kWarp];
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ res = static_cast<const T*>(p.residual);
  T* __restrict__ sum = static_cast<T*>(p.sum);
  T* __restrict__ out = static_cast<T*>(p.out);

  for (int64_t base = first_row(); base < p.rows; base += row_stride()) {
    const int64_t row = base + threadIdx.y;
    Vec<T> v[kItems];
    // Reads a tile into v; the first read of a residual tile forms s = x + r and writes it out.
    auto read_tile = [&](const TileSpan& s, bool first) {
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int c = item_col<N>(i, l.tpr);
        if constexpr (RESIDUAL) {
          if (!first) {
            v[i] = load_vec(sum + s.off, c, s.len, l.aligned);
            continue;
          }
          float a[N], b[N];
          unpack(load_vec(x + s.off, c, s.len, l.aligned), a);
          unpack(load_vec(res + s.off, c, s.len, l.aligned), b);
#pragma unroll
          for (int j = 0; j < N; ++j) v[i].v[j] = from_float<T>(a[j] + b[j]);
          store_vec(sum + s.off, c, s.len, l.aligned, v[i]);
        } else {
          v[i] = load_vec(x + s.off, c, s.len, l.aligned);
        }
      }
    };

    Moments st{};  // RMSNorm: st.m2 is the sum of squares
    for (int t = 0; t < l.tiles; ++t) {
      const TileSpan s = tile_span(row, p.rows, p.cols, t, l.tile_cols);
      read_tile(s, true);
      float sm[1] = {0.f}, sq[1] = {0.f};
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        float f[N];
        unpack(v[i], f);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          sm[0] += f[j];
          sq[0] = fmaf(f[j], f[j], sq[0]);
        }
      }
      if constexpr (RMS) {
        row_sum(sq, l.tpr, red);
        st.m2 += sq[0];
        continue;
      }
      row_sum(sm, l.tpr, red);
      const float n = float(std::min<int64_t>(l.tile_cols, p.cols - s.col0));
      const float tmean = sm[0] / n;
      float d[1] = {0.f};
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int c = item_col<N>(i, l.tpr);
        float f[N];
        unpack(v[i], f);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float e = c + j < s.len ? f[j] - tmean : 0.f;
          d[0] = fmaf(e, e, d[0]);
        }
      }
      row_sum(d, l.tpr, red);
      st = merge(st, Moments{n, tmean, d[0]});
    }
    const float mean = st.mean, rstd = 1.f / sqrtf(st.m2 / float(p.cols) + p.eps);
    if (threadIdx.x == 0 && row < p.rows) {
      p.rstd[row] = rstd;
      if constexpr (!RMS) p.mean[row] = mean;
    }

    for (int t = 0; t < l.tiles; ++t) {
      const TileSpan s = tile_span(row, p.rows, p.cols, t, l.tile_cols);
      if (l.tiles > 1) read_tile(s, false);
      const float* w = advance(p.weight, s.col0);
      const float* b = advance(RMS ? nullptr : p.bias, s.col0);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int c = item_col<N>(i, l.tpr);
        if (c >= s.len) continue;
        float f[N], wv[N], bv[N];
        unpack(v[i], f);
        load_param(w, c, s.len, l.aligned, 1.f, wv);
        load_param(b, c, s.len, l.aligned, 0.f, bv);
        Vec<T> y;
#pragma unroll
        for (int j = 0; j < N; ++j)
          y.v[j] = from_float<T>(fmaf((f[j] - mean) * rstd, wv[j], bv[j]));
        store_vec(out + s.off, c, s.len, l.aligned, y);
      }
    }
  }
}

// Backward for rows of one tile: s and dy stay in registers between the reduction and dx;
// dw/db accumulate per thread, then per block (over threadIdx.y, in order) into
// part[blockIdx.x] (dw) and part[gridDim.x + blockIdx.x] (db), rows of cols floats.
template <typename T, bool RMS>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_bwd_kernel(const NormBwdParams p, const RowLayout l, float* __restrict__ part) {
  constexpr int N = Vec<T>::N, kItems = kElems / N;
  __shared__ float red[kMaxRowThreads / kWarp * 2];
  const T* __restrict__ in = static_cast<const T*>(p.input);
  const T* __restrict__ dy = static_cast<const T*>(p.grad_out);
  const T* __restrict__ dsum = static_cast<const T*>(p.grad_sum);
  T* __restrict__ dx = static_cast<T*>(p.grad_input);
  float dw[kItems][N] = {}, db[kItems][N] = {};

  for (int64_t base = first_row(); base < p.rows; base += row_stride()) {
    const int64_t row = base + threadIdx.y;
    const TileSpan s = tile_span(row, p.rows, p.cols, 0, l.tile_cols);
    const float mean = RMS || !s.len ? 0.f : p.mean[row];
    const float rstd = s.len ? p.rstd[row] : 0.f;
    Vec<T> sv[kItems], gv[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      sv[i] = load_vec(in + s.off, item_col<N>(i, l.tpr), s.len, l.aligned);
      gv[i] = load_vec(dy + s.off, item_col<N>(i, l.tpr), s.len, l.aligned);
    }
    float acc[2] = {0.f, 0.f};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float sf[N], g[N], w[N];
      unpack(sv[i], sf);
      unpack(gv[i], g);
      load_param(p.weight, item_col<N>(i, l.tpr), s.len, l.aligned, 1.f, w);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float xhat = (sf[j] - mean) * rstd;
        acc[0] = fmaf(g[j], w[j], acc[0]);
        acc[1] = fmaf(g[j] * w[j], xhat, acc[1]);
        dw[i][j] = fmaf(g[j], xhat, dw[i][j]);
        db[i][j] += g[j];
      }
    }
    row_sum(acc, l.tpr, red);
    const float inv_n = 1.f / float(p.cols);
    const float mg = RMS ? 0.f : acc[0] * inv_n, mgx = acc[1] * inv_n;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int c = item_col<N>(i, l.tpr);
      if (c >= s.len) continue;
      float sf[N], g[N], w[N], r[N];
      unpack(sv[i], sf);
      unpack(gv[i], g);
      load_param(p.weight, c, s.len, l.aligned, 1.f, w);
      if (dsum != nullptr) {
        unpack(load_vec(dsum + s.off, c, s.len, l.aligned), r);
      } else {
#pragma unroll
        for (int j = 0; j < N; ++j) r[j] = 0.f;
      }
      Vec<T> o;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float xhat = (sf[j] - mean) * rstd;
        o.v[j] = from_float<T>(fmaf(rstd, fmaf(g[j], w[j], -mg) - xhat * mgx, r[j]));
      }
      store_vec(dx + s.off, c, s.len, l.aligned, o);
    }
  }
  if (part == nullptr) return;
  // Threads (x, 0..rows-1) own the same columns: their sums are added in order of y.
  __shared__ float stage[kRowBlock * N];
  auto write_part = [&](float (&acc)[kItems][N], float* dst) {
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int c = item_col<N>(i, l.tpr);
      if (blockDim.y > 1) {
        __syncthreads();
#pragma unroll
        for (int j = 0; j < N; ++j) stage[j * kRowBlock + tid] = acc[i][j];
        __syncthreads();
#pragma unroll
        for (int j = 0; j < N; ++j) {
          acc[i][j] = 0.f;
          for (int y = 0; y < int(blockDim.y); ++y)
            acc[i][j] += stage[j * kRowBlock + y * blockDim.x + threadIdx.x];
        }
      }
      if (threadIdx.y != 0) continue;
#pragma unroll
      for (int j = 0; j < N; ++j)
        if (c + j < p.cols) dst[c + j] = acc[i][j];
    }
  };
  write_part(dw, part + int64_t(blockIdx.x) * p.cols);
  if constexpr (!RMS) write_part(db, part + (int64_t(gridDim.x) + blockIdx.x) * p.cols);
}

// Backward for long rows, first pass: per-row sum(g) and sum(g * xhat) into coef[row].
template <typename T, bool RMS>
__global__ void __launch_bounds__(kMaxRowThreads)
    norm_bwd_coef_kernel(const NormBwdParams p, const RowLayout l, float2* __restrict__ coef) {
  constexpr int N = Vec<T>::N, kItems = kElems / N;
  __shared__ float red[kMaxRowThreads / kWarp * 2];
  const T* __restrict__ in = static_cast<const T*>(p.input);
  const T* __restrict__ dy = static_cast<const T*>(p.grad_out);
  for (int64_t base = first_row(); base < p.rows; base += row_stride()) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < p.rows;
    const float mean = RMS || !valid ? 0.f : p.mean[row];
    const float rstd = valid ? p.rstd[row] : 0.f;
    float acc[2] = {0.f, 0.f};
    for (int t = 0; t < l.tiles; ++t) {
      const TileSpan s = tile_span(row, p.rows, p.cols, t, l.tile_cols);
      const float* wp = advance(p.weight, s.col0);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        const int c = item_col<N>(i, l.tpr);
        float sf[N], g[N], w[N];
        unpack(load_vec(in + s.off, c, s.len, l.aligned), sf);
        unpack(load_vec(dy + s.off, c, s.len, l.aligned), g);
        load_param(wp, c, s.len, l.aligned, 1.f, w);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          acc[0] = fmaf(g[j], w[j], acc[0]);
          acc[1] = fmaf(g[j] * w[j], (sf[j] - mean) * rstd, acc[1]);
        }
      }
    }
    row_sum(acc, l.tpr, red);
    if (threadIdx.x == 0 && valid) coef[row] = make_float2(RMS ? 0.f : acc[0], acc[1]);
  }
}

// Backward for long rows (or without dx), second pass over column slabs: block (32, kColRows)
// covers 32 vectors of columns and a chunk of rows; writes dx and the chunk's dw/db partials.
constexpr int kColRows = 8;

template <typename T, bool RMS>
__global__ void __launch_bounds__(kWarp* kColRows)
    norm_bwd_cols_kernel(const NormBwdParams p, const float2* __restrict__ coef,
                         float* __restrict__ part, bool aligned) {
  constexpr int N = Vec<T>::N;
  __shared__ float stage[2][kColRows][kWarp * N];
  const T* __restrict__ in = static_cast<const T*>(p.input);
  const T* __restrict__ dy = static_cast<const T*>(p.grad_out);
  const T* __restrict__ dsum = static_cast<const T*>(p.grad_sum);
  T* __restrict__ dx = static_cast<T*>(p.grad_input);
  const int64_t slab = int64_t(blockIdx.x) * kWarp * N;
  const int c = threadIdx.x * N;
  const int len = int(std::min<int64_t>(p.cols - slab, kWarp * N));
  const int64_t r0 = p.rows * blockIdx.y / gridDim.y, r1 = p.rows * (blockIdx.y + 1) / gridDim.y;
  const float inv_n = 1.f / float(p.cols);
  float w[N], dw[N] = {}, db[N] = {};
  load_param(advance(p.weight, slab), c, len, aligned, 1.f, w);
  for (int64_t row = r0 + threadIdx.y; row < r1; row += kColRows) {
    const int64_t off = row * p.cols + slab;
    const float mean = RMS ? 0.f : p.mean[row], rstd = p.rstd[row];
    float s[N], g[N], r[N] = {};
    unpack(load_vec(in + off, c, len, aligned), s);
    unpack(load_vec(dy + off, c, len, aligned), g);
    if (dx != nullptr && dsum != nullptr) unpack(load_vec(dsum + off, c, len, aligned), r);
    const float2 k = dx != nullptr ? coef[row] : make_float2(0.f, 0.f);
    Vec<T> o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float xhat = (s[j] - mean) * rstd;
      dw[j] = fmaf(g[j], xhat, dw[j]);
      db[j] += g[j];
      o.v[j] = from_float<T>(fmaf(rstd, fmaf(g[j], w[j], -k.x * inv_n) - xhat * k.y * inv_n, r[j]));
    }
    if (dx != nullptr) store_vec(dx + off, c, len, aligned, o);
  }
  if (part == nullptr) return;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    stage[0][threadIdx.y][c + j] = dw[j];
    stage[1][threadIdx.y][c + j] = db[j];
  }
  __syncthreads();
  // Each column of the slab is summed over the kColRows row lanes, in order.
  for (int a = 0; a < (RMS ? 1 : 2); ++a) {
    float* dst = part + (int64_t(a) * gridDim.y + blockIdx.y) * p.cols + slab;
    for (int e = threadIdx.y * kWarp + threadIdx.x; e < len; e += kWarp * kColRows) {
      float v = 0.f;
      for (int y = 0; y < kColRows; ++y) v += stage[a][y][e];
      dst[e] = v;
    }
  }
}

// dw[c] (blockIdx.y = 0) or db[c] (1) = sum over blocks b of part[blockIdx.y][b][c]: each of
// kColRows lanes sums a strided subset of b in increasing order, then the lanes are added in
// order.
__global__ void __launch_bounds__(kWarp* kColRows)
    column_sum_kernel(const float* __restrict__ part, int64_t blocks, int64_t cols,
                      float* __restrict__ dw, float* __restrict__ db) {
  __shared__ float stage[kColRows][kWarp];
  float* dst = blockIdx.y == 0 ? dw : db;
  if (dst == nullptr) return;
  const int64_t c = int64_t(blockIdx.x) * kWarp + threadIdx.x;
  const float* src = part + int64_t(blockIdx.y) * blocks * cols;
  float v = 0.f;
  if (c < cols)
    for (int64_t b = threadIdx.y; b < blocks; b += kColRows) v += src[b * cols + c];
  stage[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  for (int y = 1; y < kColRows; ++y) v += stage[y][threadIdx.x];
  dst[c] = v;
}

template <typename T>
bool rows_aligned(int64_t cols, std::initializer_list<const void*> ptrs) {
  return cols % Vec<T>::N == 0 && all_aligned(ptrs);
}

template <typename T, bool RMS, bool RESIDUAL>
void launch_fwd(const NormFwdParams& p, cudaStream_t stream) {
  const bool aligned =
      rows_aligned<T>(p.cols, {p.x, p.residual, p.out, p.sum, p.weight, RMS ? nullptr : p.bias});
  const RowLayout l = row_layout(p.cols, aligned);
  const dim3 block = row_block(l);
  const int64_t blocks = (p.rows + block.y - 1) / block.y;
  norm_fwd_kernel<T, RMS, RESIDUAL>
      <<<unsigned(std::min<int64_t>(blocks, kMaxGrid)), block, 0, stream>>>(p, l);
}

template <typename T>
void norm_fwd_typed(const NormFwdParams& p, cudaStream_t stream) {
  const bool res = p.residual != nullptr;
  if (p.rms)
    res ? launch_fwd<T, true, true>(p, stream) : launch_fwd<T, true, false>(p, stream);
  else
    res ? launch_fwd<T, false, true>(p, stream) : launch_fwd<T, false, false>(p, stream);
}

// The backward's launch geometry, shared by the workspace size and the launch.
struct BwdPlan {
  RowLayout l;
  bool fused = false;  // norm_bwd_kernel (else coef + cols kernels)
  dim3 grid, block;    // of the kernel writing the partials
  int64_t parts = 0;   // partial rows per accumulator
  size_t coef_bytes = 0;
};

template <typename T, bool RMS>
BwdPlan plan_bwd(const NormBwdParams& p) {
  constexpr int N = Vec<T>::N;
  BwdPlan b;
  const bool aligned =
      rows_aligned<T>(p.cols, {p.input, p.grad_out, p.grad_sum, p.grad_input, p.weight});
  b.l = row_layout(p.cols, aligned);
  b.fused = b.l.tiles == 1 && p.grad_input != nullptr;
  const bool want_pg = p.grad_weight != nullptr || p.grad_bias != nullptr;
  if (b.fused) {
    b.block = row_block(b.l);
    const int per_sm = blocks_per_sm<norm_bwd_kernel<T, RMS>>(int(b.block.x * b.block.y));
    const int64_t blocks = (p.rows + b.block.y - 1) / b.block.y;
    b.grid = dim3(unsigned(std::min<int64_t>(blocks, int64_t(per_sm) * sm_count())));
    b.parts = want_pg ? b.grid.x : 0;
    return b;
  }
  b.block = dim3(kWarp, kColRows);
  const int64_t slabs = (p.cols + kWarp * N - 1) / (kWarp * N);
  const int64_t chunks = std::min<int64_t>(
      {std::max<int64_t>(1, 4 * sm_count() / slabs), (p.rows + kColRows - 1) / kColRows, 65535});
  b.grid = dim3(unsigned(slabs), unsigned(std::max<int64_t>(chunks, 1)));
  b.parts = want_pg ? b.grid.y : 0;
  b.coef_bytes = p.grad_input != nullptr ? size_t(p.rows) * sizeof(float2) : 0;
  return b;
}

template <typename T, bool RMS>
size_t bwd_workspace(const NormBwdParams& p) {
  const BwdPlan b = plan_bwd<T, RMS>(p);
  return b.coef_bytes + size_t(b.parts) * size_t(p.cols) * (RMS ? 1 : 2) * sizeof(float);
}

template <typename T, bool RMS>
void launch_bwd(NormBwdParams p, cudaStream_t stream) {
  if (RMS) p.grad_bias = nullptr;
  const BwdPlan b = plan_bwd<T, RMS>(p);
  auto* coef = static_cast<float2*>(p.workspace);
  float* part =
      b.parts ? reinterpret_cast<float*>(static_cast<char*>(p.workspace) + b.coef_bytes) : nullptr;
  if (b.fused) {
    norm_bwd_kernel<T, RMS><<<b.grid, b.block, 0, stream>>>(p, b.l, part);
  } else {
    if (p.grad_input != nullptr) {
      const dim3 block = row_block(b.l);
      const int64_t blocks = (p.rows + block.y - 1) / block.y;
      norm_bwd_coef_kernel<T, RMS>
          <<<unsigned(std::min<int64_t>(blocks, kMaxGrid)), block, 0, stream>>>(p, b.l, coef);
    }
    norm_bwd_cols_kernel<T, RMS><<<b.grid, b.block, 0, stream>>>(p, coef, part, b.l.aligned);
  }
  if (part == nullptr) return;
  const dim3 grid(unsigned((p.cols + kWarp - 1) / kWarp), RMS ? 1 : 2);
  column_sum_kernel<<<grid, dim3(kWarp, kColRows), 0, stream>>>(part, b.parts, p.cols,
                                                                p.grad_weight, p.grad_bias);
}

}  // namespace

cudaError_t norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) { norm_fwd_typed<decltype(t)>(p, stream); });
  return cudaGetLastError();
}

size_t norm_bwd_workspace_bytes(const NormBwdParams& p) {
  if (p.rows == 0 || p.cols == 0) return 0;
  size_t bytes = 0;
  dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    bytes = p.rms ? bwd_workspace<T, true>(p) : bwd_workspace<T, false>(p);
  });
  return bytes;
}

cudaError_t norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  dispatch(p.dtype, [&](auto t) {
    using T = decltype(t);
    p.rms ? launch_bwd<T, true>(p, stream) : launch_bwd<T, false>(p, stream);
  });
  return cudaGetLastError();
}

}  // namespace fastdl::cuda
