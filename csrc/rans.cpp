// rANS coder core. Layout and parameters are described in rans.hpp.
#include "rans.hpp"

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <thread>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pqmim::rans {
namespace {

std::string row_msg(const char* what, int64_t row) {
  return std::string(what) + " row " + std::to_string(row);
}

// Joins every started thread when it goes out of scope, exceptions included (a joinable
// std::thread destroyed unjoined would call std::terminate).
struct JoinAll {
  std::vector<std::thread>& pool;
  ~JoinAll() {
    for (auto& th : pool)
      if (th.joinable()) th.join();
  }
};

// Starts fn() on new threads until `pool` holds `count` of them or the system refuses one
// (thread or address-space limit): callers do the work of the threads that did not start
// themselves, so a refusal only means less parallelism, never an error.
template <class Fn>
void start_threads(std::vector<std::thread>& pool, int count, const Fn& fn) {
  try {
    pool.reserve(static_cast<size_t>(count));
    while (static_cast<int>(pool.size()) < count) pool.emplace_back(fn, static_cast<int>(pool.size()));
  } catch (...) {  // std::system_error (EAGAIN) or std::bad_alloc: keep what started
  }
}

// Runs fn(lo, hi) over [0, n) split into contiguous chunks, one thread per chunk; chunks whose
// thread could not be started run on the calling thread after its own (same results). If
// chunks throw, the exception of the lowest chunk wins, so the reported row is the first bad
// one.
template <class Fn>
void parallel_for(int64_t n, int threads, int64_t work_per_item, Fn fn) {
  constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;
  int64_t useful = std::max<int64_t>(1, (n * work_per_item) / kMinWorkPerThread);
  int t = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(threads), useful, n}));
  if (t <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<size_t>(t));
  auto run = [&](int c) {
    int64_t lo = n * c / t, hi = n * (c + 1) / t;
    try {
      fn(lo, hi);
    } catch (...) {
      errors[static_cast<size_t>(c)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  {
    JoinAll join{pool};
    start_threads(pool, t - 1, [&](int i) { run(i + 1); });
    run(0);
    for (int c = 1 + static_cast<int>(pool.size()); c < t; ++c) run(c);
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Requests the row PQMIM_PREFETCH_BYTES / (4 K) rows (at least one) after row r, when it is
// below hi: the quantiser's first pass over a row otherwise waits on memory, and one row
// ahead is too close for short rows.
#ifndef PQMIM_PREFETCH_BYTES
#define PQMIM_PREFETCH_BYTES 4096
#endif
inline void prefetch_ahead(const float* probs, int64_t r, int64_t hi, int64_t k) {
  const int64_t ahead = std::max<int64_t>(1, PQMIM_PREFETCH_BYTES / (4 * k));
  if (r + ahead >= hi) return;
  const float* p = probs + (r + ahead) * k;
  for (int64_t i = 0; i < k; i += 16) __builtin_prefetch(p + i);
}

void check_symbol(int64_t s, int64_t k, int64_t i) {
  if (s < 0 || s >= k)
    throw Error("symbols[" + std::to_string(i) + "] = " + std::to_string(s) +
                " is out of range [0, " + std::to_string(k) + ")");
}

void check_alphabet(int64_t k, int precision) {
  if (k < 1) throw Error("alphabet size K must be >= 1, got " + std::to_string(k));
  if (k > (int64_t{1} << precision))
    throw Error("alphabet size K = " + std::to_string(k) + " exceeds 2^precision = " +
                std::to_string(int64_t{1} << precision) +
                " (every symbol needs a frequency >= 1); raise the precision");
}

void put_u32(uint8_t* p, uint32_t v) {
  for (int b = 0; b < 4; ++b) p[b] = static_cast<uint8_t>(v >> (8 * b));
}

uint64_t get_le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int b = 0; b < bytes; ++b) v |= uint64_t{p[b]} << (8 * b);
  return v;
}

// Reverse-order (last symbol first) interleaved encoding. Each lane's symbols are encoded in
// the reverse of the order its decoder consumes them and every emitted word is pushed on a
// stack (`out`, filled upwards); the decoder pops them, i.e. reads the stack top-down.
template <int W>
size_t encode_lanes(const uint32_t* start, const uint32_t* freq, int64_t n, int precision,
                    uint64_t* state, uint32_t* out) {
  // A state x may absorb a symbol of frequency f without leaving [kLow, kLow * 2^32) iff
  // x < (kLow >> P << 32) * f; otherwise its low word is flushed first (once is enough).
  const uint64_t bound = (kLow >> precision) << 32;
  size_t w = 0;
  auto put = [&](uint64_t& x, uint32_t s, uint32_t f) {
    if (x >= bound * f) {
      out[w++] = static_cast<uint32_t>(x);
      x >>= 32;
    }
    x = ((x / f) << precision) + (x % f) + s;
  };
  int64_t full = n - n % W;
  for (int64_t j = n - 1; j >= full; --j) put(state[j % W], start[j], freq[j]);
  for (int64_t g = full - W; g >= 0; g -= W)
    for (int l = W - 1; l >= 0; --l) put(state[l], start[g + l], freq[g + l]);
  return w;
}

}  // namespace

void U32Buffer::resize(size_t n) {
  if (n > capacity_) {
    // Large buffers are 2 MiB aligned and marked for huge pages (THP in "madvise" mode);
    // growth is geometric so that many small calls stay linear.
    constexpr size_t kHuge = size_t{1} << 21;
    size_t cap = std::max(n, 2 * capacity_);
    size_t bytes = cap * sizeof(uint32_t);
    const size_t align = bytes >= 2 * kHuge ? kHuge : 64;
    bytes = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, bytes);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHuge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only; failure is harmless
#endif
    if (size_ > 0) std::memcpy(p, data_, size_ * sizeof(uint32_t));
    std::free(data_);
    data_ = static_cast<uint32_t*>(p);
    capacity_ = bytes / sizeof(uint32_t);
  }
  size_ = n;
}

