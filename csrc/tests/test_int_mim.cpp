// Unit tests of the integer entropy-model engine's primitives (the bit-exact comparison with the
// torch spec lives in tests/test_int_mim.py). Plain asserts; run by ctest, under ASan/UBSan/TSan.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "int_mim.hpp"

using namespace pqmim::intmim;

static int failures = 0;
#define EXPECT(cond)                                                  \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: EXPECT(%s)\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                     \
    }                                                                 \
  } while (0)

static std::vector<int64_t> approx_table(int bits) {
  std::vector<int64_t> t(256);
  for (int j = 0; j < 256; ++j) t[j] = int64_t(std::floor(std::ldexp(std::exp2(-j / 256.0), bits)));
  return t;
}

static void test_integer_helpers() {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200000; ++i) {
    int64_t n = int64_t(rng() >> 12);  // < 2^52
    if (i < 1000) n = i;
    int64_t r = isqrt(n);
    EXPECT(r >= 0 && r * r <= n && (r + 1) * (r + 1) > n);
  }
  for (int64_t a = -50; a <= 50; ++a)
    for (int64_t b = 1; b <= 7; ++b) {
      EXPECT(floor_div(a, b) == int64_t(std::floor(double(a) / double(b))));
      for (int s = 0; s < 5; ++s) {
        // round half up of a / 2^s
        int64_t want = int64_t(std::floor(double(a) / double(int64_t(1) << s) + 0.5));
        EXPECT(round_shift(a, s) == want);
      }
    }
}

static void test_window_attention_matches_naive() {
  std::mt19937 rng(7);
  const int h = 5, w = 7, heads = 2, dh = 6, radius = 2, n = h * w;
  const int side = 2 * radius + 1;
  std::vector<int8_t> q(n * heads * dh), k(n * heads * dh), v(n * heads * dh);
  for (auto* a : {&q, &k, &v})
    for (auto& x : *a) x = int8_t(int(rng() % 255) - 127);
  std::vector<int64_t> pos(n), limit(n), stage(n);
  for (int i = 0; i < n; ++i) {
    pos[i] = i;
    stage[i] = rng() % 4;
    limit[i] = rng() % 5;
  }
  std::vector<int32_t> bias(heads * side * side);
  for (auto& b : bias) b = int32_t(rng() % 200001) - 100000;
  const auto table = approx_table(kAttExpBits);
  std::vector<int32_t> out(n * heads * dh), out2(n * heads * dh);
  window_attention(q.data(), pos.data(), limit.data(), n, k.data(), v.data(), stage.data(), h, w,
                   heads, dh, radius, 1000, 7, bias.data(), table.data(), out.data(), 1);
  window_attention(q.data(), pos.data(), limit.data(), n, k.data(), v.data(), stage.data(), h, w,
                   heads, dh, radius, 1000, 7, bias.data(), table.data(), out2.data(), 3);
  EXPECT(out == out2);  // threads do not change the result
  for (int i = 0; i < n; ++i) {
    const int y = i / w, x = i % w;
    for (int hd = 0; hd < heads; ++hd) {
      std::vector<int64_t> z, kp;
      for (int p = 0; p < n; ++p) {
        const int dy = p / w - y, dx = p % w - x;
        if (std::abs(dy) > radius || std::abs(dx) > radius || stage[p] >= limit[i]) continue;
        int64_t s = 0;
        for (int d = 0; d < dh; ++d) s += int64_t(q[(i * heads + hd) * dh + d]) * k[(p * heads + hd) * dh + d];
        z.push_back(round_shift(s * 1000, 7) + bias[hd * side * side + (dy + radius) * side + dx + radius]);
        kp.push_back(p);
      }
      for (int d = 0; d < dh; ++d) {
        int64_t want = 0;
        if (!z.empty()) {
          int64_t zmax = z[0];
          for (int64_t zz : z) zmax = std::max(zmax, zz);
          int64_t num = 0, den = 0;
          for (size_t j = 0; j < z.size(); ++j) {
            const int64_t dd = zmax - z[j];
            const int64_t e = table[(dd >> 8) & 255] >> std::min<int64_t>(dd >> 16, 16);
            num += e * v[(kp[j] * heads + hd) * dh + d];
            den += e;
          }
          want = floor_div(2 * num + den, 2 * den);
        }
        EXPECT(out[(i * heads + hd) * dh + d] == want);
      }
    }
  }
}

static void test_logits_to_cdfs() {
  std::mt19937 rng(3);
  const auto table = approx_table(kProbExpBits);
  for (int k : {1, 2, 3, 256, 1000}) {
    const int n = 50;
    std::vector<int32_t> logits(n * k);
    for (auto& l : logits) l = int32_t(rng() % 4000001) - 2000000;
    std::vector<int32_t> cdf(n * (k + 1));
    logits_to_cdfs(logits.data(), n, k, 24, table.data(), cdf.data(), 2);
    for (int r = 0; r < n; ++r) {
      EXPECT(cdf[r * (k + 1)] == 0);
      EXPECT(cdf[r * (k + 1) + k] == (1 << 24));
      for (int i = 0; i < k; ++i) EXPECT(cdf[r * (k + 1) + i + 1] > cdf[r * (k + 1) + i]);
    }
  }
}

int main() {
  test_integer_helpers();
  test_window_attention_matches_naive();
  test_logits_to_cdfs();
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  std::printf("test_int_mim: all passed\n");
  return 0;
}
