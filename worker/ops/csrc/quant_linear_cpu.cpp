// Linear layers on quantized weights for the CPU: y = x W^T with W kept as it was stored.
//
// Decoding one stream reads every weight once per token, so its speed is the bytes read: a
// Q4_1 matrix is 5 bits a weight against float32's 32. The weights stay in their GGUF blocks
// (the layout of worker/ops/quant_formats.py) and are never expanded to floats. The activations
// are rounded to int16 with one float scale per chunk of 256 values (8 weight blocks, as
// llama.cpp's Q8_K), so that a block's dot product is 32 integer products summed in integers
// (AVX512-VNNI vpdpwssd, AVX2 vpmaddwd), scaled by the weight block's scale; a chunk's blocks
// are summed in float and scaled once by the activation's scale:
//   Q8_0  w = d q            sum = da sum_b dw sum(qw qa)
//   Q4_0  w = d (q - 8)      sum = da sum_b dw sum(qw qa) - 8 dw sa      (sa = da sum(qa), per block)
//   Q4_1  w = d q + m        sum = da sum_b dw sum(qw qa) + m sa
//   int8  w = s_row q        sum = da sum_b sum(qw qa); times the row's scale at the end
// What bounds the speed is the CPU's two multiply pipes, which take the integer dots and the
// float scaling alike: a scale per chunk rather than per block leaves one fused multiply-add per
// block and row (3072 x 576 Q4_1 at 32 rows: 1.89 ms with a scale per block, 1.38 per chunk).
// Layouts:
//   x       [M, K]           float32, contiguous, K a multiple of 32
//   weight  [N, row_bytes]   uint8 GGUF blocks (int8 [N, K] for int8), contiguous
//   scale   [N]              float32 (int8 only; an empty tensor otherwise)
//   out     [M, N]           float32, contiguous, written
// Output rows are spread over torch's OpenMP threads (at::parallel_for). For M > 1 the rows are
// taken in tiles, so a tile of weights is read from memory once and reused from L1 for every
// activation row, and each weight block is unpacked once for a group of activation rows
// (dot_rows).
//
// Registered as torch.ops.kvops.quant_linear_cpu; built together with paged_attention_cpu.cpp
// by worker/ops/cpu_attention.py (one extension, one cache, one prebuilt library).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "kvops_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVOPS_QUANT_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KVOPS_QUANT_VNNI 1  // fused integer dots on 256-bit registers, and 32 of them
#endif
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kChunkBlocks = 8;  // weight blocks per activation scale
// The format codes of worker/ops/quant_formats.py (FORMATS[...].code).
enum Format : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3 };

// Bytes per 32-weight block (0: not a format code).
constexpr int64_t block_bytes_of(int64_t format) {
  return format == kQ8_0 ? 34 : format == kQ4_0 ? 18 : format == kQ4_1 ? 20 : format == kInt8 ? kBlock : 0;
}
constexpr bool is_4bit(int64_t format) { return format == kQ4_0 || format == kQ4_1; }

// Activations are int16. int8, as llama.cpp rounds them, cost this model too much: perplexity
// with the Q4_1 file +0.40% over float32 with a scale per 32 values (llama.cpp's own: +0.30%),
// +1.01% per 256 (int16 per 256: +0.001%); and with Q8_0 weights 8 of the 9 exactness prompts
// left the float32 reference's greedy path within 48 tokens (4 with float activations or int16).
constexpr float kActMax = 32767.f;

// The 4-bit formats' offset terms (block offset times sa) of eight rows are summed as the lanes
// of one vector per block, so the block sums sa of rows 8g..8g+7 lie together: [block][8].
constexpr int64_t kSumLanes = 8;

// The rows of one dot_rows call, as rounded: x ~= d[c] * q within chunk c of a row; s holds
// the block sums of the rows' group of eight, the first row being lane `lane`.
struct ActGroup {
  const int16_t* q[kSumLanes];
  const float* d[kSumLanes];
  const float* s;
  int64_t lane;
};

// The rounded activations of M rows, owning their storage.
class Activations {
 public:
  Activations(int64_t rows, int64_t num_blocks)
      : num_blocks_(num_blocks),
        num_chunks_((num_blocks + kChunkBlocks - 1) / kChunkBlocks),
        q_(static_cast<size_t>(rows * num_blocks * kBlock)),
        d_(static_cast<size_t>(rows * num_chunks_)),
        s_(static_cast<size_t>((rows + kSumLanes - 1) / kSumLanes * num_blocks * kSumLanes), 0.f) {}

