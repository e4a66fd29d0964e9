// The CPU twin of the mask and max-pool kernels (mask_phases.h): what ops.cpp runs for CPU tensors,
// as it runs the launchers of mask_cuda.cu for CUDA ones, with the same work split: a warp (its
// lanes looped over, HostLanes) per 32 consecutive elements or runs of them for the packing
// kernels, one thread per element otherwise, blocks in parallel over host threads (twin.h).
#include <algorithm>

#include "kernels.h"
#include "twin.h"

namespace division {
namespace {

template <int VEC, bool kRelu, typename scalar_t>
void pack_warps(const PackArgs& a) {
  const int64_t chunks = (a.numel + 32 * VEC - 1) / (32 * VEC);
  HostLanes lanes;
  for_blocks(chunks, [&](int64_t c) { pack_chunk<scalar_t, VEC, kRelu>(a, c, lanes); });
}

}  // namespace

void twin_relu_pack(const PackArgs& a, int vec, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_relu_pack_cpu", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (vec == kVec) {
      pack_warps<kVec, true, scalar_t>(a);
    } else {
      pack_warps<1, true, scalar_t>(a);
    }
  });
}

void twin_pack_bool(const PackArgs& a, int vec) {
  if (vec == 16) {
    pack_warps<16, false, bool>(a);
  } else {
    pack_warps<1, false, bool>(a);
  }
}

void twin_mask_grad(const MaskGradArgs& a, int vec, bool relu, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_mask_grad_cpu", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const int64_t chunks = (a.numel + vec - 1) / vec;
    for_blocks((chunks + 1023) / 1024, [&](int64_t b) {
      for (int64_t c = b * 1024; c < std::min(chunks, (b + 1) * 1024); ++c) {
        if (vec == kVec && relu) mask_grad_chunk<scalar_t, kVec, true>(a, c);
        else if (vec == kVec) mask_grad_chunk<scalar_t, kVec, false>(a, c);
        else if (relu) mask_grad_chunk<scalar_t, 1, true>(a, c);
        else mask_grad_chunk<scalar_t, 1, false>(a, c);
      }
    });
  });
}

void twin_pool_forward(const PoolArgs& a, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_pool_forward_cpu", [&] {
    HostLanes lanes;
    for_blocks((a.out_numel + 31) / 32, [&](int64_t c) { pool_forward_chunk<scalar_t>(a, c, lanes); });
  });
}

void twin_pool_backward(const PoolArgs& a, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_pool_backward_cpu", [&] {
    for_blocks((a.in_numel + 1023) / 1024, [&](int64_t b) {
      for (int64_t e = b * 1024; e < std::min(a.in_numel, (b + 1) * 1024); ++e) pool_backward_one<scalar_t>(a, e);
    });
  });
}

}  // namespace division
