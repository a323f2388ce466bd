// Fused temporal attention: a few threads per (batch, pixel), each owning VEC adjacent channels.
// A thread reads its channels of q, of the K memory keys/values (plus the age embedding) and of
// the pixel's own key/value with one VEC-wide load each (16 bytes when the pointers allow), so
// every byte of the ring buffer is read once, coalesced, with no intermediate tensors. Scores
// are reduced per head with warp shuffles (through shared memory when a head spans several
// warps); softmax and accumulation run in fp32. A slot is valid when its age lies in [1, K]; any
// other age (0 = empty, or out of range) masks it, and neither its memory nor the age table is read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include <type_traits>

#include "mirage_kernels.h"

namespace {

template <typename T> __device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// VEC elements moved as one aligned load/store (ld.global.v4 for 16 bytes).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC> __device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_f(pk.v[i]);
}

template <typename T, int VEC>
__global__ void temporal_attention_kernel(const T* __restrict__ q, const T* __restrict__ k_self,
                                          const T* __restrict__ v_self, const T* __restrict__ memory,
                                          const int32_t* __restrict__ ages, const T* __restrict__ age_table,
                                          T* __restrict__ out, int pixels, int tokens, int dim, int context,
                                          int head_dim, int total_tokens, int token_offset, int qkv_stride,
                                          float scale) {
  extern __shared__ float partial[];  // [(K + 1) * warps] when a head spans several warps (one pixel per block)
  const int per_pixel = dim / VEC;     // threads of one pixel
  const int group = head_dim / VEC;    // threads of one head
  const int local = threadIdx.x % per_pixel;
  int pixel = blockIdx.x * (blockDim.x / per_pixel) + threadIdx.x / per_pixel;  // b * tokens + n
  const bool live = pixel < pixels;
  pixel = live ? pixel : pixels - 1;  // the tail computes a duplicate so that every lane joins the shuffles
  const int b = pixel / tokens, n = pixel % tokens, c = local * VEC;
  const int width = group < 32 ? group : 32;
  // The shuffles name exactly the lanes this block has: a block of 8 threads (a small pixel) fills
  // only part of its warp, and naming absent lanes in the mask is undefined behaviour.
  const int lanes = min(32, static_cast<int>(blockDim.x) - static_cast<int>(threadIdx.x & ~31u));
  const unsigned mask = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
  const size_t row = static_cast<size_t>(pixel) * qkv_stride + c;
  const size_t slot_stride = 2ull * total_tokens * dim;  // between slots k and k + 1
  const T* mem = memory + static_cast<size_t>(b) * context * slot_stride + static_cast<size_t>(token_offset + n) * dim + c;
  const int32_t* age_row = ages + b * context;

  float qv[VEC], x[VEC], e[VEC];
  load<T, VEC>(q + row, qv);
#pragma unroll
  for (int i = 0; i < VEC; ++i) qv[i] *= scale;
  float score[MIRAGE_MAX_CONTEXT + 1];
  unsigned valid = 0;  // bit j: slot j holds a frame (K <= 32)
#pragma unroll 4
  for (int j = 0; j <= context; ++j) {
    const int age = j < context ? age_row[j] : 0;
    if (age >= 1 && age <= context) {
      valid |= 1u << j;
      load<T, VEC>(mem + j * slot_stride, x);
      load<T, VEC>(age_table + static_cast<size_t>(age) * dim + c, e);
    } else if (j == context) {
      load<T, VEC>(k_self + row, x);
#pragma unroll
      for (int i = 0; i < VEC; ++i) e[i] = 0.f;
    } else {  // masked slot: read nothing (it may hold garbage or NaN); its score is never used
#pragma unroll
      for (int i = 0; i < VEC; ++i) x[i] = e[i] = 0.f;
    }
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += qv[i] * (x[i] + e[i]);
    // Unconditional: lanes of one warp may belong to pixels of different batch rows (other ages).
    for (int off = width / 2; off > 0; off >>= 1) s += __shfl_xor_sync(mask, s, off, width);
    score[j] = s;
  }
  if (group > 32) {  // combine the warps of a head through shared memory
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (lane == 0)
      for (int j = 0; j <= context; ++j) partial[j * warps + warp] = score[j];
    __syncthreads();
    const int first = (local / group) * (group / 32);
    for (int j = 0; j <= context; ++j) {
      float s = 0.f;
      for (int w = 0; w < group / 32; ++w) s += partial[j * warps + first + w];
      score[j] = s;
    }
  }
  float peak = score[context];  // the pixel itself is always valid
  for (int j = 0; j < context; ++j)
    if (valid >> j & 1u) peak = fmaxf(peak, score[j]);
  float total = 0.f, acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
  for (int j = 0; j <= context; ++j) {
    if (j < context && !(valid >> j & 1u)) continue;  // masked slot
    const float p = __expf(score[j] - peak);
    total += p;
    load<T, VEC>(j < context ? mem + j * slot_stride + static_cast<size_t>(total_tokens) * dim : v_self + row, x);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] += p * x[i];
  }
  if (!live) return;
  Pack<T, VEC> res;