  // Rows m .. m + rows - 1, within one group of eight.
  ActGroup group(int64_t m, int rows) const {
    ActGroup g{};
    for (int r = 0; r < rows; ++r) {
      g.q[r] = q_.data() + (m + r) * num_blocks_ * kBlock;
      g.d[r] = d_.data() + (m + r) * num_chunks_;
    }
    g.s = s_.data() + m / kSumLanes * num_blocks_ * kSumLanes;
    g.lane = m % kSumLanes;
    return g;
  }

  void round_row(int64_t m, const float* x) {
    int16_t* q = q_.data() + m * num_blocks_ * kBlock;
    float* s = s_.data() + m / kSumLanes * num_blocks_ * kSumLanes + m % kSumLanes;
    for (int64_t c = 0; c < num_chunks_; ++c) {
      const int64_t first = c * kChunkBlocks * kBlock;
      const int64_t last = std::min(first + kChunkBlocks * kBlock, num_blocks_ * kBlock);
      float amax = 0.f;
      for (int64_t j = first; j < last; ++j) amax = std::max(amax, std::fabs(x[j]));
      const float scale = amax / kActMax;
      const float inverse = scale != 0.f ? 1.f / scale : 0.f;
      for (int64_t b = first / kBlock; b < last / kBlock; ++b) {
        int sum = 0;
        for (int64_t j = b * kBlock; j < (b + 1) * kBlock; ++j) {
          const int v = static_cast<int>(std::nearbyint(x[j] * inverse));
          q[j] = static_cast<int16_t>(v);
          sum += v;
        }
        s[b * kSumLanes] = scale * static_cast<float>(sum);
      }
      d_[m * num_chunks_ + c] = scale;
    }
  }

 private:
  int64_t num_blocks_, num_chunks_;
  std::vector<int16_t> q_;
  std::vector<float> d_, s_;
};

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#ifdef KVOPS_QUANT_AVX2
  return _cvtsh_ss(bits);
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// A weight block's scale and the per-block term its offset adds (times sa): Q4_1's minimum m,
// Q4_0's -8 d; int8's row scale is applied by the caller.
template <int64_t kFormat>
inline float block_scale(const uint8_t* w) {
  return kFormat == kInt8 ? 1.f : half_to_float(w);
}
template <int64_t kFormat>
inline float block_offset(const uint8_t* w) {
  if constexpr (kFormat == kQ4_1) return half_to_float(w + 2);
  if constexpr (kFormat == kQ4_0) return -8.f * half_to_float(w);
  return 0.f;
}
template <int64_t kFormat>
inline const uint8_t* block_values(const uint8_t* w) {
  return w + (kFormat == kQ8_0 || kFormat == kQ4_0 ? 2 : kFormat == kQ4_1 ? 4 : 0);
}

#ifdef KVOPS_QUANT_AVX2

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// A weight block's 32 values unpacked for the integer dots: two registers of 16 int16.
struct Unpacked {
  __m256i low, high;
};

template <int64_t kFormat>
inline Unpacked unpack(const uint8_t* w) {
  const uint8_t* q = block_values<kFormat>(w);
  if constexpr (is_4bit(kFormat)) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    return {_mm256_cvtepu8_epi16(_mm_and_si128(packed, mask)),
            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask))};
  } else {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))};
  }
}

// The block's 32 products with the activations summed into eight int32 lanes (at most
// 32 * 128 * 32767 in all: no overflow).
inline __m256i dot_block(const Unpacked& w, const int16_t* a) {
  const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16));
#ifdef KVOPS_QUANT_VNNI
  return _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(_mm256_setzero_si256(), w.low, a0), w.high, a1);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(w.low, a0), _mm256_madd_epi16(w.high, a1));
#endif
}

