// Integer-exact inference engine of the entropy model v2: see int_mim.hpp and the spec
// pqmim_kernels/reference/int_mim.py. Every function here computes exactly the integers of its
// torch counterpart (tests/test_int_mim.py compares them on random models and inputs).
#include "int_mim.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PQMIM_X86 1
#endif

// Hot loops are compiled for AVX2 and for the baseline ISA and picked at run time; the integer
// results are identical on every path (only integer operations and exact divisions below).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(PQMIM_NO_CLONES)
#define PQMIM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PQMIM_CLONES
#endif

namespace pqmim {
namespace intmim {

namespace {

// floor(a / d) for d > 0 and |a| < 2^62 from a float64 estimate a * inv (inv = 1.0 / d), made
// exact by integer corrections (the estimate is within a few units of the quotient; the loops
// step it to the one q with q*d <= a < (q+1)*d). A hardware int64 division costs ~40 cycles.
inline int64_t floor_div_inv(int64_t a, int64_t d, double inv) {
  int64_t q = int64_t(std::floor(double(a) * inv));
  while (q * d > a) --q;
  while ((q + 1) * d <= a) ++q;
  return q;
}

// Runs fn(begin, end) over [0, n) on up to num_threads threads (chunks of at least `grain`).
// Every started thread is joined, whatever happens; the first exception is rethrown after. A
// thread that cannot be created leaves its chunk to the calling thread.
template <class Fn>
void parallel_for(int64_t n, int num_threads, int64_t grain, Fn fn) {
  if (n <= 0) return;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / std::max<int64_t>(1, grain)));
  if (chunks <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(chunks);
  std::vector<int64_t> local;  // chunks the calling thread runs itself
  auto run = [&](int64_t c) {
    try {
      fn(n * c / chunks, n * (c + 1) / chunks);
    } catch (...) {
      errors[c] = std::current_exception();
    }
  };
  pool.reserve(chunks - 1);
  for (int64_t c = 1; c < chunks; ++c) {
    try {
      pool.emplace_back(run, c);
    } catch (const std::system_error&) {
      local.push_back(c);
    }
  }
  run(0);
  for (int64_t c : local) run(c);
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

inline int32_t clamp_res(int64_t v) {
  return int32_t(std::min<int64_t>(kResLimit, std::max<int64_t>(-kResLimit, v)));
}

inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::min(hi, std::max(lo, v)); }

inline int64_t exp2_neg(int64_t d, const int64_t* table, int bits) {
  int64_t frac = (d >> (kLogBits - 8)) & 255;
  int64_t whole = std::min<int64_t>(d >> kLogBits, bits + 1);
  return table[frac] >> whole;
}

// acc (rows, dout) int32 = a (rows, din) int16 @ w.T, for rows <= 4 at a time on AVX2.
void gemm_scalar(const Linear& L, const int16_t* a, int64_t rows, int32_t* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const int16_t* ar = a + r * L.din_pad;
    int32_t* out = acc + r * L.dout;
    for (int o = 0; o < L.dout; ++o) {
      const int16_t* wr = L.w.data() + size_t(o) * L.din;
      int32_t s = 0;
      for (int i = 0; i < L.din; ++i) s += int32_t(ar[i]) * int32_t(wr[i]);
      out[o] = s;
    }
  }
}

#ifdef PQMIM_X86
__attribute__((target("avx2"))) void gemm_avx2(const Linear& L, const int16_t* a, int64_t rows,
                                                  int32_t* acc) {
  const int dout = L.dout, pairs = L.din_pad / 2;
  const int dvec = dout / 8 * 8;
  const int32_t* wp = reinterpret_cast<const int32_t*>(L.w_pairs.data());  // (pairs, dout)
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    const int nr = int(std::min<int64_t>(4, rows - r0));
    const int32_t* ap[4];
    for (int j = 0; j < 4; ++j)
      ap[j] = reinterpret_cast<const int32_t*>(a + (r0 + std::min(j, nr - 1)) * L.din_pad);
    int o = 0;
    for (; o + 16 <= dvec; o += 16) {  // 4 rows x 16 outputs: each broadcast feeds two madds
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      __m256i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int i = 0; i < pairs; ++i) {
        const int32_t* row = wp + size_t(i) * dout + o;
        const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        const __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 8));
        __m256i x = _mm256_set1_epi32(ap[0][i]);
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(x, wa));
        b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(x, wb));
        x = _mm256_set1_epi32(ap[1][i]);
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(x, wa));
        b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(x, wb));
        x = _mm256_set1_epi32(ap[2][i]);
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(x, wa));
        b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(x, wb));
        x = _mm256_set1_epi32(ap[3][i]);
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(x, wa));
        b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(x, wb));
      }
      const __m256i av[4] = {a0, a1, a2, a3}, bv[4] = {b0, b1, b2, b3};
      for (int j = 0; j < nr; ++j) {
        int32_t* dst = acc + (r0 + j) * dout + o;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), av[j]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 8), bv[j]);
      }
    }
    for (; o < dvec; o += 8) {
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
      for (int i = 0; i < pairs; ++i) {
        __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + size_t(i) * dout + o));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_set1_epi32(ap[0][i]), wv));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_set1_epi32(ap[1][i]), wv));
        s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_set1_epi32(ap[2][i]), wv));
        s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_set1_epi32(ap[3][i]), wv));
      }
      __m256i sv[4] = {s0, s1, s2, s3};
      for (int j = 0; j < nr; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + (r0 + j) * dout + o), sv[j]);
    }
    for (int o = dvec; o < dout; ++o) {
      const int16_t* wr = L.w.data() + size_t(o) * L.din;
      for (int j = 0; j < nr; ++j) {
        const int16_t* ar = a + (r0 + j) * L.din_pad;
        int32_t s = 0;
        for (int i = 0; i < L.din; ++i) s += int32_t(ar[i]) * int32_t(wr[i]);
        acc[(r0 + j) * dout + o] = s;
      }
    }
  }
}
#endif

