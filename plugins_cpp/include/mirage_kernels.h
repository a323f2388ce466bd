// Mirage CUDA kernels: a C ABI so tests (ctypes) and the TensorRT plugin share one entry point.
#pragma once
#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Largest number of context slots K the temporal-attention kernel accepts.
#define MIRAGE_MAX_CONTEXT 32

typedef enum { MIRAGE_FP32 = 0, MIRAGE_FP16 = 1, MIRAGE_BF16 = 2 } MirageDType;

// Per-pixel temporal attention over the context ring buffer, read in place.
//   q, k_self, v_self : (B, N, D)            the current frame's queries / keys / values
//   memory            : (B, K, 2, N_total, D) the ring buffer; this layer's tokens start at token_offset
//   ages              : (B, K) int32          frames since written, 1..K; 0 = empty slot. A slot whose age
//                                             is outside [1, K] is masked, and neither it nor the table is read
//   age_table         : (K + 1, D)            age embedding added to memory keys
//   out               : (B, N, D)
// heads divides D; D / heads (the head width) is a power of two from 2 to 1024/heads; D <= 1024.
// Loads are as wide as alignment allows (16 bytes when every pointer and row is 16-byte aligned).
// Returns cudaSuccess, cudaErrorInvalidValue for unsupported shapes, or the launch error.
cudaError_t mirage_temporal_attention(MirageDType dtype, const void* q, const void* k_self, const void* v_self,
                                      const void* memory, const int32_t* ages, const void* age_table, void* out,
                                      int batch, int tokens, int dim, int context, int heads, int total_tokens,
                                      int token_offset, cudaStream_t stream);

// The same with q, k_self and v_self rows qkv_stride elements apart (>= dim): reads q/k/v straight
// out of a fused (B, N, 3D) projection, as PyTorch's chunk() leaves them.
cudaError_t mirage_temporal_attention_strided(MirageDType dtype, const void* q, const void* k_self,
                                              const void* v_self, const void* memory, const int32_t* ages,
                                              const void* age_table, void* out, int batch, int tokens, int dim,
                                              int context, int heads, int total_tokens, int token_offset,
                                              int qkv_stride, cudaStream_t stream);

// The launch the call with these arguments would make, without running it (tests check which path
// they exercise): *vec = elements per thread and load (1 = scalar loads), *threads = threads per
// block. Returns cudaErrorInvalidValue for unsupported shapes, as the kernel does.
cudaError_t mirage_temporal_attention_config(MirageDType dtype, const void* q, const void* k_self, const void* v_self,
                                             const void* memory, const void* age_table, const void* out, int batch,
                                             int tokens, int dim, int context, int heads, int total_tokens,
                                             int token_offset, int qkv_stride, int* vec, int* threads);

#ifdef __cplusplus
}
#endif
