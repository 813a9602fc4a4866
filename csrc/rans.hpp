// rANS entropy coder core: plain C++17, no Python. See docs in pqmim_kernels/coding/rans.py.
//
// Coder parameters
//   state      64-bit, kept in [kLow, kLow * 2^32) between symbols, kLow = 2^31
//   renorm     one 32-bit word in (encoder) / out (decoder) at most per symbol
//   precision  P in [1, 24]: every distribution is integer frequencies summing to 2^P
//   lanes      1, 2, 4 or 8 interleaved states; symbol j (global index across calls) uses
//              lane j % lanes
//
// Stream layout (little endian), empty for zero symbols:
//   byte 0            header: bits 0-1 log2(lanes), bit 2 reserved (0), bits 3-7 P - 1
//   lane 0 state      5..8 bytes; the count is implied by the stream length (everything after
//                     it is a multiple of 4 bytes), which saves ~2 bytes on small streams
//   lanes 1.. states  8 bytes each
//   words             32-bit words in the order the decoder consumes them
// The encoder starts every lane at kLow; the decoder must end every lane at kLow having read
// every word, which is a ~31-bit-per-lane integrity check (it also catches decoding with
// distributions that differ from the encoder's).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pqmim::rans {

// Bumped whenever the binding's behaviour or the stream format changes (2: InUse errors,
// full CDF row checks); the Python layer refuses a stale extension whose value differs from
// the one it was written for.
constexpr int kAbiVersion = 2;
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
  explicit Encoder(int precision = kDefaultPrecision, int lanes = 0, int num_threads = 1);

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
  U32Buffer start_;
  U32Buffer freq_;
  mutable std::atomic<bool> busy_{false};
};

class Decoder {
 public:
  Decoder(const uint8_t* data, size_t size, int precision = kDefaultPrecision,
          int num_threads = 1);

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
  uint32_t read_word();
  void need_stream(int64_t n) const;
  std::vector<uint8_t> data_;
  size_t pos_ = 0;
  int precision_;
  int lanes_ = 1;  // 1, 2, 4 or 8: a power of two, so lane = count & (lanes - 1)
  int num_threads_;
  uint64_t state_[kMaxLanes] = {};
  int64_t count_ = 0;
  mutable std::atomic<bool> busy_{false};
};

}  // namespace pqmim::rans
