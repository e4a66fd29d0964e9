// How every kernel of the extension is launched: on the current stream of its tensors' device,
// with a checked grid size and the shared-memory opt-in it needs, checked for launch errors.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <utility>

namespace division {

inline unsigned grid(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), what, ": ", blocks,
              " thread blocks are too many for one launch");
  return static_cast<unsigned>(blocks);
}

// Lets `kernel` use `bytes` of dynamic shared memory on the current device (above 48 KB needs the
// opt-in). The attribute call costs host time on every launch, so the largest size already
// allowed is remembered per (kernel, device).
template <typename Kernel>
void allow_shared(Kernel kernel, int32_t bytes) {
  if (bytes <= 48 * 1024) return;
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int32_t> allowed;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  int32_t& done = allowed[{reinterpret_cast<const void*>(kernel), device}];
  if (bytes <= done) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  done = bytes;
}

// The device, stream and grid of one launch for tensors on `on`'s device (blocks == 0: nothing to do).
struct LaunchSite {
  c10::cuda::CUDAGuard guard;  // first: the stream below is the guarded device's
  unsigned blocks;
  cudaStream_t stream;
  LaunchSite(const at::Tensor& on, int64_t blocks_, const char* what)
      : guard(on.device()), blocks(grid(blocks_, what)), stream(c10::cuda::getCurrentCUDAStream()) {}
};

// Blocks of `per_block` items each that cover `items`.
inline int64_t blocks_of(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

// One launch of `kernel` on the site's stream.
template <typename... Params, typename... Args>
void launch(const LaunchSite& site, int threads, int32_t smem, void (*kernel)(Params...), const Args&... args) {
  allow_shared(kernel, smem);
  kernel<<<site.blocks, threads, smem, site.stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace division