bool have_avx2() {
#ifdef PQMIM_X86
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
#else
  return false;
#endif
}

void gemm(const Linear& L, const int16_t* a, int64_t rows, int32_t* acc) {
#ifdef PQMIM_X86
  if (have_avx2()) return gemm_avx2(L, a, rows, acc);
#endif
  gemm_scalar(L, a, rows, acc);
}

// The rescale of one accumulator of output channel o (spec: IntLinear.__call__).
inline int64_t epilogue(const Linear& L, int o, int32_t acc) {
  int64_t v = (int64_t(acc) + L.b[o]) * L.mult[o];
  return clamp64(round_shift(v, L.shift[o]), L.lo, L.hi);
}

// epilogue of a whole row into int8 / int16 outputs (values in [lo, hi] = [-127, 127]).
template <class T>
PQMIM_CLONES void epilogue_row(const Linear& L, const int32_t* acc, T* out) {
  for (int o = 0; o < L.dout; ++o) out[o] = T(epilogue(L, o, acc[o]));
}

// out = act[epilogue(acc) + 127] over a row (the MLP activation table).
PQMIM_CLONES void act_row(const Linear& L, const int32_t* acc, const int32_t* act, int16_t* out) {
  for (int o = 0; o < L.dout; ++o) out[o] = int16_t(act[epilogue(L, o, acc[o]) + 127]);
}

// x = clamp_res(x + epilogue(acc)) over a residual row.
PQMIM_CLONES void residual_row(const Linear& L, const int32_t* acc, int32_t* x) {
  for (int o = 0; o < L.dout; ++o) {
    const int64_t v = int64_t(x[o]) + epilogue(L, o, acc[o]);
    x[o] = int32_t(std::min<int64_t>(kResLimit, std::max<int64_t>(-kResLimit, v)));
  }
}

// RMS norm of one residual row (spec: rms_norm_int) into int16 (values in [-127, 127]).
PQMIM_CLONES void rms_norm(const int32_t* x, int width, int exponent, int16_t* y) {
  int64_t ss = 0;
  for (int i = 0; i < width; ++i) ss += int64_t(x[i]) * x[i];
  const int64_t r = std::max<int64_t>(1, isqrt(ss / width));
  const int64_t d = 2 * r;
  const double inv = 1.0 / double(d);
  for (int i = 0; i < width; ++i) {
    const int64_t a = int64_t(x[i]) * (int64_t(1) << (exponent + 1)) + r;
    y[i] = int16_t(clamp64(floor_div_inv(a, d, inv), -127, 127));
  }
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("integer entropy model: " + what);
}