void U32Buffer::release() {
  std::free(data_);
  data_ = nullptr;
  size_ = capacity_ = 0;
}

void check_precision(int precision) {
  if (precision < 1 || precision > kMaxPrecision)
    throw Error("precision must be in [1, " + std::to_string(kMaxPrecision) + "], got " +
                std::to_string(precision));
}

// Spec (kept byte-identical with pqmim_kernels.reference.rans.quantize_probs; every float
// operation is one IEEE float32 operation, compiled with -ffp-contract=off so no FMA):
//  1. m = max p, a = first index of m; m = frac * 2^e with frac in [0.5, 1) (frexp).
//  2. t_i = floor(p_i * 2^(24 - e)): integers in [0, 2^24), exact scaling by a power of two,
//     so T = sum t_i is an exact integer sum and independent of summation order.
//  3. s = float(2^P) / float(T); f_i = max(1, floor(float(t_i) * s)); d = 2^P - sum f_i.
//     If f_a + d >= 1: f_a += d, done (the usual case: the top symbol absorbs the residue).
//  4. Otherwise (many symbols bumped to 1, only possible when K^2 >~ 2^P): reserve 1 per
//     symbol, s = float(2^P - K) / float(T), f_i = 1 + floor(float(t_i) * s),
//     d = 2^P - sum f_i; if d >= 0: f_a += d, else remove the excess one symbol at a time in
//     index order, taking at most f_i - 1 from each.
// The row loops below are compiled for AVX-512 / AVX2 / baseline and picked at load time. The
// results are identical on every path: the float ops are single IEEE operations applied
// elementwise (vectorising changes no rounding), and the only reductions are max and integer
// sums, which do not depend on order.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(PQMIM_NO_CLONES)
#define PQMIM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PQMIM_CLONES
#endif

namespace {

struct RowScan {
  float max;
  bool bad;
};

PQMIM_CLONES RowScan scan_row(const float* p, int64_t k) {
  // The max is taken over the bit patterns with the sign cleared: for non-negative floats the
  // integer order is the float order, and an integer max vectorises (a float max with NaN
  // semantics does not). inf/NaN patterns compare above FLT_MAX's.
  int32_t mb = 0;
  int bad = 0;
  for (int64_t i = 0; i < k; ++i) {
    float v = p[i];
    int32_t b;
    std::memcpy(&b, &v, sizeof b);
    bad |= !(v >= 0.0f);  // negative or NaN (-0.0 passes)
    b &= 0x7fffffff;
    mb = b > mb ? b : mb;
  }
  float m;
  std::memcpy(&m, &mb, sizeof m);
  return {m, bad != 0 || !(m <= FLT_MAX)};
}

struct Weights {
  int64_t total;  // sum of t_i
  int32_t first;  // first index holding the row maximum m
};

// One element of sum_weights: stores t_i, adds it to part, min-reduces the index of m.
inline void weigh(const float* p, int32_t i, int32_t k, float c1, float c2, float m,
                  uint32_t* t, int32_t& part, int32_t& first) {
  const int32_t w = static_cast<int32_t>(std::floor((p[i] * c1) * c2));  // exact
  t[i] = static_cast<uint32_t>(w);
  part += w;
  const int32_t cand = p[i] == m ? i : k;
  first = cand < first ? cand : first;
}

// T = sum floor(p_i c1 c2) and the first index of m, in one vectorised pass (the index as a
// min-reduction instead of an early-exit scan, which would be scalar). The integer weights
// t_i are also stored in t (< 2^24 each), so the frequency pass need not recompute them.
// Partial sums are kept in int32 over blocks of 64 (64 * 2^24 = 2^30) and widened once per
// block: widening every element to int64 cost a fifth of the pass.
PQMIM_CLONES Weights sum_weights(const float* p, int32_t k, float c1, float c2, float m,
                                 uint32_t* t) {
  constexpr int32_t kBlock = 64;
  int64_t total = 0;
  int32_t first = k;
  int32_t b = 0;
  for (; b + kBlock <= k; b += kBlock) {
    int32_t part = 0;
    for (int32_t j = 0; j < kBlock; ++j) weigh(p, b + j, k, c1, c2, m, t, part, first);
    total += part;
  }
  int32_t part = 0;
  for (; b < k; ++b) weigh(p, b, k, c1, c2, m, t, part, first);
  return {total + part, first};
}

// In place: f_i = max(1, floor(float(t_i) * s)) from the weights t_i that sum_weights left in
// f (float(t_i) is exact, t_i < 2^24); returns sum f_i. The sum fits in 32 bits: each term is
// at most t_i * s * (1 + 2^-23) + 1 with sum t_i * s = 2^P, so it stays below 2^P + 2K + 1.
PQMIM_CLONES uint32_t freqs_from_weights(uint32_t* f, int64_t k, float s) {
  uint32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    int32_t q = static_cast<int32_t>(std::floor(static_cast<float>(static_cast<int32_t>(f[i])) * s));
    q = q < 1 ? 1 : q;
    f[i] = static_cast<uint32_t>(q);
    sum += static_cast<uint32_t>(q);
  }
  return sum;
}

