/* crossent's CPU kernels (C99, AVX2 + FMA, OpenMP); built and loaded by chunked_cpp.py. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef __m256 V;
extern V Sleef_log1pf8_u10(V);
extern V Sleef_logf8_u10(V);

#define W 8

static inline V vzero(void) { return _mm256_setzero_ps(); }
static inline V vset(float a) { return _mm256_set1_ps(a); }
static inline V vneg(V a) { return _mm256_xor_ps(a, vset(-0.0f)); }
/* max(0, a), NaN propagating (maxps returns its second operand when one is NaN) */
static inline V vrelu(V a) { return _mm256_max_ps(vzero(), a); }
/* c * v, with 0 where c == 0 (a term with zero weight is absent, even if v is inf) */
static inline V vtimes(V c, V v) {
  return _mm256_blendv_ps(_mm256_mul_ps(c, v), vzero(), _mm256_cmp_ps(c, vzero(), _CMP_EQ_OQ));
}
static inline double hsum(V a) {
  float t[W]; _mm256_storeu_ps(t, a);
  double s = 0.0; for (int j = 0; j < W; ++j) s += t[j]; return s;
}

/* log1p(e) for e in [0, 1] (e = exp(-|x|) in softplus), within 1 ulp like Sleef's log1pf
   and about twice as fast (checked against float64 for every float in (0, 1]: test_backends).
   log1p(e) = 2 atanh(s), s = e / (2 + e) in [0, 1/3]: 2 s + s (2/3 s^2 + 2/5 s^4 + ... +
   2/15 s^14) (the next term is below 1e-9 relative). s is rounded twice (d = 2 + e, then
   e / d); both errors are recovered exactly, d_err = (2 - d) + e and r = e - s d (an FMA),
   and folded in as s_true - s = (r - s d_err) / d, where 12 bits of 1/d suffice. */
static inline V log1p01(V e) {
  const V two = vset(2.f);
  V d = _mm256_add_ps(two, e);
  V s = _mm256_div_ps(e, d);
  V z = _mm256_mul_ps(s, s);
  V p = vset(2.f / 15);
  p = _mm256_fmadd_ps(p, z, vset(2.f / 13));
  p = _mm256_fmadd_ps(p, z, vset(2.f / 11));
  p = _mm256_fmadd_ps(p, z, vset(2.f / 9));
  p = _mm256_fmadd_ps(p, z, vset(2.f / 7));
  p = _mm256_fmadd_ps(p, z, vset(2.f / 5));
  p = _mm256_fmadd_ps(p, z, vset(2.f / 3));
  p = _mm256_mul_ps(p, z);
  V d_err = _mm256_add_ps(_mm256_sub_ps(two, d), e);
  V r = _mm256_fnmadd_ps(s, d, e);
  V c = _mm256_mul_ps(_mm256_fnmadd_ps(s, d_err, r), _mm256_rcp_ps(d));
  return _mm256_add_ps(_mm256_add_ps(s, s), _mm256_fmadd_ps(p, s, _mm256_add_ps(c, c)));
}

/* exp(z) for z <= 0 (or -inf), within 1 ulp (checked against float64 on a sample of every
   binade: tests/backends/test_kernel_source.py). Every exponential of the kernels has such an
   argument (x - max, -|x|), and inline it costs about half of a call to Sleef_expf8_u10.
   z = n ln2 + r, |r| <= ln2/2 (n rounded to nearest, ln2 in two parts, FMAs);
   exp(r) = 1 + r + r^2 P(r), P of degree 5 (Cephes' expf coefficients); the result is
   scaled by 2^n in two factors 2^(n/2) 2^(n - n/2), each a normal number, so a subnormal
   result is rounded once. z < -104 gives 0 (exp(-104) is below half the least subnormal),
   NaN gives NaN. */
