// Per-element arithmetic of the DIVISION bit format (division/format.py), shared by the CUDA kernels
// and the CPU twin so that both are bit-identical to the pure-PyTorch reference.
//
// Every float operation is rounded on its own, as PyTorch's separate ops are: on the device the
// __f*_rn intrinsics forbid FMA contraction; host code is compiled with -ffp-contract=off.
#pragma once

#include <cmath>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef __CUDACC__
#define DIV_HD __host__ __device__ __forceinline__
#else
#define DIV_HD inline
#endif

namespace division {

constexpr float kTiny = 1e-30f;                   // format.TINY: floor of a plane's range
constexpr float kFltMax = 3.4028234663852886e38f;  // FLT_MAX
constexpr float kU24Scale = 5.9604644775390625e-08f;  // 2^-24

DIV_HD float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

DIV_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DIV_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DIV_HD float fdiv(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// The 32-bit permutation of format.py (TheIronBorn's constants).
DIV_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

// u in [0, 1) for global element index i: key = mix32(mix32(s1 ^ i_hi) ^ s0),
// hash = mix32(mix32(i_lo ^ key)), u = (hash >> 8) * 2^-24.
DIV_HD float uniform24(uint64_t seed, uint64_t index) {
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t i_lo = static_cast<uint32_t>(index), i_hi = static_cast<uint32_t>(index >> 32);
  const uint32_t key = mix32(mix32(s1 ^ i_hi) ^ s0);
  const uint32_t h = mix32(mix32(i_lo ^ key));
  return fmul(static_cast<float>(h >> 8), kU24Scale);
}

// code = clamp(floor((h - lo) * scale + u), 0, levels)
DIV_HD uint32_t quantize(float h, float lo, float scale, float u, int levels) {
  const float v = fmul(fsub(h, lo), scale);
  float c = floorf(fadd(v, u));
  c = c < 0.f ? 0.f : c;
  c = c > static_cast<float>(levels) ? static_cast<float>(levels) : c;
  return static_cast<uint32_t>(c);
}

// Geometry of one plane: spatial sizes padded to 3 dims (D, H, W), block sides and block counts.
struct PlaneGeometry {
  int64_t d, h, w;     // spatial sizes
  int64_t bd, bh, bw;  // block sides: min(B, size)
  int64_t ld, lh, lw;  // LFC blocks per dim: ceil(size / side)
  int64_t numel;       // d * h * w
  int64_t lfc_numel;   // ld * lh * lw
  int64_t channels;    // C, for channels_last offsets
  bool channels_last;
};

// Memory offset of element q of plane p = n * C + c.
DIV_HD int64_t element_offset(const PlaneGeometry& g, int64_t plane, int64_t q) {
  if (!g.channels_last) return plane * g.numel + q;
  const int64_t n = plane / g.channels, c = plane - n * g.channels;
  return (n * g.numel + q) * g.channels + c;
}

// Index of the LFC block that element q (row-major over D, H, W) belongs to.
DIV_HD int64_t block_of(const PlaneGeometry& g, int64_t q) {
  const int64_t x = q % g.w;
  const int64_t rest = q / g.w;
  const int64_t y = rest % g.h;
  const int64_t z = rest / g.h;
  return ((z / g.bd) * g.lh + (y / g.bh)) * g.lw + (x / g.bw);
}

}  // namespace division

namespace division {

// LFC storage dtypes, as passed from Python.
enum LfcKind : int { kLfcBFloat16 = 0, kLfcFloat16 = 1, kLfcFloat32 = 2 };

// float32 mean -> clamp to the dtype's finite range -> round to the dtype (RNE), back as float.
DIV_HD float round_lfc(float mean, int kind) {
  if (kind == kLfcBFloat16) {
    const float m = 3.3895313892515355e38f;  // bfloat16 max
    mean = mean < -m ? -m : (mean > m ? m : mean);
    return static_cast<float>(c10::BFloat16(mean));
  }
  if (kind == kLfcFloat16) {
    const float m = 65504.f;
    mean = mean < -m ? -m : (mean > m ? m : mean);
    return static_cast<float>(c10::Half(mean));
  }
  return mean < -kFltMax ? -kFltMax : (mean > kFltMax ? kFltMax : mean);
}

DIV_HD void store_lfc(void* base, int kind, int64_t index, float rounded) {
  if (kind == kLfcBFloat16) {
    static_cast<c10::BFloat16*>(base)[index] = c10::BFloat16(rounded);
  } else if (kind == kLfcFloat16) {
    static_cast<c10::Half*>(base)[index] = c10::Half(rounded);
  } else {
    static_cast<float*>(base)[index] = rounded;
  }
}

DIV_HD float load_lfc(const void* base, int kind, int64_t index) {
  if (kind == kLfcBFloat16) return static_cast<float>(static_cast<const c10::BFloat16*>(base)[index]);
  if (kind == kLfcFloat16) return static_cast<float>(static_cast<const c10::Half*>(base)[index]);
  return static_cast<const float*>(base)[index];
}

// Mean of LFC block j of a plane: float64 sum of the float32 elements / count, rounded to float32.
template <typename scalar_t>
DIV_HD float block_mean(const scalar_t* x, const PlaneGeometry& g, int64_t plane, int64_t j) {
  const int64_t jw = j % g.lw, jh = (j / g.lw) % g.lh, jd = j / (g.lw * g.lh);
  const int64_t z0 = jd * g.bd, y0 = jh * g.bh, x0 = jw * g.bw;
  const int64_t z1 = z0 + g.bd < g.d ? z0 + g.bd : g.d;
  const int64_t y1 = y0 + g.bh < g.h ? y0 + g.bh : g.h;
  const int64_t x1 = x0 + g.bw < g.w ? x0 + g.bw : g.w;
  double sum = 0.0;
  for (int64_t z = z0; z < z1; ++z)
    for (int64_t y = y0; y < y1; ++y)
      for (int64_t xx = x0; xx < x1; ++xx)
        sum += static_cast<double>(static_cast<float>(x[element_offset(g, plane, (z * g.h + y) * g.w + xx)]));
  const double count = static_cast<double>((z1 - z0) * (y1 - y0) * (x1 - x0));
  return static_cast<float>(sum / count);
}

// Per-plane quantization constants from the HFC range, as format.py.
struct PlaneScale {
  float lo, scale, step;
};

DIV_HD PlaneScale plane_scale(float lo, float hi, int levels) {
  float r = fsub(hi, lo);
  r = r < kTiny ? kTiny : (r > kFltMax ? kFltMax : r);
  const float lv = static_cast<float>(levels);
  return {lo, fdiv(lv, r), fdiv(r, lv)};
}

// x_hat for one element: division: up + (code * step + lo); lfc_only: up; hfc_only: code * step + lo.
enum Mode : int { kDivision = 0, kLfcOnly = 1, kHfcOnly = 2 };

DIV_HD float reconstruct(int mode, float up, uint32_t code, float step, float lo) {
  if (mode == kLfcOnly) return up;
  const float hfc = fadd(fmul(static_cast<float>(code), step), lo);
  return mode == kHfcOnly ? hfc : fadd(up, hfc);
}

}  // namespace division
