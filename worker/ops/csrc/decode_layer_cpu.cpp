// One decoder layer of a decode step (every row one sequence's next token) on the CPU, as a
// single torch op: the same tensor operations, in the same order, as DecoderLayer.forward in
// worker/model.py with quantized projections and the C++ attention, so the same bits come out
// (tests/test_decode_fusions.py) -- without Python between them. A decode step of a small model
// is mostly that Python: on SmolLM2-135M at one thread, about 110 us a layer around 250 us of
// weight GEMMs.
//
// Registered as torch.ops.kvops.decode_layer_cpu; called by worker/ops/cpu_decode_layer.py.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "kvops_cpu.h"

namespace {

// y = x W^T for a quantized W (quant_linear.py's QuantizedLinear on decode rows).
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                   int64_t format, int64_t out_features) {
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  kvops::quant_linear_cpu(x.contiguous(), weight, scale, format, y);
  return y;
}

// norms: input and post-attention RMSNorm weights. weights, scales, formats, out_features: the
// quantized qkv, o, gate_up and down projections. cos, signed_sin: the rotary tables of the
// step's tokens [T, 1, D] (model.py's RotaryTables).
at::Tensor decode_layer_cpu(const at::Tensor& x, at::TensorList norms, at::TensorList weights,
                            at::TensorList scales, at::IntArrayRef formats,
                            at::IntArrayRef out_features, double eps, const at::Tensor& cos,
                            const at::Tensor& signed_sin, int64_t num_heads, int64_t num_kv_heads,
                            const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(norms.size() == 2 && weights.size() == 4 && scales.size() == 4 &&
                  formats.size() == 4 && out_features.size() == 4,
              "decode_layer_cpu: two norms and four projections (qkv, o, gate_up, down)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "decode_layer_cpu: x [T, hidden]");
  const int64_t tokens = x.size(0), hidden = x.size(1), head_dim = cos.size(-1);
  const auto proj = [&](const at::Tensor& input, size_t i) {
    return project(input, weights[i], scales[i], formats[i], out_features[i]);
  };

  // Attention.forward
  at::Tensor h = at::rms_norm(x, {hidden}, norms[0], eps);
  const at::Tensor qkv = proj(h, 0).view({tokens, num_heads + 2 * num_kv_heads, head_dim});
  const at::Tensor rotated = qkv.narrow(1, 0, num_heads + num_kv_heads);
  const at::Tensor qk = rotated * cos + rotated.roll(head_dim / 2, -1) * signed_sin;
  const at::Tensor q = qk.narrow(1, 0, num_heads);
  kvops::write_kv_cache_cpu(qk.narrow(1, num_heads, num_kv_heads),
                            qkv.narrow(1, num_heads + num_kv_heads, num_kv_heads), k_cache,
                            v_cache, slot_mapping);
  at::Tensor attended = at::empty({tokens, num_heads, head_dim}, x.options());
  kvops::paged_decode_attention_cpu(q.contiguous(), k_cache, v_cache, block_tables, seq_lens,
                                    scale, attended);
  const at::Tensor after_attention = x + proj(attended.view({tokens, num_heads * head_dim}), 1);

  // MLP.forward
  h = at::rms_norm(after_attention, {hidden}, norms[1], eps);
  const at::Tensor gate_up = proj(h, 2);
  const int64_t intermediate = out_features[2] / 2;
  const at::Tensor act =
      at::silu(gate_up.narrow(1, 0, intermediate)) * gate_up.narrow(1, intermediate, intermediate);
  return after_attention + proj(act, 3);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvops, m) {
  m.def(
      "decode_layer_cpu(Tensor x, Tensor[] norms, Tensor[] weights, Tensor[] scales, "
      "int[] formats, int[] out_features, float eps, Tensor cos, Tensor signed_sin, "
      "int num_heads, int num_kv_heads, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvops, CPU, m) { m.impl("decode_layer_cpu", &decode_layer_cpu); }