static inline V vexp_nonpos(V z) {
  z = _mm256_max_ps(vset(-104.f), z);   /* maxps returns its second operand for NaN: NaN stays NaN */
  V n = _mm256_round_ps(_mm256_mul_ps(z, vset(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V r = _mm256_fnmadd_ps(n, vset(0.693359375f), z);
  r = _mm256_fnmadd_ps(n, vset(-2.12194440e-4f), r);
  V p = vset(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, vset(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, vset(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, vset(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, vset(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, vset(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(r, r), p, r), vset(1.f));
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  V s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  V s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* The first n (< W) lanes: a mask for _mm256_maskload_ps / _mm256_maskstore_ps. */
static inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* The exp of the kernels' scalar tails, the same function as vexp_nonpos lane by lane. */
static inline float exp_nonpos(float z) {
  float b[W];
  _mm256_storeu_ps(b, vexp_nonpos(vset(z)));
  return b[0];
}

/* BCE with logits, reference formulas, e = exp(-|x|):
   loss = p t softplus(-x) + (1-t) softplus(x),  softplus(+-x) = max(+-x, 0) + log1p(e)
   grad = (1-t) sigmoid(x) - p t sigmoid(-x),     sigmoid(|x|) = 1/(1+e), sigmoid(-|x|) = e/(1+e) */
static inline void softplus_sigmoid8(V x, V *sp_pos, V *sp_neg, V *sig, V *sig_neg) {
  const V one = vset(1.f);
  V ax = _mm256_andnot_ps(vset(-0.0f), x);
  V e = vexp_nonpos(vneg(ax));
  V l1 = log1p01(e);
  V r = _mm256_div_ps(one, _mm256_add_ps(one, e));
  V er = _mm256_mul_ps(e, r);
  V neg = _mm256_cmp_ps(x, vzero(), _CMP_LT_OQ);
  *sp_pos = _mm256_add_ps(vrelu(x), l1);
  *sp_neg = _mm256_add_ps(vrelu(vneg(x)), l1);
  *sig = _mm256_blendv_ps(r, er, neg);
  *sig_neg = _mm256_blendv_ps(er, r, neg);
}

static inline void bce8(V x, V t, V pw, V *loss, V *grad) {
  const V one = vset(1.f);
  V sp_pos, sp_neg, sig, sig_neg;
  softplus_sigmoid8(x, &sp_pos, &sp_neg, &sig, &sig_neg);
  V p = _mm256_mul_ps(pw, t);
  V omt = _mm256_sub_ps(one, t);
  *loss = _mm256_add_ps(vtimes(p, sp_neg), vtimes(omt, sp_pos));
  *grad = _mm256_sub_ps(_mm256_mul_ps(omt, sig), _mm256_mul_ps(p, sig_neg));
}

/* BCE on probabilities, torch's clamp and torch's gradient (reference._BinaryCrossEntropy):
   loss = -(p t max(log q, -100) + (1-t) max(log1p(-q), -100))
   grad = ((q - t) - (pw - 1) t (1-q)) / max(q (1-q), 1e-12f)   (q the probability, p = pw t;
   1e-12f is torch's float32 EPSILON; pw = 1 without pos_weight makes the second term 0) */
static inline void bcep8(V q, V t, V pw, V *loss, V *grad) {
  const V one = vset(1.f), lo = vset(-100.f);
  V log_q = _mm256_max_ps(lo, Sleef_logf8_u10(q));
  V log_1mq = _mm256_max_ps(lo, Sleef_log1pf8_u10(vneg(q)));
  V p = _mm256_mul_ps(pw, t);
  V omt = _mm256_sub_ps(one, t);
  V omq = _mm256_sub_ps(one, q);
  *loss = vneg(_mm256_add_ps(_mm256_mul_ps(p, log_q), _mm256_mul_ps(omt, log_1mq)));
  V num = _mm256_sub_ps(_mm256_sub_ps(q, t),
                        _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(pw, one), t), omq));
  *grad = _mm256_div_ps(num, _mm256_max_ps(vset(1e-12f), _mm256_mul_ps(q, omq)));
}

#define BLOCK 16384

/* The per-element kernels of an elementwise pass: kind 0 BCE with logits (bce8), 1 BCE on
   probabilities (bcep8), 2 sigmoid focal / Poly-1 (focal8, with alpha, half2, eps). */
typedef struct { int kind; float alpha; int half2; float eps; } Elementwise;
static inline void focal8(V x, V t, V pw, float alpha, int half2, float eps, V *loss, V *grad);
static inline __attribute__((always_inline)) void elem8(const Elementwise *k, V x, V t, V pw, V *loss, V *grad) {
  if (k->kind == 0) bce8(x, t, pw, loss, grad);
  else if (k->kind == 1) bcep8(x, t, pw, loss, grad);
  else focal8(x, t, pw, k->alpha, k->half2, k->eps, loss, grad);
}

/* One block [begin, end) of an elementwise pass. pw: NULL, or L weights cycled. With
   want_loss: per-element losses into loss, or their sum returned when loss is NULL; with
   want_grad: the gradient times scale into grad. */
static inline __attribute__((always_inline)) double elementwise_block(
    const Elementwise *k, const float *x, const float *t, const float *pw, int64_t L, float *loss, float *grad,
    float scale, int64_t begin, int64_t end, const int want_loss, const int want_grad) {
  const V vscale = vset(scale);
  float pwb[W], xb[W], tb[W], lb[W], gb[W];
  V acc = vzero();
  double s = 0.0;
  int flush = 0;
  int64_t col = pw ? begin % L : 0;   /* position in the cycled pos_weight */
  for (int64_t i = begin; i < end; i += W) {
    const int64_t m = (end - i < W) ? end - i : W;
    V xv, tv, pv = vset(1.f), lo, gr;
    if (m == W) {
      xv = _mm256_loadu_ps(x + i); tv = _mm256_loadu_ps(t + i);
      if (pw) {
        if (col + W <= L) { pv = _mm256_loadu_ps(pw + col); col += W; if (col == L) col = 0; }
        else {
          for (int j = 0; j < W; ++j) { pwb[j] = pw[col]; if (++col == L) col = 0; }
          pv = _mm256_loadu_ps(pwb);
        }
      }
    } else {
      for (int j = 0; j < W; ++j) { xb[j] = 0.5f; tb[j] = 0.f; pwb[j] = 1.f; }
      for (int64_t j = 0; j < m; ++j) { xb[j] = x[i + j]; tb[j] = t[i + j]; if (pw) pwb[j] = pw[(i + j) % L]; }
      xv = _mm256_loadu_ps(xb); tv = _mm256_loadu_ps(tb); pv = _mm256_loadu_ps(pwb);
    }
    elem8(k, xv, tv, pv, &lo, &gr);
    if (want_grad && scale != 1.f) gr = _mm256_mul_ps(gr, vscale);
    if (m == W) {
      if (want_grad) _mm256_storeu_ps(grad + i, gr);
      if (want_loss && loss) _mm256_storeu_ps(loss + i, lo);
      else if (want_loss) {
        acc = _mm256_add_ps(acc, lo);
        if (++flush == 32) { s += hsum(acc); acc = vzero(); flush = 0; }
      }
    } else {
      _mm256_storeu_ps(gb, gr); _mm256_storeu_ps(lb, lo);
      for (int64_t j = 0; j < m; ++j) {
        if (want_grad) grad[i + j] = gb[j];
        if (want_loss && loss) loss[i + j] = lb[j]; else if (want_loss) s += lb[j];
      }
    }
  }
  return s + hsum(acc);
}

/* A whole pass over n elements, blocks of BLOCK as OpenMP tasks; the sum of the blocks'
   loss sums. One function per (want_loss, want_grad): OpenMP outlines the parallel loop
   into a function of its own, so the flags must be constants there for the compiler to drop
   the arithmetic a pass does not keep (the forward of a captured 'mean' computes no gradient,
   its backward no loss). */
#define ELEMENTWISE_PASS(name, want_loss, want_grad)                                                          \
  static double name(const Elementwise *k, const float *x, const float *t, const float *pw, int64_t L,         \
                     float *loss, float *grad, float scale, int64_t n, int nthreads) {                          \
    const int64_t nblocks = (n + BLOCK - 1) / BLOCK;                                                            \
    double total = 0.0;                                                                                         \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static) reduction(+:total)")                      \
    for (int64_t b = 0; b < nblocks; ++b) {                                                                    \
      const int64_t begin = b * BLOCK, end = (begin + BLOCK < n) ? begin + BLOCK : n;                          \
      total += elementwise_block(k, x, t, pw, L, loss, grad, scale, begin, end, want_loss, want_grad);        \
    }                                                                                                           \
    return total;                                                                                               \
  }
ELEMENTWISE_PASS(pass_loss_grad, 1, 1)
ELEMENTWISE_PASS(pass_loss, 1, 0)
ELEMENTWISE_PASS(pass_grad, 0, 1)

/* BCE (kind 0: with logits, 1: on probabilities): per-element losses into loss, or their
   sum returned when loss is NULL; the gradient times scale into grad unless it is NULL. */
double crossent_bce(int kind, const float *x, const float *t, const float *pw, int64_t L, float *loss,
                    float *grad, float scale, int64_t n, int nthreads) {
  const Elementwise k = {kind, 0.f, 0, 0.f};
  return grad ? pass_loss_grad(&k, x, t, pw, L, loss, grad, scale, n, nthreads)
              : pass_loss(&k, x, t, pw, L, loss, grad, scale, n, nthreads);
}

/* The gradient alone (times scale), for a backward pass that needs no loss. */
void crossent_bce_grad(int kind, const float *x, const float *t, const float *pw, int64_t L, float *grad,
                       float scale, int64_t n, int nthreads) {
  const Elementwise k = {kind, 0.f, 0, 0.f};
  pass_grad(&k, x, t, pw, L, 0, grad, scale, n, nthreads);
}

/* Cross-entropy, class-index targets, one row at a time (reference formulas):
   m = max x, k = first arg-max, z = x - m (0 where x == m), e = exp(z) (1 for ties),
   s = sum_{j != k} e_j, loss = c (log1p(s) - z_y) (0 if c == 0),
   grad_j = A (e_j/(1+s)) - a_j  (a_j = c [j == y] + sm_j, A = c + S);
   at the arg-max, when it dominates (s < 1): grad_k = (A - a_k) - A (s/(1+s)), else the
   general form (reference._CrossEntropy.backward).
   grad may be NULL (loss only) or alias x (in-place mode: x_y is read first).
   c may be NULL: every c_r = 1 (no class weights, no smoothing, nothing ignored).
   Ignored rows (ignore_index) come with c_r = -0.0, a value a kept row never has
   (reference.ce_coefficients): they get loss 0 and a zero gradient row whatever their
   logits hold (NaN, +-inf), without reading them. */
/* The max of a row (first pass), and whether it holds a NaN. */
static inline float ce_row_max(const float *xr, int64_t C, int *has_nan) {
  V vm = vset(-INFINITY), vnan = vzero();
  int64_t j = 0;
  for (; j + W <= C; j += W) {
    V xv = _mm256_loadu_ps(xr + j);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    vm = _mm256_max_ps(vm, xv);
  }
  float tmp[W]; _mm256_storeu_ps(tmp, vm);
  float m = -INFINITY;
  for (int q = 0; q < W; ++q) m = tmp[q] > m ? tmp[q] : m;
  *has_nan = _mm256_movemask_ps(vnan) != 0;
  for (; j < C; ++j) { if (xr[j] != xr[j]) *has_nan = 1; else if (xr[j] > m) m = xr[j]; }
  return m;
}

/* grad_j = scale (A (e_j / (1+s)) - sm_j) over a row, p_j = e_j / (1+s) rounded once (a
   reciprocal then a product would be two). from_x: e_j = exp(x_j - m) (1 where x_j == m)
   is computed here and the first arg-max returned; else gr holds e_j already (-1 returned). */
static inline __attribute__((always_inline)) int64_t ce_grad_pass(const float *xr, float *gr, int64_t C, float m,
                                                                  float den, float A, const float *sm, float scale,
                                                                  const int from_x) {
  const V vA = vset(A), vden = vset(den), vs = vset(scale), vmax = vset(m), one = vset(1.f);
  int64_t j = 0, k = -1;
  for (; j + W <= C; j += W) {
    V e;
    if (from_x) {
      V xv = _mm256_loadu_ps(xr + j);
      V eq = _mm256_cmp_ps(xv, vmax, _CMP_EQ_OQ);
      e = _mm256_blendv_ps(vexp_nonpos(_mm256_sub_ps(xv, vmax)), one, eq);
      int bits = _mm256_movemask_ps(eq);
      if (bits && k < 0) k = j + __builtin_ctz(bits);
    } else {
      e = _mm256_loadu_ps(gr + j);
    }
    V g = _mm256_mul_ps(vA, _mm256_div_ps(e, vden));
    if (sm) g = _mm256_sub_ps(g, _mm256_loadu_ps(sm + j));
    _mm256_storeu_ps(gr + j, _mm256_mul_ps(vs, g));
  }
  for (; j < C; ++j) {
    float e = gr[j];
    if (from_x) {
      e = (xr[j] == m) ? 1.f : exp_nonpos(xr[j] - m);
      if (xr[j] == m && k < 0) k = j;
    }
    gr[j] = sm ? scale * (A * (e / den) - sm[j]) : scale * (A * (e / den));
  }
  return k;
}

/* The gradient entries at the target y and at the first arg-max k (e_k = 1), written after
   the general form: at y, A p_y - (sm_y + c); at k, when it dominates (s < 1),
   (A - a_k) - A s/(1+s) with A - a_k = c [k != y] + (S - sm_k) in double; else A p_k - a_k
   as everywhere. ey = e_y. */
static inline void ce_grad_entries(float *gr, int64_t yr, int64_t k, float ey, float s, float den, float A,
                                   float cr, const float *sm, double S, float scale) {
  const float sm_y = sm ? sm[yr] : 0.f;
  gr[yr] = scale * (A * (ey / den) - (sm_y + cr));
  if (s < 1.f) {
    const float a_rest = ((k == yr) ? 0.f : cr) + (sm ? (float)(S - (double)sm[k]) : 0.f);
    gr[k] = scale * (a_rest - A * (s / den));
  } else {
    const float a_k = (sm ? sm[k] : 0.f) + ((k == yr) ? cr : 0.f);
    gr[k] = scale * (A * (1.f / den) - a_k);
  }
}

/* The sum S of the smoothing terms sm_j (0 without smoothing). */
static inline double ce_smooth_total(const float *sm, int64_t C) {
  double S = 0.0;
  if (sm) for (int64_t j = 0; j < C; ++j) S += sm[j];
  return S;
}

/* The min and max of n floats into out[0], out[1]; both NaN when one of the floats is NaN. */
static void value_range(const float *x, int64_t n, float *out) {
  V lo = vset(INFINITY), hi = vset(-INFINITY), vnan = vzero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V xv = _mm256_loadu_ps(x + j);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    lo = _mm256_min_ps(lo, xv);
    hi = _mm256_max_ps(hi, xv);
  }
  float l[W], h[W];
  _mm256_storeu_ps(l, lo); _mm256_storeu_ps(h, hi);
  float a = INFINITY, b = -INFINITY;
  int has_nan = _mm256_movemask_ps(vnan) != 0;
  for (int q = 0; q < W; ++q) { a = l[q] < a ? l[q] : a; b = h[q] > b ? h[q] : b; }
  for (; j < n; ++j) { if (x[j] != x[j]) has_nan = 1; a = x[j] < a ? x[j] : a; b = x[j] > b ? x[j] : b; }
  out[0] = has_nan ? NAN : a;
  out[1] = has_nan ? NAN : b;
}

/* Targets outside [0, C) of the rows not ignored are counted first: when there are any,
   nothing is computed or written and their count is returned (the caller raises, or hands
   the call to a path that handles ignore_index), so no row is read out of bounds.
   stats: NULL, or 2 M floats that receive each row's (m, s) for crossent_ce_index_grad
   (NaN rows: m = NaN). range: NULL, or 2 floats that receive the min and max of the first
   range_rows rows' logits (value_range), which the functional layer's "looks like softmax
   output" check would otherwise read again. */
int64_t crossent_ce_index(const float *x, const int64_t *y, const float *c, const float *sm, float *loss,
                          float *grad, float *stats, float scale, int64_t M, int64_t C, int nthreads,
                          float *range, int64_t range_rows) {
  int64_t bad = 0;
  for (int64_t r = 0; r < M; ++r) {
    const int ignored = c && c[r] == 0.f && signbit(c[r]);
    bad += !ignored && (y[r] < 0 || y[r] >= C);
  }
  if (bad) return bad;
  if (range) value_range(x, (range_rows < M ? range_rows : M) * C, range);
  /* label smoothing: a_j = c [j == y] + sm_j, so A = c + S and
     loss = c (log1p(s) - z_y) + S log1p(s) + sum_j sm_j (-z_j)   (terms with sm_j == 0 dropped) */
  const double S = ce_smooth_total(sm, C);
  const float Sf = (float)S;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < M; ++r) {
    const float *xr = x + r * C;
    float *gr = grad ? grad + r * C : 0;
    const int64_t yr = y[r];
    const float cr = c ? c[r] : 1.f;   /* c NULL: every row has coefficient 1 */
    if (stats) { stats[2 * r] = NAN; stats[2 * r + 1] = NAN; }
    if (cr == 0.f && signbit(cr)) {    /* ignored row */
      loss[r] = 0.f;
      if (gr) memset(gr, 0, (size_t)C * sizeof(float));
      continue;
    }
    int has_nan;
    const float m = ce_row_max(xr, C, &has_nan);
    if (has_nan) {
      loss[r] = NAN;
      if (gr) for (int64_t q = 0; q < C; ++q) gr[q] = NAN;
      continue;
    }
    const float zy = (xr[yr] == m) ? 0.f : xr[yr] - m;
    int64_t k = -1, ties = 0, j;
    double s_total = 0.0, T = 0.0;
    const V vmax = vset(m), one = vset(1.f);
    V acc = vzero(), tacc = vzero();
    int flush = 0;
    for (j = 0; j + W <= C; j += W) {
      V xv = _mm256_loadu_ps(xr + j);
      V eq = _mm256_cmp_ps(xv, vmax, _CMP_EQ_OQ);
      int bits = _mm256_movemask_ps(eq);
      if (sm) {   /* sm_j * (m - x_j), 0 where x_j == m or sm_j == 0 */
        V negz = _mm256_blendv_ps(_mm256_sub_ps(vmax, xv), vzero(), eq);
        tacc = _mm256_add_ps(tacc, vtimes(_mm256_loadu_ps(sm + j), negz));
      }
      V e = vexp_nonpos(_mm256_sub_ps(xv, vmax));
      if (bits) {
        e = _mm256_blendv_ps(e, one, eq);
        ties += __builtin_popcount(bits);
        if (k < 0) k = j + __builtin_ctz(bits);
        acc = _mm256_add_ps(acc, _mm256_blendv_ps(e, vzero(), eq));
      } else {
        acc = _mm256_add_ps(acc, e);
      }
      if (gr) _mm256_storeu_ps(gr + j, e);
      if (++flush == 32) {
        s_total += hsum(acc); acc = vzero(); flush = 0;
        if (sm) { T += hsum(tacc); tacc = vzero(); }
      }
    }
    if (j < C) {   /* the last C % W classes as one masked vector (lanes past C: e = 0, no tie) */
      const __m256i mask = lanes_below(C - j);
      const V in = _mm256_castsi256_ps(mask);
      V xv = _mm256_maskload_ps(xr + j, mask);
      V eq = _mm256_and_ps(_mm256_cmp_ps(xv, vmax, _CMP_EQ_OQ), in);
      int bits = _mm256_movemask_ps(eq);
      if (sm) {
        V negz = _mm256_blendv_ps(_mm256_sub_ps(vmax, xv), vzero(), eq);
        tacc = _mm256_add_ps(tacc, _mm256_and_ps(vtimes(_mm256_maskload_ps(sm + j, mask), negz), in));
      }
      V e = _mm256_and_ps(_mm256_blendv_ps(vexp_nonpos(_mm256_sub_ps(xv, vmax)), one, eq), in);
      if (bits) {
        ties += __builtin_popcount(bits);
        if (k < 0) k = j + __builtin_ctz(bits);
      }
      acc = _mm256_add_ps(acc, _mm256_blendv_ps(e, vzero(), eq));
      if (gr) _mm256_maskstore_ps(gr + j, mask, e);
    }
    s_total += hsum(acc);
    if (sm) T += hsum(tacc);
    const float s = (float)(s_total + (double)(ties - 1));
    if (stats) { stats[2 * r] = m; stats[2 * r + 1] = s; }
    const float lse = log1pf(s);
    float lr = (cr == 0.f) ? 0.f : cr * (lse - zy);
    if (sm) lr += (Sf == 0.f ? 0.f : Sf * lse) + (float)T;
    loss[r] = lr;
    if (!gr) continue;
    /* scale: the grad_output a plain backward() will send, applied last (as backward would) */
    const float den = 1.f + s, A = cr + Sf, ey = gr[yr];
    ce_grad_pass(xr, gr, C, m, den, A, sm, scale, 0);
    ce_grad_entries(gr, yr, k, ey, s, den, A, cr, sm, S, scale);
  }
  return 0;
}

/* The gradient of crossent_ce_index (times scale) from the (m, s) of each row that its
   forward wrote to stats: one pass over the logits (exp, then the gradient), bit for bit the
   gradient the forward would have written. Targets must be in [0, C) (the forward checked). */
void crossent_ce_index_grad(const float *x, const int64_t *y, const float *c, const float *sm, const float *stats,
                            float *grad, float scale, int64_t M, int64_t C, int nthreads) {
  const double S = ce_smooth_total(sm, C);
  const float Sf = (float)S;
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < M; ++r) {
    const float *xr = x + r * C;
    float *gr = grad + r * C;
    const int64_t yr = y[r];
    const float cr = c ? c[r] : 1.f;
    const float m = stats[2 * r], s = stats[2 * r + 1];
    if (cr == 0.f && signbit(cr)) { memset(gr, 0, (size_t)C * sizeof(float)); continue; }
    if (m != m || yr < 0 || yr >= C) { for (int64_t q = 0; q < C; ++q) gr[q] = NAN; continue; }
    const float den = 1.f + s, A = cr + Sf;
    const float ey = (xr[yr] == m) ? 1.f : exp_nonpos(xr[yr] - m);
    const int64_t k = ce_grad_pass(xr, gr, C, m, den, A, sm, scale, 1);
    ce_grad_entries(gr, yr, k, ey, s, den, A, cr, sm, S, scale);
  }
}

/* Cross-entropy, class-index targets, (N, C, S) layout (S = d1 ... dK, contiguous): the
   formulas of crossent_ce_index, one lane per spatial position. 8 consecutive positions
   of image n are one vector and the class loop j = 0..C-1 runs over x[n, j, p:p+8], so
   there is no transpose to rows and no scalar tail for small C. Per lane: m (max),
   k (FIRST arg-max), ties (e = 1 for each), s = sum_{j != k} e_j + (ties - 1), NaN lanes
   give NaN loss and gradient; the gradient is written in the (N, C, S) layout.

   Tiles: the C rows of a position tile (T positions, T = 64 for C <= 64 down to 8) are
   first copied into a small per-thread buffer and the three class passes (max; exp and
   sums; gradient) run on it, then the gradient tile is copied out row by row. Read in
   place, the C rows of one position lie S floats apart: with S a multiple of 1024 (a
   64 x 64 or 128 x 128 image) they all map to the same L1 and L2 cache set, which thrashes
   for C > 8 and made three passes cost three trips to L3. The tile touches each cache
   line of x and of the gradient once. Tail tiles (S not a multiple of T) are padded with
   0 logits, class 0 and weight 0 in the lanes past the end, which are never written out.

   Per-lane sums (s and the smoothing term T) are accumulated in float64 (two __m256d per
   8 lanes): a lane sums C terms, one per class, and float32 partial sums would carry
   about C/2 ulp for large C; the conversion and two adds cost a few instructions against
   ~20 for expf8, and the sum is then as good as the row kernel's (8-lane float32 blocks
   of 32 terms, then float64) or better, for any C.
   y and c are (N, S) like the loss; c the per-position class weight, -0.0 where ignored
   (as in crossent_ce_index: such lanes get loss 0 and a zero gradient whatever their
   logits hold), or NULL: every c = 1 (no class weights, no smoothing, nothing ignored). */
/* per-lane float64 accumulation: lo holds lanes 0-3, hi lanes 4-7 */
static inline void dacc(__m256d *lo, __m256d *hi, V v) {
  *lo = _mm256_add_pd(*lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  *hi = _mm256_add_pd(*hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
static inline V dtof(__m256d lo, __m256d hi) {
  return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm256_cvtpd_ps(lo)), _mm256_cvtpd_ps(hi), 1);
}

/* Zero the gradient entries of the lanes in mask ign (C rows of the tile buffer, stride T). */
static inline void zero_lanes(float *xb, int64_t T, int64_t C, V ign) {
  for (int64_t j = 0; j < C; ++j) _mm256_storeu_ps(xb + j * T, _mm256_andnot_ps(ign, _mm256_loadu_ps(xb + j * T)));
}

/* One vector of 8 lanes; xb: C rows of the tile buffer (stride T), holding x on entry and
   the gradient (or e_j when !want_grad) on return. yb, cb: 8 targets (in [0, C)) and
   weights; lossb: 8 losses out; bad lanes (bm = -1) give NaN loss, ignored lanes (weight
   -0.0) loss 0 and a zero gradient (a vector with no ignored lane pays one compare and a
   branch; one with only ignored lanes skips the work). Only the class loops
   are vector code; what concerns one class per lane (x_y, e_y, the gradient entries at
   y and at the arg-max k) is read and written per lane, in the order the row kernel
   writes them (the general form, then y, then k). */
static inline void ce_lanes(float *xb, int64_t T, int64_t C, const int32_t *yb, const float *cb,
                            const int32_t *bm, const float *sm, double Ssm, float scale, int want_grad,
                            float *lossb, const int small) {
  /* small (C <= 16): x_y, e_y and the y / k gradient entries are selected with a compare
     and a blend per class (a few instructions per class); otherwise read and written lane
     by lane (16 scalar accesses per vector, whatever C). */
  const V one = vset(1.f), Sv = vset((float)Ssm);
  const float Sf = (float)Ssm;
  const __m256i ione = _mm256_set1_epi32(1);
  const __m256i vy = _mm256_loadu_si256((const __m256i *)yb);
  const V cr = _mm256_loadu_ps(cb);
  const V ign = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(cr), _mm256_set1_epi32(INT32_MIN)));
  const int ignored = _mm256_movemask_ps(ign);
  if (ignored == 0xFF) {
    _mm256_storeu_ps(lossb, vzero());
    if (want_grad) zero_lanes(xb, T, C, ign);
    return;
  }
  /* pass 1: max, FIRST arg-max (a lane's index moves only on a strictly greater value;
     all -inf: k = 0), NaN lanes */
  V vm = vset(-INFINITY), vnan = vzero(), xy = vzero();
  __m256i vk = _mm256_setzero_si256(), vj = _mm256_setzero_si256();
  for (int64_t j = 0; j < C; ++j) {
    V xv = _mm256_loadu_ps(xb + j * T);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
    vk = _mm256_blendv_epi8(vk, vj, _mm256_castps_si256(_mm256_cmp_ps(xv, vm, _CMP_GT_OQ)));
    vm = _mm256_max_ps(vm, xv);   /* NaN lanes get a meaningless m and k: NaN results below */
    if (small) xy = _mm256_blendv_ps(xy, xv, _mm256_castsi256_ps(_mm256_cmpeq_epi32(vy, vj)));
    vj = _mm256_add_epi32(vj, ione);
  }
  if (!small) {
    float xyb[W];
    for (int q = 0; q < W; ++q) xyb[q] = xb[yb[q] * T + q];
    xy = _mm256_loadu_ps(xyb);
  }
  /* pass 2: e = exp(x - m) (1 for ties), ties, s = sum_{j != ties} e_j, smoothing T */
  __m256i vties = _mm256_setzero_si256();
  __m256d slo = _mm256_setzero_pd(), shi = slo, tlo = slo, thi = slo;
  V ey = vzero();
  vj = _mm256_setzero_si256();
  for (int64_t j = 0; j < C; ++j) {
    V xv = _mm256_loadu_ps(xb + j * T);
    V eq = _mm256_cmp_ps(xv, vm, _CMP_EQ_OQ);
    V e = _mm256_blendv_ps(vexp_nonpos(_mm256_sub_ps(xv, vm)), one, eq);
    if (small) {
      ey = _mm256_blendv_ps(ey, e, _mm256_castsi256_ps(_mm256_cmpeq_epi32(vy, vj)));
      vj = _mm256_add_epi32(vj, ione);
    }
    vties = _mm256_sub_epi32(vties, _mm256_castps_si256(eq));
    dacc(&slo, &shi, _mm256_andnot_ps(eq, e));   /* a NaN lane's NaN entry makes s NaN */
    if (sm && sm[j] != 0.f)   /* sm_j * (m - x_j), 0 where x_j == m (a zero sm_j: no term) */
      dacc(&tlo, &thi, _mm256_mul_ps(vset(sm[j]), _mm256_andnot_ps(eq, _mm256_sub_ps(vm, xv))));
    _mm256_storeu_ps(xb + j * T, e);
  }
  const __m256i tm1 = _mm256_sub_epi32(vties, ione);
  slo = _mm256_add_pd(slo, _mm256_cvtepi32_pd(_mm256_castsi256_si128(tm1)));
  shi = _mm256_add_pd(shi, _mm256_cvtepi32_pd(_mm256_extracti128_si256(tm1, 1)));
  const V s = dtof(slo, shi);
  const V lse = Sleef_log1pf8_u10(s);
  const V zy = _mm256_andnot_ps(_mm256_cmp_ps(xy, vm, _CMP_EQ_OQ), _mm256_sub_ps(xy, vm));
  V lr = vtimes(cr, _mm256_sub_ps(lse, zy));
  if (sm) lr = _mm256_add_ps(lr, _mm256_add_ps(Sf == 0.f ? vzero() : _mm256_mul_ps(Sv, lse), dtof(tlo, thi)));
  const V bad = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *)bm));
  _mm256_storeu_ps(lossb, _mm256_andnot_ps(ign, _mm256_blendv_ps(lr, vset(NAN), _mm256_or_ps(vnan, bad))));
  if (!want_grad) return;
  /* pass 3: grad_j = scale (A (e_j/(1+s)) - sm_j), A = c + S; then at y
     scale (A (e_y/(1+s)) - (sm_y + c)), then at the arg-max k when s < 1
     scale (a_rest - A (s/(1+s))), a_rest = c [k != y] + (S - sm_k) (in float64), as the
     row kernel. A NaN lane has s = NaN: every entry NaN, and no arg-max form. */
  if (!small) {
    float eyb[W];
    for (int q = 0; q < W; ++q) eyb[q] = xb[yb[q] * T + q];
    ey = _mm256_loadu_ps(eyb);
  }
  const V den = _mm256_add_ps(one, s);
  const V A = _mm256_add_ps(cr, Sv);
  const V vs = vset(scale);
  /* the y and k entries as vectors (same operations, so the same roundings, as one lane
     at a time) */
  int32_t kb[W];
  float smyb[W], rb[W], gyb[W], gkb[W];
  _mm256_storeu_si256((__m256i *)kb, vk);
  V a_rest = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(vk, vy)), cr);
  V sm_y = vzero();
  if (sm) {
    for (int q = 0; q < W; ++q) { smyb[q] = sm[yb[q]]; rb[q] = (float)(Ssm - (double)sm[kb[q]]); }
    sm_y = _mm256_loadu_ps(smyb);
    a_rest = _mm256_add_ps(a_rest, _mm256_loadu_ps(rb));
  }
  const V gy = _mm256_mul_ps(vs, _mm256_sub_ps(_mm256_mul_ps(A, _mm256_div_ps(ey, den)), _mm256_add_ps(sm_y, cr)));
  const V gk = _mm256_mul_ps(vs, _mm256_sub_ps(a_rest, _mm256_mul_ps(A, _mm256_div_ps(s, den))));
  const V dom = _mm256_cmp_ps(s, one, _CMP_LT_OQ);
  if (small) {   /* general form, then y, then k (when s < 1), per class by blends */
    vj = _mm256_setzero_si256();
    for (int64_t j = 0; j < C; ++j) {
      V g = _mm256_mul_ps(A, _mm256_div_ps(_mm256_loadu_ps(xb + j * T), den));
      if (sm) g = _mm256_sub_ps(g, vset(sm[j]));
      if (scale != 1.f) g = _mm256_mul_ps(vs, g);
      g = _mm256_blendv_ps(g, gy, _mm256_castsi256_ps(_mm256_cmpeq_epi32(vy, vj)));
      g = _mm256_blendv_ps(g, gk, _mm256_and_ps(dom, _mm256_castsi256_ps(_mm256_cmpeq_epi32(vk, vj))));
      _mm256_storeu_ps(xb + j * T, g);
      vj = _mm256_add_epi32(vj, ione);
    }
    if (ignored) zero_lanes(xb, T, C, ign);
    return;
  }
  if (sm) {
    for (int64_t j = 0; j < C; ++j) {
      V g = _mm256_sub_ps(_mm256_mul_ps(A, _mm256_div_ps(_mm256_loadu_ps(xb + j * T), den)), vset(sm[j]));
      _mm256_storeu_ps(xb + j * T, scale == 1.f ? g : _mm256_mul_ps(vs, g));
    }
  } else {
    for (int64_t j = 0; j < C; ++j) {
      V g = _mm256_mul_ps(A, _mm256_div_ps(_mm256_loadu_ps(xb + j * T), den));
      _mm256_storeu_ps(xb + j * T, scale == 1.f ? g : _mm256_mul_ps(vs, g));
    }
  }
  /* ... then the y and k entries stored lane by lane */
  _mm256_storeu_ps(gyb, gy);
  _mm256_storeu_ps(gkb, gk);
  const int dominant = _mm256_movemask_ps(dom);
  for (int q = 0; q < W; ++q) {
    xb[yb[q] * T + q] = gyb[q];
    if (dominant & (1 << q)) xb[kb[q] * T + q] = gkb[q];
  }
  if (ignored) zero_lanes(xb, T, C, ign);
}

