// Linear layers on quantized weights for the CPU: y = x W^T with W kept as it was stored.
//
// Decoding one stream reads every weight once per token, so its speed is the bytes read: a
// Q4_1 matrix is 5 bits a weight against float32's 32. The weights stay in their GGUF blocks
// (the layout of worker/ops/quant_formats.py) and are never expanded to floats. The activations
// are quantized per 32-value block to int16 with one float scale (llama.cpp uses int8; see
// kActMax), so that a block's dot product is 32 integer products summed in integers (AVX2
// vpmaddwd), scaled once by the two blocks' scales:
//   Q8_0  w = d q            sum = dw da sum(qw qa)
//   Q4_0  w = d (q - 8)      sum = dw da sum((qw - 8) qa)
//   Q4_1  w = d q + m        sum = dw da sum(qw qa) + m da sum(qa)    (da sum(qa) kept per block)
//   int8  w = s_row q        per 32-block: da sum(qw qa); times the row's scale at the end
// Layouts:
//   x       [M, K]           float32, contiguous, K a multiple of 32
//   weight  [N, row_bytes]   uint8 GGUF blocks (int8 [N, K] for int8), contiguous
//   scale   [N]              float32 (int8 only; an empty tensor otherwise)
//   out     [M, N]           float32, contiguous, written
// Output rows are spread over torch's OpenMP threads (at::parallel_for). For M > 1 the rows are
// taken in tiles, so a tile of weights is read from memory once and reused from L1 for every
// activation row, and each weight block is unpacked once for a group of eight activation rows
// (dot_rows).
//
// Registered as torch.ops.kvops.quant_linear_cpu; built together with paged_attention_cpu.cpp
// by worker/ops/cpu_attention.py (one extension, one cache, one prebuilt library).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KVOPS_QUANT_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 32;
// The format codes of worker/ops/quant_formats.py (FORMATS[...].code).
enum Format : int64_t { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2, kInt8 = 3 };

// Bytes per 32-weight block (0: not a format code).
constexpr int64_t block_bytes_of(int64_t format) {
  return format == kQ8_0 ? 34 : format == kQ4_0 ? 18 : format == kQ4_1 ? 20 : format == kInt8 ? kBlock : 0;
}
// Activations are rounded to int16 per block. int8, as llama.cpp rounds them, cost this model
// too much: with Q8_0 weights, 8 of the 9 exactness prompts left the float32 reference's greedy
// path within 48 tokens (4 with float activations), at logprob margins up to 0.37 nats.
constexpr float kActMax = 32767.f;

// One block of 32 activations as int16: x ~= d * q; s = d * sum(q) (for Q4_1's minimum).
struct ActBlock {
  float d;
  float s;
  int16_t q[kBlock];
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

void quantize_row(const float* x, int64_t num_blocks, ActBlock* out) {
  for (int64_t b = 0; b < num_blocks; ++b) {
    const float* v = x + b * kBlock;
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / kActMax;
    const float inverse = d != 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int j = 0; j < kBlock; ++j) {
      const int q = static_cast<int>(std::nearbyint(v[j] * inverse));
      out[b].q[j] = static_cast<int16_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

#ifdef KVOPS_QUANT_AVX2

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// A block's 32 weights (two registers of 16 int16) times its 32 activations, summed into eight
// int32 lanes (at most 32 * 255 * 32767 in all: no overflow), as floats.
inline __m256 dot_block(__m256i w_low, __m256i w_high, const int16_t* a) {
  const __m256i low = _mm256_madd_epi16(w_low, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m256i high =
      _mm256_madd_epi16(w_high, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16)));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(low, high));
}

// One weight row against up to kRowGroup activation rows: each block is unpacked once and used
// for every row (a row at a time, unpacking was about half of the work at 32 rows). Every row
// gets the same operations in the same order whatever R is, so a row's result does not depend
// on the rows grouped with it.
template <int64_t kFormat, int R>
void dot_rows(const uint8_t* w, const ActBlock* const* a, int64_t num_blocks, float* out) {
  __m256 acc[R];
  float minimums[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    minimums[r] = 0.f;
  }
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t b = 0; b < num_blocks; ++b, w += block_bytes_of(kFormat)) {
    __m256i low, high;
    float dw = 1.f;  // int8: the row's scale is applied by the caller
    if constexpr (kFormat == kQ8_0 || kFormat == kInt8) {
      const uint8_t* q = kFormat == kQ8_0 ? w + 2 : w;
      low = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      high = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      if constexpr (kFormat == kQ8_0) dw = half_to_float(w);
    } else {
      const __m128i packed =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (kFormat == kQ4_0 ? 2 : 4)));
      low = _mm256_cvtepu8_epi16(_mm_and_si128(packed, mask));
      high = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
      if constexpr (kFormat == kQ4_0) {
        const __m256i eight = _mm256_set1_epi16(8);
        low = _mm256_sub_epi16(low, eight);
        high = _mm256_sub_epi16(high, eight);
      }
      dw = half_to_float(w);
    }
    float m = 0.f;
    if constexpr (kFormat == kQ4_1) m = half_to_float(w + 2);
    for (int r = 0; r < R; ++r) {
      const ActBlock& block = a[r][b];
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * block.d), dot_block(low, high, block.q), acc[r]);
      if constexpr (kFormat == kQ4_1) minimums[r] += m * block.s;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + minimums[r];
}

