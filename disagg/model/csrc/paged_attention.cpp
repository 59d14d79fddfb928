// Decode attention straight over the paged KV pool (disagg/model/paged_kv.py), one query token per row.
//
// Every (row, KV head) pair is one task: its group's query heads are scored against the row's keys block by block,
// in place (nothing gathered, nothing repeated for grouped-query attention), softmaxed in float32, and its values
// summed with those weights. K and V are each read once, which is the least any decode attention can read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, at::Tensor& out) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key_cache.size(0), num_blocks = key_cache.size(1), block_size = key_cache.size(2);
  const int64_t group = heads / kv_heads, table_width = block_tables.size(1);
  const T* q = query.data_ptr<T>();
  const T* keys = key_cache.data_ptr<T>();
  const T* values = value_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  T* o = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled_q(group * dim), acc(group * dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, head = task % kv_heads;
      const int64_t len = std::min(lens[row], table_width * block_size);
      const int64_t* table = tables + row * table_width;
      scores.assign(group * len, 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = q + (row * heads + head * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) scaled_q[g * dim + d] = static_cast<float>(qg[d]) * fscale;
      }
      for (int64_t t = 0; t < len; ++t) {
        const T* k = keys + ((head * num_blocks + table[t / block_size]) * block_size + t % block_size) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = scaled_q.data() + g * dim;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < dim; ++d) s += qg[d] * static_cast<float>(k[d]);
          scores[g * len + t] = s;
        }
      }
      std::vector<float> sums(group, 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) top = std::max(top, sg[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < len; ++t) {
          sg[t] = std::exp(sg[t] - top);
          sum += sg[t];
        }
        sums[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = values + ((head * num_blocks + table[t / block_size]) * block_size + t % block_size) * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * len + t];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * static_cast<float>(v[d]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* og = o + (row * heads + head * group + g) * dim;
        const float inv = 1.0f / sums[g];
        for (int64_t d = 0; d < dim; ++d) og[d] = static_cast<T>(acc[g * dim + d] * inv);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4 && value_cache.sizes() == key_cache.sizes(),
              "query [rows, heads, dim], caches [kv_heads, blocks, block_size, dim]");
  TORCH_CHECK(query.size(2) == key_cache.size(3) && query.size(1) % key_cache.size(0) == 0, "head shapes differ");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == query.size(0), "block_tables [rows, blocks]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == query.size(0), "context_lens [rows]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 indices");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "one dtype");
  const auto q = query.contiguous(), k = key_cache.contiguous(), v = value_cache.contiguous();
  const auto tables = block_tables.contiguous(), lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(q, k, v, tables, lens, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(disagg, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor context_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(disagg, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
