// Fused DIVISION kernels: one thread block owns one (sample, channel) plane.
//
// compress, in one launch: (1) block means -> LFC, written to global memory and read back from
// L1/L2; (2) HFC = x - upsampled LFC and its min/max by a block reduction; (3) the stochastically
// rounded codes, each thread assembling whole 32-bit words of the packed plane. The plane is read
// three times, the second and third times from cache for the common map sizes.
// decompress: each thread rebuilds elements from the LFC, its code word, lo and step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "codec.h"
#include "division_math.h"

namespace division {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) compress_kernel(const scalar_t* __restrict__ x, PlaneGeometry g, int bits,
                                                            int mode, uint64_t seed, int lfc_kind, void* lfc,
                                                            uint8_t* __restrict__ codes, float* __restrict__ lo_out,
                                                            float* __restrict__ step_out, int64_t plane_bytes) {
  const int64_t p = blockIdx.x;
  void* lfc_plane_base = lfc;
  const int64_t lfc_base = p * g.lfc_numel;
  // (1) LFC block means
  for (int64_t j = threadIdx.x; j < g.lfc_numel; j += blockDim.x) {
    store_lfc(lfc_plane_base, lfc_kind, lfc_base + j, round_lfc(block_mean(x, g, p, j), lfc_kind));
  }
  if (mode == kLfcOnly) return;
  __syncthreads();  // the LFC written above is visible to the whole block
  // (2) range of h = x - up
  float lo = kFltMax, hi = -kFltMax;
  for (int64_t q = threadIdx.x; q < g.numel; q += blockDim.x) {
    const float up = load_lfc(lfc, lfc_kind, lfc_base + block_of(g, q));
    const float h = fsub(static_cast<float>(x[element_offset(g, p, q)]), up);
    lo = fminf(lo, h);
    hi = fmaxf(hi, h);
  }
  __shared__ float s_lo[kThreads / 32], s_hi[kThreads / 32];
  __shared__ PlaneScale s_scale;
  lo = warp_min(lo);
  hi = warp_max(hi);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float l = s_lo[0], h = s_hi[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) {
      l = fminf(l, s_lo[w]);
      h = fmaxf(h, s_hi[w]);
    }
    s_scale = plane_scale(l, h, (1 << bits) - 1);
    lo_out[p] = s_scale.lo;
    step_out[p] = s_scale.step;
  }
  __syncthreads();
  const PlaneScale s = s_scale;
  // (3) codes, one 32-bit word per thread iteration; padding bits stay zero
  const int per_word = 32 / bits;
  const int levels = (1 << bits) - 1;
  const int64_t words = plane_bytes / 4;
  uint32_t* out = reinterpret_cast<uint32_t*>(codes + p * plane_bytes);
  for (int64_t wi = threadIdx.x; wi < words; wi += blockDim.x) {
    uint32_t word = 0;
    const int64_t q0 = wi * per_word;
    for (int k = 0; k < per_word; ++k) {
      const int64_t q = q0 + k;
      if (q >= g.numel) break;
      const float up = load_lfc(lfc, lfc_kind, lfc_base + block_of(g, q));
      const float h = fsub(static_cast<float>(x[element_offset(g, p, q)]), up);
      const float u = uniform24(seed, static_cast<uint64_t>(p * g.numel + q));
      word |= quantize(h, s.lo, s.scale, u, levels) << (k * bits);
    }
    out[wi] = word;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) decompress_kernel(PlaneGeometry g, int bits, int mode, int lfc_kind,
                                                              const void* lfc, const uint8_t* __restrict__ codes,
                                                              const float* __restrict__ lo, const float* __restrict__ step,
                                                              int64_t plane_bytes, scalar_t* __restrict__ out) {
  const int64_t p = blockIdx.x;
  const uint32_t mask = (1u << bits) - 1;
  const float l = mode == kLfcOnly ? 0.f : lo[p];
  const float st = mode == kLfcOnly ? 0.f : step[p];
  const uint32_t* words = mode == kLfcOnly ? nullptr : reinterpret_cast<const uint32_t*>(codes + p * plane_bytes);
  for (int64_t q = threadIdx.x; q < g.numel; q += blockDim.x) {
    const float up = mode == kHfcOnly ? 0.f : load_lfc(lfc, lfc_kind, p * g.lfc_numel + block_of(g, q));
    uint32_t code = 0;
    if (mode != kLfcOnly) {
      const int64_t bit = q * bits;
      code = (__ldg(words + bit / 32) >> (bit % 32)) & mask;
    }
    out[element_offset(g, p, q)] = static_cast<scalar_t>(reconstruct(mode, up, code, st, l));
  }
}

int64_t plane_bytes_of(int64_t numel, int bits) { return (numel * bits + 31) / 32 * 4; }

}  // namespace

void compress_cuda(const at::Tensor& x, const PlaneGeometry& g, int64_t planes, int bits, int mode, uint64_t seed,
                   int lfc_kind, at::Tensor& lfc, at::Tensor& codes, at::Tensor& lo, at::Tensor& step) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(planes <= 2147483647LL, "division._C.compress: too many planes (N*C = ", planes, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pbytes = plane_bytes_of(g.numel, bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "division_compress_cuda", [&] {
    compress_kernel<scalar_t><<<static_cast<unsigned>(planes), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), g, bits, mode, seed, lfc_kind, lfc.data_ptr(),
        mode == kLfcOnly ? nullptr : codes.data_ptr<uint8_t>(), mode == kLfcOnly ? nullptr : lo.data_ptr<float>(),
        mode == kLfcOnly ? nullptr : step.data_ptr<float>(), pbytes);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decompress_cuda(const PlaneGeometry& g, int64_t planes, int bits, int mode, int lfc_kind, const void* lfc,
                     const uint8_t* codes, const float* lo, const float* step, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_CHECK(planes <= 2147483647LL, "division._C.decompress: too many planes (N*C = ", planes, ")");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pbytes = plane_bytes_of(g.numel, bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "division_decompress_cuda", [&] {
    decompress_kernel<scalar_t><<<static_cast<unsigned>(planes), kThreads, 0, stream>>>(
        g, bits, mode, lfc_kind, lfc, codes, lo, step, pbytes, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace division
