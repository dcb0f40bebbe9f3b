// Paged decode attention and the KV-cache write for float32 on the CPU.
//
// Decode attention reads the KV-cache blocks where they lie.
// The torch reference gathers every sequence's blocks into a contiguous copy and runs SDPA on
// it: the context is read, written and read again, and decode attention on a CPU is bound by
// memory bandwidth. This kernel reads each key and value row once. Layouts are those of
// worker/ops/attention.py:
//   query        [B, H, D]           float32, contiguous
//   k/v_cache    [KV, NB, BS, D]     float32, contiguous (kv-head major)
//   block_tables [B, max_blocks]     int32, contiguous
//   seq_lens     [B]                 int32; 0 marks a padding row (its output is zeros)
//   out          [B, H, D]           float32, contiguous, written
// Query head h reads kv head h / (H / KV). Softmax is exact (max-subtracted, two passes over the
// scores of one (sequence, kv head) pair), in float32.
//
// The cache write copies each new token's key and value rows to its slot: index_copy_ along the
// slot dimension of the kv-head-major cache took 80 us a layer for a 32-token decode step.
//
// Registered as torch.ops.kvops.{paged_decode_attention_cpu,write_kv_cache_cpu}; built on first
// use by worker/ops/cpu_attention.py with torch.utils.cpp_extension.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "kvops_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// GCC/Clang vector extension: eight float lanes, lowered to whatever SIMD the target has (two
// SSE or NEON registers, one AVX register). Every instantiated head_dim is a multiple of kLanes.
constexpr int64_t kLanes = 8;
constexpr int64_t kMaxGroup = 64;  // query heads per kv head
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) { __builtin_memcpy(p, &v, sizeof v); }

// The sum of the eight lanes, by halving (three shuffles and adds instead of seven scalar adds).
inline float lane_sum(Lanes v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

typedef int32_t IntLanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp of eight lanes, each x <= 0 (scores minus their maximum): Cephes' expf polynomial after
// reduction by ln 2, within about 1 ulp of std::exp. std::exp is a scalar libm call that took
// about half of this kernel's time; libmvec's vector exp would need -ffast-math for the whole file.
inline Lanes exp_nonpositive(Lanes x) {
  const Lanes lowest = Lanes{} - 87.3f;  // exp(-87.3) is near the smallest normal float
  x = x < lowest ? lowest : x;
  // n = round(x / ln 2), by the 1.5 * 2^23 trick (round to nearest, the default mode).
  const Lanes magic = Lanes{} + 12582912.f;
  const Lanes n = (x * 1.44269504088896341f + magic) - magic;
  const Lanes r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln 2 split in two parts
  Lanes y = Lanes{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  // Scale by 2^n through the exponent bits.
  const IntLanes exponent = (__builtin_convertvector(n, IntLanes) + 127) << 23;
  Lanes scale;
  __builtin_memcpy(&scale, &exponent, sizeof scale);
  return y * scale;
}

struct Geometry {
  int64_t num_blocks;  // NB
  int64_t block_size;  // BS
  int64_t head_dim;    // D
  int64_t group;       // query heads per kv head
  float scale;
};

// Attention of the `group` query heads `q` [group, D] of one sequence over its `len` cached
// positions of one kv head; `k_head`/`v_head` point at that kv head's [NB, BS, D] blocks.
// `scores` is scratch of group * len floats; `out` [group, D]. D is a template parameter so that
// a query head's D / 8 lane vectors, and an output head's accumulators, stay in registers.
template <int64_t D>
void attend(const float* q, const float* k_head, const float* v_head, const int32_t* table,
            int64_t len, const Geometry& g, float* scores, float* out) {
  constexpr int64_t kVectors = D / kLanes;
  const int64_t BS = g.block_size;
  const int64_t block_floats = BS * D;
  const auto block_of = [&](const float* head, int64_t start) {
    return head + static_cast<int64_t>(table[start / BS]) * block_floats;
  };
  // Pass 1: scaled scores. A block's key rows stay in L1 while each query head of the group
  // runs over them.
  for (int64_t start = 0; start < len; start += BS) {
    const float* block = block_of(k_head, start);
    const int64_t n = std::min(BS, len - start);
    for (int64_t h = 0; h < g.group; ++h) {
      Lanes qh[kVectors];
      for (int64_t j = 0; j < kVectors; ++j) qh[j] = load(q + h * D + j * kLanes);
      float* row = scores + h * len + start;
      for (int64_t i = 0; i < n; ++i) {
        const float* key = block + i * D;
        Lanes acc = qh[0] * load(key);
        for (int64_t j = 1; j < kVectors; ++j) acc += qh[j] * load(key + j * kLanes);
        row[i] = lane_sum(acc) * g.scale;
      }
    }
  }

  // Softmax of each head's row; the normalisation is applied to the output at the end.
  float denominators[kMaxGroup];
  const int64_t whole = len - len % kLanes;
  for (int64_t h = 0; h < g.group; ++h) {
    float* row = scores + h * len;
    const float peak = *std::max_element(row, row + len);
    Lanes sums = {};
    for (int64_t t = 0; t < whole; t += kLanes) {
      const Lanes e = exp_nonpositive(load(row + t) - peak);
      store(row + t, e);
      sums += e;
    }
    float sum = lane_sum(sums);
    for (int64_t t = whole; t < len; ++t) {
      row[t] = std::exp(row[t] - peak);
      sum += row[t];
    }
    denominators[h] = sum;
  }

  // Pass 2: weighted sum of the value rows, with each head's accumulators in registers.
  for (int64_t h = 0; h < g.group; ++h) {
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = 0.f;
  }
  for (int64_t start = 0; start < len; start += BS) {
    const float* block = block_of(v_head, start);
    const int64_t n = std::min(BS, len - start);
    for (int64_t h = 0; h < g.group; ++h) {
      Lanes oh[kVectors];
      for (int64_t j = 0; j < kVectors; ++j) oh[j] = load(out + h * D + j * kLanes);
      const float* p = scores + h * len + start;
      for (int64_t i = 0; i < n; ++i) {
        const float* value = block + i * D;
        const Lanes weight = Lanes{} + p[i];
        for (int64_t j = 0; j < kVectors; ++j) oh[j] += weight * load(value + j * kLanes);
      }
      for (int64_t j = 0; j < kVectors; ++j) store(out + h * D + j * kLanes, oh[j]);
    }
  }
  for (int64_t h = 0; h < g.group; ++h) {
    const float inverse = 1.f / denominators[h];
    for (int64_t d = 0; d < D; ++d) out[h * D + d] *= inverse;
  }
}

using AttendFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t,
                         const Geometry&, float*, float*);

// The head sizes the kernel is instantiated for (cpu_attention.py's HEAD_DIMS).
AttendFn attend_for(int64_t head_dim) {
  switch (head_dim) {
    case 64: return &attend<64>;
    case 80: return &attend<80>;
    case 96: return &attend<96>;
    case 128: return &attend<128>;
    case 256: return &attend<256>;
    default: return nullptr;
  }
}

}  // namespace