// f_i = 1 + floor(floor(p_i c1 c2) * s) from the probabilities (step 4: one reserved per
// symbol; the floor is >= 0 as t, s >= 0); returns sum f_i. Used by the rare second pass of
// quantize_row, after freqs_from_weights overwrote the weights in f.
PQMIM_CLONES int64_t reserved_freqs(const float* p, int64_t k, float c1, float c2, float s,
                                    uint32_t* f) {
  int64_t sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    float t = std::floor((p[i] * c1) * c2);
    int32_t q = 1 + static_cast<int32_t>(std::floor(t * s));  // <= 2^25 (t <= T)
    f[i] = static_cast<uint32_t>(q);
    sum += q;
  }
  return sum;
}

}  // namespace

static PQMIM_CLONES uint32_t sum_u32(const uint32_t* f, int64_t n) {
  uint32_t c = 0;  // sums of frequencies stay <= 2^24
  for (int64_t i = 0; i < n; ++i) c += f[i];
  return c;
}

// The symbol s whose interval [sum f[0..s), sum f[0..s]) holds `slot` (< sum f = 2^P, so s < k
// for any slot); *start receives sum f[0..s). Whole blocks of 32 frequencies are skipped with
// vectorised block sums; only the last block is scanned one symbol at a time.
static PQMIM_CLONES int64_t find_slot(const uint32_t* f, int64_t k, uint32_t slot,
                                      uint32_t* start) {
  constexpr int64_t kBlock = 32;
  uint32_t c = 0;
  int64_t s = 0;
  for (; s + kBlock <= k; s += kBlock) {
    uint32_t b = 0;
    for (int64_t j = 0; j < kBlock; ++j) b += f[s + j];
    if (c + b > slot) break;
    c += b;
  }
  // Bounded by k - 1: only frequencies that do not sum to 2^P (a row changed by another
  // thread while it was read) could otherwise run past the row.
  while (s < k - 1 && c + f[s] <= slot) c += f[s++];
  *start = c;
  return s;
}

namespace {
// 2^n as a float for n in [-126, 127] (normal range), exactly.
inline float pow2f(int n) {
  uint32_t b = static_cast<uint32_t>(n + 127) << 23;
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
}  // namespace

void quantize_row(const float* p, int64_t k, int precision, uint32_t* f, int64_t row) {
  RowScan sc = scan_row(p, k);
  if (sc.bad) throw Error(row_msg("probs", row) + " contains NaN, infinite or negative values");
  const float m = sc.max;
  if (m == 0.0f) throw Error(row_msg("probs", row) + " sums to zero (all probabilities are 0)");
  // e = frexp exponent of m, read from the bits for normal m (m > 0 here).
  int e = 0;
  uint32_t mbits;
  std::memcpy(&mbits, &m, sizeof mbits);
  if (mbits >= 0x00800000u)
    e = static_cast<int>(mbits >> 23) - 126;
  else
    std::frexp(m, &e);
  // 2^(24 - e) can exceed the float range for tiny m (e down to -148): split into two exact
  // power-of-two factors (both normal: 2^-104 .. 2^127 and 1 .. 2^45); the first product is
  // normal and exact, the second exact too.
  int sh = 24 - e;
  float c1 = pow2f(std::min(sh, 127));
  float c2 = pow2f(std::max(sh - 127, 0));
  const Weights w = sum_weights(p, static_cast<int32_t>(k), c1, c2, m, f);
  const int64_t total = w.total;
  const int64_t a = w.first;
  if (a >= k || total <= 0)  // only if another thread changed the row between the two passes
    throw Error(row_msg("probs", row) + " changed while it was being read (another thread "
                "wrote to the array during the call)");
  const int64_t M = int64_t{1} << precision;
  const float tf = static_cast<float>(total);
  int64_t d = M - static_cast<int64_t>(freqs_from_weights(f, k, static_cast<float>(M) / tf));
  if (static_cast<int64_t>(f[a]) + d >= 1) {
    f[a] = static_cast<uint32_t>(static_cast<int64_t>(f[a]) + d);
    return;
  }
  d = M - reserved_freqs(p, k, c1, c2, static_cast<float>(M - k) / tf, f);
  if (d >= 0) {
    f[a] += static_cast<uint32_t>(d);
    return;
  }
  for (int64_t i = 0; i < k && d < 0; ++i) {
    int64_t take = std::min<int64_t>(f[i] - 1, -d);
    f[i] -= static_cast<uint32_t>(take);
    d += take;
  }
}

void quantize_probs(const float* probs, int64_t n, int64_t k, int precision, int32_t* cdfs,
                    int num_threads) {
  check_precision(precision);
  check_alphabet(k, precision);
  parallel_for(n, num_threads, k, [&](int64_t lo, int64_t hi) {
    std::vector<uint32_t> f(static_cast<size_t>(k));
    for (int64_t r = lo; r < hi; ++r) {
      quantize_row(probs + r * k, k, precision, f.data(), r);
      int32_t* c = cdfs + r * (k + 1);
      uint32_t acc = 0;
      c[0] = 0;
      for (int64_t i = 0; i < k; ++i) {
        acc += f[i];
        c[i + 1] = static_cast<int32_t>(acc);
      }
    }
  });
}

namespace {

// Nonzero unless c[0..k] is 0, strictly increasing, 2^precision. No early exit, so the loop
// vectorises (two overlapping loads and a compare per 8 or 16 entries): validating a row
// costs about one streaming read of it.
PQMIM_CLONES int cdf_row_bad(const int32_t* c, int64_t k, int32_t total) {
  int bad = (c[0] != 0) | (c[k] != total);
  for (int64_t i = 0; i < k; ++i) bad |= c[i] >= c[i + 1];
  return bad;
}

// The error for a row that cdf_row_bad refused: what is wrong, at which entry.
[[noreturn]] void throw_bad_cdf_row(const char* name, const int32_t* c, int64_t r, int64_t k,
                                    int64_t total) {
  const std::string row = row_msg(name, r);
  if (c[0] != 0 || c[k] != total)
    throw Error(row + " must start at 0 and end at 2^precision = " + std::to_string(total) +
                ", got " + std::to_string(c[0]) + " .. " + std::to_string(c[k]));
  int64_t i = 0;
  while (i < k - 1 && c[i] < c[i + 1]) ++i;
  throw Error(row + " is not strictly increasing at entry " + std::to_string(i + 1) + " (" +
              std::to_string(c[i]) + " then " + std::to_string(c[i + 1]) + ")");
}

}  // namespace

void check_cdf_table(const int32_t* table, int64_t rows, int64_t k, int precision,
                     const char* name) {
  check_alphabet(k, precision);
  const int32_t M = int32_t{1} << precision;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t* c = table + r * (k + 1);
    if (cdf_row_bad(c, k, M)) throw_bad_cdf_row(name, c, r, k, M);
  }
}