// The same for checks inside loops: the message is built only when the check fails.
void check(bool ok, const std::string& name, const char* what) {
  if (!ok) throw std::invalid_argument("integer entropy model: " + name + what);
}

void check_linear(const Linear& L, const std::string& name) {
  check(L.din >= 1 && L.din <= kMaxInner, name + " inner dimension out of [1, 1024]");
  check(int(L.w.size()) == L.dout * L.din, name + ".w has the wrong size");
  check(int(L.b.size()) == L.dout && int(L.mult.size()) == L.dout && int(L.shift.size()) == L.dout,
        name + " bias/mult/shift sizes differ from dout");
  for (int16_t v : L.w) check(v >= -127 && v <= 127, name, ".w out of [-127, 127]");
  for (int o = 0; o < L.dout; ++o) {
    check(L.b[o] >= -(int64_t(1) << 30) && L.b[o] <= (int64_t(1) << 30), name, ".b out of range");
    check(L.mult[o] >= 0 && L.mult[o] < (int64_t(1) << 30), name, ".mult out of range");
    check(L.shift[o] >= 1 && L.shift[o] <= 62, name, ".shift out of [1, 62]");
  }
  check(int(L.w_pairs.size()) == L.din_pad * L.dout, name + " not finalized");
}

}  // namespace

int64_t isqrt(int64_t n) {
  if (n <= 0) return 0;
  int64_t r = int64_t(std::sqrt(double(n)));
  if (r * r > n) --r;
  if ((r + 1) * (r + 1) <= n) ++r;
  return r;
}

void Linear::finalize() {
  din_pad = din + (din & 1);
  w_pairs.assign(size_t(din_pad) * dout, 0);
  for (int o = 0; o < dout; ++o)
    for (int i = 0; i < din; ++i)
      w_pairs[(size_t(i / 2) * dout + o) * 2 + (i & 1)] = w[size_t(o) * din + i];
}

Linear Linear::rows(int start, int stop) const {
  Linear r;
  r.dout = stop - start;
  r.din = din;
  r.w.assign(w.begin() + size_t(start) * din, w.begin() + size_t(stop) * din);
  r.b.assign(b.begin() + start, b.begin() + stop);
  r.mult.assign(mult.begin() + start, mult.begin() + stop);
  r.shift.assign(shift.begin() + start, shift.begin() + stop);
  r.lo = lo;
  r.hi = hi;
  r.finalize();
  return r;
}

void Model::finalize() {
  for (Block& b : blocks) {
    for (Linear* L : {&b.qkv, &b.proj, &b.fc1, &b.fc2}) L->finalize();
  }
  for (HeadBlock& hb : head) {
    hb.fc1.finalize();
    hb.fc2.finalize();
  }
  out.finalize();
  validate();
  for (Block& b : blocks) b.q = b.qkv.rows(0, W);
  out_parts.clear();
  for (int m = 0; m < M; ++m) out_parts.push_back(out.rows(m * K, (m + 1) * K));
}

