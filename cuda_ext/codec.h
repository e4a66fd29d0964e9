// Launchers of the CUDA kernels (codec_cuda.cu), called by the bindings in codec.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "codec_phases.h"

namespace division {

// The input / output dtypes the kernels are instantiated for (no float64).
#define DIVISION_DISPATCH(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Run compress / decompress on the device of `on` (its current stream), for input / output dtype
// `dtype`. The arguments are validated and the outputs allocated by the caller.
void compress_cuda(const CompressArgs& args, at::ScalarType dtype, const at::Tensor& on);
void decompress_cuda(const DecompressArgs& args, at::ScalarType dtype, const at::Tensor& on);

}  // namespace division