// One weight row against up to kRowGroup activation rows: each block is unpacked once and used
// for every row. Every row gets the same operations in the same order whatever R is, so a
// row's result does not depend on the rows grouped with it.
template <int64_t kFormat, int R>
void dot_rows(const uint8_t* w, const ActGroup& a, int64_t num_blocks, float* out) {
  constexpr int64_t bytes = block_bytes_of(kFormat);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256 offsets = _mm256_setzero_ps();  // lane l: the offset terms of row l of the group
  for (int64_t first = 0; first < num_blocks; first += kChunkBlocks) {
    const int64_t last = std::min(first + kChunkBlocks, num_blocks);
    __m256 part[R];
    for (int r = 0; r < R; ++r) part[r] = _mm256_setzero_ps();
    for (int64_t b = first; b < last; ++b) {
      const uint8_t* wb = w + b * bytes;
      const Unpacked unpacked = unpack<kFormat>(wb);
      const __m256 dw = _mm256_set1_ps(block_scale<kFormat>(wb));
      for (int r = 0; r < R; ++r) {
        const __m256i sum = dot_block(unpacked, a.q[r] + b * kBlock);
        part[r] = _mm256_fmadd_ps(dw, _mm256_cvtepi32_ps(sum), part[r]);
      }
      if constexpr (is_4bit(kFormat))
        offsets = _mm256_fmadd_ps(_mm256_set1_ps(block_offset<kFormat>(wb)),
                                  _mm256_loadu_ps(a.s + b * kSumLanes), offsets);
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm256_fmadd_ps(part[r], _mm256_broadcast_ss(a.d[r] + first / kChunkBlocks), acc[r]);
  }
  alignas(32) float offset_sums[kSumLanes];
  _mm256_store_ps(offset_sums, offsets);
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + offset_sums[a.lane + r];
}

#ifdef KVOPS_QUANT_VNNI
constexpr int kRowGroup = 8;  // 2 x 8 accumulators and the unpacked block fit 32 registers
#else
constexpr int kRowGroup = 4;  // ... and 2 x 4 fit AVX2's 16 (8 rows: 10% slower, spilling)
#endif

#else  // portable C++: the same sums, one value at a time

template <int64_t kFormat>
inline void unpack_values(const uint8_t* w, int32_t* q) {
  const uint8_t* v = block_values<kFormat>(w);
  for (int j = 0; j < 16; ++j) {
    if constexpr (is_4bit(kFormat)) {
      q[j] = v[j] & 0x0F;
      q[j + 16] = v[j] >> 4;
    } else {
      q[j] = static_cast<int8_t>(v[j]);
      q[j + 16] = static_cast<int8_t>(v[j + 16]);
    }
  }
}

template <int64_t kFormat, int R>
void dot_rows(const uint8_t* w, const ActGroup& a, int64_t num_blocks, float* out) {
  constexpr int64_t bytes = block_bytes_of(kFormat);
  float acc[R] = {}, offsets[R] = {};
  int32_t q[kBlock];
  for (int64_t first = 0; first < num_blocks; first += kChunkBlocks) {
    const int64_t last = std::min(first + kChunkBlocks, num_blocks);
    float part[R] = {};
    for (int64_t b = first; b < last; ++b) {
      const uint8_t* wb = w + b * bytes;
      unpack_values<kFormat>(wb, q);
      const float dw = block_scale<kFormat>(wb), offset = block_offset<kFormat>(wb);
      for (int r = 0; r < R; ++r) {
        int32_t sum = 0;
        for (int j = 0; j < kBlock; ++j) sum += q[j] * int32_t(a.q[r][b * kBlock + j]);
        part[r] += dw * float(sum);
        offsets[r] += offset * a.s[b * kSumLanes + a.lane + r];
      }
    }
    for (int r = 0; r < R; ++r) acc[r] += part[r] * a.d[r][first / kChunkBlocks];
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r] + offsets[r];
}

constexpr int kRowGroup = 8;

#endif

template <int64_t kFormat>
using RowsFn = void (*)(const uint8_t*, const ActGroup&, int64_t, float*);

// The kernel for a group of `rows` activation rows (1 to R).
static_assert(kSumLanes % kRowGroup == 0, "a row group lies within one group of eight");

template <int64_t kFormat, int R = kRowGroup>
RowsFn<kFormat> rows_fn(int rows) {
  if constexpr (R == 1) {
    return dot_rows<kFormat, 1>;
  } else {
    return rows >= R ? dot_rows<kFormat, R> : rows_fn<kFormat, R - 1>(rows);
  }
}

// Output rows per tile when M > 1: 16 rows of a 576-wide Q8_0 matrix are 10 KiB, within L1.
constexpr int64_t kRowTile = 16;
// Activation rows per pass over the weights (a multiple of kSumLanes): 256 rows of 576 int16
// are 288 KiB, within L2, where a 2048-row prefill streamed all of its rows from L3 for every
// tile of weights (3072 x 576 Q4_1 at 2048 rows: 71.6 ms, 66.4 in passes of 256).
constexpr int64_t kActivationBlock = 256;

template <int64_t kFormat>
void multiply(const float* x, int64_t M, int64_t K, const uint8_t* w, int64_t N,
              const float* row_scale, float* out) {
  const int64_t num_blocks = K / kBlock, row_bytes = num_blocks * block_bytes_of(kFormat);
  Activations act(M, num_blocks);
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) act.round_row(m, x + m * K);
  });
  // Small grains so that both threads work on the smallest decode projections (192 rows).
  at::parallel_for(0, N, kRowTile, [&](int64_t begin, int64_t end) {
    for (int64_t block = 0; block < M; block += kActivationBlock) {
      const int64_t block_end = std::min(block + kActivationBlock, M);
      for (int64_t tile = begin; tile < end; tile += kRowTile) {
        const int64_t tile_end = std::min(tile + kRowTile, end);
        for (int64_t m = block; m < block_end; m += kRowGroup) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, block_end - m));
          const RowsFn<kFormat> dot_group = rows_fn<kFormat>(rows);
          const ActGroup a = act.group(m, rows);
          float y[kRowGroup];
          for (int64_t n = tile; n < tile_end; ++n) {
            dot_group(w + n * row_bytes, a, num_blocks, y);
            for (int r = 0; r < rows; ++r)
              out[(m + r) * N + n] = row_scale ? y[r] * row_scale[n] : y[r];
          }
        }
      }
    }
  });
}

}  // namespace