CallGuard::CallGuard(std::atomic<bool>& busy, const char* what) : busy_(busy) {
  if (busy_.exchange(true, std::memory_order_acquire))
    throw InUse(std::string(what) + " is in use by another thread: use one " + what +
                " per thread (separate objects run in parallel)");
}

// ----------------------------------------------------------------------------------------
// Encoder

Encoder::Encoder(int precision, int lanes, int num_threads, Framing framing)
    : precision_(precision), lanes_(lanes), num_threads_(std::max(1, num_threads)),
      framing_(framing) {
  check_precision(precision);
  if (lanes != 0 && lanes != 1 && lanes != 2 && lanes != 4 && lanes != 8)
    throw Error("lanes must be 0 (automatic), 1, 2, 4 or 8, got " + std::to_string(lanes));
}

int64_t Encoder::pending() const {
  CallGuard guard(busy_, "RansEncoder");
  return static_cast<int64_t>(start_.size());
}

void Encoder::push_probs(const int64_t* symbols, const float* probs, int64_t n, int64_t k) {
  CallGuard guard(busy_, "RansEncoder");
  check_alphabet(k, precision_);
  size_t base = start_.size();
  start_.resize(base + static_cast<size_t>(n));
  freq_.resize(base + static_cast<size_t>(n));
  try {
    parallel_for(n, num_threads_, k, [&](int64_t lo, int64_t hi) {
      std::vector<uint32_t> f(static_cast<size_t>(k));
      for (int64_t r = lo; r < hi; ++r) {
        prefetch_ahead(probs, r, hi, k);
        int64_t s = symbols[r];
        check_symbol(s, k, r);
        quantize_row(probs + r * k, k, precision_, f.data(), r);
        start_[base + r] = sum_u32(f.data(), s);
        freq_[base + r] = f[s];
      }
    });
  } catch (...) {
    start_.resize(base);  // a failed call leaves the encoder as it was
    freq_.resize(base);
    throw;
  }
}

void Encoder::push_cdfs(const int64_t* symbols, const int32_t* cdfs, int64_t n, int64_t k) {
  CallGuard guard(busy_, "RansEncoder");
  check_alphabet(k, precision_);
  const int32_t M = int32_t{1} << precision_;
  const int64_t row = k + 1;
  size_t base = start_.size();
  start_.resize(base + static_cast<size_t>(n));
  freq_.resize(base + static_cast<size_t>(n));
  uint32_t* st = start_.data() + base;
  uint32_t* fr = freq_.data() + base;
  // Every row is checked in full (0, strictly increasing, 2^P): a row that is only locally
  // valid around its symbol can give overlapping intervals, i.e. a stream that decodes to
  // other symbols and still passes the final-state check. The check reads each row once,
  // sequentially, split over the encoder's threads like the float path.
  try {
    parallel_for(n, num_threads_, row, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t s = symbols[r];
        const int32_t* c = cdfs + r * row;
        check_symbol(s, k, r);
        if (cdf_row_bad(c, k, M)) {
          if (c[s] < 0 || c[s] >= c[s + 1] || c[s + 1] > M || c[k] != M ||
              (s == 0 && c[0] != 0))  // the symbol's own interval or the total
            throw Error(row_msg("cdfs", r) + " is not a valid CDF for symbol " +
                        std::to_string(s) + " (rows must increase strictly from 0 to "
                        "2^precision = " + std::to_string(M) + ")");
          throw_bad_cdf_row("cdfs", c, r, k, M);
        }
        // Read once into locals and re-checked: another thread writing to the array during
        // the call must not leave a zero frequency for finish() to divide by.
        const int32_t a = c[s], b = c[s + 1];
        if (!(0 <= a && a < b && b <= M))
          throw Error(row_msg("cdfs", r) + " changed while it was being read (another "
                      "thread wrote to the array during the call)");
        st[r] = static_cast<uint32_t>(a);
        fr[r] = static_cast<uint32_t>(b - a);
      }
    });
  } catch (...) {
    start_.resize(base);  // a failed call leaves the encoder as it was
    freq_.resize(base);
    throw;
  }
}