void Model::validate() const {
  check(M >= 1 && K >= 2 && W >= 1 && H >= 1 && W % H == 0, "bad shape (M, K, W, H)");
  check(R >= 0 && R <= kMaxRadius, "radius out of [0, 8]");
  check(int(exp_att.size()) == 256 && int(exp_prob.size()) == 256, "exp tables missing");
  check(int64_t(code_embedding.size()) == int64_t(M) * K * W, "code_embedding size");
  check(int(mask_embedding.size()) == W, "mask_embedding size");
  check(int64_t(cond_embedding.size()) == int64_t(std::max(M - 1, 1)) * K * W, "cond size");
  check(int64_t(step_embedding.size()) == int64_t(M) * W, "step_embedding size");
  check(int(blocks.size()) == depth && int(head.size()) == head_depth, "block count");
  const int side = 2 * R + 1;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const Block& b = blocks[i];
    std::string p = "blocks." + std::to_string(i);
    check(b.qkv.dout == 3 * W && b.qkv.din == W, p + ".qkv shape");
    check(b.proj.dout == W && b.proj.din == W, p + ".proj shape");
    check(b.fc1.din == W && b.fc2.dout == W && b.fc2.din == b.fc1.dout, p + " MLP shape");
    check_linear(b.qkv, p + ".qkv");
    check_linear(b.proj, p + ".proj");
    check_linear(b.fc1, p + ".fc1");
    check_linear(b.fc2, p + ".fc2");
    check(b.score_mult >= 1 && b.score_mult < (1 << 11), p + ".score_mult out of range");
    check(b.score_shift >= 0 && b.score_shift <= 40, p + ".score_shift out of range");
    check(int(b.bias.size()) == H * side * side, p + ".bias size");
    check(b.norm1 >= 0 && b.norm1 <= 7 && b.norm2 >= 0 && b.norm2 <= 7, p + " norm exponents");
  }
  for (size_t i = 0; i < head.size(); ++i) {
    std::string p = "head." + std::to_string(i);
    check(head[i].fc1.din == W && head[i].fc2.dout == W && head[i].fc2.din == head[i].fc1.dout,
          p + " shape");
    check_linear(head[i].fc1, p + ".fc1");
    check_linear(head[i].fc2, p + ".fc2");
  }
  check(out.dout == M * K && out.din == W, "out shape");
  check_linear(out, "out");
}

namespace {

struct AttScratch {
  std::vector<int64_t> z, kp;
  std::vector<int> off;
  std::vector<int32_t> num, dots;
  AttScratch(int side, int heads, int head_dim)
      : z(size_t(side) * side),
        kp(size_t(side) * side),
        off(size_t(side) * side),
        num(head_dim),
        dots(size_t(side) * side * heads) {}
};

// dots[j * H + h] = q_h . k_h of the key rows kp[j] (int8 rows of H * Dh; exact int32).
void key_dots_scalar(const int8_t* q, const int8_t* k_cache, const int64_t* kp, int nk, int heads,
                     int head_dim, int32_t* dots) {
  const int stride = heads * head_dim;
  for (int j = 0; j < nk; ++j) {
    const int8_t* kr = k_cache + kp[j] * stride;
    for (int hd = 0; hd < heads; ++hd) {
      int32_t s = 0;
      for (int d = 0; d < head_dim; ++d)
        s += int32_t(q[hd * head_dim + d]) * int32_t(kr[hd * head_dim + d]);
      dots[size_t(j) * heads + hd] = s;
    }
  }
}

#ifdef PQMIM_X86
// AVX2 for head_dim a multiple of 32: |k| x (q * sign(k)) with maddubs (pairs of products of
// int8 magnitudes <= 127: <= 32,258, no int16 saturation), widened by madd with ones.
__attribute__((target("avx2"))) void key_dots_avx2(const int8_t* q, const int8_t* k_cache,
                                                   const int64_t* kp, int nk, int heads,
                                                   int head_dim, int32_t* dots) {
  const int stride = heads * head_dim;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int j = 0; j < nk; ++j) {
    const int8_t* kr = k_cache + kp[j] * stride;
    for (int hd = 0; hd < heads; ++hd) {
      __m256i acc = _mm256_setzero_si256();
      for (int d = 0; d < head_dim; d += 32) {
        const int off = hd * head_dim + d;
        const __m256i kv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kr + off));
        const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + off));
        const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(kv, kv),
                                                  _mm256_sign_epi8(qv, kv));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, ones));
      }
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      dots[size_t(j) * heads + hd] = _mm_cvtsi128_si32(s);
    }
  }
}
#endif

void key_dots(const int8_t* q, const int8_t* k_cache, const int64_t* kp, int nk, int heads,
              int head_dim, int32_t* dots) {
#ifdef PQMIM_X86
  if (head_dim % 32 == 0 && have_avx2())
    return key_dots_avx2(q, k_cache, kp, nk, heads, head_dim, dots);
#endif
  key_dots_scalar(q, k_cache, kp, nk, heads, head_dim, dots);
}