namespace kvops {

void quant_linear_cpu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& scale,
    int64_t format,
    at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "quant_linear_cpu: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.element_size() == 1,
              "quant_linear_cpu: weight must be a contiguous 1-byte [N, row_bytes] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(K % kBlock == 0, "quant_linear_cpu: K = ", K, " is not a multiple of 32");
  const int64_t num_blocks = K / kBlock;
  const int64_t block_bytes = block_bytes_of(format);
  TORCH_CHECK(block_bytes != 0, "quant_linear_cpu: unknown format code ", format);
  TORCH_CHECK(weight.size(1) == num_blocks * block_bytes, "quant_linear_cpu: weight rows of ",
              weight.size(1), " bytes do not hold K = ", K, " values of format ", format);
  const bool per_row_scale = format == kInt8;
  TORCH_CHECK(!per_row_scale || (scale.scalar_type() == at::kFloat && scale.numel() == N &&
                                 scale.is_contiguous()),
              "quant_linear_cpu: int8 needs a contiguous float32 scale of N values");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(0) == M &&
                  out.size(1) == N,
              "quant_linear_cpu: out must be a contiguous float32 [M, N] tensor");

  const uint8_t* wp = static_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = per_row_scale ? scale.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (format) {
    case kQ8_0: return multiply<kQ8_0>(xp, M, K, wp, N, sp, op);
    case kQ4_0: return multiply<kQ4_0>(xp, M, K, wp, N, sp, op);
    case kQ4_1: return multiply<kQ4_1>(xp, M, K, wp, N, sp, op);
    default: return multiply<kInt8>(xp, M, K, wp, N, sp, op);
  }
}

}  // namespace kvops

namespace {

// The matrix [N, K] of a quantized weight in float32 or bfloat16, for a GEMM library at prefill
// sizes: with many activation rows, a dense GEMM on the matrix expanded once beats a dot per row
// and block. Each value is computed in float32 as the torch reference does (d * (q - 8), not
// d * q - 8 d: bit for bit); bfloat16 rounds it to nearest even, as torch's .to() does.
inline void store(float v, float* o) { *o = v; }
inline void store(float v, c10::BFloat16* o) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
  std::memcpy(o, &rounded, 2);
}