void Encoder::push_indexed(const int64_t* symbols, const int64_t* indexes, int64_t n,
                           const int32_t* table, int64_t tables, int64_t k) {
  CallGuard guard(busy_, "RansEncoder");
  check_cdf_table(table, tables, k, precision_);
  const int32_t M = int32_t{1} << precision_;
  size_t base = start_.size();
  start_.resize(base + static_cast<size_t>(n));
  freq_.resize(base + static_cast<size_t>(n));
  uint32_t* st = start_.data() + base;
  uint32_t* fr = freq_.data() + base;
  // One pass: range checks (one unsigned compare each) and the table lookups together.
  for (int64_t r = 0; r < n; ++r) {
    const int64_t s = symbols[r], t = indexes[r];
    if (static_cast<uint64_t>(s) >= static_cast<uint64_t>(k) ||
        static_cast<uint64_t>(t) >= static_cast<uint64_t>(tables)) {
      start_.resize(base);  // a failed call leaves the encoder as it was
      freq_.resize(base);
      check_symbol(s, k, r);
      throw Error("indexes[" + std::to_string(r) + "] = " + std::to_string(t) +
                  " is out of range [0, " + std::to_string(tables) + ")");
    }
    const int32_t* c = table + t * (k + 1) + s;
    const int32_t a = c[0], b = c[1];  // once, re-checked (as in push_cdfs)
    if (!(0 <= a && a < b && b <= M)) {
      start_.resize(base);
      freq_.resize(base);
      throw Error(row_msg("cdf_table", t) + " changed while it was being read (another "
                  "thread wrote to the array during the call)");
    }
    st[r] = static_cast<uint32_t>(a);
    fr[r] = static_cast<uint32_t>(b - a);
  }
}

std::vector<uint8_t> Encoder::finish() {
  CallGuard guard(busy_, "RansEncoder");
  const int64_t n = static_cast<int64_t>(start_.size());
  std::vector<uint8_t> bytes;
  if (n == 0) return bytes;
  const int lanes = lanes_for(lanes_, n);
  const bool compact = framing_ == Framing::kCompact && lanes == 1;
  uint64_t state[kMaxLanes];
  std::fill(state, state + kMaxLanes, compact ? 0 : kLow);
  // At most one word per symbol (plus the compact final flush), usually far fewer: left
  // uninitialised so that only the pages actually written are ever touched.
  std::unique_ptr<uint32_t[]> stack(new uint32_t[static_cast<size_t>(n) + 1]);
  size_t words = 0;
  switch (lanes) {
    case 1: words = encode_lanes<1>(start_.data(), freq_.data(), n, precision_, state, stack.get()); break;
    case 2: words = encode_lanes<2>(start_.data(), freq_.data(), n, precision_, state, stack.get()); break;
    case 4: words = encode_lanes<4>(start_.data(), freq_.data(), n, precision_, state, stack.get()); break;
    default: words = encode_lanes<8>(start_.data(), freq_.data(), n, precision_, state, stack.get()); break;
  }
  uint8_t* p = nullptr;
  if (compact) {
    // Final flush (rans.hpp): a state of more than 32 bits gives its low word, read first;
    // the head is what is left, in as few bytes as it needs (none for state 0, which can
    // only happen when nothing was emitted: any flush leaves the state >= kLow).
    uint64_t x = state[0];
    if (x >> 32) {
      stack[words++] = static_cast<uint32_t>(x);
      x >>= 32;
    }
    int head = 0;
    while (head < 4 && (x >> (8 * head)) != 0) ++head;
    bytes.resize(static_cast<size_t>(head) + 4 * words);
    p = bytes.data();
    for (int b = 0; b < head; ++b) *p++ = static_cast<uint8_t>(x >> (8 * b));
  } else {
    // Symbols of frequency 2^P (alphabet size 1) at the end leave every state as it was:
    // their count goes in the header so that decoding past the end always fails.
    const uint32_t M = uint32_t{1} << precision_;
    uint64_t trailing = 0;
    while (static_cast<int64_t>(trailing) < n && freq_[static_cast<size_t>(n) - 1 - trailing] == M)
      ++trailing;
    uint8_t varint[10];
    int vlen = 0;
    for (uint64_t v = trailing; v != 0; v >>= 7)
      varint[vlen++] = static_cast<uint8_t>((v & 127) | (v > 127 ? 128 : 0));
    // Lane 0 is written in as few bytes as its value needs (5..8; states are >= 2^31 so 4
    // bytes never suffice), the decoder infers the count from the length modulo 4.
    int len0 = 5;
    while (len0 < 8 && (state[0] >> (8 * len0)) != 0) ++len0;
    bytes.resize(1 + static_cast<size_t>(vlen) + len0 + 8 * static_cast<size_t>(lanes - 1) +
                 4 * words);
    int log2_lanes = lanes == 1 ? 0 : lanes == 2 ? 1 : lanes == 4 ? 2 : 3;
    bytes[0] = static_cast<uint8_t>(log2_lanes | (trailing ? 4 : 0) | ((precision_ - 1) << 3));
    p = bytes.data() + 1;
    for (int b = 0; b < vlen; ++b) *p++ = varint[b];
    for (int b = 0; b < len0; ++b) *p++ = static_cast<uint8_t>(state[0] >> (8 * b));
    for (int l = 1; l < lanes; ++l)
      for (int b = 0; b < 8; ++b) *p++ = static_cast<uint8_t>(state[l] >> (8 * b));
  }
  for (size_t i = words; i-- > 0; p += 4) put_u32(p, stack[i]);
  start_.release();
  freq_.release();
  return bytes;
}

// ----------------------------------------------------------------------------------------
// Decoder