// One query of window_attention (all heads).
PQMIM_CLONES void attend_query(int64_t i, const int8_t* q, const int64_t* q_pos,
                               const int64_t* q_limit, const int8_t* k_cache,
                               const int8_t* v_cache, const int64_t* key_stage, int h, int w,
                               int heads, int head_dim, int radius, int32_t score_mult,
                               int32_t score_shift, const int32_t* bias, const int64_t* exp_table,
                               int32_t* out, AttScratch& sc) {
  const int side = 2 * radius + 1;
  const int stride = heads * head_dim;
  const int64_t pos = q_pos[i];
  const int64_t y = pos / w, x = pos % w;
  int nk = 0;
  for (int dy = -radius; dy <= radius; ++dy) {
    const int64_t ky = y + dy;
    if (ky < 0 || ky >= h) continue;
    for (int dx = -radius; dx <= radius; ++dx) {
      const int64_t kx = x + dx;
      if (kx < 0 || kx >= w) continue;
      const int64_t p = ky * w + kx;
      if (key_stage[p] >= q_limit[i]) continue;
      sc.kp[nk] = p;
      sc.off[nk] = (dy + radius) * side + (dx + radius);
      ++nk;
    }
  }
  // q.k of every visible key and head, (nk, H) int32 (|q.k| < 2^20)
  key_dots(q + i * stride, k_cache, sc.kp.data(), nk, heads, head_dim, sc.dots.data());
  int64_t* z = sc.z.data();
  int32_t* num = sc.num.data();
  for (int hd = 0; hd < heads; ++hd) {
    int32_t* o = out + i * stride + hd * head_dim;
    if (nk == 0) {
      for (int d = 0; d < head_dim; ++d) o[d] = 0;
      continue;
    }
    const int32_t* bh = bias + hd * side * side;
    int64_t zmax = INT64_MIN;
    for (int j = 0; j < nk; ++j) {
      z[j] = round_shift(int64_t(sc.dots[size_t(j) * heads + hd]) * score_mult, score_shift) +
             bh[sc.off[j]];
      zmax = std::max(zmax, z[j]);
    }
    for (int d = 0; d < head_dim; ++d) num[d] = 0;
    int64_t den = 0;
    for (int j = 0; j < nk; ++j) {
      const int32_t e = int32_t(exp2_neg(zmax - z[j], exp_table, kAttExpBits));
      if (e == 0) continue;
      den += e;
      const int8_t* vv = v_cache + sc.kp[j] * stride + hd * head_dim;
      for (int d = 0; d < head_dim; ++d) num[d] += e * int32_t(vv[d]);
    }
    // den >= 1: the maximum key has e = 2^15
    const int64_t dd = 2 * den;
    const double inv = 1.0 / double(dd);
    for (int d = 0; d < head_dim; ++d) o[d] = int32_t(floor_div_inv(2 * int64_t(num[d]) + den, dd, inv));
  }
}

// One row of logits_to_cdfs.
PQMIM_CLONES void cdf_row(const int32_t* l, int k, int64_t total, const int64_t* exp_table,
                          int64_t* e, int32_t* c) {
  int first = 0;
  for (int i = 1; i < k; ++i)
    if (l[i] > l[first]) first = i;
  int64_t sum = 0;
  for (int i = 0; i < k; ++i) {
    e[i] = exp2_neg(int64_t(l[first]) - l[i], exp_table, kProbExpBits);
    sum += e[i];
  }
  const int64_t scale = total - k;
  const double inv = 1.0 / double(sum);
  int64_t fsum = 0;
  for (int i = 0; i < k; ++i) {
    e[i] = 1 + floor_div_inv(e[i] * scale, sum, inv);  // e[i] now holds the frequency
    fsum += e[i];
  }
  e[first] += total - fsum;
  int64_t acc = 0;
  c[0] = 0;
  for (int i = 0; i < k; ++i) {
    acc += e[i];
    c[i + 1] = int32_t(acc);
  }
}

}  // namespace

