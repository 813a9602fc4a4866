// Fuzz target for the rANS core (libFuzzer's entry point; csrc/fuzz/fuzz_main.cpp drives it
// without libFuzzer). Built with ASan + UBSan or TSan (CMake option PQMIM_BUILD_FUZZ), so any
// out-of-bounds access, undefined behaviour or data race is a crash; the checks below turn
// wrong answers into crashes too. The input bytes choose one of four programs:
//
//   round trip  random coder parameters (framing included) and up to 8 batches of the
//               three forms, each valid or damaged on purpose (symbols or indexes out of
//               range, NaN/inf/negative/zero probabilities, CDF entries moved); K = 1 often.
//               A batch must be accepted exactly when an independent check says it is
//               valid, and a refused one must leave the encoder unchanged. The stream must
//               decode to the accepted symbols in any split of the batches; decoding one
//               symbol too many (K = 1 or 2) or one too few must raise Error, with or
//               without the symbol count; truncated standard streams must raise; other
//               damaged copies must raise Error or return, never crash.
//   raw decode  the rest of the input is taken as a stream of either framing and decoded
//               with random distributions of every form: Error or success, never a crash.
//   quantise    quantize_probs on arbitrary float bit patterns: refused exactly when a row
//               holds NaN/inf/negative values or only zeros, else every row a valid CDF.
//   threads     one encoder / decoder shared by two threads: every call either completes or
//               throws InUse; separate objects in parallel give the single-thread bytes.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "rans.hpp"

namespace rc = pqmim::rans;