#pragma unroll
  for (int i = 0; i < VEC; ++i) res.v[i] = from_f<T>(acc[i] / total);
  *reinterpret_cast<Pack<T, VEC>*>(out + static_cast<size_t>(pixel) * dim + c) = res;
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

struct Config {
  int vec;                // elements per thread and load
  int threads, blocks;    // threads per block (per_block pixels x dim / vec), blocks
  size_t shared;          // bytes of shared memory (heads spanning several warps)
};

// The widest VEC (up to 16 bytes) that divides the head width and every row and keeps each
// pointer aligned, 1 (scalar loads) otherwise; several pixels per block when a pixel needs few
// threads (aiming at 128-thread blocks), but never fewer blocks than the pixels / 256 that keep
// every SM of a large GPU busy. Blocks need not be whole warps (the kernel masks its shuffles).
template <typename T>
Config configure(const void* q, const void* ks, const void* vs, const void* mem, const void* table, const void* out,
                 int batch, int tokens, int dim, int context, int heads, int qkv_stride) {
  const int head_dim = dim / heads, pixels = batch * tokens;
  int vec = 16 / static_cast<int>(sizeof(T));
  for (; vec > 1; vec /= 2) {
    const size_t bytes = vec * sizeof(T);
    if (head_dim % vec == 0 && qkv_stride % vec == 0 && aligned(q, bytes) && aligned(ks, bytes) &&
        aligned(vs, bytes) && aligned(mem, bytes) && aligned(table, bytes) && aligned(out, bytes))
      break;
  }
  const int per_pixel = dim / vec;
  const bool multi_warp = head_dim / vec > 32;  // a head spans several warps: one pixel per block
  int per_block = multi_warp || per_pixel >= 128 ? 1 : 128 / per_pixel;
  while (per_block > 1 && (pixels + per_block - 1) / per_block < 256) per_block /= 2;
  const int threads = per_block * per_pixel;
  const size_t shared = multi_warp ? sizeof(float) * (context + 1) * (threads / 32) : 0;
  return {vec, threads, (pixels + per_block - 1) / per_block, shared};
}

template <typename T, int VEC>
cudaError_t launch(const Config& cfg, const void* q, const void* ks, const void* vs, const void* mem,
                   const int32_t* ages, const void* table, void* out, int batch, int tokens, int dim, int context,
                   int heads, int total_tokens, int token_offset, int qkv_stride, cudaStream_t stream) {
  const int head_dim = dim / heads;
  temporal_attention_kernel<T, VEC><<<cfg.blocks, cfg.threads, cfg.shared, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(ks), static_cast<const T*>(vs), static_cast<const T*>(mem),
      ages, static_cast<const T*>(table), static_cast<T*>(out), batch * tokens, tokens, dim, context, head_dim,
      total_tokens, token_offset, qkv_stride, rsqrtf(static_cast<float>(head_dim)));
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* q, const void* ks, const void* vs, const void* mem, const int32_t* ages,
                     const void* table, void* out, int batch, int tokens, int dim, int context, int heads,
                     int total_tokens, int token_offset, int qkv_stride, cudaStream_t stream) {
  const Config cfg = configure<T>(q, ks, vs, mem, table, out, batch, tokens, dim, context, heads, qkv_stride);
  auto go = [&](auto width) {
    return launch<T, decltype(width)::value>(cfg, q, ks, vs, mem, ages, table, out, batch, tokens, dim, context,
                                             heads, total_tokens, token_offset, qkv_stride, stream);
  };
  if constexpr (sizeof(T) <= 2)
    if (cfg.vec == 8) return go(std::integral_constant<int, 8>{});
  if (cfg.vec == 4) return go(std::integral_constant<int, 4>{});
  if (cfg.vec == 2) return go(std::integral_constant<int, 2>{});
  return go(std::integral_constant<int, 1>{});
}