/* positions per OpenMP task: (tasks = N x ceil(S / SBLOCK)), a multiple of every T */
#define SBLOCK 256

int64_t crossent_ce_index_ncs(const float *x, const int64_t *y, const float *c, const float *sm, float *loss,
                              float *grad, float scale, int64_t N, int64_t C, int64_t S, int nthreads) {
  int64_t bad = 0;   /* targets outside [0, C): never read out of bounds; the caller raises */
  const double Ssm = ce_smooth_total(sm, C);
  /* tile width: the tile buffer (C x T floats) stays within 16 KiB of L1 up to C = 512 */
  const int64_t T = C <= 64 ? 64 : C <= 128 ? 32 : C <= 256 ? 16 : 8;
  const int64_t nb = (S + SBLOCK - 1) / SBLOCK;
  int failed = 0;
  #pragma omp parallel num_threads(nthreads) reduction(+:bad) reduction(|:failed)
  {
    float *buf = (float *)malloc((size_t)(C * T) * sizeof(float));
    if (!buf) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t task = 0; task < N * nb; ++task) {
      if (!buf) continue;
      const int64_t n = task / nb, b = task % nb;
      const int64_t s1 = (b * SBLOCK + SBLOCK < S) ? b * SBLOCK + SBLOCK : S;
      const float *xn = x + n * C * S;
      float *gn = grad ? grad + n * C * S : 0;
      for (int64_t p0 = b * SBLOCK; p0 < s1; p0 += T) {
        const int64_t cnt = (s1 - p0 < T) ? s1 - p0 : T;
        for (int64_t j = 0; j < C; ++j) {
          memcpy(buf + j * T, xn + j * S + p0, (size_t)cnt * sizeof(float));
          for (int64_t q = cnt; q < T; ++q) buf[j * T + q] = 0.f;
        }
        for (int64_t v = 0; v < cnt; v += W) {
          int32_t yb[W], bm[W];
          float cb[W], lb[W];
          const int64_t lanes = (cnt - v < W) ? cnt - v : W;
          const int64_t i0 = n * S + p0 + v;
          int scalar = lanes < W;
          if (!scalar) {   /* 8 int64 targets in [0, C) -> 8 int32 (else the lane-by-lane loop) */
            const __m256i y0 = _mm256_loadu_si256((const __m256i *)(y + i0));
            const __m256i y1 = _mm256_loadu_si256((const __m256i *)(y + i0 + 4));
            const __m256i z = _mm256_setzero_si256(), hi = _mm256_set1_epi64x(C - 1);
            const __m256i out = _mm256_or_si256(
                _mm256_or_si256(_mm256_cmpgt_epi64(z, y0), _mm256_cmpgt_epi64(y0, hi)),
                _mm256_or_si256(_mm256_cmpgt_epi64(z, y1), _mm256_cmpgt_epi64(y1, hi)));
            if (_mm256_testz_si256(out, out)) {
              const __m256 lo32 = _mm256_shuffle_ps(_mm256_castsi256_ps(y0), _mm256_castsi256_ps(y1),
                                                    _MM_SHUFFLE(2, 0, 2, 0));
              _mm256_storeu_si256((__m256i *)yb, _mm256_permute4x64_epi64(_mm256_castps_si256(lo32),
                                                                            _MM_SHUFFLE(3, 1, 2, 0)));
              _mm256_storeu_si256((__m256i *)bm, _mm256_setzero_si256());
              _mm256_storeu_ps(cb, c ? _mm256_loadu_ps(c + i0) : vset(1.f));
            } else scalar = 1;
          }
          if (scalar) for (int q = 0; q < W; ++q) {
            int64_t yq = 0;
            bm[q] = 0; cb[q] = 0.f;
            if (q < lanes) {
              const int64_t i = n * S + p0 + v + q;
              yq = y[i]; cb[q] = c ? c[i] : 1.f;
              if (yq < 0 || yq >= C) { ++bad; bm[q] = -1; yq = 0; }
            }
            yb[q] = (int32_t)yq;
          }
          ce_lanes(buf + v, T, C, yb, cb, bm, sm, Ssm, scale, gn != 0, lb, C <= 16);
          memcpy(loss + n * S + p0 + v, lb, (size_t)lanes * sizeof(float));
        }
        if (gn)
          for (int64_t j = 0; j < C; ++j) memcpy(gn + j * S + p0, buf + j * T, (size_t)cnt * sizeof(float));
      }
    }
    free(buf);
  }
  return failed ? -1 : bad;
}

