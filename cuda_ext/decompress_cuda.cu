// The CUDA kernels of decompress: the phases of codec_generic.h and codec_staged.h run by every
// thread of a block (exec_device.cuh), one kernel per path (ops.cpp's decompress_path chooses).
#include "exec_device.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace division {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) generic_decompress_kernel(const DecompressArgs a, const Launch l) {
  DeviceExec ex;
  generic_decompress_block<scalar_t>(ex, a, l, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, int VEC, bool RUNS>
__global__ void __launch_bounds__(kStagedThreads) vec_decompress_kernel(const DecompressArgs a, const VecPlan v) {
  DeviceExec ex;
  vec_decompress_block<scalar_t, VEC, RUNS>(ex, a, v, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, int BITS>
__global__ void __launch_bounds__(kStagedThreads) word_staged_kernel(const DecompressArgs a, const WordPlan w) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceExec ex;
  word_staged_block<scalar_t, BITS>(ex, a, w, smem, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, int BITS>
__global__ void __launch_bounds__(kStagedThreads) word_direct_kernel(const DecompressArgs a, const WordPlan w) {
  DeviceExec ex;
  word_direct_block<scalar_t, BITS>(ex, a, w, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, int BITS>
__global__ void __launch_bounds__(kStagedThreads) plane_decompress_kernel(const DecompressArgs a, const PlanePlan pp) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceExec ex;
  plane_decompress_block<scalar_t, BITS>(ex, a, pp, smem, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, int BITS>
__global__ void __launch_bounds__(kStagedThreads) plane_words_kernel(const DecompressArgs a, const PlaneWordsPlan pw) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceExec ex;
  plane_words_block<scalar_t, BITS>(ex, a, pw, smem, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, bool RUNS>
__global__ void __launch_bounds__(kStagedThreads) tile_decompress_kernel(const DecompressArgs a, const TilePlan t) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceExec ex;
  tile_decompress_block<scalar_t, RUNS>(ex, a, t, smem, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t, int BITS>
__global__ void __launch_bounds__(kStagedThreads) channel_decompress_kernel(const DecompressArgs a, const ChannelPlan c) {
  DeviceExec ex;
  channel_decompress_block<scalar_t, 16 / sizeof(scalar_t), BITS>(ex, a, c, static_cast<int64_t>(blockIdx.x));
}

}  // namespace

void launch_generic_decompress(const DecompressArgs& a, const Launch& l, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, blocks_for(a.g, l), "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_generic_decompress", [&] {
    launch(site, kBlockThreads, 0, generic_decompress_kernel<scalar_t>, a, l);
  });
}

void launch_vec_decompress(const DecompressArgs& a, const VecPlan& v, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, v.blocks, "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_vec_decompress", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const auto kernel = v.vec != kVec ? vec_decompress_kernel<scalar_t, 1, false>
                        : v.runs      ? vec_decompress_kernel<scalar_t, kVec, true>
                                      : vec_decompress_kernel<scalar_t, kVec, false>;
    launch(site, kStagedThreads, 0, kernel, a, v);
  });
}

void launch_word_decompress(const DecompressArgs& a, const WordPlan& w, bool staged, at::ScalarType dtype,
                            const at::Tensor& on) {
  const LaunchSite site(on, w.blocks, "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_word_decompress", [&] {
    with_bits(a.bits, [&](auto q) {
      constexpr int kBits = decltype(q)::value;
      if (staged) {
        launch(site, kStagedThreads, w.smem_bytes, word_staged_kernel<scalar_t, kBits>, a, w);
      } else {
        launch(site, kStagedThreads, 0, word_direct_kernel<scalar_t, kBits>, a, w);
      }
    });
  });
}

void launch_plane_decompress(const DecompressArgs& a, const PlanePlan& pp, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, pp.blocks, "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_plane_decompress", [&] {
    with_bits(a.bits, [&](auto q) {
      launch(site, kStagedThreads, pp.smem_bytes, plane_decompress_kernel<scalar_t, decltype(q)::value>, a, pp);
    });
  });
}

void launch_plane_words_decompress(const DecompressArgs& a, const PlaneWordsPlan& pw, at::ScalarType dtype,
                                   const at::Tensor& on) {
  const LaunchSite site(on, pw.blocks, "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_plane_words_decompress", [&] {
    with_bits(a.bits, [&](auto q) {
      launch(site, kStagedThreads, pw.smem_bytes, plane_words_kernel<scalar_t, decltype(q)::value>, a, pw);
    });
  });
}

void launch_tile_decompress(const DecompressArgs& a, const TilePlan& t, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, t.blocks, "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_tile_decompress", [&] {
    const auto kernel = t.runs ? tile_decompress_kernel<scalar_t, true> : tile_decompress_kernel<scalar_t, false>;
    launch(site, kStagedThreads, t.smem_bytes, kernel, a, t);
  });
}

void launch_channel_decompress(const DecompressArgs& a, const ChannelPlan& c, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, c.blocks, "division.decompress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_channel_decompress", [&] {
    with_bits(a.bits, [&](auto q) {
      launch(site, kStagedThreads, 0, channel_decompress_kernel<scalar_t, decltype(q)::value>, a, c);
    });
  });
}

}  // namespace division