Decoder::Decoder(const uint8_t* data, size_t size, int precision, int num_threads,
                 Framing framing, int64_t symbols, int lanes)
    : data_(data, data + size), precision_(precision), num_threads_(std::max(1, num_threads)),
      expected_(symbols) {
  check_precision(precision);
  if (lanes != 0 && lanes != 1 && lanes != 2 && lanes != 4 && lanes != 8)
    throw Error("lanes must be 0 (automatic), 1, 2, 4 or 8, got " + std::to_string(lanes));
  if (framing == Framing::kCompact) {
    if (symbols < 0)
      throw Error("the compact framing needs the number of symbols the stream holds");
    if (lanes_for(lanes, symbols) == 1) {
      parse_compact();
      return;
    }
  }
  parse_standard(lanes);
}

void Decoder::parse_compact() {
  compact_ = true;
  initial_ = 0;
  std::fill(state_, state_ + kMaxLanes, uint64_t{0});
  if (data_.empty()) return;  // final state 0
  const size_t head = (data_.size() - 1) % 4 + 1;
  if (data_[head - 1] == 0)
    throw Error("corrupt compact rANS stream: its head has a leading zero byte");
  uint64_t x = get_le(data_.data(), static_cast<int>(head));
  pos_ = head;
  if (x < kLow && data_.size() - pos_ >= 4) x = (x << 32) | read_word();
  state_[0] = x;
}

void Decoder::parse_standard(int lanes) {
  std::fill(state_, state_ + kMaxLanes, kLow);
  const size_t size = data_.size();
  if (size == 0) return;  // the stream of zero symbols
  uint8_t h = data_[0];
  lanes_ = 1 << (h & 3);
  int stream_precision = (h >> 3) + 1;
  if (stream_precision != precision_)
    throw Error("stream was written with precision " + std::to_string(stream_precision) +
                " but the decoder uses precision " + std::to_string(precision_) +
                " (or the bytes are not a rANS stream)");
  if (lanes != 0 && lanes != lanes_)
    throw Error("stream has " + std::to_string(lanes_) + " lanes but the decoder was told " +
                std::to_string(lanes));
  pos_ = 1;
  if (h & 4) {  // LEB128 count of trailing K = 1 symbols, canonical and >= 1
    uint64_t v = 0;
    for (int shift = 0;; shift += 7) {
      if (pos_ >= size || shift > 56)
        throw Error("corrupt rANS stream: its trailing-symbol count is truncated or too long");
      const uint8_t b = data_[pos_++];
      v |= uint64_t{b & 127u} << shift;
      if (!(b & 128)) {
        if (b == 0) throw Error("corrupt rANS stream: its trailing-symbol count is not canonical");
        break;
      }
    }
    trailing_ = static_cast<int64_t>(v);
    if (expected_ >= 0 && trailing_ > expected_)
      throw Error("corrupt rANS stream: it ends with more symbols of alphabet size 1 (" +
                  std::to_string(trailing_) + ") than it holds (" + std::to_string(expected_) +
                  ")");
  }
  size_t fixed = pos_ + 8 * static_cast<size_t>(lanes_ - 1);
  if (size < fixed + 5)
    throw Error("rANS stream is truncated: " + std::to_string(size) + " bytes is shorter "
                "than its header and states");
  static constexpr int kLen0[4] = {8, 5, 6, 7};
  int len0 = kLen0[(size - fixed) % 4];
  state_[0] = get_le(data_.data() + pos_, len0);
  pos_ += static_cast<size_t>(len0);
  for (int l = 1; l < lanes_; ++l, pos_ += 8) state_[l] = get_le(data_.data() + pos_, 8);
  for (int l = 0; l < lanes_; ++l)
    if (state_[l] < kLow || state_[l] >= (kLow << 32))
      throw Error("corrupt rANS stream: initial state of lane " + std::to_string(l) +
                  " is out of range");
}

// Callers have checked that 4 bytes are left.
uint32_t Decoder::read_word() {
  uint32_t w = static_cast<uint32_t>(get_le(data_.data() + pos_, 4));
  pos_ += 4;
  return w;
}

void Decoder::throw_out_of_bytes() const {
  throw Error("rANS stream is truncated or corrupt: ran out of bytes after decoding " +
              std::to_string(count_) + " symbols (or more symbols were asked for than it "
              "holds)");
}

bool Decoder::at_end() const {
  if (pos_ != data_.size()) return false;
  for (int l = 0; l < lanes_; ++l)
    if (state_[l] != initial_) return false;
  return true;
}

void Decoder::before_pop(int64_t n, int64_t k) {
  if (n <= 0) return;
  if (expected_ >= 0 && n > expected_ - count_)
    throw Error("decoding past the end of the rANS stream: it holds " +
                std::to_string(expected_) + " symbols, " + std::to_string(count_) +
                " are decoded and " + std::to_string(n) + " more were asked for");
  if (data_.empty() && !compact_)
    throw Error("cannot decode " + std::to_string(n) +
                " symbols from an empty rANS stream (it holds zero symbols)");
  // K = 1 symbols change no state: at the end of the stream only its trailing count says how
  // many are left (a K >= 2 symbol there runs out of bytes instead).
  if (k == 1 && !compact_ && at_end()) {
    if (n > trailing_ - trailing_used_)
      throw Error("decoding past the end of the rANS stream: after " +
                  std::to_string(count_) + " symbols it holds " +
                  std::to_string(trailing_ - trailing_used_) + " more (of alphabet size 1), " +
                  std::to_string(n) + " were asked for");
    trailing_used_ += n;
  }
}

namespace {
// One decode step for lane state x given the symbol's interval [start, start + freq).
inline void advance(uint64_t& x, uint64_t slot, uint32_t start, uint32_t freq, int precision) {
  x = freq * (x >> precision) + slot - start;
}
}  // namespace