namespace kvops {

void paged_decode_attention_cpu(const at::Tensor& query, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale, at::Tensor out) {
  TORCH_CHECK(query.dim() == 3 && k_cache.dim() == 4, "query [B, H, D], caches [KV, NB, BS, D]");
  TORCH_CHECK(query.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "float32 query, caches and output");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "int32 block_tables and seq_lens");
  TORCH_CHECK(query.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous() && out.is_contiguous(),
              "contiguous tensors");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && out.sizes() == query.sizes(), "shapes");

  const int64_t batch = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_kv_heads = k_cache.size(0);
  TORCH_CHECK(k_cache.size(3) == head_dim, "head_dim must match the caches");
  const auto attend_fn = attend_for(head_dim);
  TORCH_CHECK(attend_fn != nullptr, "head_dim ", head_dim, " is not one of 64, 80, 96, 128, 256");
  TORCH_CHECK(num_heads % num_kv_heads == 0 && num_heads / num_kv_heads <= kMaxGroup,
              "num_heads must be a multiple of num_kv_heads, at most ", kMaxGroup, " times");
  TORCH_CHECK(block_tables.size(0) == batch && seq_lens.size(0) == batch, "batch sizes");

  const Geometry g{k_cache.size(1), k_cache.size(2), head_dim, num_heads / num_kv_heads,
                   static_cast<float>(scale)};
  const int64_t max_blocks = block_tables.size(1);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  // A block id out of range would read outside the cache: check the ones in use.
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lens[b] >= 0 && lens[b] <= max_blocks * g.block_size,
                "seq_lens[", b, "] = ", lens[b], " does not fit its block table");
    for (int64_t i = 0; i * g.block_size < lens[b]; ++i) {
      const int32_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < g.num_blocks, "block_tables[", b, ", ", i, "] = ", block,
                  " is not a block of the cache");
    }
  }

  // Work items are (sequence, kv head) pairs, whose cost is the sequence's length. Lengths in a
  // batch differ by 10x and more, so each thread takes a contiguous run of items of about equal
  // total length rather than an equal count of items.
  const int64_t num_items = batch * num_kv_heads;
  std::vector<int64_t> cost_end(num_items);  // running total of lengths, items 0 .. i
  int64_t total = 0;
  for (int64_t i = 0; i < num_items; ++i) {
    total += std::max<int64_t>(lens[i / num_kv_heads], 1);
    cost_end[i] = total;
  }
  const int64_t num_threads =
      std::max<int64_t>(std::min<int64_t>(at::get_num_threads(), num_items), 1);
  const auto first_item_of = [&](int64_t thread) {
    // The first item whose cost range ends beyond this thread's share.
    const int64_t share_start = total * thread / num_threads;
    return static_cast<int64_t>(
        std::upper_bound(cost_end.begin(), cost_end.end(), share_start) - cost_end.begin());
  };

  const float* q = query.data_ptr<float>();
  const float* k = k_cache.data_ptr<float>();
  const float* v = v_cache.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t head_stride = g.num_blocks * g.block_size * head_dim;  // one kv head's blocks

  at::parallel_for(0, num_threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t thread = begin; thread < end; ++thread) {
      const int64_t last = thread + 1 == num_threads ? num_items : first_item_of(thread + 1);
      for (int64_t item = first_item_of(thread); item < last; ++item) {
        const int64_t b = item / num_kv_heads, kv = item % num_kv_heads;
        const int64_t len = lens[b];
        const int64_t offset = (b * num_heads + kv * g.group) * head_dim;
        if (len == 0) {
          std::fill(o + offset, o + offset + g.group * head_dim, 0.f);
          continue;
        }
        scores.resize(static_cast<size_t>(g.group * len));
        attend_fn(q + offset, k + kv * head_stride, v + kv * head_stride,
                  tables + b * max_blocks, len, g, scores.data(), o + offset);
      }
    }
  });
}