void window_attention(const int8_t* q, const int64_t* q_pos, const int64_t* q_limit, int64_t nq,
                      const int8_t* k_cache, const int8_t* v_cache, const int64_t* key_stage,
                      int h, int w, int heads, int head_dim, int radius, int32_t score_mult,
                      int32_t score_shift, const int32_t* bias, const int64_t* exp_table,
                      int32_t* out, int num_threads) {
  parallel_for(nq, num_threads, 16, [&](int64_t begin, int64_t end) {
    AttScratch sc(2 * radius + 1, heads, head_dim);
    for (int64_t i = begin; i < end; ++i)
      attend_query(i, q, q_pos, q_limit, k_cache, v_cache, key_stage, h, w, heads, head_dim,
                   radius, score_mult, score_shift, bias, exp_table, out, sc);
  });
}

void logits_to_cdfs(const int32_t* logits, int64_t n, int k, int precision,
                    const int64_t* exp_table, int32_t* cdfs, int num_threads) {
  const int64_t total = int64_t(1) << precision;
  if (k > total) throw std::invalid_argument("logits_to_cdfs: K > 2^precision");
  parallel_for(n, num_threads, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> e(k);
    for (int64_t r = begin; r < end; ++r)
      cdf_row(logits + r * k, k, total, exp_table, e.data(), cdfs + r * (k + 1));
  });
}

// ---- session ----------------------------------------------------------------------------------

Session::Session(const Model& model, int h, int w, const int64_t* key_stage)
    : model_(model), h_(h), w_(w), key_stage_(key_stage, key_stage + int64_t(h) * w) {
  const size_t per_layer = size_t(h) * w * model.W;
  k_cache_.assign(per_layer * model.depth, 0);
  v_cache_.assign(per_layer * model.depth, 0);
}

void Session::attend(int layer, const int8_t* q, const int64_t* pos, const int64_t* limit,
                     int64_t n, int32_t* out, int num_threads) const {
  const Model& m = model_;
  const size_t per_layer = size_t(h_) * w_ * m.W;
  const Block& b = m.blocks[layer];
  window_attention(q, pos, limit, n, k_cache_.data() + per_layer * layer,
                   v_cache_.data() + per_layer * layer, key_stage_.data(), h_, w_, m.H, m.W / m.H,
                   m.R, b.score_mult, b.score_shift, b.bias.data(), m.exp_att.data(), out,
                   num_threads);
}

namespace {

// The rest of a block after attention, for rows [0, n): x += proj(o); x += fc2(act(fc1(norm(x)))).
void block_rest(const Block& b, int width, int32_t* x, const int32_t* o, int64_t n) {
  std::vector<int16_t> a16(size_t(4) * std::max(b.proj.din_pad, b.fc2.din_pad));
  std::vector<int32_t> acc(size_t(4) * std::max({b.proj.dout, b.fc1.dout, b.fc2.dout}));
  std::vector<int16_t> hid(size_t(4) * b.fc2.din_pad);
  for (int64_t r0 = 0; r0 < n; r0 += 4) {
    const int nr = int(std::min<int64_t>(4, n - r0));
    for (int j = 0; j < nr; ++j) {
      for (int i = 0; i < width; ++i) a16[j * b.proj.din_pad + i] = int16_t(o[(r0 + j) * width + i]);
      if (b.proj.din_pad > width) a16[j * b.proj.din_pad + width] = 0;
    }
    gemm(b.proj, a16.data(), nr, acc.data());
    for (int j = 0; j < nr; ++j) {
      int32_t* xr = x + (r0 + j) * width;
      residual_row(b.proj, acc.data() + j * width, xr);
      rms_norm(xr, width, b.norm2, a16.data() + j * b.fc1.din_pad);
      if (b.fc1.din_pad > width) a16[j * b.fc1.din_pad + width] = 0;
    }
    gemm(b.fc1, a16.data(), nr, acc.data());
    const int hd = b.fc1.dout;
    for (int j = 0; j < nr; ++j) {
      act_row(b.fc1, acc.data() + j * hd, b.act, hid.data() + j * b.fc2.din_pad);
      if (b.fc2.din_pad > hd) hid[j * b.fc2.din_pad + hd] = 0;
    }
    gemm(b.fc2, hid.data(), nr, acc.data());
    for (int j = 0; j < nr; ++j) {
      int32_t* xr = x + (r0 + j) * width;
      residual_row(b.fc2, acc.data() + j * width, xr);
    }
  }
}

// norm then a linear with int8 outputs, rows [0, n) of x: the q or qkv projection.
void project(const Linear& L, int norm, int width, const int32_t* x, int64_t n, int8_t* out) {
  std::vector<int16_t> a16(size_t(4) * L.din_pad);
  std::vector<int32_t> acc(size_t(4) * L.dout);
  for (int64_t r0 = 0; r0 < n; r0 += 4) {
    const int nr = int(std::min<int64_t>(4, n - r0));
    for (int j = 0; j < nr; ++j) {
      rms_norm(x + (r0 + j) * width, width, norm, a16.data() + j * L.din_pad);
      if (L.din_pad > width) a16[j * L.din_pad + width] = 0;
    }
    gemm(L, a16.data(), nr, acc.data());
    for (int j = 0; j < nr; ++j)
      epilogue_row(L, acc.data() + j * L.dout, out + (r0 + j) * L.dout);
  }
}

}  // namespace