/* Sigmoid focal / Poly-1 BCE with logits (crossent.backends.focal), e = exp(-|x|):
   ce = p t softplus(-x) + (1-t) softplus(x),  m = 1 - p_t = t sigmoid(-x) + (1-t) sigmoid(x),
   loss = a ce m^gamma + eps m,  a = alpha t + (1-alpha)(1-t) (1 when alpha < 0),
   grad = a m^gamma (ce' + gamma ce r (1-2t)) + eps s u (1-2t),  ce' = (1-t) s - p t u,
   r = s u / m: s for t = 1, u for t = 0, the quotient for soft targets (m >= min(t, 1-t) / 2).
   m^gamma for gamma = k/2 (k = half2 <= 20): k/2 products and one sqrt, so its error is a
   few ulp (no exp(gamma log m), whose error grows with |gamma log m|); the caller sends
   other gammas to the torch path. */
static inline V vpow_half(V m, int half2) {
  V r = vset(1.f);
  for (int j = 0; j < half2 / 2; ++j) r = _mm256_mul_ps(r, m);
  if (half2 & 1) r = _mm256_mul_ps(r, _mm256_sqrt_ps(m));
  return r;
}

static inline void focal8(V x, V t, V pw, float alpha, int half2, float eps, V *loss, V *grad) {
  const V one = vset(1.f);
  V sp_pos, sp_neg, s, u;   /* s = sigmoid(x), u = sigmoid(-x) */
  softplus_sigmoid8(x, &sp_pos, &sp_neg, &s, &u);
  V p = _mm256_mul_ps(pw, t);
  V omt = _mm256_sub_ps(one, t);
  V ce = _mm256_add_ps(vtimes(p, sp_neg), vtimes(omt, sp_pos));
  V g = _mm256_sub_ps(_mm256_mul_ps(omt, s), _mm256_mul_ps(p, u));
  V m = _mm256_add_ps(_mm256_mul_ps(t, u), _mm256_mul_ps(omt, s));
  V sign = _mm256_sub_ps(one, _mm256_add_ps(t, t));
  V lo = ce;
  if (half2) {
    V mg = vpow_half(m, half2);
    V su = _mm256_mul_ps(s, u);
    V rr = _mm256_div_ps(su, _mm256_max_ps(m, vset(1.17549435e-38f)));
    rr = _mm256_blendv_ps(rr, s, _mm256_cmp_ps(t, one, _CMP_GE_OQ));
    rr = _mm256_blendv_ps(rr, u, _mm256_cmp_ps(t, vzero(), _CMP_LE_OQ));
    V focus = _mm256_mul_ps(vset(0.5f * (float)half2), _mm256_mul_ps(vtimes(ce, rr), sign));
    g = _mm256_mul_ps(mg, _mm256_add_ps(g, focus));
    lo = vtimes(mg, ce);
  }
  if (alpha >= 0.f) {
    V a = _mm256_add_ps(_mm256_mul_ps(vset(alpha), t), _mm256_mul_ps(vset(1.f - alpha), omt));
    lo = _mm256_mul_ps(a, lo);
    g = _mm256_mul_ps(a, g);
  }
  if (eps != 0.f) {
    lo = _mm256_fmadd_ps(vset(eps), m, lo);
    g = _mm256_fmadd_ps(vset(eps), _mm256_mul_ps(_mm256_mul_ps(s, u), sign), g);
  }
  *loss = lo; *grad = g;
}

