// Integer-exact inference engine of the PQ-MIM entropy model v2 (.pqm format 3), plain C++17.
//
// Bit-identical to the torch spec pqmim_kernels/reference/int_mim.py, which documents every
// formula, range and rounding rule; this file only makes the CPU path fast (int16 multiply-add
// GEMMs, fused local attention, threads over tokens). No Python here: the pybind11 binding is
// python/int_mim_binding.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace pqmim {
namespace intmim {

constexpr int kResBits = 10;
constexpr int32_t kResLimit = (1 << 22) - 1;
constexpr int kLogBits = 16;
constexpr int kMaxInner = 1024;
constexpr int kMaxRadius = 8;
constexpr int kAttExpBits = 15;
constexpr int kProbExpBits = 30;

// floor(sqrt(n)) for 0 <= n < 2^52, exact.
int64_t isqrt(int64_t n);
// floor(a / b) for b > 0.
inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}
// >> of a negative signed value floors (arithmetic shift): guaranteed by GCC, Clang and MSVC
// and by C++20; checked here so that a compiler that does otherwise cannot build this file.
static_assert((int64_t(-5) >> 1) == -3, "arithmetic right shift required");

// Round half up of v / 2^shift (shift 0..62): (v + 2^(shift-1)) >> shift, flooring shift.
inline int64_t round_shift(int64_t v, int shift) {
  return shift == 0 ? v : (v + (int64_t(1) << (shift - 1))) >> shift;
}

// y = clamp(round_shift((a . w_row + b) * mult, shift), lo, hi) for every output row.
struct Linear {
  int dout = 0, din = 0;
  std::vector<int16_t> w;       // (dout, din) row-major
  std::vector<int16_t> w_pairs; // (din_pad/2, dout, 2): input pairs interleaved for madd
  int din_pad = 0;
  std::vector<int64_t> b, mult;
  std::vector<int32_t> shift;
  int64_t lo = -127, hi = 127;
  void finalize();  // builds w_pairs from w
  Linear rows(int start, int stop) const;  // output channels [start, stop), finalized
};

struct Block {
  int norm1 = 0, norm2 = 0;
  Linear qkv, proj, fc1, fc2;
  Linear q;  // rows [0, W) of qkv (the query stream needs only queries); built by finalize
  int32_t score_mult = 1, score_shift = 0;
  std::vector<int32_t> bias;  // (H, 2R+1, 2R+1)
  int32_t act[255];
};

struct HeadBlock {
  int norm = 0;
  Linear fc1, fc2;
  int32_t act[255];
};

struct Model {
  int M = 0, K = 0, W = 0, H = 0, R = 0, depth = 0, head_depth = 0;
  std::vector<int32_t> code_embedding;  // (M*K, W)
  std::vector<int32_t> mask_embedding;  // (W,)
  std::vector<int32_t> cond_embedding;  // (max(M-1,1)*K, W)
  std::vector<int32_t> step_embedding;  // (M, W)
  std::vector<Block> blocks;
  std::vector<HeadBlock> head;
  int out_norm = 0;
  Linear out;                    // (M*K, W)
  std::vector<Linear> out_parts; // out rows [m*K, (m+1)*K) per sub-space; built by finalize
  // The spec's exact tables floor(2^b * 2^(-j/256)), j < 256, for b = 15 and b = 30 (computed by
  // integer roots in Python: pqmim_kernels.reference.int_mim.exp2_table).
  std::vector<int64_t> exp_att, exp_prob;
  // Builds the derived GEMM layouts, then checks every field against the spec's ranges
  // (std::invalid_argument naming the first one out of range).
  void finalize();
  void validate() const;
};

// Local attention of one query set over cached keys (the spec's window_attention_int).
// q: (nq, H, Dh) int8; k/v cache: (h*w, H, Dh) int8; out: (nq, H, Dh) int32.
void window_attention(const int8_t* q, const int64_t* q_pos, const int64_t* q_limit, int64_t nq,
                      const int8_t* k_cache, const int8_t* v_cache, const int64_t* key_stage,
                      int h, int w, int heads, int head_dim, int radius, int32_t score_mult,
                      int32_t score_shift, const int32_t* bias, const int64_t* exp_table,
                      int32_t* out, int num_threads);

// Integer logits (n, K) in 2^-16-bit units -> CDFs (n, K+1) int32 (the spec's logits_to_cdfs).
void logits_to_cdfs(const int32_t* logits, int64_t n, int k, int precision,
                    const int64_t* exp_table, int32_t* cdfs, int num_threads);

// Per-image state: the known-stream key/value caches and the stage of every position.
class Session {
 public:
  Session(const Model& model, int h, int w, const int64_t* key_stage);
  // Sets the stage of n positions (the sampled fill of unsent stages gives the tokens it fixes
  // the stage of the iteration that fixed them).
  void set_key_stage(const int64_t* pos, const int64_t* stage, int64_t n);
  // Known stream of n tokens (codes (n, M)) at raster positions pos with stages stage.
  void known_stream(const int64_t* codes, const int64_t* pos, const int64_t* stage, int64_t n,
                    int num_threads);
  // Query-stream outputs (n, W) int32 for tokens at pos with stages stage.
  void query_stream(const int64_t* pos, const int64_t* stage, int64_t n, int32_t* xq,
                    int num_threads) const;
  // Logits (n, K) of sub-code m given xq (n, W) and prefix (n, M) (columns < m are read).
  void head_logits(const int32_t* xq, const int64_t* prefix, int64_t n, int m, int32_t* logits,
                   int num_threads) const;

 private:
  void attend(int layer, const int8_t* q, const int64_t* pos, const int64_t* limit, int64_t n,
              int32_t* out, int num_threads) const;
  const Model& model_;
  int h_, w_;
  std::vector<int64_t> key_stage_;
  std::vector<int8_t> k_cache_, v_cache_;  // (depth, h*w, H, Dh)
};

}  // namespace intmim
}  // namespace pqmim