bool supported(int batch, int tokens, int dim, int context, int heads, int total_tokens, int token_offset,
               int qkv_stride) {
  const int head_dim = heads > 0 ? dim / heads : 0;
  const bool pow2 = head_dim >= 2 && (head_dim & (head_dim - 1)) == 0;
  return batch >= 1 && tokens >= 1 && context >= 1 && context <= MIRAGE_MAX_CONTEXT && heads >= 1 &&
         dim % heads == 0 && pow2 && dim <= 1024 && dim % 32 == 0 && token_offset >= 0 &&
         token_offset + tokens <= total_tokens && qkv_stride >= dim;
}

}  // namespace

extern "C" cudaError_t mirage_temporal_attention_strided(MirageDType dtype, const void* q, const void* k_self,
                                                         const void* v_self, const void* memory,
                                                         const int32_t* ages, const void* age_table, void* out,
                                                         int batch, int tokens, int dim, int context, int heads,
                                                         int total_tokens, int token_offset, int qkv_stride,
                                                         cudaStream_t stream) {
  if (!supported(batch, tokens, dim, context, heads, total_tokens, token_offset, qkv_stride))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case MIRAGE_FP32: return dispatch<float>(q, k_self, v_self, memory, ages, age_table, out, batch, tokens, dim,
                                             context, heads, total_tokens, token_offset, qkv_stride, stream);
    case MIRAGE_FP16: return dispatch<__half>(q, k_self, v_self, memory, ages, age_table, out, batch, tokens, dim,
                                              context, heads, total_tokens, token_offset, qkv_stride, stream);
    case MIRAGE_BF16: return dispatch<__nv_bfloat16>(q, k_self, v_self, memory, ages, age_table, out, batch,
                                                      tokens, dim, context, heads, total_tokens, token_offset,
                                                      qkv_stride, stream);
  }
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t mirage_temporal_attention_config(MirageDType dtype, const void* q, const void* k_self,
                                                        const void* v_self, const void* memory, const void* age_table,
                                                        const void* out, int batch, int tokens, int dim, int context,
                                                        int heads, int total_tokens, int token_offset, int qkv_stride,
                                                        int* vec, int* threads) {
  if (!supported(batch, tokens, dim, context, heads, total_tokens, token_offset, qkv_stride))
    return cudaErrorInvalidValue;
  Config cfg{};
  switch (dtype) {
    case MIRAGE_FP32: cfg = configure<float>(q, k_self, v_self, memory, age_table, out, batch, tokens, dim, context,
                                             heads, qkv_stride); break;
    case MIRAGE_FP16: cfg = configure<__half>(q, k_self, v_self, memory, age_table, out, batch, tokens, dim,
                                              context, heads, qkv_stride); break;
    case MIRAGE_BF16: cfg = configure<__nv_bfloat16>(q, k_self, v_self, memory, age_table, out, batch, tokens, dim,
                                                      context, heads, qkv_stride); break;
    default: return cudaErrorInvalidValue;
  }
  *vec = cfg.vec;
  *threads = cfg.threads;
  return cudaSuccess;
}

extern "C" cudaError_t mirage_temporal_attention(MirageDType dtype, const void* q, const void* k_self,
                                                 const void* v_self, const void* memory, const int32_t* ages,
                                                 const void* age_table, void* out, int batch, int tokens, int dim,
                                                 int context, int heads, int total_tokens, int token_offset,
                                                 cudaStream_t stream) {
  return mirage_temporal_attention_strided(dtype, q, k_self, v_self, memory, ages, age_table, out, batch, tokens,
                                           dim, context, heads, total_tokens, token_offset, dim, stream);
}