/* loss: per-element losses, or NULL to return their sum (as crossent_bce); grad is
   multiplied by scale (the grad_output a plain backward() of 'mean' / 'sum' will send). */
double crossent_focal(const float *x, const float *t, const float *pw, int64_t L, float *loss, float *grad,
                      float alpha, int half2, float eps, float scale, int64_t n, int nthreads) {
  const Elementwise k = {2, alpha, half2, eps};
  return pass_loss_grad(&k, x, t, pw, L, loss, grad, scale, n, nthreads);
}

/* ------------------------------------------------------------------ LM-head rows
   The per-row statistics and gradient of crossent.backends.lm_head (its docstring has the
   formulas), on a block of raw logits x (R, C). The transform is
   z = (s tanh(x / s)) / T with a soft cap s > 0, z = x / T without one (s = 0). */

/* tanh(a) and sech^2(a) from w = exp(-2|a|) <= 1: tanh|a| = (1 - w) / (1 + w) and
   sech^2 a = 4 w / (1 + w)^2, both without cancellation for |a| >= 0.625 (w <= 0.29); below,
   tanh|a| = |a| + |a| a^2 P(a^2) (Cephes' tanhf polynomial), as 1 - w would cancel. sech^2
   has no cancellation anywhere and underflows to 0 (the exact limit) far out; NaN stays
   NaN, +-inf gives +-1 and 0. */