namespace {
// Ring of quantised row blocks shared by the decoding thread and its helpers (pop_probs with
// threads). Block j (rows [j * rows, (j + 1) * rows)) lives in slot j % slots. Any thread
// claims the next block to quantise, at most `slots` blocks ahead of the decoder, so a slot
// is only overwritten after the block that was in it has been decoded.
struct BlockRing {
  int64_t blocks = 0, slots = 0;
  std::unique_ptr<std::atomic<int64_t>[]> ready;  // per slot: the block it holds, or -1
  std::vector<std::exception_ptr> errors;         // per slot: the block's quantiser error
  std::atomic<int64_t> next{0};                   // first block nobody has claimed
  std::atomic<int64_t> consumed{0};               // blocks fully decoded
  std::atomic<bool> abort{false};

  // The next block to quantise, or -1 when none may be claimed now.
  int64_t claim() {
    int64_t j = next.load(std::memory_order_relaxed);
    while (j < blocks && j < consumed.load(std::memory_order_acquire) + slots)
      if (next.compare_exchange_weak(j, j + 1, std::memory_order_acq_rel)) return j;
    return -1;
  }
};
}  // namespace

int64_t Decoder::decoded() const {
  CallGuard guard(busy_, "RansDecoder");
  return count_;
}

size_t Decoder::remaining_bytes() const {
  CallGuard guard(busy_, "RansDecoder");
  return data_.size() - pos_;
}

void Decoder::pop_probs(const float* probs, int64_t n, int64_t k, int64_t* out) {
  CallGuard guard(busy_, "RansDecoder");
  check_alphabet(k, precision_);
  before_pop(n, k);
  const uint64_t mask = (uint64_t{1} << precision_) - 1;
  auto decode_row = [&](int64_t r, const uint32_t* f) {
    uint64_t& x = state_[count_ & (lanes_ - 1)];
    uint64_t slot = x & mask;
    uint32_t c = 0;
    int64_t s = find_slot(f, k, static_cast<uint32_t>(slot), &c);
    advance(x, slot, c, f[s], precision_);
    renorm(x);
    out[r] = s;
    ++count_;
  };
  // Blocks of ~64 KiB of frequencies, 16 of them per thread in the ring: a deep ring absorbs
  // the jitter of the decoding thread, which also quantises whenever its next block is not
  // ready (2 per thread ran at 1.4x one thread on 2 cores, 16 at 1.7-2x; bench/README.md).
  const int64_t rows = std::max<int64_t>(1, (int64_t{1} << 14) / k);
  const int64_t blocks = (n + rows - 1) / rows;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads_, blocks));
  if (threads <= 1) {
    // Each row is quantised into an L1-resident scratch row and decoded at once.
    std::vector<uint32_t> f(static_cast<size_t>(k));
    for (int64_t r = 0; r < n; ++r) {
      prefetch_ahead(probs, r, n, k);
      quantize_row(probs + r * k, k, precision_, f.data(), r);
      decode_row(r, f.data());
    }
    return;
  }
  // Frequencies do not depend on the stream, so helpers quantise blocks ahead while this
  // thread decodes every block in order (the serial part: slot search and state update) and
  // quantises blocks itself whenever the one it needs next is not ready.
  BlockRing ring;
  ring.blocks = blocks;
  ring.slots = std::min<int64_t>(16 * static_cast<int64_t>(threads), blocks);
  U32Buffer freqs;  // every slot is written before it is read
  freqs.resize(static_cast<size_t>(ring.slots * rows * k));
  ring.ready.reset(new std::atomic<int64_t>[static_cast<size_t>(ring.slots)]);
  for (int64_t s = 0; s < ring.slots; ++s) ring.ready[s].store(-1, std::memory_order_relaxed);
  ring.errors.resize(static_cast<size_t>(ring.slots));
  auto quantize_block = [&](int64_t j) {
    const int64_t slot = j % ring.slots;
    uint32_t* f = freqs.data() + slot * rows * k;
    const int64_t r0 = j * rows, r1 = std::min(n, r0 + rows);
    try {
      for (int64_t r = r0; r < r1; ++r) {
        prefetch_ahead(probs, r, r1, k);
        quantize_row(probs + r * k, k, precision_, f + (r - r0) * k, r);
      }
    } catch (...) {
      ring.errors[static_cast<size_t>(slot)] = std::current_exception();
    }
    ring.ready[slot].store(j, std::memory_order_release);
  };
  auto helper = [&] {
    while (!ring.abort.load(std::memory_order_acquire) &&
           ring.next.load(std::memory_order_relaxed) < blocks) {
      const int64_t j = ring.claim();
      if (j >= 0)
        quantize_block(j);
      else
        std::this_thread::yield();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  struct Joiner {  // stops and joins the helpers on every exit, exceptions included
    BlockRing& ring;
    std::vector<std::thread>& pool;
    ~Joiner() {
      ring.abort.store(true, std::memory_order_release);
      for (auto& th : pool) th.join();
    }
  } joiner{ring, pool};
  // Helpers the system refuses to start (thread or address-space limit) are simply missing:
  // this thread quantises whatever no helper has claimed.
  start_threads(pool, threads - 1, [&](int) { helper(); });
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t slot = j % ring.slots;
    while (ring.ready[slot].load(std::memory_order_acquire) != j) {
      const int64_t c = ring.claim();
      if (c >= 0)
        quantize_block(c);
      else
        std::this_thread::yield();
    }
    if (ring.errors[static_cast<size_t>(slot)])
      std::rethrow_exception(ring.errors[static_cast<size_t>(slot)]);
    const uint32_t* f = freqs.data() + slot * rows * k;
    const int64_t r0 = j * rows, r1 = std::min(n, r0 + rows);
    for (int64_t r = r0; r < r1; ++r) decode_row(r, f + (r - r0) * k);
    ring.consumed.store(j + 1, std::memory_order_release);
  }
}

