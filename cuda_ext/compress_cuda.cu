// The CUDA kernels of compress: the phases of codec_generic.h and codec_staged.h run by every
// thread of a block (exec_device.cuh), and the device attributes their plans ask for.
#include <cooperative_groups.h>

#include <map>
#include <mutex>
#include <tuple>

#include "exec_device.cuh"
#include "kernels.h"
#include "launch.cuh"

namespace division {
namespace {

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads) generic_compress_kernel(const CompressArgs a, const Launch l) {
  __shared__ CompressShared shared;
  DeviceExec ex;
  generic_compress_block<scalar_t>(ex, a, l, shared, static_cast<int64_t>(blockIdx.x));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kStagedThreads) staged_compress_kernel(const CompressArgs a, const StagedPlan s) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceExec ex;
  staged_compress_block<scalar_t>(ex, a, s, smem, static_cast<int64_t>(blockIdx.x));
}

// A plane group split over a cluster of s.ranks blocks, one strip each: the blocks exchange their
// strips' ranges through distributed shared memory between two cluster barriers (the second keeps
// every block's shared memory alive until no peer reads it).
template <typename scalar_t>
__global__ void __launch_bounds__(kStagedThreads) staged_split_compress_kernel(const CompressArgs a, const StagedPlan s) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char smem[];
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  DeviceExec ex;
  const int64_t block = static_cast<int64_t>(blockIdx.x);
  staged_first<scalar_t>(ex, a, s, smem, block);
  if (a.mode == kLfcOnly) return;  // uniform over the grid
  cluster.sync();
  PlaneSlot* const own = StagedSmem<scalar_t>(smem, s).slot;
  PlaneSlot* peers[kMaxRanks];
  for (int r = 0; r < s.ranks; ++r) peers[r] = cluster.map_shared_rank(own, r);
  staged_second<scalar_t>(ex, a, s, smem, peers, block);
  cluster.sync();
  staged_third<scalar_t>(ex, a, s, smem, block);
#else
  __trap();  // code for an architecture without clusters: cluster_fits never launches it
#endif
}

// Whether one cluster of `config`'s shape fits on the device (asked once per kernel, device,
// cluster size and shared memory), and the code the device runs was compiled for clusters (a build
// for an older architecture, JIT-compiled from its PTX, has an empty split kernel).
template <typename Kernel>
bool cluster_fits(Kernel kernel, const cudaLaunchConfig_t& config) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, unsigned, size_t>, bool> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, config.attrs[0].val.clusterDim.x,
                                   config.dynamicSmemBytes);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  if (attributes.ptxVersion < 90) return known[key] = false;
  int clusters = 0;
  const cudaError_t err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (err != cudaSuccess) (void)cudaGetLastError();  // no answer: launch without clusters
  return known[key] = err == cudaSuccess && clusters > 0;
}

}  // namespace

// A device attribute, queried once per (attribute, device): the plan of every compress call asks.
static int device_attribute(cudaDeviceAttr attribute, const at::Tensor& on) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, int> known;
  const std::pair<int, int> key{static_cast<int>(attribute), on.device().index()};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, key.second));
  return known[key] = value;
}

int64_t max_shared_bytes(const at::Tensor& on) {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, on);
}

bool supports_clusters(const at::Tensor& on) { return device_attribute(cudaDevAttrClusterLaunch, on) != 0; }

void launch_generic_compress(const CompressArgs& a, const Launch& l, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, blocks_for(a.g, l), "division.compress");
  if (site.blocks == 0) return;
  DIVISION_DISPATCH(dtype, "division_generic_compress", [&] {
    launch(site, kBlockThreads, 0, generic_compress_kernel<scalar_t>, a, l);
  });
}

bool launch_staged_compress(const CompressArgs& a, const StagedPlan& s, at::ScalarType dtype, const at::Tensor& on) {
  const LaunchSite site(on, s.blocks, "division.compress");
  if (site.blocks == 0) return true;
  bool launched = true;
  DIVISION_DISPATCH(dtype, "division_staged_compress", [&] {
    if (s.ranks == 1) {
      launch(site, kStagedThreads, s.smem_bytes, staged_compress_kernel<scalar_t>, a, s);
      return;
    }
    allow_shared(staged_split_compress_kernel<scalar_t>, s.smem_bytes);
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(site.blocks);
    config.blockDim = dim3(kStagedThreads);
    config.dynamicSmemBytes = static_cast<size_t>(s.smem_bytes);
    config.stream = site.stream;
    cudaLaunchAttribute cluster[1];
    cluster[0].id = cudaLaunchAttributeClusterDimension;
    cluster[0].val.clusterDim.x = static_cast<unsigned>(s.ranks);
    cluster[0].val.clusterDim.y = 1;
    cluster[0].val.clusterDim.z = 1;
    config.attrs = cluster;
    config.numAttrs = 1;
    launched = cluster_fits(staged_split_compress_kernel<scalar_t>, config);
    if (launched) {
      C10_CUDA_CHECK(cudaLaunchKernelEx(&config, staged_split_compress_kernel<scalar_t>, a, s));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return launched;
}

}  // namespace division
