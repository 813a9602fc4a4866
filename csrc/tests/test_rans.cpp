// C++ unit tests for the rANS core: plain checks, no framework. Run under ctest, also with
// AddressSanitizer + UBSan (-DPQMIM_SANITIZE=ON), which is what gives the corrupted-stream
// tests their teeth: decoding garbage must throw Error or finish, never touch bad memory.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

#include "rans.hpp"

namespace rc = pqmim::rans;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

template <class Fn>
bool throws(Fn fn) {
  try {
    fn();
  } catch (const rc::Error&) {
    return true;
  }
  return false;
}

// The message of the rc::Error fn throws ("" if none).
template <class Fn>
std::string error_of(Fn fn) {
  try {
    fn();
  } catch (const rc::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

namespace {

struct Case {
  int64_t n, k;
  int precision, lanes;
  std::vector<float> probs;
  std::vector<int32_t> cdfs;
  std::vector<int64_t> symbols;
};

Case random_case(std::mt19937_64& rng, int64_t max_n, int64_t max_k) {
  Case c;
  c.n = static_cast<int64_t>(rng() % static_cast<uint64_t>(max_n + 1));
  c.k = 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(max_k));
  int minp = 1;
  while ((int64_t{1} << minp) < c.k) ++minp;
  c.precision = minp + static_cast<int>(rng() % static_cast<uint64_t>(rc::kMaxPrecision - minp + 1));
  static const int kLanes[5] = {0, 1, 2, 4, 8};
  c.lanes = kLanes[rng() % 5];
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::normal_distribution<float> g(0.0f, 1.0f + 6.0f * u(rng));
  c.probs.resize(static_cast<size_t>(c.n * c.k));
  int kind = static_cast<int>(rng() % 4);
  for (auto& v : c.probs) {
    if (kind == 0) v = std::exp(g(rng));                     // softmax-like
    else if (kind == 1) v = u(rng) < 0.9f ? 0.0f : u(rng);   // sparse (zeros)
    else if (kind == 2) v = u(rng) * 1e-40f;                 // subnormal
    else v = 1.0f;                                           // uniform
  }
  for (int64_t r = 0; r < c.n; ++r) c.probs[static_cast<size_t>(r * c.k)] += 1e-30f;  // no zero rows
  c.cdfs.resize(static_cast<size_t>(c.n * (c.k + 1)));
  rc::quantize_probs(c.probs.data(), c.n, c.k, c.precision, c.cdfs.data(), 1);
  c.symbols.resize(static_cast<size_t>(c.n));
  for (auto& s : c.symbols) s = static_cast<int64_t>(rng() % static_cast<uint64_t>(c.k));
  return c;
}

void test_quantizer_invariants(std::mt19937_64& rng) {
  for (int it = 0; it < 300; ++it) {
    Case c = random_case(rng, 8, 3000);
    for (int64_t r = 0; r < c.n; ++r) {
      const int32_t* cdf = c.cdfs.data() + r * (c.k + 1);
      CHECK(cdf[0] == 0 && cdf[c.k] == (int32_t{1} << c.precision));
      for (int64_t i = 0; i < c.k; ++i) CHECK(cdf[i] < cdf[i + 1]);
    }
  }
  // Exactly uniform rows with K a power of two get exactly equal frequencies.
  std::vector<float> p(256, 0.5f);
  std::vector<uint32_t> f(256);
  rc::quantize_row(p.data(), 256, 16, f.data(), 0);
  for (uint32_t v : f) CHECK(v == 256);
}

void test_roundtrips(std::mt19937_64& rng) {
  for (int it = 0; it < 1500; ++it) {
    Case c = random_case(rng, 300, 600);
    rc::Encoder enc(c.precision, c.lanes, 1 + it % 2);
    // Split into up to three calls with the three forms; the decoder mirrors the split.
    int64_t a = c.n / 3, b = 2 * c.n / 3;
    enc.push_probs(c.symbols.data(), c.probs.data(), a, c.k);
    enc.push_cdfs(c.symbols.data() + a, c.cdfs.data() + a * (c.k + 1), b - a, c.k);
    std::vector<int64_t> idx(static_cast<size_t>(c.n - b));
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int64_t>(i);
    enc.push_indexed(c.symbols.data() + b, idx.data(), c.n - b, c.cdfs.data() + b * (c.k + 1),
                     c.n - b, c.k);
    CHECK(enc.pending() == c.n);
    std::vector<uint8_t> data = enc.finish();
    CHECK(enc.pending() == 0);
    CHECK((c.n == 0) == data.empty());

    std::vector<int64_t> out(static_cast<size_t>(c.n), -1);
    rc::Decoder dec(data.data(), data.size(), c.precision, 1 + it % 2);
    dec.pop_probs(c.probs.data(), a, c.k, out.data());
    dec.pop_cdfs(c.cdfs.data() + a * (c.k + 1), b - a, c.k, out.data() + a);
    dec.pop_indexed(idx.data(), c.n - b, c.cdfs.data() + b * (c.k + 1), c.n - b, c.k,
                    out.data() + b);
    dec.finish();
    CHECK(out == c.symbols);
  }
}

// The threaded float decoder over many row blocks (more than its ring holds): same symbols
// as encoded for 2, 3 and 8 threads, a bad row reported by its own index, truncated data
// raising while helpers run. The sanitizer builds check the ring's memory use (ASan) and its
// synchronisation (TSan), helpers outliving the call included.
void test_threaded_decode(std::mt19937_64& rng) {
  for (int it = 0; it < 12; ++it) {
    const int64_t k = 2 + static_cast<int64_t>(rng() % 500);
    const int64_t n = 3000 + static_cast<int64_t>(rng() % 5000);
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    std::vector<float> probs(static_cast<size_t>(n * k));
    for (auto& v : probs) v = u(rng) < 0.3f ? 0.0f : u(rng);
    std::vector<int64_t> symbols(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) {
      int64_t s = static_cast<int64_t>(rng() % static_cast<uint64_t>(k));
      probs[static_cast<size_t>(r * k + s)] += 0.5f;  // the symbol has a non-zero probability
      symbols[static_cast<size_t>(r)] = s;
    }
    rc::Encoder enc;
    enc.push_probs(symbols.data(), probs.data(), n, k);
    std::vector<uint8_t> data = enc.finish();
    static const int kThreads[3] = {2, 3, 8};
    const int threads = kThreads[it % 3];
    std::vector<int64_t> out(static_cast<size_t>(n), -1);
    rc::Decoder dec(data.data(), data.size(), rc::kDefaultPrecision, threads);
    const int64_t split = n / 3;
    dec.pop_probs(probs.data(), split, k, out.data());
    dec.pop_probs(probs.data() + split * k, n - split, k, out.data() + split);
    dec.finish();
    CHECK(out == symbols);

    std::vector<float> bad = probs;
    const int64_t bad_row = n - 1 - static_cast<int64_t>(rng() % 1000);
    bad[static_cast<size_t>(bad_row * k)] = -1.0f;
    bool caught = false;
    try {
      rc::Decoder d(data.data(), data.size(), rc::kDefaultPrecision, threads);
      d.pop_probs(bad.data(), n, k, out.data());
    } catch (const rc::Error& e) {
      caught = std::string(e.what()).find("row " + std::to_string(bad_row) + " ") !=
               std::string::npos;
    }
    CHECK(caught);
    std::vector<uint8_t> cut(data.begin(), data.begin() + static_cast<long>(data.size() / 2));
    CHECK(throws([&] {
      rc::Decoder d(cut.data(), cut.size(), rc::kDefaultPrecision, threads);
      d.pop_probs(probs.data(), n, k, out.data());
      d.finish();
    }));
  }
}

// Decodes `data` as a stream of c's symbols; returns true if an Error was raised anywhere.
bool decode_caught(const std::vector<uint8_t>& data, const Case& c) {
  std::vector<int64_t> out(static_cast<size_t>(c.n));
  return throws([&] {
    rc::Decoder dec(data.data(), data.size(), c.precision);
    dec.pop_cdfs(c.cdfs.data(), c.n, c.k, out.data());
    dec.finish();
  });
}

void test_corrupted_streams(std::mt19937_64& rng) {
  int64_t flips = 0, flips_caught = 0, foreign = 0, foreign_caught = 0, cuts = 0;
  for (int it = 0; it < 400; ++it) {
    Case c = random_case(rng, 200, 300);
    if (c.n == 0) continue;
    rc::Encoder enc(c.precision, c.lanes);
    enc.push_cdfs(c.symbols.data(), c.cdfs.data(), c.n, c.k);
    std::vector<uint8_t> data = enc.finish();
    CHECK(!decode_caught(data, c));
    // Every strict prefix is rejected (a miss would need a shifted decode to end exactly in
    // the initial states).
    for (size_t cut = 0; cut < data.size(); cut += 1 + data.size() / 16, ++cuts) {
      std::vector<uint8_t> t(data.begin(), data.begin() + static_cast<ptrdiff_t>(cut));
      CHECK(decode_caught(t, c));
    }
    for (int flip = 0; flip < 8; ++flip) {
      std::vector<uint8_t> t = data;
      size_t bit = rng() % (8 * t.size());
      t[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
      ++flips;
      flips_caught += decode_caught(t, c);
    }
    std::vector<uint8_t> junk(rng() % 300);
    for (auto& v : junk) v = static_cast<uint8_t>(rng());
    ++foreign;
    foreign_caught += decode_caught(junk, c);
  }
  std::printf("truncations caught: %lld of %lld; bit flips caught: %lld of %lld; "
              "foreign streams caught: %lld of %lld\n",
              static_cast<long long>(cuts), static_cast<long long>(cuts),
              static_cast<long long>(flips_caught), static_cast<long long>(flips),
              static_cast<long long>(foreign_caught), static_cast<long long>(foreign));
  CHECK(foreign_caught == foreign);
  // Not every flip can be caught: one that moves a slot into a neighbouring symbol with the
  // same frequency and offset leaves the state unchanged and decodes a different, equally
  // valid message (common here: uniform, sparse and low-precision rows are part of the mix).
  CHECK(flips_caught * 10 >= flips * 6);
}

// The other two decode paths on damaged data: pop_indexed with enough symbols per table for
// its bucket lookup table, and pop_probs (linear search over quantised rows).
void test_corrupted_streams_indexed_and_probs(std::mt19937_64& rng) {
  int64_t tried = 0, caught = 0;
  for (int it = 0; it < 60; ++it) {
    const int64_t tables = 1 + static_cast<int64_t>(rng() % 8), n = 3000;
    Case c = random_case(rng, 0, 300);  // only for k, precision and lanes
    const int64_t k = c.k;
    const int precision = std::max(c.precision, 10);
    std::vector<float> rows(static_cast<size_t>(tables * k));
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    for (auto& v : rows) v = u(rng) < 0.2f ? 0.0f : std::exp(4.0f * u(rng));
    for (int64_t t = 0; t < tables; ++t) rows[static_cast<size_t>(t * k)] += 1.0f;
    std::vector<int32_t> table(static_cast<size_t>(tables * (k + 1)));
    rc::quantize_probs(rows.data(), tables, k, precision, table.data(), 1);
    std::vector<int64_t> idx(n), sym(n), out(n);
    std::vector<float> probs(static_cast<size_t>(n * k));
    for (int64_t i = 0; i < n; ++i) {
      idx[i] = static_cast<int64_t>(rng() % static_cast<uint64_t>(tables));
      sym[i] = static_cast<int64_t>(rng() % static_cast<uint64_t>(k));
      std::copy(rows.begin() + idx[i] * k, rows.begin() + (idx[i] + 1) * k,
                probs.begin() + i * k);
    }
    rc::Encoder enc(precision, c.lanes);
    enc.push_indexed(sym.data(), idx.data(), n, table.data(), tables, k);
    std::vector<uint8_t> data = enc.finish();
    for (int trial = 0; trial < 12; ++trial) {
      std::vector<uint8_t> t = data;
      int kind = trial % 3;
      if (kind == 0) {
        size_t bit = rng() % (8 * t.size());
        t[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
      } else if (kind == 1) {
        t.resize(rng() % t.size());
      } else {
        for (size_t b = 1 + rng() % (t.size() - 1); b < t.size(); ++b)
          t[b] = static_cast<uint8_t>(rng());
      }
      for (int form = 0; form < 2; ++form) {
        ++tried;
        caught += throws([&] {
          rc::Decoder dec(t.data(), t.size(), precision);
          if (form == 0)
            dec.pop_indexed(idx.data(), n, table.data(), tables, k, out.data());
          else
            dec.pop_probs(probs.data(), n, k, out.data());
          dec.finish();
        });
      }
    }
    rc::Decoder dec(data.data(), data.size(), precision);
    dec.pop_indexed(idx.data(), n, table.data(), tables, k, out.data());
    dec.finish();
    CHECK(out == sym);
  }
  std::printf("indexed (lookup table) and probs decodes of damaged streams: %lld of %lld "
              "caught, none crashed\n",
              static_cast<long long>(caught), static_cast<long long>(tried));
  CHECK(caught * 10 >= tried * 9);
}

void test_errors() {
  CHECK(throws([] { rc::Encoder e(0); }));
  CHECK(throws([] { rc::Encoder e(25); }));
  CHECK(throws([] { rc::Encoder e(16, 3); }));
  std::vector<float> p = {0.5f, 0.5f, 0.0f};
  int64_t s_bad = 3, s_ok = 2;
  rc::Encoder e(16);
  CHECK(throws([&] { e.push_probs(&s_bad, p.data(), 1, 3); }));
  e.push_probs(&s_ok, p.data(), 1, 3);  // zero probability still codes (frequency 1)
  p[0] = -1.0f;
  CHECK(throws([&] { e.push_probs(&s_ok, p.data(), 1, 3); }));
  p[0] = std::nanf("");
  CHECK(throws([&] { e.push_probs(&s_ok, p.data(), 1, 3); }));
  p.assign(3, 0.0f);
  CHECK(throws([&] { e.push_probs(&s_ok, p.data(), 1, 3); }));
  CHECK(e.pending() == 1);
  std::vector<int32_t> table = {0, 10, 5, 16};  // not increasing
  int64_t idx = 0, sym = 0;
  CHECK(throws([&] { rc::check_cdf_table(table.data(), 1, 3, 4); }));
  CHECK(throws([&] { e.push_indexed(&sym, &idx, 1, table.data(), 1, 3); }));
  std::vector<int32_t> cdf = {0, 3, 17};  // wrong total
  CHECK(throws([&] { e.push_cdfs(&sym, cdf.data(), 1, 2); }));
  std::vector<float> big(70000, 1.0f);
  CHECK(throws([&] { e.push_probs(&sym, big.data(), 1, 70000); }));  // K > 2^16
  std::vector<uint8_t> data = e.finish();
  CHECK(throws([&] { rc::Decoder d(data.data(), data.size(), 15); }));  // precision mismatch
  rc::Decoder d(data.data(), data.size(), 16);
  CHECK(throws([&] { d.finish(); }));  // nothing decoded yet
  std::vector<uint8_t> empty;
  rc::Decoder d0(empty.data(), 0, 16);
  d0.finish();
  int64_t out;
  CHECK(throws([&] { d0.pop_cdfs(cdf.data(), 1, 2, &out); }));
}

// Full CDF row validation in push_cdfs: rows that are valid around their symbol but not
// elsewhere are refused (they gave overlapping intervals: streams decoding to other symbols
// that still passed finish()), with the row and entry named; the encoder is left unchanged.
void test_cdf_validation(std::mt19937_64& rng) {
  const int precision = 8;
  const int32_t M = 1 << precision;
  rc::Encoder enc(precision, 0, 2);
  int64_t refused = 0;
  for (int it = 0; it < 2000; ++it) {
    const int64_t k = 3 + static_cast<int64_t>(rng() % 20);
    std::vector<int32_t> c(static_cast<size_t>(k + 1));
    for (int64_t i = 1; i < k; ++i) c[static_cast<size_t>(i)] = static_cast<int32_t>(rng() % M);
    c[0] = 0;
    c[static_cast<size_t>(k)] = M;
    std::sort(c.begin(), c.end());
    const int64_t s = static_cast<int64_t>(rng() % static_cast<uint64_t>(k));
    c[static_cast<size_t>(s)] = static_cast<int32_t>(rng() % (M - 1));  // locally valid...
    c[static_cast<size_t>(s + 1)] = c[static_cast<size_t>(s)] + 1;
    c[0] = s == 0 ? c[0] : 0;
    if (s + 1 == k) c[static_cast<size_t>(k)] = M, c[static_cast<size_t>(s)] = M - 1;
    bool valid = c[0] == 0 && c[static_cast<size_t>(k)] == M;
    for (int64_t i = 0; i < k; ++i) valid = valid && c[static_cast<size_t>(i)] < c[static_cast<size_t>(i + 1)];
    const std::string e = error_of([&] { enc.push_cdfs(&s, c.data(), 1, k); });
    CHECK(valid == e.empty());
    if (!valid) {
      ++refused;
      CHECK(contains(e, "cdfs row 0 "));
    }
  }
  CHECK(refused > 1000);
  // Row and entry named; a bad later row refuses the whole call (threads split the rows).
  const int64_t n = 100000, k = 4;
  std::vector<int32_t> rows(static_cast<size_t>(n * (k + 1)));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i <= k; ++i) rows[static_cast<size_t>(r * (k + 1) + i)] = static_cast<int32_t>(i * M / k);
  std::vector<int64_t> sym(static_cast<size_t>(n), 0);
  const int64_t before = enc.pending();
  rows[static_cast<size_t>(77777 * (k + 1) + 3)] = rows[static_cast<size_t>(77777 * (k + 1) + 2)];
  rows[static_cast<size_t>(88888 * (k + 1) + 2)] = 0;
  std::string e = error_of([&] { enc.push_cdfs(sym.data(), rows.data(), n, k); });
  CHECK(e == "cdfs row 77777 is not strictly increasing at entry 3 (128 then 128)");
  CHECK(enc.pending() == before);
  rows[static_cast<size_t>(77777 * (k + 1))] = 5;
  e = error_of([&] { enc.push_cdfs(sym.data(), rows.data(), n, k); });
  CHECK(contains(e, "cdfs row 77777 is not a valid CDF for symbol 0"));
  sym[5] = 1;
  rows[static_cast<size_t>(5 * (k + 1) + 4)] = M - 1;
  e = error_of([&] { enc.push_cdfs(sym.data(), rows.data(), n, k); });
  CHECK(contains(e, "cdfs row 5 is not a valid CDF for symbol 1"));
  e = error_of([&] { rc::check_cdf_table(rows.data(), n, k, precision, "tbl"); });
  CHECK(e == "tbl row 5 must start at 0 and end at 2^precision = 256, got 0 .. 255");
}

// One object per thread: a second thread entering a busy Encoder or Decoder gets InUse, the
// running call is unaffected, and separate objects run in parallel with identical results.
// Under TSan this also checks that the guard orders the object's memory correctly.
void test_in_use() {
  const int64_t n = 40000, k = 16;
  std::vector<float> probs(static_cast<size_t>(n * k));
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (auto& v : probs) v = u(rng);
  std::vector<int64_t> sym(static_cast<size_t>(n));
  for (auto& s : sym) s = static_cast<int64_t>(rng() % k);
  auto in_use = [](auto fn) {
    try {
      fn();
    } catch (const rc::InUse& e) {
      CHECK(contains(e.what(), "is in use by another thread: use one "));
      return 1;
    }
    return 0;
  };
  rc::Encoder shared;
  std::atomic<int> busy_seen{0}, pushes{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t)
    pool.emplace_back([&, t] {
      for (int i = 0; i < 8; ++i) {
        int seen = 0;
        if (t == 3)  // finish() racing the pushes (was a SIGFPE)
          seen = in_use([&] { (void)shared.finish(); });
        else if (t == 2)
          seen = in_use([&] { (void)shared.pending(); });
        else if (!(seen = in_use([&] { shared.push_probs(sym.data(), probs.data(), n / 8, k); })))
          pushes.fetch_add(1);
        busy_seen.fetch_add(seen);
      }
    });
  for (auto& th : pool) th.join();
  pool.clear();
  std::printf("one encoder from 4 threads: %d in-use refusals, %d pushes\n", busy_seen.load(),
              pushes.load());
  // Separate encoders and decoders in parallel: the same bytes and symbols as one thread.
  rc::Encoder one;
  one.push_probs(sym.data(), probs.data(), n, k);
  const std::vector<uint8_t> ref = one.finish();
  std::atomic<int> good{0};
  for (int t = 0; t < 3; ++t)
    pool.emplace_back([&] {
      rc::Encoder e(rc::kDefaultPrecision, 0, 2);
      e.push_probs(sym.data(), probs.data(), n, k);
      std::vector<uint8_t> data = e.finish();
      rc::Decoder d(data.data(), data.size(), rc::kDefaultPrecision, 2);
      std::vector<int64_t> out(static_cast<size_t>(n));
      d.pop_probs(probs.data(), n, k, out.data());
      d.finish();
      good.fetch_add(data == ref && out == sym);
    });
  for (auto& th : pool) th.join();
  pool.clear();
  CHECK(good.load() == 3);
  // A decoder shared by threads: refusals, never a torn state; it still decodes correctly
  // when the racing calls are only queries.
  rc::Decoder dec(ref.data(), ref.size());
  std::atomic<bool> done{false};
  std::thread query([&] {
    while (!done.load()) busy_seen.fetch_add(in_use([&] { (void)dec.decoded(); }));
  });
  std::vector<int64_t> out(static_cast<size_t>(n));
  // The decoding thread is refused too whenever it enters while the query runs: the refusal
  // happens before anything moves, so it simply tries again.
  int pop_refusals = 0;
  for (int64_t lo = 0; lo < n; lo += n / 4)
    while (in_use([&] { dec.pop_probs(probs.data() + lo * k, n / 4, k, out.data() + lo); }))
      ++pop_refusals;
  done.store(true);
  query.join();
  std::printf("one decoder, a querying thread beside it: %d pops refused and retried\n",
              pop_refusals);
  dec.finish();
  CHECK(out == sym);
}

// quantize_probs / push_probs / pop_probs asked for more threads than the system will start
// (an address-space limit in a child process): the missing threads' work is done by the
// calling thread, same results, no std::terminate. Skipped under the sanitizers, whose shadow
// memory cannot live under an address-space limit.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define PQMIM_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define PQMIM_UNDER_SANITIZER 1
#endif
#endif
void test_thread_start_failure() {
#if defined(__linux__) && !defined(PQMIM_UNDER_SANITIZER)
  const int64_t n = 1 << 14, k = 256;
  std::vector<float> probs(static_cast<size_t>(n * k));
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (auto& v : probs) v = u(rng);
  std::vector<int64_t> sym(static_cast<size_t>(n));
  for (auto& s : sym) s = static_cast<int64_t>(rng() % k);
  std::vector<int32_t> ref(static_cast<size_t>(n * (k + 1))), got(ref.size());
  rc::quantize_probs(probs.data(), n, k, 24, ref.data(), 1);
  rc::Encoder e1;
  e1.push_probs(sym.data(), probs.data(), n, k);
  const std::vector<uint8_t> ref_bytes = e1.finish();
  std::fflush(stdout);
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    // Room for the coder's buffers, not for 1000 thread stacks of 8 MiB.
    long vm_kb = 0;
    if (FILE* f = std::fopen("/proc/self/statm", "r")) {
      long pages = 0;
      if (std::fscanf(f, "%ld", &pages) == 1) vm_kb = pages * (sysconf(_SC_PAGESIZE) / 1024);
      std::fclose(f);
    }
    struct rlimit lim;
    lim.rlim_cur = lim.rlim_max = static_cast<rlim_t>(vm_kb + 64 * 1024) * 1024;
    if (vm_kb == 0 || setrlimit(RLIMIT_AS, &lim) != 0) _exit(3);
    // Check that the limit bites: 100 threads of 8 MiB stacks do not fit under it.
    std::vector<std::thread> probe;
    try {
      for (int i = 0; i < 100; ++i) probe.emplace_back([] {});
    } catch (...) {
    }
    const bool limited = probe.size() < 100;
    for (auto& th : probe) th.join();
    if (!limited) _exit(4);
    rc::quantize_probs(probs.data(), n, k, 24, got.data(), 1000);
    if (got != ref) _exit(5);
    rc::Encoder e(rc::kDefaultPrecision, 0, 1000);
    e.push_probs(sym.data(), probs.data(), n, k);
    if (e.finish() != ref_bytes) _exit(6);
    rc::Decoder d(ref_bytes.data(), ref_bytes.size(), rc::kDefaultPrecision, 1000);
    std::vector<int64_t> out(static_cast<size_t>(n));
    d.pop_probs(probs.data(), n, k, out.data());
    d.finish();
    _exit(out == sym ? 0 : 7);
  }
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
    std::fprintf(stderr, "thread-start-failure child: %s %d\n",
                 WIFEXITED(status) ? "exit" : "signal",
                 WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  std::printf("1000 threads asked under an address-space limit: same results, no abort\n");
#endif
}

// The compact framing round-trips (any size and lane choice) and is never longer than the
// standard stream; from 65,536 symbols (4 lanes) it is the standard stream. K = 1 symbols at
// the end of a standard stream are counted: decoding past them raises.
void test_framings(std::mt19937_64& rng) {
  for (int it = 0; it < 300; ++it) {
    Case c = random_case(rng, 300, 300);
    rc::Encoder std_enc(c.precision, c.lanes);
    rc::Encoder cmp_enc(c.precision, c.lanes, 1, rc::Framing::kCompact);
    std_enc.push_cdfs(c.symbols.data(), c.cdfs.data(), c.n, c.k);
    cmp_enc.push_cdfs(c.symbols.data(), c.cdfs.data(), c.n, c.k);
    const std::vector<uint8_t> s = std_enc.finish(), d = cmp_enc.finish();
    CHECK(d.size() <= s.size());
    CHECK(c.n == 0 || (rc::lanes_for(c.lanes, c.n) == 1) == (d != s));
    std::vector<int64_t> out(static_cast<size_t>(c.n));
    rc::Decoder dec(d.data(), d.size(), c.precision, 1, rc::Framing::kCompact, c.n, c.lanes);
    dec.pop_cdfs(c.cdfs.data(), c.n, c.k, out.data());
    dec.finish();
    CHECK(out == c.symbols);
    int64_t o = 0;
    CHECK(contains(error_of([&] { dec.pop_cdfs(c.cdfs.data(), 1, c.k, &o); }),
                   "decoding past the end of the rANS stream: it holds"));
  }
  const int64_t n = 70000, k = 8;
  std::vector<int32_t> table = {0, 1, 2, 3, 4, 5, 6, 7, 1 << 24};
  std::vector<int64_t> sym(n), idx(n, 0);
  for (auto& v : sym) v = static_cast<int64_t>(rng() % k);
  rc::Encoder a, b(rc::kDefaultPrecision, 0, 1, rc::Framing::kCompact);
  a.push_indexed(sym.data(), idx.data(), n, table.data(), 1, k);
  b.push_indexed(sym.data(), idx.data(), n, table.data(), 1, k);
  CHECK(a.finish() == b.finish());
  // K = 1 at the end: header bit 2 and the count; one more raises, one fewer fails finish().
  std::vector<int32_t> one = {0, 1 << 24};
  std::vector<int64_t> zeros(300, 0), out(301);
  rc::Encoder e;
  e.push_cdfs(sym.data(), table.data(), 1, k);  // one K = 8 symbol first
  e.push_indexed(zeros.data(), zeros.data(), 300, one.data(), 1, 1);
  const std::vector<uint8_t> data = e.finish();
  CHECK((data[0] & 4) && data[1] == ((300 & 127) | 128) && data[2] == 300 >> 7);
  rc::Decoder d(data.data(), data.size());
  d.pop_cdfs(table.data(), 1, k, out.data());
  CHECK(out[0] == sym[0]);
  d.pop_indexed(zeros.data(), 299, one.data(), 1, 1, out.data() + 1);
  CHECK(contains(error_of([&] { d.finish(); }), "1 symbols of alphabet size 1 at its end"));
  CHECK(contains(error_of([&] { d.pop_indexed(zeros.data(), 2, one.data(), 1, 1, out.data()); }),
                 "decoding past the end of the rANS stream: after 300 symbols it holds 1 more"));
  d.pop_indexed(zeros.data(), 1, one.data(), 1, 1, out.data());
  d.finish();
}

}  // namespace

int main() {
  std::mt19937_64 rng(12345);
  test_errors();
  test_quantizer_invariants(rng);
  test_roundtrips(rng);
  test_threaded_decode(rng);
  test_corrupted_streams(rng);
  test_corrupted_streams_indexed_and_probs(rng);
  test_cdf_validation(rng);
  test_in_use();
  test_thread_start_failure();
  test_framings(rng);
  std::printf("test_rans: all checks passed\n");
  return 0;
}
