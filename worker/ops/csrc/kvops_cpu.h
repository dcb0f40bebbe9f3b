// The CPU kernels one C++ file calls in another (decode_layer_cpu.cpp runs a whole decoder
// layer on them); each is also a torch op, torch.ops.kvops.<name>, documented where it is defined.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kvops {

// paged_attention_cpu.cpp
void paged_decode_attention_cpu(const at::Tensor& query, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& block_tables,
                                const at::Tensor& seq_lens, double scale, at::Tensor out);
void write_kv_cache_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor k_cache,
                        at::Tensor v_cache, const at::Tensor& slot_mapping);

// quant_linear_cpu.cpp
void quant_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                      int64_t format, at::Tensor& out);

}  // namespace kvops
