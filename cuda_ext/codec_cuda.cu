// The CUDA kernels: the phases of codec_phases.h run by every thread of a block, with
// __syncthreads() as the barrier. See codec_phases.h for the work split and the memory traffic.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "codec.h"

namespace division {
namespace {

// Each thread runs each phase for its own id; barriers are __syncthreads().
struct DeviceExec {
  template <typename F>
  __host__ __device__ __forceinline__ void each(F&& f) {
#ifdef __CUDA_ARCH__
    f(static_cast<int>(threadIdx.x));
#endif
  }
  __host__ __device__ __forceinline__ void sync() {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) compress_kernel(const CompressArgs args) {
  __shared__ CompressShared shared;
  DeviceExec ex;
  compress_block<scalar_t>(ex, args, shared, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) decompress_kernel(const DecompressArgs args) {
  DeviceExec ex;
  decompress_block<scalar_t>(ex, args, static_cast<int64_t>(blockIdx.x));
}

unsigned grid_size(const Geometry& g, const Launch& l, const char* what) {
  const int64_t blocks = blocks_for(g, l);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), what, ": too many planes (N*C = ",
              g.planes, ") for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void compress_cuda(const CompressArgs& args, at::ScalarType dtype, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_size(args.g, args.l, "division._C.compress");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DIVISION_DISPATCH(dtype, "division_compress_cuda", [&] {
    compress_kernel<scalar_t><<<blocks, kBlockThreads, 0, stream>>>(args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decompress_cuda(const DecompressArgs& args, at::ScalarType dtype, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_size(args.g, args.l, "division._C.decompress");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DIVISION_DISPATCH(dtype, "division_decompress_cuda", [&] {
    decompress_kernel<scalar_t><<<blocks, kBlockThreads, 0, stream>>>(args);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace division