#else  // portable C++: the same sums, one value at a time

inline int sum_products(const int8_t* w, const int16_t* a) {
  int s = 0;
  for (int j = 0; j < kBlock; ++j) s += int(w[j]) * int(a[j]);
  return s;
}

inline void unpack_nibbles(const uint8_t* p, int offset, int8_t* out) {
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<int8_t>((p[j] & 0x0F) - offset);
    out[j + 16] = static_cast<int8_t>((p[j] >> 4) - offset);
  }
}

template <int64_t kFormat, int R>
void dot_rows(const uint8_t* w, const ActBlock* const* a, int64_t num_blocks, float* out) {
  float acc[R] = {};
  int8_t q[kBlock];
  for (int64_t b = 0; b < num_blocks; ++b, w += block_bytes_of(kFormat)) {
    float dw = 1.f;  // int8: the row's scale is applied by the caller
    if constexpr (kFormat == kQ8_0 || kFormat == kInt8) {
      std::memcpy(q, kFormat == kQ8_0 ? w + 2 : w, kBlock);
    } else {
      unpack_nibbles(w + (kFormat == kQ4_0 ? 2 : 4), kFormat == kQ4_0 ? 8 : 0, q);
    }
    if constexpr (kFormat != kInt8) dw = half_to_float(w);
    for (int r = 0; r < R; ++r) {
      const ActBlock& block = a[r][b];
      acc[r] += dw * block.d * float(sum_products(q, block.q));
      if constexpr (kFormat == kQ4_1) acc[r] += half_to_float(w + 2) * block.s;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = acc[r];
}

#endif

using RowsFn = void (*)(const uint8_t*, const ActBlock* const*, int64_t, float*);

// Activation rows per call of a RowsFn: eight accumulators and the unpacked block fit AVX2's
// sixteen registers (at 32 rows, 3072 x 576 Q4_1 on one thread: 2.97 ms a row at a time, 1.93
// in groups of four, 1.72 in groups of eight).
constexpr int kRowGroup = 8;

template <int64_t kFormat>
RowsFn rows_fn(int rows) {
  switch (rows) {
    case 1: return dot_rows<kFormat, 1>;
    case 2: return dot_rows<kFormat, 2>;
    case 3: return dot_rows<kFormat, 3>;
    case 4: return dot_rows<kFormat, 4>;
    case 5: return dot_rows<kFormat, 5>;
    case 6: return dot_rows<kFormat, 6>;
    case 7: return dot_rows<kFormat, 7>;
    default: return dot_rows<kFormat, 8>;
  }
}

RowsFn rows_fn(int64_t format, int rows) {
  switch (format) {
    case kQ8_0: return rows_fn<kQ8_0>(rows);
    case kQ4_0: return rows_fn<kQ4_0>(rows);
    case kQ4_1: return rows_fn<kQ4_1>(rows);
    default: return rows_fn<kInt8>(rows);
  }
}

// Output rows per tile when M > 1: 16 rows of a 576-wide Q8_0 matrix are 10 KiB, within L1.
constexpr int64_t kRowTile = 16;

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

  std::vector<ActBlock> act(static_cast<size_t>(M * num_blocks));
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(xp + m * K, num_blocks, act.data() + m * num_blocks);
  });

  const uint8_t* wp = static_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = per_row_scale ? scale.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = num_blocks * block_bytes;
  // Small grains so that both threads work on the smallest decode projections (192 rows).
  at::parallel_for(0, N, kRowTile, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile += kRowTile) {
      const int64_t tile_end = std::min(tile + kRowTile, end);
      for (int64_t m = 0; m < M; m += kRowGroup) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowGroup, M - m));
        const RowsFn dot_group = rows_fn(format, rows);
        const ActBlock* a[kRowGroup];
        for (int r = 0; r < rows; ++r) a[r] = act.data() + (m + r) * num_blocks;
        float y[kRowGroup];
        for (int64_t n = tile; n < tile_end; ++n) {
          dot_group(wp + n * row_bytes, a, num_blocks, y);
          for (int r = 0; r < rows; ++r) op[(m + r) * N + n] = sp ? y[r] * sp[n] : y[r];
        }
      }
    }
  });
}