static inline V vtanh_sech2(V a, V *sech2) {
  const V one = vset(1.f);
  V aa = _mm256_andnot_ps(vset(-0.0f), a);
  V w = vexp_nonpos(_mm256_mul_ps(vset(-2.f), aa));
  V opw = _mm256_add_ps(one, w);
  V big = _mm256_div_ps(_mm256_sub_ps(one, w), opw);
  V z = _mm256_mul_ps(aa, aa);
  V p = vset(-5.70498872745e-3f);
  p = _mm256_fmadd_ps(p, z, vset(2.06390887954e-2f));
  p = _mm256_fmadd_ps(p, z, vset(-5.37397155531e-2f));
  p = _mm256_fmadd_ps(p, z, vset(1.33314422036e-1f));
  p = _mm256_fmadd_ps(p, z, vset(-3.33332819422e-1f));
  V small = _mm256_fmadd_ps(_mm256_mul_ps(p, z), aa, aa);
  V th = _mm256_blendv_ps(big, small, _mm256_cmp_ps(aa, vset(0.625f), _CMP_LT_OQ));
  if (sech2) *sech2 = _mm256_div_ps(_mm256_mul_ps(vset(4.f), w), _mm256_mul_ps(opw, opw));
  return _mm256_or_ps(th, _mm256_and_ps(a, vset(-0.0f)));   /* the sign of a */
}

