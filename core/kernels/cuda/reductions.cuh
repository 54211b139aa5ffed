// Deterministic reductions shared by the norm, embedding and position-embedding kernels: a block-wide sum, the
// column sums of parameter gradients, and the keyed row sums of the gather layers' backward; and the 16-byte
// vector loads and stores of the bandwidth-bound kernels. Every sum has a
// fixed order (no floating-point atomics), so results are bitwise repeatable run to run.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "core/kernels/cuda/context.h"
#include "core/kernels/cuda/cuda_check.h"
#include "core/kernels/cuda/elem.cuh"

namespace q3vl::cuda {

constexpr int kWarps = kThreads / 32;

// Elements of T in one 16-byte access (8 bf16, 4 f32).
template <class T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// True when every pointer is 16-byte aligned (so vectors of kVec elements at multiples of kVec are too).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// f[0..V) = p[0..V) as float: 16-byte loads when V elements fill whole 16-byte words (p then 16-byte aligned),
// else scalar loads.
template <int V, class T>
__device__ __forceinline__ void load_floats(const T* p, float (&f)[V]) {
  if constexpr ((V * sizeof(T)) % 16 == 0) {
    constexpr int per = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < V / per; ++q) {
      const uint4 u = reinterpret_cast<const uint4*>(p)[q];
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < per; ++k) f[q * per + k] = to_float(e[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = to_float(p[k]);
  }
}

// p[0..V) = f[0..V) rounded to T, with the same access widths as load_floats.
template <int V, class T>
__device__ __forceinline__ void store_floats(T* p, const float (&f)[V]) {
  if constexpr ((V * sizeof(T)) % 16 == 0) {
    constexpr int per = 16 / sizeof(T);
#pragma unroll
    for (int q = 0; q < V / per; ++q) {
      alignas(16) T e[per];
#pragma unroll
      for (int k = 0; k < per; ++k) e[k] = from_float<T>(f[q * per + k]);
      reinterpret_cast<uint4*>(p)[q] = *reinterpret_cast<const uint4*>(e);
    }
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = from_float<T>(f[k]);
  }
}

// Sums of the N values v over a block of any multiple of 32 threads (at most 1024), returned to every thread:
// a butterfly within each warp, then the warp totals in warp order. Every thread must reach the call; `shared`
// holds N x 32 floats and may be reused by the next call.
template <int N>
__device__ inline void block_sums(float (&v)[N], float (*shared)[32]) {
#pragma unroll
  for (int q = 0; q < N; ++q)
    for (int o = 16; o > 0; o >>= 1) v[q] += __shfl_xor_sync(0xffffffffu, v[q], o);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % 32 == 0)
    for (int q = 0; q < N; ++q) shared[q][threadIdx.x / 32] = v[q];
  __syncthreads();
  const int warps = blockDim.x / 32;
#pragma unroll
  for (int q = 0; q < N; ++q) {
    float s = 0.0f;
    for (int w = 0; w < warps; ++w) s += shared[q][w];
    v[q] = s;
  }
}

// Sum of v over a block of kThreads threads, returned to every thread: a butterfly within each warp (every lane
// gets the same bits, float addition being commutative), then the warp totals in warp order. Every thread
// must reach the call; `shared` holds kWarps floats and may be reused by the next call.
__device__ inline float block_sum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous call's readers are done with `shared`
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < kWarps; ++w) s += shared[w];
  return s;
}

// out[j] += sum over rows i of term(i, j). A block of 32 x kColumnRowGroups threads owns 32 columns: thread
// (x, y) sums rows y, y + kColumnRowGroups, ... in order, then the row groups' partials are added in y order.
constexpr int kColumnRowGroups = 16;

template <class G, class Term>
__global__ void column_sums_add_kernel(int64_t rows, int64_t cols, G* out, Term term) {
  __shared__ float partial[kColumnRowGroups][33];
  const int64_t j = blockIdx.x * 32LL + threadIdx.x;
  float s = 0.0f;
  if (j < cols)
    for (int64_t i = threadIdx.y; i < rows; i += kColumnRowGroups) s += term(i, j);
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    float total = 0.0f;
    for (int g = 0; g < kColumnRowGroups; ++g) total += partial[g][threadIdx.x];
    out[j] = from_float<G>(to_float(out[j]) + total);
  }
}

template <class G, class Term>
void column_sums_add(const char* kernel, int64_t rows, int64_t cols, G* out, Term term) {
  if (cols == 0) return;
  const dim3 block(32, kColumnRowGroups);
  column_sums_add_kernel<G, Term><<<static_cast<unsigned>((cols + 31) / 32), block, 0, context().stream>>>(
      rows, cols, out, term);
  Q3VL_CUDA_LAUNCHED(kernel);
}