void Session::set_key_stage(const int64_t* pos, const int64_t* stage, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (pos[i] < 0 || pos[i] >= int64_t(h_) * w_) throw std::out_of_range("set_key_stage: bad pos");
  for (int64_t i = 0; i < n; ++i) key_stage_[pos[i]] = stage[i];
}

void Session::known_stream(const int64_t* codes, const int64_t* pos, const int64_t* stage,
                           int64_t n, int num_threads) {
  const Model& m = model_;
  const int width = m.W;
  for (int64_t i = 0; i < n; ++i) {
    if (pos[i] < 0 || pos[i] >= int64_t(h_) * w_) throw std::out_of_range("known_stream: bad pos");
    for (int s = 0; s < m.M; ++s)
      if (codes[i * m.M + s] < 0 || codes[i * m.M + s] >= m.K)
        throw std::out_of_range("known_stream: code out of [0, K)");
  }
  std::vector<int32_t> x(size_t(n) * width);
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < width; ++c) {
      int64_t v = 0;
      for (int s = 0; s < m.M; ++s) v += m.code_embedding[(size_t(s) * m.K + codes[i * m.M + s]) * width + c];
      x[i * width + c] = clamp_res(v);
    }
  }
  std::vector<int64_t> limit(n);
  for (int64_t i = 0; i < n; ++i) limit[i] = stage[i] + 1;
  std::vector<int8_t> qkv(size_t(n) * 3 * width);
  std::vector<int32_t> o(size_t(n) * width);
  const size_t per_layer = size_t(h_) * w_ * width;
  for (int layer = 0; layer < m.depth; ++layer) {
    const Block& b = m.blocks[layer];
    parallel_for(n, num_threads, 8, [&](int64_t begin, int64_t end) {
      project(b.qkv, b.norm1, width, x.data() + begin * width, end - begin,
              qkv.data() + begin * 3 * width);
    });
    std::vector<int8_t> q(size_t(n) * width);
    for (int64_t i = 0; i < n; ++i) {
      const int8_t* r = qkv.data() + i * 3 * width;
      std::memcpy(q.data() + i * width, r, width);
      std::memcpy(k_cache_.data() + per_layer * layer + pos[i] * width, r + width, width);
      std::memcpy(v_cache_.data() + per_layer * layer + pos[i] * width, r + 2 * width, width);
    }
    attend(layer, q.data(), pos, limit.data(), n, o.data(), num_threads);
    parallel_for(n, num_threads, 8, [&](int64_t begin, int64_t end) {
      block_rest(b, width, x.data() + begin * width, o.data() + begin * width, end - begin);
    });
  }
}