/* The transformed logits z of 8 raw logits, and (dz) dz/dx unless dz is NULL. */
typedef struct { float T, cap, cap_over_T, inv_T; } LMTransform;
static inline V lm_z(const LMTransform *f, V x, V *dz) {
  if (f->cap > 0.f) {
    V u = vtanh_sech2(_mm256_div_ps(x, vset(f->cap)), dz);
    if (dz) *dz = _mm256_mul_ps(*dz, vset(f->inv_T));
    return _mm256_mul_ps(u, vset(f->cap_over_T));
  }
  if (dz) *dz = vset(f->inv_T);
  return f->T == 1.f ? x : _mm256_div_ps(x, vset(f->T));
}

/* The same for one logit (lane 0 of the vector function: bit for bit the same value). */
static inline float lm_z1(const LMTransform *f, float x, float *dz) {
  V d, z = lm_z(f, vset(x), &d);
  float zb[W], db[W];
  _mm256_storeu_ps(zb, z); _mm256_storeu_ps(db, d);
  if (dz) *dz = db[0];
  return zb[0];
}

/* 8 raw logits from x[j, j + n) (n < W: the lanes past n get -inf; with a soft cap their
   z is finite, so a sum masks them again after the transform). */
static inline V lm_load(const float *x, int64_t n) {
  if (n >= W) return _mm256_loadu_ps(x);
  const __m256i mask = lanes_below(n);
  return _mm256_blendv_ps(vset(-INFINITY), _mm256_maskload_ps(x, mask), _mm256_castsi256_ps(mask));
}

/* 8 smoothing coefficients sm[j, j + n) (n < W: 0 in the lanes past n, so no term). */
static inline V lm_load_sm(const float *sm, int64_t n) {
  return n < W ? _mm256_maskload_ps(sm, lanes_below(n)) : _mm256_loadu_ps(sm);
}

/* 8 values into x[j, j + n) (n < W: the first n). */
static inline void lm_store(float *x, int64_t n, V v) {
  if (n >= W) _mm256_storeu_ps(x, v);
  else _mm256_maskstore_ps(x, lanes_below(n), v);
}

/* Pass 1 over a row: the max m of z (the transform of x) and whether a z is NaN; z is
   written to zout and dz/dx to dout where they are not NULL (zout may be xr). */
static inline __attribute__((always_inline)) float lm_row_max(const LMTransform *f, float *xr, int64_t C,
                                                              float *zout, float *dout, int *has_nan) {
  V vm = vset(-INFINITY), vnan = vzero();
  for (int64_t j = 0; j < C; j += W) {
    V d, z = lm_z(f, lm_load(xr + j, C - j), dout ? &d : 0);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
    vm = _mm256_max_ps(vm, z);
    if (zout) lm_store(zout + j, C - j, z);
    if (dout) lm_store(dout + j, C - j, d);
  }
  float mb[W]; _mm256_storeu_ps(mb, vm);
  float m = -INFINITY;
  for (int q = 0; q < W; ++q) m = mb[q] > m ? mb[q] : m;
  *has_nan = _mm256_movemask_ps(vnan) != 0;
  return m;
}

/* Pass 2 over a row, z = f(x) (f the identity when the row holds z already), with
   t_j = z_j - m (0 where z_j == m: ties and a +inf max) and e_j = exp(t_j):
   s = sum over j off the ties of e_j + (ties - 1) (= S'), B = sum_j e_j (-t_j) (0 where e_j = 0;
   with want_B), T = sum_j sm_j (-t_j) (sm not NULL), k the first arg-max; e_j is written to
   eout unless it is NULL (eout may be xr). Float lanes are flushed to double every 32
   vectors, as in the row kernel. */
typedef struct { float s; double B, T; int64_t k; } LMSums;
static inline __attribute__((always_inline)) LMSums lm_row_sums(const LMTransform *f, float *xr, int64_t C, float m,
                                                                const float *sm, float *eout, const int want_B) {
  const V vmax = vset(m);
  V acc = vzero(), bacc = vzero(), tacc = vzero();
  double s_total = 0.0, B = 0.0, Tsm = 0.0;
  int64_t k = -1, ties = 0;
  int flush = 0;
  for (int64_t j = 0; j < C; j += W) {
    const int64_t n = C - j;
    V z = lm_z(f, lm_load(xr + j, n), 0);
    V eq = _mm256_cmp_ps(z, vmax, _CMP_EQ_OQ);
    if (n < W) {   /* the lanes past the end: z = -inf, never a tie */
      const V in = _mm256_castsi256_ps(lanes_below(n));
      z = _mm256_blendv_ps(vset(-INFINITY), z, in);
      eq = _mm256_and_ps(eq, in);
    }
    V t = _mm256_andnot_ps(eq, _mm256_sub_ps(z, vmax));   /* 0 at ties; -inf past the end */
    V e = vexp_nonpos(t);
    int bits = _mm256_movemask_ps(eq);
    if (bits) {
      ties += __builtin_popcount(bits);
      if (k < 0) k = j + __builtin_ctz(bits);
    }
    acc = _mm256_add_ps(acc, _mm256_andnot_ps(eq, e));
    if (want_B) bacc = _mm256_add_ps(bacc, vtimes(e, vneg(t)));   /* e = 0 (-inf, or past the end): no term */
    if (sm) tacc = _mm256_add_ps(tacc, vtimes(lm_load_sm(sm + j, n), vneg(t)));
    if (eout) lm_store(eout + j, n, e);
    if (++flush == 32) {
      s_total += hsum(acc); acc = vzero(); flush = 0;
      if (want_B) { B += hsum(bacc); bacc = vzero(); }
      if (sm) { Tsm += hsum(tacc); tacc = vzero(); }
    }
  }
  s_total += hsum(acc);
  if (want_B) B += hsum(bacc);
  if (sm) Tsm += hsum(tacc);
  const LMSums r = {(float)(s_total + (double)(ties - 1)), B, Tsm, k};
  return r;
}

/* The smoothing term sm = (sum sm_j) log1p(S') + sum_j sm_j (-t_j) of a row (0 without sm). */
static inline float lm_smooth(const float *sm, double S_sm, float lp1, double T) {
  return sm ? ((S_sm == 0.0 ? 0.f : (float)S_sm * lp1) + (float)T) : 0.f;
}

/* Per row r of x (R, C): out[0..4][r] = m, log1p(S'), nll = log1p(S') - t_y, B/(1+S'),
   sm (lm_row_sums; 0 when sm is NULL) and correct[r] = (first arg-max == y[r]).
   A row holding a NaN gets NaN everywhere (correct 0). Targets in [0, C) (the caller's).
   x is scratch: with a temperature or soft cap it is overwritten with z (so the transform
   is evaluated once per logit, not twice). */