namespace {

[[noreturn]] void fail(const char* what, int line) {
  std::fprintf(stderr, "fuzz_rans: check failed at line %d: %s\n", line, what);
  std::abort();
}
#define REQUIRE(cond)                   \
  do {                                  \
    if (!(cond)) fail(#cond, __LINE__); \
  } while (0)

// The fuzzer's bytes as a stream of choices; zeros once exhausted, so every input is a
// complete program.
class Input {
 public:
  Input(const uint8_t* data, size_t size) : p_(data), n_(size) {}
  uint8_t byte() { return pos_ < n_ ? p_[pos_++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int b = 0; b < 4; ++b) v |= uint32_t{byte()} << (8 * b);
    return v;
  }
  // A value in [0, bound), bound >= 1.
  uint64_t pick(uint64_t bound) {
    uint64_t v = bound <= 256 ? byte() : bound <= 65536 ? (u32() & 0xffff) : u32();
    return v % bound;
  }
  bool chance(int percent) { return pick(100) < static_cast<uint64_t>(percent); }
  // Mostly ordinary probabilities, sometimes zeros, subnormals, huge values, NaN, inf,
  // negatives or raw bit patterns.
  float prob() {
    switch (pick(16)) {
      case 0: return 0.0f;
      case 1: return -0.0f;
      case 2: return 1e-42f * static_cast<float>(1 + pick(100));
      case 3: return 3e38f;
      case 4: {
        uint32_t b = u32();
        float f;
        std::memcpy(&f, &b, sizeof f);
        return f;
      }
      default: return static_cast<float>(1 + pick(1000)) / 1000.0f;
    }
  }
  const uint8_t* rest(size_t* size) {
    *size = n_ - pos_;
    const uint8_t* r = p_ + pos_;
    pos_ = n_;
    return r;
  }

 private:
  const uint8_t* p_;
  size_t n_, pos_ = 0;
};

enum Form { kProbs, kCdfs, kIndexed };

struct Batch {
  Form form;
  int64_t n = 0, k = 1, tables = 0;
  std::vector<int64_t> symbols, indexes;
  std::vector<float> probs;    // (n, k) for kProbs
  std::vector<int32_t> cdfs;   // (n, k + 1) for kCdfs, (tables, k + 1) for kIndexed
};

bool row_is_cdf(const int32_t* c, int64_t k, int precision) {
  if (c[0] != 0 || c[k] != (int32_t{1} << precision)) return false;
  for (int64_t i = 0; i < k; ++i)
    if (c[i] >= c[i + 1]) return false;
  return true;
}

bool row_is_distribution(const float* p, int64_t k) {
  bool positive = false;
  for (int64_t i = 0; i < k; ++i) {
    if (!(p[i] >= 0.0f) || std::isinf(p[i])) return false;
    positive = positive || p[i] > 0.0f;
  }
  return positive;
}

// Valid CDF rows from well-formed probabilities (a valid quantiser input).
std::vector<int32_t> valid_cdfs(Input& in, int64_t rows, int64_t k, int precision) {
  std::vector<float> p(static_cast<size_t>(rows * k));
  for (auto& v : p) v = static_cast<float>(in.pick(1000));
  for (int64_t r = 0; r < rows; ++r) p[static_cast<size_t>(r * k)] += 1.0f;
  std::vector<int32_t> c(static_cast<size_t>(rows * (k + 1)));
  rc::quantize_probs(p.data(), rows, k, precision, c.data(), 1);
  return c;
}

// A batch of random shape and form; `damage` allows invalid content.
Batch make_batch(Input& in, int precision, bool damage) {
  Batch b;
  b.form = static_cast<Form>(in.pick(3));
  const int64_t kmax = std::min<int64_t>(int64_t{1} << precision, 300);
  b.k = in.chance(15) ? 1 : 1 + static_cast<int64_t>(in.pick(static_cast<uint64_t>(kmax)));
  b.n = in.chance(5) ? 200 + static_cast<int64_t>(in.pick(3000)) : static_cast<int64_t>(in.pick(40));
  b.symbols.resize(static_cast<size_t>(b.n));
  for (auto& s : b.symbols) s = static_cast<int64_t>(in.pick(static_cast<uint64_t>(b.k)));
  if (damage && b.n > 0 && in.chance(30))
    b.symbols[in.pick(static_cast<uint64_t>(b.n))] = in.chance(50) ? -1 : b.k + static_cast<int64_t>(in.pick(3));
  if (b.form == kProbs) {
    b.probs.resize(static_cast<size_t>(b.n * b.k));
    for (auto& v : b.probs) v = damage ? in.prob() : static_cast<float>(in.pick(1000));
    for (int64_t r = 0; r < b.n; ++r) b.probs[static_cast<size_t>(r * b.k)] += damage ? 0.0f : 1.0f;
  } else {
    const int64_t rows = b.form == kCdfs ? b.n : 1 + static_cast<int64_t>(in.pick(6));
    b.cdfs = valid_cdfs(in, rows, b.k, precision);
    if (damage && in.chance(40) && !b.cdfs.empty())  // move one entry anywhere
      b.cdfs[in.pick(b.cdfs.size())] = static_cast<int32_t>(in.u32() % ((1u << precision) + 3)) - 1;
    if (b.form == kIndexed) {
      b.tables = rows;
      b.indexes.resize(static_cast<size_t>(b.n));
      for (auto& t : b.indexes) t = static_cast<int64_t>(in.pick(static_cast<uint64_t>(rows)));
      if (damage && b.n > 0 && in.chance(20)) b.indexes[in.pick(static_cast<uint64_t>(b.n))] = rows;
    }
  }
  return b;
}

// What an independent check says about the batch: would a correct coder accept it?
bool batch_is_valid(const Batch& b, int precision) {
  for (int64_t s : b.symbols)
    if (s < 0 || s >= b.k) return false;
  if (b.form == kProbs) {
    for (int64_t r = 0; r < b.n; ++r)
      if (!row_is_distribution(b.probs.data() + r * b.k, b.k)) return false;
    return true;
  }
  const int64_t rows = b.form == kCdfs ? b.n : b.tables;
  for (int64_t r = 0; r < rows; ++r)
    if (!row_is_cdf(b.cdfs.data() + r * (b.k + 1), b.k, precision)) return false;
  for (int64_t t : b.indexes)
    if (t < 0 || t >= b.tables) return false;
  return true;
}

void push(rc::Encoder& e, const Batch& b, int64_t lo, int64_t hi) {
  const int64_t* s = b.symbols.data() + lo;
  if (b.form == kProbs)
    e.push_probs(s, b.probs.data() + lo * b.k, hi - lo, b.k);
  else if (b.form == kCdfs)
    e.push_cdfs(s, b.cdfs.data() + lo * (b.k + 1), hi - lo, b.k);
  else
    e.push_indexed(s, b.indexes.data() + lo, hi - lo, b.cdfs.data(), b.tables, b.k);
}

void pop(rc::Decoder& d, const Batch& b, int64_t lo, int64_t hi, int64_t* out) {
  if (b.form == kProbs)
    d.pop_probs(b.probs.data() + lo * b.k, hi - lo, b.k, out);
  else if (b.form == kCdfs)
    d.pop_cdfs(b.cdfs.data() + lo * (b.k + 1), hi - lo, b.k, out);
  else
    d.pop_indexed(b.indexes.data() + lo, hi - lo, b.cdfs.data(), b.tables, b.k, out);
}

template <class Fn>
bool raises(Fn fn) {
  try {
    fn();
  } catch (const rc::Error&) {
    return true;
  }
  return false;
}

struct Params {
  int precision = rc::kDefaultPrecision, lanes = 0, threads = 1;
  rc::Framing framing = rc::Framing::kStandard;
  int64_t symbols = -1;  // told to the decoder; -1 = unknown (standard framing only)
};

// Decodes every batch (each split in two calls at `cut` percent) and finishes; returns
// false if an Error was raised. Symbols are compared when `expect` is set.
bool decode_all(const std::vector<uint8_t>& data, const std::vector<Batch>& batches,
                const Params& pa, int cut, bool expect) {
  return !raises([&] {
    rc::Decoder d(data.data(), data.size(), pa.precision, pa.threads, pa.framing, pa.symbols,
                  pa.lanes);
    for (const Batch& b : batches) {
      std::vector<int64_t> out(static_cast<size_t>(b.n), -1);
      const int64_t mid = b.n * cut / 100;
      pop(d, b, 0, mid, out.data());
      pop(d, b, mid, b.n, out.data() + mid);
      if (expect) REQUIRE(out == b.symbols);
    }
    d.finish();
  });
}

Batch k_batch(int64_t k, int precision) {  // one symbol 0 with a uniform-ish CDF of size k
  Batch b;
  b.form = kCdfs;
  b.n = 1;
  b.k = k;
  b.symbols = {0};
  b.cdfs = {0};
  if (k == 2) b.cdfs.push_back(1 << (precision - 1));
  b.cdfs.push_back(1 << precision);
  return b;
}

void round_trip(Input& in) {
  static const int kLanes[5] = {0, 1, 2, 4, 8};
  Params pa;
  pa.precision = 1 + static_cast<int>(in.pick(rc::kMaxPrecision));
  pa.lanes = kLanes[in.pick(5)];
  pa.threads = 1 + static_cast<int>(in.pick(3));
  pa.framing = in.chance(50) ? rc::Framing::kCompact : rc::Framing::kStandard;
  const int precision = pa.precision;
  rc::Encoder enc(precision, pa.lanes, pa.threads, pa.framing);
  std::vector<Batch> accepted;
  const int count = static_cast<int>(in.pick(9));
  int64_t total = 0;
  for (int i = 0; i < count; ++i) {
    Batch b = make_batch(in, precision, in.chance(40));
    const bool valid = batch_is_valid(b, precision);
    const bool ok = !raises([&] { push(enc, b, 0, b.n); });
    REQUIRE(ok == valid);
    if (ok) total += b.n, accepted.push_back(std::move(b));
    REQUIRE(enc.pending() == total);  // a refused call buffered nothing
  }
  const std::vector<uint8_t> data = enc.finish();
  REQUIRE(enc.pending() == 0);
  const bool compact = pa.framing == rc::Framing::kCompact && rc::lanes_for(pa.lanes, total) == 1;
  if (!compact) REQUIRE(data.empty() == (total == 0));  // compact: b"" for a final state 0
  if (pa.framing == rc::Framing::kCompact || in.chance(50)) pa.symbols = total;
  const int cut = static_cast<int>(in.pick(101));
  REQUIRE(decode_all(data, accepted, pa, cut, true));
  // One symbol too many (K = 2 or K = 1 after the last batch) or one too few.
  for (int64_t k : {int64_t{2}, int64_t{1}}) {
    std::vector<Batch> more = accepted;
    more.push_back(k_batch(k, precision));
    REQUIRE(!decode_all(data, more, pa, cut, false));
  }
  std::vector<Batch> fewer = accepted;
  while (!fewer.empty() && fewer.back().n == 0) fewer.pop_back();
  if (!fewer.empty()) {
    Batch& last = fewer.back();
    last.n -= 1;
    last.symbols.pop_back();
    if (last.form == kProbs) last.probs.resize(static_cast<size_t>(last.n * last.k));
    if (last.form == kCdfs) last.cdfs.resize(static_cast<size_t>(last.n * (last.k + 1)));
    if (last.form == kIndexed) last.indexes.pop_back();
    REQUIRE(!decode_all(data, fewer, pa, cut, false));
  }
  if (data.empty()) return;
  // Damaged copies: truncated (always caught in the standard framing; the compact one has
  // no check value of its own), a byte changed, bytes appended.
  std::vector<uint8_t> bad(data.begin(), data.begin() + static_cast<ptrdiff_t>(in.pick(data.size())));
  const bool caught = !decode_all(bad, accepted, pa, cut, false);
  REQUIRE(caught || compact);
  bad = data;
  bad[in.pick(bad.size())] ^= static_cast<uint8_t>(1 + in.pick(255));
  (void)decode_all(bad, accepted, pa, cut, false);
  bad = data;
  for (int i = 1 + static_cast<int>(in.pick(5)); i > 0; --i) bad.push_back(in.byte());
  (void)decode_all(bad, accepted, pa, cut, false);
}

void raw_decode(Input& in) {
  static const int kLanes[5] = {0, 1, 2, 4, 8};
  Params pa;
  pa.precision = 1 + static_cast<int>(in.pick(rc::kMaxPrecision));
  pa.threads = 1 + static_cast<int>(in.pick(3));
  pa.lanes = kLanes[in.pick(5)];
  std::vector<Batch> batches;
  int64_t total = 0;
  for (int i = static_cast<int>(in.pick(4)); i > 0; --i) {
    batches.push_back(make_batch(in, pa.precision, false));
    total += batches.back().n;
  }
  if (in.chance(50)) pa.framing = rc::Framing::kCompact;
  if (pa.framing == rc::Framing::kCompact || in.chance(50))
    pa.symbols = in.chance(80) ? total : static_cast<int64_t>(in.pick(100));
  size_t size = 0;
  const uint8_t* data = in.rest(&size);
  std::vector<uint8_t> stream(data, data + size);
  (void)decode_all(stream, batches, pa, 50, false);
}

void quantise(Input& in) {
  const int precision = 1 + static_cast<int>(in.pick(rc::kMaxPrecision));
  const int64_t kmax = std::min<int64_t>(int64_t{1} << precision, 2000);
  const int64_t k = 1 + static_cast<int64_t>(in.pick(static_cast<uint64_t>(kmax)));
  const int64_t n = static_cast<int64_t>(in.pick(8));
  std::vector<float> p(static_cast<size_t>(n * k));
  for (auto& v : p) v = in.prob();
  bool valid = true;
  for (int64_t r = 0; r < n; ++r) valid = valid && row_is_distribution(p.data() + r * k, k);
  std::vector<int32_t> c(static_cast<size_t>(n * (k + 1)));
  const bool ok = !raises([&] {
    rc::quantize_probs(p.data(), n, k, precision, c.data(), 1 + static_cast<int>(in.pick(3)));
  });
  REQUIRE(ok == valid);
  if (ok)
    for (int64_t r = 0; r < n; ++r) REQUIRE(row_is_cdf(c.data() + r * (k + 1), k, precision));
}

void threads(Input& in) {
  const int precision = 8 + static_cast<int>(in.pick(17));
  Batch b = make_batch(in, precision, false);
  auto guarded = [](auto fn) {
    try {
      fn();
    } catch (const rc::InUse&) {
      return false;
    }
    return true;
  };
  rc::Encoder shared(precision);
  std::atomic<int> pushed{0};
  std::vector<uint8_t> finished;
  std::thread t([&] {
    for (int i = 0; i < 4; ++i)
      if (guarded([&] { push(shared, b, 0, b.n); })) pushed.fetch_add(1);
  });
  for (int i = 0; i < 4; ++i) {
    (void)guarded([&] { (void)shared.pending(); });
    if (in.chance(30)) (void)guarded([&] { (void)shared.finish(); });
  }
  t.join();
  finished = shared.finish();  // no other thread now: never refused
  // Separate encoders in parallel: identical bytes.
  std::vector<uint8_t> a, c;
  auto encode = [&](std::vector<uint8_t>* out) {
    rc::Encoder e(precision, 0, 2);
    push(e, b, 0, b.n);
    *out = e.finish();
  };
  std::thread u(encode, &a);
  encode(&c);
  u.join();
  REQUIRE(a == c);
  // A decoder shared by a decoding thread and a querying one.
  rc::Decoder d(a.data(), a.size(), precision);
  std::atomic<bool> done{false};
  std::thread q([&] {
    while (!done.load()) (void)guarded([&] { (void)d.decoded(); });
  });
  std::vector<int64_t> out(static_cast<size_t>(b.n));
  bool decoded = false;
  for (int attempt = 0; attempt < 100 && !decoded; ++attempt)
    decoded = guarded([&] { pop(d, b, 0, b.n, out.data()); });
  done.store(true);
  q.join();
  if (decoded) {
    REQUIRE(out == b.symbols);
    d.finish();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  switch (in.pick(8)) {
    case 0: case 1: case 2: case 3: round_trip(in); break;
    case 4: case 5: raw_decode(in); break;
    case 6: quantise(in); break;
    default: threads(in); break;
  }
  return 0;
}
