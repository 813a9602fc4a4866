// rANS entropy coder core: plain C++17, no Python. See docs in pqmim_kernels/coding/rans.py.
//
// Coder parameters
//   state      64-bit, kept in [kLow, kLow * 2^32) between symbols, kLow = 2^31
//   renorm     one 32-bit word in (encoder) / out (decoder) at most per symbol
//   precision  P in [1, 24]: every distribution is integer frequencies summing to 2^P
//   lanes      1, 2, 4 or 8 interleaved states; symbol j (global index across calls) uses
//              lane j % lanes
//
// Two framings of the same coder (the caller chooses; the decoder must be told the same).
//
// Standard framing (self-describing), little endian, empty for zero symbols:
//   byte 0            header: bits 0-1 log2(lanes), bit 2 "trailing count follows",
//                     bits 3-7 P - 1
//   trailing count    only if bit 2: LEB128 varint t >= 1 (1 byte below 128), the number of
//                     symbols at the end of the stream with alphabet size K = 1. Such symbols
//                     (frequency 2^P) change no state and cost no bits, so without the count
//                     decoding past the end of a stream that ends with them could not fail.
//                     Streams that do not end with K = 1 symbols have bit 2 clear and no
//                     count.
//   lane 0 state      5..8 bytes; the count is implied by the stream length (everything after
//                     it is a multiple of 4 bytes), which saves ~2 bytes on small streams
//   lanes 1.. states  8 bytes each
//   words             32-bit words in the order the decoder consumes them
// The encoder starts every lane at kLow; the decoder must end every lane at kLow having read
// every word, which is a ~31-bit-per-lane integrity check (it also catches decoding with
// distributions that differ from the encoder's).
//
// Compact framing (for small streams inside a container that records the symbol count, the
// precision and the lane choice, and checks integrity itself, like .pqm): the decoder is told
// the symbol count n, the precision and the `lanes` argument the encoder had. When that
// gives one lane (lanes 1, or automatic with n < kInterleaveMinSymbols) the stream is
//   head              1..4 bytes, little endian, no leading zero byte: (length - 1) % 4 + 1
//   words             32-bit words in the order the decoder consumes them
// and b"" when the final state is 0 (zero symbols, or only symbols whose interval starts at
// 0). The lane starts at state 0 instead of kLow (no 31-bit check value to carry) and the
// encoder's flush decision is unchanged, so while the state is still below kLow the encoder
// emits nothing and the decoder, at the end of the words, reads nothing. Final flush: a state
// x >= 2^32 emits its low word (read first) and x >> 32 (< 2^31) becomes the head; otherwise x
// is the head. The decoder reads the head, and if it is below kLow and words follow, one
// word: x = head << 32 | word. It must end at state 0 with every byte read and exactly n
// symbols decoded. Cost: the bytes of the final state (~P bits for the first symbol coded
// from the empty state, plus < 1 byte of rounding) instead of 1 + 5..8 bytes. With more than
// one lane the compact framing writes the standard stream (large streams are unchanged).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pqmim::rans {

// Bumped whenever the binding's behaviour or the stream format changes (2: InUse errors,
// full CDF row checks; 3: trailing K = 1 count, compact framing, symbol counts); the Python
// layer refuses a stale extension whose value differs from the one it was written for.
constexpr int kAbiVersion = 3;
constexpr int kMaxPrecision = 24;
constexpr int kDefaultPrecision = 24;
constexpr uint64_t kLow = uint64_t{1} << 31;
// Streams with at least this many symbols use kInterleavedLanes states; smaller ones use a
// single state. Each lane costs 8 bytes of final state (~4 of them pure integrity check).
// Encoding speed does not depend on the lane count (it is bound by memory traffic and the
// division), decoding does: each lane's state is an independent dependency chain, so more
// lanes overlap more table / CDF lookups. On this Zen 5 EPYC, 4 lanes decode the CDF and
// indexed forms 15-25% faster than 2, and 8 add nothing over 4 (bench/README.md).
constexpr int64_t kInterleaveMinSymbols = int64_t{1} << 16;
constexpr int kInterleavedLanes = 4;
constexpr int kMaxLanes = 8;

enum class Framing { kStandard = 0, kCompact = 1 };

// Lanes a stream of n symbols uses for a `lanes` argument (0 = automatic).
inline int lanes_for(int lanes, int64_t n) {
  return lanes != 0 ? lanes : (n >= kInterleaveMinSymbols ? kInterleavedLanes : 1);
}

// Raised for every bad argument or undecodable stream (the binding maps it to ValueError).
struct Error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Raised when a second thread calls into an Encoder or Decoder while another call on the same
// object is running (the binding releases the GIL, so Python threads can do this; it maps
// the exception to RuntimeError). One object per thread; different objects run in parallel.
struct InUse : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Marks an object busy for the duration of one call: a second entry throws InUse instead of
// racing on the object's buffers (one atomic exchange per call, nothing per symbol).
class CallGuard {
 public:
  CallGuard(std::atomic<bool>& busy, const char* what);
  CallGuard(const CallGuard&) = delete;
  CallGuard& operator=(const CallGuard&) = delete;
  ~CallGuard() { busy_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool>& busy_;
};

// Growable array of uint32 that, unlike std::vector, does not zero what it grows into (every
// element is written before it is read) and backs large sizes with transparent huge pages
// where the system offers them: the encoder's per-symbol buffers are written once and read
// once, so 4 KiB page faults and the zero fill were a third of the indexed encode's time.
class U32Buffer {
 public:
  U32Buffer() = default;
  U32Buffer(const U32Buffer&) = delete;
  U32Buffer& operator=(const U32Buffer&) = delete;
  ~U32Buffer() { release(); }
  size_t size() const { return size_; }
  uint32_t* data() { return data_; }
  const uint32_t* data() const { return data_; }
  uint32_t& operator[](size_t i) { return data_[i]; }
  // New elements are uninitialised; shrinking keeps the capacity.
  void resize(size_t n);
  void release();  // frees the memory (size 0)