// One format per instantiation, so that the compiler vectorizes the block's 32 values.
template <int64_t kFormat, typename Out>
void dequantize_rows(const uint8_t* wp, const float* row_scale, int64_t begin, int64_t end,
                     int64_t K, Out* op) {
  constexpr int64_t bytes = block_bytes_of(kFormat);
  const int64_t num_blocks = K / kBlock;
  for (int64_t n = begin; n < end; ++n) {
    const uint8_t* w = wp + n * num_blocks * bytes;
    Out* o = op + n * K;
    for (int64_t b = 0; b < num_blocks; ++b, w += bytes, o += kBlock) {
      const uint8_t* q = block_values<kFormat>(w);
      float v[kBlock];
      if constexpr (kFormat == kQ8_0 || kFormat == kInt8) {
        const float d = kFormat == kInt8 ? row_scale[n] : half_to_float(w);
        for (int j = 0; j < kBlock; ++j) v[j] = d * float(static_cast<int8_t>(q[j]));
      } else {
        const float d = half_to_float(w);
        const float m = kFormat == kQ4_1 ? half_to_float(w + 2) : 0.f;
        constexpr int offset = kFormat == kQ4_1 ? 0 : 8;
        for (int j = 0; j < 16; ++j) {
          v[j] = d * float((q[j] & 0x0F) - offset) + m;
          v[j + 16] = d * float((q[j] >> 4) - offset) + m;
        }
      }
      for (int j = 0; j < kBlock; ++j) store(v[j], o + j);
    }
  }
}

template <typename Out>
void dequantize_all(const uint8_t* wp, const float* sp, int64_t format, int64_t N, int64_t K,
                    Out* op) {
  at::parallel_for(0, N, kRowTile, [&](int64_t begin, int64_t end) {
    switch (format) {
      case kQ8_0: return dequantize_rows<kQ8_0>(wp, sp, begin, end, K, op);
      case kQ4_0: return dequantize_rows<kQ4_0>(wp, sp, begin, end, K, op);
      case kQ4_1: return dequantize_rows<kQ4_1>(wp, sp, begin, end, K, op);
      default: return dequantize_rows<kInt8>(wp, sp, begin, end, K, op);
    }
  });
}

void dequantize_cpu(
    const at::Tensor& weight, const at::Tensor& scale, int64_t format, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.element_size() == 1,
              "dequantize_cpu: weight must be a contiguous 1-byte [N, row_bytes] tensor");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == weight.size(0) &&
                  out.size(1) % kBlock == 0 &&
                  (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
              "dequantize_cpu: out must be a contiguous float32 or bfloat16 [N, K] tensor");
  const int64_t N = out.size(0), K = out.size(1), num_blocks = K / kBlock;
  const int64_t block_bytes = block_bytes_of(format);
  TORCH_CHECK(block_bytes != 0, "dequantize_cpu: unknown format code ", format);
  TORCH_CHECK(weight.size(1) == num_blocks * block_bytes,
              "dequantize_cpu: weight rows do not hold K values");
  TORCH_CHECK(format != kInt8 || (scale.scalar_type() == at::kFloat && scale.numel() == N),
              "dequantize_cpu: int8 needs a float32 scale of N values");
  const uint8_t* wp = static_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = format == kInt8 ? scale.data_ptr<float>() : nullptr;
  if (out.scalar_type() == at::kFloat)
    dequantize_all(wp, sp, format, N, K, out.data_ptr<float>());
  else
    dequantize_all(wp, sp, format, N, K, out.data_ptr<c10::BFloat16>());
}

// From how many activation rows expanding a weight to float32 for one dense GEMM beats this
// build's integer dots. Measured on one thread at SmolLM2's shapes (bench/results/README.md,
// "2026-11-30 18:30-19:37"), 3072 x 576 Q4_1: with AVX512-VNNI the two break even near 256
// rows (10.8 against 10.4 ms; 5.3 against 6.5 at 128), with AVX2 between 64 and 128 (3.3
// against 3.4 ms at 64, 6.9 against 6.2 at 128); the portable C++ dots win at one row only
// (0.65 against 1.35 ms; 4 rows: 1.96 against 1.47).
int64_t quant_dense_from_rows() {
#if defined(KVOPS_QUANT_VNNI)
  return 256;
#elif defined(KVOPS_QUANT_AVX2)
  return 128;
#else
  return 2;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvops, m) {
  m.def(
      "quant_linear_cpu(Tensor x, Tensor weight, Tensor scale, int format, Tensor(a!) out) "
      "-> ()");
  m.def("dequantize_cpu(Tensor weight, Tensor scale, int format, Tensor(a!) out) -> ()");
  m.def("quant_dense_from_rows() -> int", &quant_dense_from_rows);
}

TORCH_LIBRARY_IMPL(kvops, CPU, m) {
  m.impl("quant_linear_cpu", &kvops::quant_linear_cpu);
  m.impl("dequantize_cpu", &dequantize_cpu);
}
