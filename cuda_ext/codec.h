// Launchers of the CUDA kernels (codec_cuda.cu), called by the bindings in codec.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "division_math.h"

namespace division {

void compress_cuda(const at::Tensor& x, const PlaneGeometry& g, int64_t planes, int bits, int mode, uint64_t seed,
                   int lfc_kind, at::Tensor& lfc, at::Tensor& codes, at::Tensor& lo, at::Tensor& step);

void decompress_cuda(const PlaneGeometry& g, int64_t planes, int bits, int mode, int lfc_kind, const void* lfc,
                     const uint8_t* codes, const float* lo, const float* step, at::Tensor& out);

}  // namespace division
