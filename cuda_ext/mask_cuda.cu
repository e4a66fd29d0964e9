// The CUDA kernels of the masks and max pooling: the functions of mask_phases.h, one warp per 32
// consecutive elements (or runs of them) for the packing kernels, one thread per element otherwise.
#include "exec_device.cuh"
#include "kernels.h"
#include "launch.cuh"

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

}  // namespace

void launch_relu_pack(const PackArgs& a, int vec, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, blocks_of(a.numel, int64_t{32} * vec * kMaskWarps), "division.relu_pack");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_relu_pack", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto kernel = vec == kVec ? pack_kernel<scalar_t, kVec, true> : pack_kernel<scalar_t, 1, true>;
    launch(site, kMaskThreads, 0, kernel, a);
  });
}

void launch_pack_bool(const PackArgs& a, int vec, const at::Tensor& on) {
  const LaunchSite site(on, blocks_of(a.numel, int64_t{32} * vec * kMaskWarps), "division.pack_bool");
  if (site.blocks == 0) return;
  launch(site, kMaskThreads, 0, vec == 16 ? pack_kernel<bool, 16, false> : pack_kernel<bool, 1, false>, a);
}

void launch_mask_grad(const MaskGradArgs& a, int vec, bool relu, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, blocks_of(a.numel, int64_t{kMaskThreads} * vec), "division.mask_grad");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_mask_grad", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto kernel = vec == kVec ? (relu ? mask_grad_kernel<scalar_t, kVec, true> : mask_grad_kernel<scalar_t, kVec, false>)
                                    : (relu ? mask_grad_kernel<scalar_t, 1, true> : mask_grad_kernel<scalar_t, 1, false>);
    launch(site, kMaskThreads, 0, kernel, a);
  });
}

void launch_pool_forward(const PoolArgs& a, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, blocks_of(a.out_numel, kMaskThreads), "division.max_pool2d");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_pool_forward", [&] {
    launch(site, kMaskThreads, 0, pool_forward_kernel<scalar_t>, a);
  });
}

void launch_pool_backward(const PoolArgs& a, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, blocks_of(a.in_numel, kMaskThreads), "division.max_pool2d_backward");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_pool_backward", [&] {
    launch(site, kMaskThreads, 0, pool_backward_kernel<scalar_t>, a);
  });
}

}  // namespace division
