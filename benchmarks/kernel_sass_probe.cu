// Probe kernels for benchmarks/kernel_sass.py: each wraps one hot phase of the codec kernels so that
// its machine code (SASS) can be read apart from the rest. Never launched.
#include "codec_staged.h"

using namespace division;

template <typename T, int BITS, int RUN, int PAIRS>
__global__ void probe_codes(CompressArgs a, StagedPlan s, StagedBlock b) {
  extern __shared__ __align__(16) unsigned char base[];
  const StagedSmem<T> m(base, s);
  staged_codes<T, BITS, RUN, PAIRS>(a, s, b, m, static_cast<int>(threadIdx.x));
}

// KIND: 4 or 2, runs of that many; 0, a flat block (whole rows); 1, the element walk
template <typename T, int KIND>
__global__ void probe_block_stats(int W, BlockRange br, double* sums, float* ranges) {
  extern __shared__ __align__(16) unsigned char base[];
  const T* plane = reinterpret_cast<const T*>(base);
  double sum;
  float lo, hi;
  if (KIND == 4 || KIND == 2) {
    block_stats_runs<T, KIND == 4 ? 4 : 2>(plane, W, br, threadIdx.x & 31, sum, lo, hi);
  } else if (KIND == 0) {
    block_stats_flat(plane, W, br, threadIdx.x & 31, sum, lo, hi);
  } else {
    block_stats_any(plane, W, br, threadIdx.x & 31, sum, lo, hi);
  }
  sums[threadIdx.x] = sum;
  ranges[threadIdx.x] = hi - lo;
}

template <typename T, int VEC, bool RUNS>
__global__ void probe_vec_decompress(DecompressArgs a, VecPlan v) {
  for (int64_t c = blockIdx.x * kStagedThreads + threadIdx.x; c < v.chunks; c += int64_t{1} << 24)
    vec_decompress_chunk<T, VEC, RUNS>(a, v, c);
}

template <typename T, int BITS>
__global__ void probe_word_decompress(DecompressArgs a, WordPlan w) {
  for (int64_t t = blockIdx.x * kStagedThreads + threadIdx.x; t < w.threads; t += int64_t{1} << 24)
    word_direct_thread<T, BITS>(a, w, t);
}

// a plane of one LFC block (7x7 at B = 8): no table
template <typename T, int BITS>
__global__ void probe_plane_decompress(DecompressArgs a, PlanePlan pp) {
  extern __shared__ __align__(16) unsigned char base[];
  T* dst = reinterpret_cast<T*>(base) + threadIdx.x * a.g.numel;
  for (int64_t p = blockIdx.x * kStagedThreads + threadIdx.x; p < a.g.planes; p += int64_t{1} << 24)
    decode_plane<T, BITS>(a, p, nullptr, dst);
}

// planes staged whole (14x14 at B = 8): the loop over a thread's code words
template <typename T, int BITS>
__global__ void probe_plane_words_decompress(DecompressArgs a, PlaneWordsPlan pw) {
  extern __shared__ __align__(16) unsigned char base[];
  plane_words_thread<T, BITS>(a, pw, blockIdx.x * static_cast<int64_t>(pw.planes), pw.planes,
                              reinterpret_cast<const float*>(base + pw.off_lfc),
                              reinterpret_cast<const int16_t*>(base + pw.off_table), reinterpret_cast<T*>(base),
                              threadIdx.x);
}

template <typename T, int VEC, int BITS>
__global__ void probe_channel_decompress(DecompressArgs a, ChannelPlan c) {
  for (int64_t t = blockIdx.x * kStagedThreads + threadIdx.x; t < c.threads; t += int64_t{1} << 24)
    channel_decompress_thread<T, VEC, BITS>(a, c, t);
}

template __global__ void probe_codes<float, 2, 4, 0>(CompressArgs, StagedPlan, StagedBlock);
template __global__ void probe_codes<c10::BFloat16, 2, 4, 0>(CompressArgs, StagedPlan, StagedBlock);
template __global__ void probe_codes<float, 2, 2, 2>(CompressArgs, StagedPlan, StagedBlock);
template __global__ void probe_codes<c10::BFloat16, 2, 2, 2>(CompressArgs, StagedPlan, StagedBlock);
template __global__ void probe_codes<float, 2, 2, 1>(CompressArgs, StagedPlan, StagedBlock);
template __global__ void probe_codes<float, 2, 2, 0>(CompressArgs, StagedPlan, StagedBlock);
template __global__ void probe_block_stats<float, 4>(int, BlockRange, double*, float*);
template __global__ void probe_block_stats<c10::BFloat16, 4>(int, BlockRange, double*, float*);
template __global__ void probe_block_stats<float, 2>(int, BlockRange, double*, float*);
template __global__ void probe_block_stats<c10::BFloat16, 2>(int, BlockRange, double*, float*);
template __global__ void probe_block_stats<float, 0>(int, BlockRange, double*, float*);
template __global__ void probe_block_stats<c10::BFloat16, 0>(int, BlockRange, double*, float*);
template __global__ void probe_block_stats<float, 1>(int, BlockRange, double*, float*);
template __global__ void probe_vec_decompress<float, 4, true>(DecompressArgs, VecPlan);
template __global__ void probe_vec_decompress<c10::BFloat16, 8, true>(DecompressArgs, VecPlan);
template __global__ void probe_vec_decompress<float, 4, false>(DecompressArgs, VecPlan);
template __global__ void probe_vec_decompress<c10::BFloat16, 8, false>(DecompressArgs, VecPlan);
template __global__ void probe_word_decompress<float, 2>(DecompressArgs, WordPlan);
template __global__ void probe_word_decompress<c10::BFloat16, 2>(DecompressArgs, WordPlan);
template __global__ void probe_plane_decompress<float, 2>(DecompressArgs, PlanePlan);
template __global__ void probe_plane_decompress<c10::BFloat16, 2>(DecompressArgs, PlanePlan);
template __global__ void probe_plane_words_decompress<float, 2>(DecompressArgs, PlaneWordsPlan);
template __global__ void probe_plane_words_decompress<c10::BFloat16, 2>(DecompressArgs, PlaneWordsPlan);
template __global__ void probe_channel_decompress<float, 4, 2>(DecompressArgs, ChannelPlan);
template __global__ void probe_channel_decompress<c10::BFloat16, 8, 2>(DecompressArgs, ChannelPlan);
