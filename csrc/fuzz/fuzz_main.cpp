// Stand-alone driver for fuzz_rans.cpp where libFuzzer is not available (GCC builds, and the
// ThreadSanitizer build): random inputs and mutations of earlier ones, no coverage feedback.
// Usage: fuzz_rans [-runs=N] [-max_total_time=SECONDS] [-seed=S] [FILE...]
// With FILEs, runs each once (to replay a crash found by libFuzzer) and exits.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int main(int argc, char** argv) {
  long long runs = -1;
  double max_time = 10.0;
  unsigned long long seed = 1;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("-runs=", 0) == 0) runs = std::atoll(a.c_str() + 6);
    else if (a.rfind("-max_total_time=", 0) == 0) max_time = std::atof(a.c_str() + 16);
    else if (a.rfind("-seed=", 0) == 0) seed = std::strtoull(a.c_str() + 6, nullptr, 10);
    else if (!a.empty() && a[0] == '-') std::fprintf(stderr, "fuzz_rans: ignoring %s\n", a.c_str());
    else files.push_back(a);
  }
  if (!files.empty()) {
    for (const std::string& f : files) {
      std::ifstream in(f, std::ios::binary);
      std::vector<uint8_t> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      LLVMFuzzerTestOneInput(data.data(), data.size());
      std::printf("fuzz_rans: ran %s (%zu bytes)\n", f.c_str(), data.size());
    }
    return 0;
  }
  std::mt19937_64 rng(seed);
  std::vector<std::vector<uint8_t>> pool;
  const auto start = std::chrono::steady_clock::now();
  long long done = 0;
  for (; runs < 0 || done < runs; ++done) {
    if ((done & 63) == 0) {
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (runs < 0 && t >= max_time) break;
    }
    std::vector<uint8_t> x;
    if (pool.empty() || rng() % 4 == 0) {
      x.resize(rng() % 600);
      for (auto& b : x) b = static_cast<uint8_t>(rng());
    } else {  // mutate an earlier input: flip, overwrite, insert, erase, splice
      x = pool[rng() % pool.size()];
      for (int m = 1 + static_cast<int>(rng() % 4); m > 0; --m) {
        const size_t at = x.empty() ? 0 : rng() % x.size();
        switch (rng() % 5) {
          case 0: if (!x.empty()) x[at] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
          case 1: if (!x.empty()) x[at] = static_cast<uint8_t>(rng()); break;
          case 2: x.insert(x.begin() + static_cast<ptrdiff_t>(at), static_cast<uint8_t>(rng())); break;
          case 3: if (!x.empty()) x.erase(x.begin() + static_cast<ptrdiff_t>(at)); break;
          default: {
            const auto& y = pool[rng() % pool.size()];
            x.insert(x.end(), y.begin(), y.begin() + static_cast<ptrdiff_t>(y.size() / 2));
          }
        }
      }
    }
    LLVMFuzzerTestOneInput(x.data(), x.size());
    if (pool.size() < 512) pool.push_back(std::move(x));
    else pool[rng() % pool.size()] = std::move(x);
  }
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fuzz_rans (stand-alone driver, seed %llu): %lld executions in %.1f s, 0 crashes\n",
              seed, done, t);
  return 0;
}