// key/value [T, KV, D] float32 (any token and head strides, unit stride along D); slot_mapping
// [T] int64, -1 skips a token (padding). Token t of kv head h goes to cache[h, slot_mapping[t]]
// of the [KV, NB * BS, D] view.
void write_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache,
                        at::Tensor v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(), "key and value [T, KV, D]");
  TORCH_CHECK(key.scalar_type() == at::kFloat && value.scalar_type() == at::kFloat &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "float32 keys, values and caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes(),
              "contiguous caches [KV, NB, BS, D]");
  TORCH_CHECK(key.stride(2) == 1 && value.stride(2) == 1, "unit stride along head_dim");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0),
              "int64 slot_mapping [T]");
  const int64_t num_tokens = key.size(0), num_kv_heads = key.size(1), head_dim = key.size(2);
  TORCH_CHECK(k_cache.size(0) == num_kv_heads && k_cache.size(3) == head_dim,
              "keys and caches disagree on kv heads or head_dim");
  const int64_t num_slots = k_cache.size(1) * k_cache.size(2);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= -1 && slots[t] < num_slots, "slot_mapping[", t, "] = ", slots[t],
                " is not a slot of the cache");
  }
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t row_bytes = head_dim * static_cast<int64_t>(sizeof(float));
  // Rows of 64-256 floats: a thread is worth waking only for a prefill's thousands of them.
  at::parallel_for(0, num_tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        const int64_t cache_row = (h * num_slots + slots[t]) * head_dim;
        __builtin_memcpy(kc + cache_row, k + t * key.stride(0) + h * key.stride(1), row_bytes);
        __builtin_memcpy(vc + cache_row, v + t * value.stride(0) + h * value.stride(1),
                         row_bytes);
      }
    }
  });
}

}  // namespace kvops

TORCH_LIBRARY(kvops, m) {
  m.def(
      "paged_decode_attention_cpu(Tensor query, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale, Tensor(a!) out) -> ()");
  m.def(
      "write_kv_cache_cpu(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(kvops, CPU, m) {
  m.impl("paged_decode_attention_cpu", &kvops::paged_decode_attention_cpu);
  m.impl("write_kv_cache_cpu", &kvops::write_kv_cache_cpu);
}