void Session::query_stream(const int64_t* pos, const int64_t* stage, int64_t n, int32_t* xq,
                           int num_threads) const {
  const Model& m = model_;
  const int width = m.W;
  for (int64_t i = 0; i < n; ++i)
    if (pos[i] < 0 || pos[i] >= int64_t(h_) * w_) throw std::out_of_range("query_stream: bad pos");
  for (int64_t i = 0; i < n; ++i) std::memcpy(xq + i * width, m.mask_embedding.data(), width * 4);
  parallel_for(n, num_threads, 8, [&](int64_t begin, int64_t end) {
    const int64_t cnt = end - begin;
    std::vector<int8_t> q(size_t(cnt) * width);
    std::vector<int32_t> o(size_t(cnt) * width);
    int32_t* x = xq + begin * width;
    for (int layer = 0; layer < m.depth; ++layer) {
      const Block& b = m.blocks[layer];
      project(b.q, b.norm1, width, x, cnt, q.data());
      attend(layer, q.data(), pos + begin, stage + begin, cnt, o.data(), 1);
      block_rest(b, width, x, o.data(), cnt);
    }
  });
}

void Session::head_logits(const int32_t* xq, const int64_t* prefix, int64_t n, int m,
                          int32_t* logits, int num_threads) const {
  const Model& md = model_;
  const int width = md.W, k = md.K;
  if (m < 0 || m >= md.M) throw std::out_of_range("head_logits: sub-space out of range");
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j)
      if (prefix[i * md.M + j] < 0 || prefix[i * md.M + j] >= k)
        throw std::out_of_range("head_logits: code out of [0, K)");
  parallel_for(n, num_threads, 8, [&](int64_t begin, int64_t end) {
    const int64_t cnt = end - begin;
    std::vector<int32_t> z(size_t(cnt) * width);
    std::vector<int64_t> v(width);
    for (int64_t i = 0; i < cnt; ++i) {
      const int32_t* xr = xq + (begin + i) * width;
      const int32_t* st = md.step_embedding.data() + size_t(m) * width;
      for (int c = 0; c < width; ++c) v[c] = int64_t(xr[c]) + st[c];
      for (int j = 0; j < m; ++j) {
        const int32_t* e =
            md.cond_embedding.data() + (size_t(j) * k + prefix[(begin + i) * md.M + j]) * width;
        for (int c = 0; c < width; ++c) v[c] += e[c];
      }
      for (int c = 0; c < width; ++c) z[i * width + c] = clamp_res(v[c]);
    }
    std::vector<int16_t> a16(size_t(4) * kMaxInner + 8);
    std::vector<int32_t> acc(size_t(4) * std::max(kMaxInner, k));
    std::vector<int16_t> hid(size_t(4) * kMaxInner + 8);
    for (const HeadBlock& hb : md.head) {
      for (int64_t r0 = 0; r0 < cnt; r0 += 4) {
        const int nr = int(std::min<int64_t>(4, cnt - r0));
        for (int j = 0; j < nr; ++j) {
          rms_norm(z.data() + (r0 + j) * width, width, hb.norm, a16.data() + j * hb.fc1.din_pad);
          if (hb.fc1.din_pad > width) a16[j * hb.fc1.din_pad + width] = 0;
        }
        gemm(hb.fc1, a16.data(), nr, acc.data());
        const int hd = hb.fc1.dout;
        for (int j = 0; j < nr; ++j) {
          act_row(hb.fc1, acc.data() + j * hd, hb.act, hid.data() + j * hb.fc2.din_pad);
          if (hb.fc2.din_pad > hd) hid[j * hb.fc2.din_pad + hd] = 0;
        }
        gemm(hb.fc2, hid.data(), nr, acc.data());
        for (int j = 0; j < nr; ++j) {
          int32_t* zr = z.data() + (r0 + j) * width;
          residual_row(hb.fc2, acc.data() + j * width, zr);
        }
      }
    }
    const Linear& L = md.out_parts[m];
    for (int64_t r0 = 0; r0 < cnt; r0 += 4) {
      const int nr = int(std::min<int64_t>(4, cnt - r0));
      for (int j = 0; j < nr; ++j) {
        rms_norm(z.data() + (r0 + j) * width, width, md.out_norm, a16.data() + j * L.din_pad);
        if (L.din_pad > width) a16[j * L.din_pad + width] = 0;
      }
      gemm(L, a16.data(), nr, acc.data());
      for (int j = 0; j < nr; ++j) {
        int32_t* lo = logits + (begin + r0 + j) * k;
        epilogue_row(L, acc.data() + j * k, lo);
      }
    }
  });
}

}  // namespace intmim
}  // namespace pqmim