// Keyed row sums, the backward of a gather: for every output row r in [0, rows) that some entry's key names
// (key == key_begin + r),
//   dst[r, :] += sum over those entries e, in entry order, of weight[e] * src[e / per_src, :]
// (embedding: entries are tokens, per_src 1, no weights; position embedding: entries are (patch, corner)
// pairs, per_src 4). Keys outside [key_begin, key_begin + rows) are skipped.
//
// Deterministic without scratch memory or atomics: each touched output row has exactly one owning block (per
// column tile), which scans the keys in chunks of kThreads, compacts the matches of a chunk into shared memory
// in entry order (warp ballots, warp totals in warp order) and adds their terms in that order into fp32
// accumulators, then adds the sum into dst once. Two ways to find the owners, same sums:
//  - by row: one block per output row scanning all entries (rows * entries key reads), when rows <= entries
//    (the vision position table: 2304 rows, 65536 entries);
//  - by entry: one block per entry; it owns its key's row when no earlier entry has the key (a scan of the
//    entries before it), so entries^2 key reads, when entries < rows (token embedding: 4096 tokens, 151936 rows).
constexpr int kKeyedColumnsPerThread = 4;

template <class T, class W, class G, bool kByRow>
__global__ void keyed_row_sums_kernel(const int64_t* keys, int64_t entries, int per_src, const W* weights,
                                      const T* src, int64_t key_begin, int64_t rows, int64_t cols, G* dst) {
  __shared__ int64_t matches[kThreads];
  __shared__ int warp_counts[kWarps];
  int64_t key, start;
  if constexpr (kByRow) {
    key = key_begin + blockIdx.x;
    start = 0;
  } else {
    const int64_t first = blockIdx.x;
    key = keys[first];
    if (key < key_begin || key >= key_begin + rows) return;  // the whole block returns
    bool earlier = false;
    for (int64_t e = threadIdx.x; e < first; e += kThreads) earlier |= keys[e] == key;
    if (__syncthreads_or(earlier)) return;  // an earlier entry's block owns this row
    start = first;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col0 = blockIdx.y * static_cast<int64_t>(kThreads * kKeyedColumnsPerThread) + threadIdx.x;
  float acc[kKeyedColumnsPerThread] = {};
  bool touched = false;
  for (int64_t c = start; c < entries; c += kThreads) {
    const int64_t e = c + threadIdx.x;
    const bool match = e < entries && keys[e] == key;
    const int count = __syncthreads_count(match);  // also: every thread has finished reading the last chunk
    if (count == 0) continue;
    touched = true;
    const unsigned ballot = __ballot_sync(0xffffffffu, match);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    if (match) {
      int pos = __popc(ballot & ((1u << lane) - 1u));
      for (int w = 0; w < warp; ++w) pos += warp_counts[w];
      matches[pos] = e;
    }
    __syncthreads();
    for (int q = 0; q < count; ++q) {
      const int64_t m = matches[q];
      const float wt = weights != nullptr ? to_float(weights[m]) : 1.0f;
      const T* s = src + (m / per_src) * cols;
      for (int k = 0; k < kKeyedColumnsPerThread; ++k) {
        const int64_t j = col0 + k * kThreads;
        if (j < cols) acc[k] += wt * to_float(s[j]);
      }
    }
  }
  if (!touched) return;
  G* d = dst + (key - key_begin) * cols;
  for (int k = 0; k < kKeyedColumnsPerThread; ++k) {
    const int64_t j = col0 + k * kThreads;
    if (j < cols) d[j] = from_float<G>(to_float(d[j]) + acc[k]);
  }
}

template <class T, class W, class G>
void keyed_row_sums(const int64_t* keys, int64_t entries, int per_src, const W* weights, const T* src,
                    int64_t key_begin, int64_t rows, int64_t cols, G* dst) {
  if (entries == 0 || rows == 0 || cols == 0) return;
  const int64_t per_block = kThreads * kKeyedColumnsPerThread;
  const unsigned tiles = static_cast<unsigned>((cols + per_block - 1) / per_block);
  if (rows <= entries) {
    keyed_row_sums_kernel<T, W, G, true><<<dim3(static_cast<unsigned>(rows), tiles), kThreads, 0,
                                           context().stream>>>(keys, entries, per_src, weights, src, key_begin,
                                                               rows, cols, dst);
    Q3VL_CUDA_LAUNCHED("keyed_row_sums_kernel (by row)");
  } else {
    keyed_row_sums_kernel<T, W, G, false><<<dim3(static_cast<unsigned>(entries), tiles), kThreads, 0,
                                            context().stream>>>(keys, entries, per_src, weights, src, key_begin,
                                                                rows, cols, dst);
    Q3VL_CUDA_LAUNCHED("keyed_row_sums_kernel (by entry)");
  }
}

}  // namespace q3vl::cuda
