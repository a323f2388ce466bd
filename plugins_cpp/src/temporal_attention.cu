// Fused temporal attention: one block per (batch, pixel), one thread per channel.
// A thread owns channel d of its pixel: it reads q[d], the K memory keys/values at d (plus the
// age embedding) and the pixel's own key/value, so every byte of the ring buffer is read once,
// coalesced across the block, with no intermediate tensors. Scores are reduced per head with
// warp shuffles (and shared memory when a head spans several warps); softmax runs in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "mirage_kernels.h"

namespace {

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

template <typename T>
__global__ void temporal_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_self,
                                          const T* __restrict__ v_self, const T* __restrict__ memory,
                                          const int32_t* __restrict__ ages, const T* __restrict__ age_table,
                                          T* __restrict__ out, int tokens, int dim, int context, int head_dim,
                                          int total_tokens, int token_offset, float scale) {
  extern __shared__ float partial[];  // [(K + 1) * warps] when a head spans several warps
  const int pixel = blockIdx.x;       // b * tokens + n
  const int b = pixel / tokens, n = pixel % tokens, d = threadIdx.x;
  const int lane = d & 31, warp = d >> 5, warps = blockDim.x >> 5;
  const int width = head_dim < 32 ? head_dim : 32;
  const size_t row = static_cast<size_t>(pixel) * dim + d;
  const size_t slot_stride = 2ull * total_tokens * dim;  // between slots k and k + 1
  const T* mem = memory + static_cast<size_t>(b) * context * slot_stride + static_cast<size_t>(token_offset + n) * dim + d;

  const float qd = to_f(q[row]) * scale;
  float score[MIRAGE_MAX_CONTEXT + 1];
  bool valid[MIRAGE_MAX_CONTEXT + 1];
#pragma unroll 4
  for (int j = 0; j <= context; ++j) {
    float key;
    if (j < context) {
      const int age = ages[b * context + j];
      valid[j] = age > 0;
      key = to_f(mem[j * slot_stride]) + to_f(age_table[static_cast<size_t>(age) * dim + d]);
    } else {
      valid[j] = true;
      key = to_f(k_self[row]);
    }
    float s = qd * key;
    for (int off = width / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off, width);
    score[j] = s;
  }
  if (head_dim > 32) {  // combine the warps of a head through shared memory
    if (lane == 0)
      for (int j = 0; j <= context; ++j) partial[j * warps + warp] = score[j];
    __syncthreads();
    const int first = (d / head_dim) * (head_dim / 32);
    for (int j = 0; j <= context; ++j) {
      float s = 0.f;
      for (int w = 0; w < head_dim / 32; ++w) s += partial[j * warps + first + w];
      score[j] = s;
    }
  }
  float peak = -INFINITY;
  for (int j = 0; j <= context; ++j)
    if (valid[j]) peak = fmaxf(peak, score[j]);
  float total = 0.f, acc = 0.f;
  for (int j = 0; j <= context; ++j) {
    if (!valid[j]) continue;
    const float p = __expf(score[j] - peak);
    total += p;
    acc += p * (j < context ? to_f(mem[j * slot_stride + static_cast<size_t>(total_tokens) * dim]) : to_f(v_self[row]));
  }
  out[row] = from_f<T>(acc / total);
}

template <typename T>
cudaError_t launch(const void* q, const void* ks, const void* vs, const void* mem, const int32_t* ages,
                   const void* table, void* out, int batch, int tokens, int dim, int context, int heads,
                   int total_tokens, int token_offset, cudaStream_t stream) {
  const int head_dim = dim / heads;
  const int warps = dim / 32;
  const size_t shared = head_dim > 32 ? sizeof(float) * (context + 1) * warps : 0;
  temporal_attention_kernel<T><<<batch * tokens, dim, shared, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(ks), static_cast<const T*>(vs), static_cast<const T*>(mem),
      ages, static_cast<const T*>(table), static_cast<T*>(out), tokens, dim, context, head_dim, total_tokens,
      token_offset, rsqrtf(static_cast<float>(head_dim)));
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t mirage_temporal_attention(MirageDType dtype, const void* q, const void* k_self,
                                                 const void* v_self, const void* memory, const int32_t* ages,
                                                 const void* age_table, void* out, int batch, int tokens, int dim,
                                                 int context, int heads, int total_tokens, int token_offset,
                                                 cudaStream_t stream) {
  const int head_dim = heads > 0 ? dim / heads : 0;
  const bool pow2 = head_dim >= 2 && (head_dim & (head_dim - 1)) == 0;
  if (batch < 1 || tokens < 1 || context < 1 || context > MIRAGE_MAX_CONTEXT || heads < 1 || dim % heads ||
      !pow2 || dim > 1024 || dim % 32 || token_offset < 0 || token_offset + tokens > total_tokens)
    return cudaErrorInvalidValue;
  switch (dtype) {
    case MIRAGE_FP32: return launch<float>(q, k_self, v_self, memory, ages, age_table, out, batch, tokens, dim,
                                           context, heads, total_tokens, token_offset, stream);
    case MIRAGE_FP16: return launch<__half>(q, k_self, v_self, memory, ages, age_table, out, batch, tokens, dim,
                                            context, heads, total_tokens, token_offset, stream);
    case MIRAGE_BF16: return launch<__nv_bfloat16>(q, k_self, v_self, memory, ages, age_table, out, batch, tokens,
                                                   dim, context, heads, total_tokens, token_offset, stream);
  }
  return cudaErrorInvalidValue;
}
