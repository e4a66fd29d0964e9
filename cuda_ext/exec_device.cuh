// The GPU executor of the phases (see exec.h): each thread runs every phase for its own id.
// Methods are __host__ __device__ with empty host bodies so that the __host__ __device__ phase
// templates may name them; they only ever run on the device.
#pragma once

#include <cstdint>

namespace division {

struct DeviceLanes {
  int lane;

  template <typename Field, typename Store>
  __host__ __device__ __forceinline__ void words(int group, Field&& field, Store&& store) {
#ifdef __CUDA_ARCH__
    const uint32_t v = field(lane);
    uint32_t word;
    if (group == 32) {  // one bit per lane, at the lane's own position: a ballot
      word = __ballot_sync(0xFFFFFFFFu, v != 0);
    } else {
      word = v;
      for (int s = 1; s < group; s <<= 1) word |= __shfl_xor_sync(0xFFFFFFFFu, word, s);
    }
    if ((lane & (group - 1)) == 0) store(lane / group, word);
#endif
  }
};

struct DeviceExec {
  template <typename F>
  __host__ __device__ __forceinline__ void each(F&& f) {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x));
#endif
  }

  template <typename F>
  __host__ __device__ __forceinline__ void each_warp(F&& f) {
#ifdef __CUDA_ARCH__
    DeviceLanes lanes{static_cast<int>(threadIdx.x & 31)};
    f(static_cast<int>(threadIdx.x >> 5), lanes);
#endif
  }

  __host__ __device__ __forceinline__ void sync() {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

}  // namespace division