void Decoder::pop_cdfs(const int32_t* cdfs, int64_t n, int64_t k, int64_t* out) {
  CallGuard guard(busy_, "RansDecoder");
  check_alphabet(k, precision_);
  before_pop(n, k);
  const int64_t M = int64_t{1} << precision_;
  const uint64_t mask = static_cast<uint64_t>(M - 1);
  constexpr int64_t kAhead = 8;
  for (int64_t r = 0; r < n; ++r) {
    if (r + kAhead < n) {  // the first probes of a later row's binary search
      const int32_t* a = cdfs + (r + kAhead) * (k + 1);
      __builtin_prefetch(a + k / 2);
      __builtin_prefetch(a + k / 4);
      __builtin_prefetch(a + 3 * k / 4);
    }
    const int32_t* c = cdfs + r * (k + 1);
    uint64_t& x = state_[count_ & (lanes_ - 1)];
    int64_t slot = static_cast<int64_t>(x & mask);
    // Largest s with c[s] <= slot, found in c[1..k) (valid rows have c[0] = 0 <= slot).
    int64_t s = std::upper_bound(c + 1, c + k, static_cast<int32_t>(slot)) - (c + 1);
    if (c[0] != 0 || c[k] != M || !(c[s] <= slot && slot < c[s + 1]))
      throw Error(row_msg("cdfs", r) + " is not a valid CDF (rows must increase strictly "
                  "from 0 to 2^precision = " + std::to_string(M) + ")");
    advance(x, static_cast<uint64_t>(slot), static_cast<uint32_t>(c[s]),
            static_cast<uint32_t>(c[s + 1] - c[s]), precision_);
    renorm(x);
    out[r] = s;
    ++count_;
  }
}

void Decoder::pop_indexed(const int64_t* indexes, int64_t n, const int32_t* table,
                          int64_t tables, int64_t k, int64_t* out) {
  CallGuard guard(busy_, "RansDecoder");
  check_cdf_table(table, tables, k, precision_);
  for (int64_t r = 0; r < n; ++r)
    if (indexes[r] < 0 || indexes[r] >= tables)
      throw Error("indexes[" + std::to_string(r) + "] = " + std::to_string(indexes[r]) +
                  " is out of range [0, " + std::to_string(tables) + ")");
  before_pop(n, k);
  const uint64_t mask = (uint64_t{1} << precision_) - 1;
  // Per table, bucket b of the top `bits` slot bits maps to the symbol whose interval holds
  // the bucket's first slot; a short forward scan finishes the search. Built per call
  // (tables * 2^bits entries), worth it only when there are many symbols per table.
  const int bits = std::min(precision_, 10);
  const int shift = precision_ - bits;
  const int64_t buckets = int64_t{1} << bits;
  const bool use_lut = n >= 4 * tables * buckets / 16 && k <= 65536;
  std::vector<uint16_t> lut;
  if (use_lut) {
    lut.resize(static_cast<size_t>(tables * buckets));
    for (int64_t t = 0; t < tables; ++t) {
      const int32_t* c = table + t * (k + 1);
      int64_t s = 0;
      for (int64_t b = 0; b < buckets; ++b) {
        while (s < k - 1 && c[s + 1] <= (b << shift)) ++s;
        lut[static_cast<size_t>(t * buckets + b)] = static_cast<uint16_t>(s);
      }
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    // Read once and re-checked, like the searches' bounds below: the checks above hold unless
    // another thread writes to the arrays during the call, which must still not crash.
    const int64_t t = indexes[r];
    if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(tables))
      throw Error("indexes changed while they were being read (another thread wrote to the "
                  "array during the call)");
    const int32_t* c = table + t * (k + 1);
    uint64_t& x = state_[count_ & (lanes_ - 1)];
    int32_t slot = static_cast<int32_t>(x & mask);
    int64_t s;
    if (use_lut) {
      s = lut[static_cast<size_t>(t * buckets + (slot >> shift))];
      while (s < k - 1 && c[s + 1] <= slot) ++s;  // c[k] = 2^P > slot stops it
    } else {
      s = std::upper_bound(c + 1, c + k, slot) - (c + 1);
    }
    advance(x, static_cast<uint64_t>(slot), static_cast<uint32_t>(c[s]),
            static_cast<uint32_t>(c[s + 1] - c[s]), precision_);
    renorm(x);
    out[r] = s;
    ++count_;
  }
}

void Decoder::finish() const {
  CallGuard guard(busy_, "RansDecoder");
  if (expected_ >= 0 && count_ != expected_)
    throw Error("rANS stream holds " + std::to_string(expected_) + " symbols but " +
                std::to_string(count_) + " were decoded");
  if (pos_ != data_.size())
    throw Error("rANS stream not fully consumed: " + std::to_string(data_.size() - pos_) +
                " bytes left after " + std::to_string(count_) +
                " symbols (fewer symbols decoded than encoded, or corrupt data)");
  for (int l = 0; l < lanes_; ++l)
    if (state_[l] != initial_)
      throw Error("rANS stream failed its final-state check after " + std::to_string(count_) +
                  " symbols: the data is corrupt, or was decoded with different "
                  "distributions or a different symbol count than it was encoded with");
  if (trailing_used_ != trailing_)
    throw Error("rANS stream not fully consumed: " + std::to_string(trailing_ - trailing_used_) +
                " symbols of alphabet size 1 at its end were not decoded (after " +
                std::to_string(count_) + " symbols)");
}

}  // namespace pqmim::rans
