// The attention row kernels (see attention_params.h), written once on the Vec<A> abstraction of
// common/vec.h and compiled per ISA inside its namespace; they export kAttentionKernels. No torch,
// no std templates (see vec.h). The GEMMs around them are in attention.cpp.

// ---------------------------------------------------------------- row kernels

template <typename A>
inline A row_max(const A* s, int64_t n) {
  using V = Vec<A>;
  constexpr int W = V::W;
  A m = -__builtin_inf();
  int64_t j = 0;
  if (n >= W) {
    V vm = V::load(s);
    for (j = W; j + W <= n; j += W) vm = vmax(vm, V::load(s + j));
    m = hmax(vm);
  }
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s <- exp(s - shift) over a row, returning the sum.
template <typename A>
inline A exp_row(A* s, int64_t n, A shift) {
  using V = Vec<A>;
  const V vs = V::set1(shift);
  V acc = V::zero();
  for_vectors<V::W>(0, n, [&](int64_t j, int64_t len) {
    const V e = vexp(ld<V>(s + j, len) - vs).first(len);
    st(s + j, e, len);
    acc = acc + e;
  });
  return acc.sum();
}

template <typename A>
void softmax_step(void* sv, int64_t rows, int64_t cols, int64_t ld, void* mv, void* lv, void* cv) {
  A* s = static_cast<A*>(sv);
  A* m = static_cast<A*>(mv);
  A* l = static_cast<A*>(lv);
  A* corr = static_cast<A*>(cv);
  const A ninf = -__builtin_inf();
  for (int64_t r = 0; r < rows; ++r) {
    A* row = s + r * ld;
    const A bm = row_max(row, cols);
    const A mn = bm > m[r] ? bm : m[r];
    if (mn == ninf) {  // nothing allowed so far: keep exp from seeing -inf - -inf
      for (int64_t j = 0; j < cols; ++j) row[j] = A(0);
      corr[r] = A(1);
      continue;
    }
    const A c = sexp(m[r] - mn);
    l[r] = l[r] * c + exp_row(row, cols, mn);
    corr[r] = c;
    m[r] = mn;
  }
}

template <typename A>
void exp_rows(void* sv, int64_t rows, int64_t cols, int64_t ld, const void* lsev) {
  A* s = static_cast<A*>(sv);
  const A* lse = static_cast<const A*>(lsev);
  for (int64_t r = 0; r < rows; ++r) {
    A* row = s + r * ld;
    if (lse[r] == -__builtin_inf()) {  // a row with no allowed key has P = 0
      for (int64_t j = 0; j < cols; ++j) row[j] = A(0);
      continue;
    }
    exp_row(row, cols, lse[r]);
  }
}

template <typename A>
void ds_rows(const void* pv, void* dpv, int64_t rows, int64_t cols, int64_t stride,
             const void* dv) {
  using V = Vec<A>;
  const A* p = static_cast<const A*>(pv);
  A* dp = static_cast<A*>(dpv);
  const A* d = static_cast<const A*>(dv);
  for (int64_t r = 0; r < rows; ++r) {
    const V dr = V::set1(d[r]);
    const A* pr = p + r * stride;
    A* dr_row = dp + r * stride;
    for_vectors<V::W>(0, cols, [&](int64_t j, int64_t len) {
      const V ds = ld<V>(pr + j, len) * (ld<V>(dr_row + j, len) - dr);
      st(dr_row + j, ds, len);
    });
  }
}

const AttentionKernels kAttentionKernels = {
    .softmax_step = {softmax_step<float>, softmax_step<double>},
    .exp_rows = {exp_rows<float>, exp_rows<double>},
    .ds_rows = {ds_rows<float>, ds_rows<double>},
};