void crossent_lm_stats(float *x, const int64_t *y, const float *sm, float T, float cap, float *out,
                       uint8_t *correct, int64_t R, int64_t C, int nthreads) {
  const LMTransform f = {T, cap, cap / T, 1.f / T}, id = {1.f, 0.f, 1.f, 1.f};
  const double S_sm = ce_smooth_total(sm, C);
  const int in_place = cap > 0.f || T != 1.f;   /* then pass 1 writes z over x and pass 2 reads it */
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float *xr = x + r * C;
    const float zy = lm_z1(&f, xr[y[r]], 0);
    int has_nan;
    const float m = lm_row_max(&f, xr, C, in_place ? xr : 0, 0, &has_nan);
    if (has_nan) {
      for (int q = 0; q < 5; ++q) out[q * R + r] = NAN;
      correct[r] = 0;
      continue;
    }
    const LMSums u = lm_row_sums(in_place ? &id : &f, xr, C, m, sm, 0, 1);
    const float lp1 = log1pf(u.s);
    const float ty = (zy == m) ? 0.f : zy - m;
    out[r] = m;
    out[R + r] = lp1;
    out[2 * R + r] = lp1 - ty;
    out[3 * R + r] = (float)u.B / (1.f + u.s);
    out[4 * R + r] = lm_smooth(sm, S_sm, lp1, u.T);
    correct[r] = (u.k == y[r]);
  }
}

/* d/dz_y of the nll, smoothing and lse terms at the target (p_y = exp(-nll); coef as in the
   gradient passes; smy = g_sm sm_y): p_y (coef - g_nll) + g_nll (p_y - 1) - smy, with
   p_y - 1 = expm1(-nll), exact for a confident token. */
static inline float lm_target_grad(float p_y, float nll, float coef, float g_nll, float smy) {
  return p_y * (coef - g_nll) + g_nll * expm1f(-nll) - smy;
}

/* d/dx of g_nll nll + g_sm sm + g_lse lse + g_ent ent per row r of x (R, C), into grad (may
   alias x: a row's target logit is read first). stats: (4, R) m, log1p(S'), nll, B/(1+S')
   of crossent_lm_stats; g: (4, R) upstream g_nll, g_sm, g_lse, g_ent. With
   p_j = exp(t_j - log1p(S')), coef = g_nll + g_lse + g_sm sum(sm):
   dz_j = p_j (a + b t_j) - g_sm sm_j, a = coef - g_ent B/(1+S'), b = -g_ent (0 where p_j = 0),
   at the target p_y (coef - g_nll) + g_nll expm1(-nll) - g_ent p_y (t_y + B/(1+S')) - g_sm sm_y
   (p_y - 1 as expm1: exact for a confident token), each times dz/dx. */
void crossent_lm_grad(const float *x, const int64_t *y, const float *sm, float T, float cap, const float *stats,
                      const float *g, float *grad, int64_t R, int64_t C, int nthreads) {
  const LMTransform f = {T, cap, cap / T, 1.f / T};
  const double S_sm = ce_smooth_total(sm, C);
  #pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const float *xr = x + r * C;
    float *gr = grad + r * C;
    const float m = stats[r], lp1 = stats[R + r], nll = stats[2 * R + r], BA = stats[3 * R + r];
    const float g_nll = g[r], g_sm = sm ? g[R + r] : 0.f, g_lse = g[2 * R + r], g_ent = g[3 * R + r];
    const float coef = g_nll + g_lse + (sm ? g_sm * (float)S_sm : 0.f);
    const float a = coef - g_ent * BA;
    const int64_t yr = y[r];
    float dzy;
    const float zy = lm_z1(&f, xr[yr], &dzy);
    const float ty = (zy == m) ? 0.f : zy - m;
    const V vmax = vset(m), vlp1 = vset(lp1), va = vset(a), vb = vset(-g_ent), vgs = vset(g_sm);
    for (int64_t j = 0; j < C; j += W) {
      const int64_t n = C - j;
      V d, z = lm_z(&f, lm_load(xr + j, n), &d);
      V eq = _mm256_cmp_ps(z, vmax, _CMP_EQ_OQ);
      V t = _mm256_andnot_ps(eq, _mm256_sub_ps(z, vmax));
      V p = vexp_nonpos(_mm256_sub_ps(t, vlp1));
      V dz = vtimes(p, _mm256_fmadd_ps(vb, t, va));
      if (sm) dz = _mm256_fnmadd_ps(vgs, lm_load_sm(sm + j, n), dz);
      lm_store(gr + j, n, _mm256_mul_ps(dz, d));
    }
    const float p_y = expf(-nll);
    float col = lm_target_grad(p_y, nll, coef, g_nll, sm ? g_sm * sm[yr] : 0.f);
    if (g_ent != 0.f && p_y > 0.f) col -= g_ent * (p_y * (ty + BA));
    gr[yr] = col * dzy;
  }
}

/* The summed LM-head loss of crossent.backends.lm_head.loss_rows in one call per block: per
   row r, with coefficients c_nll, c_sm, c_z (c: (3, R)), out (3, R) receives nll, lse and sm
   (as crossent_lm_stats), correct the arg-max hit, and x (R, C) is overwritten with
   d/dx of c_nll nll + c_sm sm + c_z lse^2: with coef = c_nll + 2 c_z lse + c_sm sum(sm),
   dz_j = coef e_j / (1 + S') - c_sm sm_j, at the target
   p_y (coef - c_nll) + c_nll expm1(-nll) - c_sm sm_y, each times dz/dx.
   Three passes over a row: z (written over x) with dz/dx (a per-thread row, soft cap only)
   and the max; e_j (written over z) and the sums; the gradient. One transform and one
   exponential per logit. Returns -1 when the per-thread row cannot be allocated, else 0. */
int crossent_lm_loss_grad(float *x, const int64_t *y, const float *sm, float T, float cap, const float *c,
                          float *out, uint8_t *correct, int64_t R, int64_t C, int nthreads) {
  const LMTransform f = {T, cap, cap / T, 1.f / T}, id = {1.f, 0.f, 1.f, 1.f};
  const double S_sm = ce_smooth_total(sm, C);
  int failed = 0;
  #pragma omp parallel num_threads(nthreads) reduction(|:failed)
  {
    float *dbuf = cap > 0.f ? (float *)malloc((size_t)C * sizeof(float)) : 0;
    if (cap > 0.f && !dbuf) failed = 1;
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      if (cap > 0.f && !dbuf) continue;
      float *xr = x + r * C;
      const int64_t yr = y[r];
      const float c_nll = c[r], c_sm = sm ? c[R + r] : 0.f, c_z = c[2 * R + r];
      int has_nan;
      const float m = lm_row_max(&f, xr, C, xr, dbuf, &has_nan);
      if (has_nan) {
        for (int q = 0; q < 3; ++q) out[q * R + r] = NAN;
        correct[r] = 0;
        for (int64_t j = 0; j < C; ++j) xr[j] = NAN;
        continue;
      }
      const float zy = xr[yr];
      const LMSums u = lm_row_sums(&id, xr, C, m, sm, xr, 0);
      const float lp1 = log1pf(u.s);
      const float ty = (zy == m) ? 0.f : zy - m;
      const float nll = lp1 - ty, lse = m + lp1;
      out[r] = nll;
      out[R + r] = lse;
      out[2 * R + r] = lm_smooth(sm, S_sm, lp1, u.T);
      correct[r] = (u.k == yr);
      const float coef = c_nll + 2.f * c_z * lse + (sm ? c_sm * (float)S_sm : 0.f);
      const V vscale = vset(coef / (1.f + u.s)), vcs = vset(c_sm), vinvT = vset(f.inv_T);
      for (int64_t j = 0; j < C; j += W) {
        const int64_t n = C - j;
        V g = _mm256_mul_ps(lm_load(xr + j, n), vscale);   /* e_j coef / (1 + S') */
        if (sm) g = _mm256_fnmadd_ps(vcs, lm_load_sm(sm + j, n), g);
        lm_store(xr + j, n, _mm256_mul_ps(g, dbuf ? lm_load(dbuf + j, n) : vinvT));
      }
      const float col = lm_target_grad(expf(-nll), nll, coef, c_nll, sm ? c_sm * sm[yr] : 0.f);
      xr[yr] = col * (dbuf ? dbuf[yr] : f.inv_T);
    }
    free(dbuf);
  }
  return failed ? -1 : 0;
}