 private:
  uint32_t* data_ = nullptr;
  size_t size_ = 0, capacity_ = 0;
};

void check_precision(int precision);

// Deterministic float -> integer frequency quantisation of one row (see quantize_probs in
// pqmim_kernels/coding/rans.py for the exact spec). freq receives K frequencies >= 1 that sum
// to 2^precision. Throws Error naming `row` for NaN / inf / negative entries or an all-zero row.
void quantize_row(const float* p, int64_t k, int precision, uint32_t* freq, int64_t row);

// probs (n, k) float32 row-major -> cdfs (n, k + 1) int32 row-major.
void quantize_probs(const float* probs, int64_t n, int64_t k, int precision, int32_t* cdfs,
                    int num_threads);

// Full check of a CDF table (rows of k + 1 entries): 0, strictly increasing, 2^precision.
// Throws Error naming the first bad row as "<name> row <r>" and what is wrong with it.
void check_cdf_table(const int32_t* table, int64_t rows, int64_t k, int precision,
                     const char* name = "cdf_table");

class Encoder {
 public:
  explicit Encoder(int precision = kDefaultPrecision, int lanes = 0, int num_threads = 1,
                   Framing framing = Framing::kStandard);

  // Each call appends n symbols; nothing is coded until finish(). Every call validates its
  // whole input (symbols, every distribution) and leaves the encoder unchanged when it throws.
  // All members throw InUse when another thread is inside a call on this object.
  void push_probs(const int64_t* symbols, const float* probs, int64_t n, int64_t k);
  void push_cdfs(const int64_t* symbols, const int32_t* cdfs, int64_t n, int64_t k);
  void push_indexed(const int64_t* symbols, const int64_t* indexes, int64_t n,
                    const int32_t* table, int64_t tables, int64_t k);

  // Codes every buffered symbol (last to first, so the decoder reads them first to last) and
  // returns the stream. The encoder is empty afterwards and can be reused.
  std::vector<uint8_t> finish();

  int64_t pending() const;
  int precision() const { return precision_; }

 private:
  int precision_;
  int lanes_;  // 0 = choose from the symbol count at finish()
  int num_threads_;
  Framing framing_;
  U32Buffer start_;
  U32Buffer freq_;
  mutable std::atomic<bool> busy_{false};
};

class Decoder {
 public:
  // `symbols`: the number of symbols the stream holds, or -1 if unknown (standard framing
  // only). When known, decoding more raises and finish() checks that all were decoded.
  // `lanes`: the encoder's lanes argument; the compact framing needs it (with the count) to
  // know the layout, the standard framing checks it against the header when nonzero.
  Decoder(const uint8_t* data, size_t size, int precision = kDefaultPrecision,
          int num_threads = 1, Framing framing = Framing::kStandard, int64_t symbols = -1,
          int lanes = 0);

  void pop_probs(const float* probs, int64_t n, int64_t k, int64_t* out);
  void pop_cdfs(const int32_t* cdfs, int64_t n, int64_t k, int64_t* out);
  void pop_indexed(const int64_t* indexes, int64_t n, const int32_t* table, int64_t tables,
                   int64_t k, int64_t* out);

  // Throws Error unless every word was read and every lane is back at its initial state.
  void finish() const;

  int lanes() const { return lanes_; }  // fixed at construction: no guard needed
  int64_t decoded() const;
  size_t remaining_bytes() const;

 private:
  void parse_standard(int lanes);
  void parse_compact();
  // Reads the next word into x if x < kLow (the decoder's renormalisation).
  void renorm(uint64_t& x) {
    if (x >= kLow) return;
    if (data_.size() - pos_ >= 4) {
      x = (x << 32) | read_word();
    } else if (!compact_) {
      throw_out_of_bytes();
    }  // compact: the encoder's initial phase, states below kLow with nothing emitted
  }
  uint32_t read_word();
  [[noreturn]] void throw_out_of_bytes() const;
  void before_pop(int64_t n, int64_t k);  // count, empty-stream and K = 1 end checks
  bool at_end() const;
  std::vector<uint8_t> data_;
  size_t pos_ = 0;
  int precision_;
  int lanes_ = 1;  // 1, 2, 4 or 8: a power of two, so lane = count & (lanes - 1)
  int num_threads_;
  bool compact_ = false;  // the compact one-lane layout (initial state 0)
  uint64_t initial_ = kLow;  // the state every lane starts (and must end) at
  int64_t expected_ = -1;    // symbols in the stream, -1 if unknown
  int64_t trailing_ = 0;     // K = 1 symbols at the end (standard framing, header bit 2)
  int64_t trailing_used_ = 0;
  uint64_t state_[kMaxLanes] = {};
  int64_t count_ = 0;
  mutable std::atomic<bool> busy_{false};
};

}  // namespace pqmim::rans
