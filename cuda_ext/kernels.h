// Launchers of the CUDA kernels (compress_cuda.cu, decompress_cuda.cu, mask_cuda.cu) and of their
// CPU twin (codec_twin.cpp, mask_twin.cpp), called by ops.cpp once it has checked the arguments,
// allocated the outputs and made the plan. Each launcher runs on the device of `on` and its
// current stream.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "mask_phases.h"

namespace division {

// The input / output dtypes the kernels are instantiated for (no float64).
#define DIVISION_DISPATCH(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The largest dynamic shared memory one thread block of the device may ask for (opt-in).
int64_t max_shared_bytes(const at::Tensor& on);

void launch_generic_compress(const CompressArgs& a, const Launch& l, at::ScalarType dtype, const at::Tensor& on);
// Whether the device launches thread-block clusters (compute capability 9.0 and later).
bool supports_clusters(const at::Tensor& on);

// false where a cluster plan (ranks > 1) could not be launched (no room for the cluster): the
// caller then plans without clusters.
bool launch_staged_compress(const CompressArgs& a, const StagedPlan& s, at::ScalarType dtype, const at::Tensor& on);
void launch_generic_decompress(const DecompressArgs& a, const Launch& l, at::ScalarType dtype, const at::Tensor& on);
void launch_vec_decompress(const DecompressArgs& a, const VecPlan& v, at::ScalarType dtype, const at::Tensor& on);
// staged: through shared memory, whole-warp stores (path word); else straight from registers (word_direct).
void launch_word_decompress(const DecompressArgs& a, const WordPlan& w, bool staged, at::ScalarType dtype,
                            const at::Tensor& on);
void launch_plane_decompress(const DecompressArgs& a, const PlanePlan& pp, at::ScalarType dtype, const at::Tensor& on);
void launch_plane_words_decompress(const DecompressArgs& a, const PlaneWordsPlan& pw, at::ScalarType dtype,
                                   const at::Tensor& on);
void launch_tile_decompress(const DecompressArgs& a, const TilePlan& t, at::ScalarType dtype, const at::Tensor& on);
void launch_channel_decompress(const DecompressArgs& a, const ChannelPlan& c, at::ScalarType dtype, const at::Tensor& on);

// The codec's CPU twin: the same kernels run on the host (codec_twin.cpp).
void twin_generic_compress(const CompressArgs& a, const Launch& l, at::ScalarType dtype);
void twin_staged_compress(const CompressArgs& a, const StagedPlan& s, at::ScalarType dtype);
void twin_generic_decompress(const DecompressArgs& a, const Launch& l, at::ScalarType dtype);
void twin_vec_decompress(const DecompressArgs& a, const VecPlan& v, at::ScalarType dtype);
void twin_word_decompress(const DecompressArgs& a, const WordPlan& w, bool staged, at::ScalarType dtype);
void twin_plane_decompress(const DecompressArgs& a, const PlanePlan& pp, at::ScalarType dtype);
void twin_plane_words_decompress(const DecompressArgs& a, const PlaneWordsPlan& pw, at::ScalarType dtype);
void twin_tile_decompress(const DecompressArgs& a, const TilePlan& t, at::ScalarType dtype);
void twin_channel_decompress(const DecompressArgs& a, const ChannelPlan& c, at::ScalarType dtype);

void launch_relu_pack(const PackArgs& a, int vec, at::ScalarType dtype, const at::Tensor& on);
void launch_pack_bool(const PackArgs& a, int vec, const at::Tensor& on);
void launch_mask_grad(const MaskGradArgs& a, int vec, bool relu, at::ScalarType dtype, const at::Tensor& on);
void launch_pool_forward(const PoolArgs& a, at::ScalarType dtype, const at::Tensor& on);
void launch_pool_backward(const PoolArgs& a, at::ScalarType dtype, const at::Tensor& on);

// The mask and max-pool kernels' CPU twin (mask_twin.cpp).
void twin_relu_pack(const PackArgs& a, int vec, at::ScalarType dtype);
void twin_pack_bool(const PackArgs& a, int vec);
void twin_mask_grad(const MaskGradArgs& a, int vec, bool relu, at::ScalarType dtype);
void twin_pool_forward(const PoolArgs& a, at::ScalarType dtype);
void twin_pool_backward(const PoolArgs& a, at::ScalarType dtype);

}  // namespace division
