// The CUDA kernels of the masks and max pooling: the functions of mask_phases.h, one warp per 32
// consecutive elements (or runs of them) for the packing kernels, one thread per element otherwise.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "exec_device.cuh"
#include "kernels.h"

namespace division {
namespace {

template <typename scalar_t, int VEC, bool kRelu>
__global__ void __launch_bounds__(kMaskThreads) pack_kernel(const PackArgs a) {
  DeviceExec ex;
  ex.each_warp([&](int warp, auto& lanes) {
    pack_chunk<scalar_t, VEC, kRelu>(a, static_cast<int64_t>(blockIdx.x) * kMaskWarps + warp, lanes);
  });
}

template <typename scalar_t, int VEC, bool kRelu>
__global__ void __launch_bounds__(kMaskThreads) mask_grad_kernel(const MaskGradArgs a) {
  mask_grad_chunk<scalar_t, VEC, kRelu>(a, static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaskThreads) pool_forward_kernel(const PoolArgs a) {
  DeviceExec ex;
  ex.each_warp([&](int warp, auto& lanes) {
    pool_forward_chunk<scalar_t>(a, static_cast<int64_t>(blockIdx.x) * kMaskWarps + warp, lanes);
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaskThreads) pool_backward_kernel(const PoolArgs a) {
  pool_backward_one<scalar_t>(a, static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x);
}

unsigned grid_for(int64_t items, int64_t per_block, const char* what) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), what, ": ", items,
              " elements are too many for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void launch_relu_pack(const PackArgs& a, int vec, at::ScalarType dtype, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_for(a.numel, int64_t{32} * vec * kMaskWarps, "division.relu_pack");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DIVISION_DISPATCH(dtype, "division_relu_pack", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec == kVec) {
      pack_kernel<scalar_t, kVec, true><<<blocks, kMaskThreads, 0, stream>>>(a);
    } else {
      pack_kernel<scalar_t, 1, true><<<blocks, kMaskThreads, 0, stream>>>(a);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_pack_bool(const PackArgs& a, int vec, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_for(a.numel, int64_t{32} * vec * kMaskWarps, "division.pack_bool");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vec == 16) {
    pack_kernel<bool, 16, false><<<blocks, kMaskThreads, 0, stream>>>(a);
  } else {
    pack_kernel<bool, 1, false><<<blocks, kMaskThreads, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_mask_grad(const MaskGradArgs& a, int vec, bool relu, at::ScalarType dtype, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_for(a.numel, int64_t{kMaskThreads} * vec, "division.mask_grad");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DIVISION_DISPATCH(dtype, "division_mask_grad", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec == kVec && relu) {
      mask_grad_kernel<scalar_t, kVec, true><<<blocks, kMaskThreads, 0, stream>>>(a);
    } else if (vec == kVec) {
      mask_grad_kernel<scalar_t, kVec, false><<<blocks, kMaskThreads, 0, stream>>>(a);
    } else if (relu) {
      mask_grad_kernel<scalar_t, 1, true><<<blocks, kMaskThreads, 0, stream>>>(a);
    } else {
      mask_grad_kernel<scalar_t, 1, false><<<blocks, kMaskThreads, 0, stream>>>(a);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_pool_forward(const PoolArgs& a, at::ScalarType dtype, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_for(a.out_numel, kMaskThreads, "division.max_pool2d");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DIVISION_DISPATCH(dtype, "division_pool_forward", [&] {
    pool_forward_kernel<scalar_t><<<blocks, kMaskThreads, 0, stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_pool_backward(const PoolArgs& a, at::ScalarType dtype, const at::Tensor& on) {
  const c10::cuda::CUDAGuard guard(on.device());
  const unsigned blocks = grid_for(a.in_numel, kMaskThreads, "division.max_pool2d_backward");
  if (blocks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DIVISION_DISPATCH(dtype, "division_pool_backward", [&] {
    pool_backward_kernel<scalar_t><<<blocks, kMaskThreads, 0, stream>>>(a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace division