// The float32 matrix [N, K] of a quantized weight, for a GEMM library at prefill sizes: with
// many activation rows, a dense GEMM on the matrix expanded once beats a dot per row and block.
void dequantize_cpu(
    const at::Tensor& weight, const at::Tensor& scale, int64_t format, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.element_size() == 1,
              "dequantize_cpu: weight must be a contiguous 1-byte [N, row_bytes] tensor");
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.size(0) == weight.size(0) && out.size(1) % kBlock == 0,
              "dequantize_cpu: out must be a contiguous float32 [N, K] tensor");
  const int64_t N = out.size(0), K = out.size(1), num_blocks = K / kBlock;
  const int64_t block_bytes = block_bytes_of(format);
  TORCH_CHECK(block_bytes != 0, "dequantize_cpu: unknown format code ", format);
  TORCH_CHECK(weight.size(1) == num_blocks * block_bytes,
              "dequantize_cpu: weight rows do not hold K values");
  TORCH_CHECK(format != kInt8 || (scale.scalar_type() == at::kFloat && scale.numel() == N),
              "dequantize_cpu: int8 needs a float32 scale of N values");
  const uint8_t* wp = static_cast<const uint8_t*>(weight.data_ptr());
  const float* sp = format == kInt8 ? scale.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, kRowTile, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* w = wp + n * num_blocks * block_bytes;
      float* o = op + n * K;
      for (int64_t b = 0; b < num_blocks; ++b, w += block_bytes, o += kBlock) {
        if (format == kQ8_0) {
          const float d = half_to_float(w);
          for (int j = 0; j < kBlock; ++j) o[j] = d * float(static_cast<int8_t>(w[2 + j]));
        } else if (format == kInt8) {
          for (int j = 0; j < kBlock; ++j) o[j] = sp[n] * float(static_cast<int8_t>(w[j]));
        } else {
          const float d = half_to_float(w);
          const float m = format == kQ4_1 ? half_to_float(w + 2) : 0.f;
          const int offset = format == kQ4_1 ? 0 : 8;
          const uint8_t* q = w + (format == kQ4_1 ? 4 : 2);
          for (int j = 0; j < 16; ++j) {
            o[j] = d * float((q[j] & 0x0F) - offset) + m;
            o[j + 16] = d * float((q[j] >> 4) - offset) + m;
          }
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvops, m) {
  m.def(
      "quant_linear_cpu(Tensor x, Tensor weight, Tensor scale, int format, Tensor(a!) out) "
      "-> ()");
  m.def("dequantize_cpu(Tensor weight, Tensor scale, int format, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(kvops, CPU, m) {
  m.impl("quant_linear_cpu", &quant_linear_cpu);
  m.impl("dequantize_cpu", &dequantize_cpu);
}
