// The cheap layers' saved state (division/masks.py), fused into their forward and backward:
//   relu_pack    y = relu(x) and its 1-bit mask in one pass (in place when y is x)
//   pack_bool    a bool tensor (Dropout's keep-mask) at one bit per element
//   mask_grad    the incoming gradient through a 1-bit mask: ReLU selects, Dropout multiplies
//   pool_forward max pooling writing y and each argmax as a `bits`-bit offset in its window
//   pool_backward gather: each input element sums the gradients of the windows that chose it,
//                in the order of stock PyTorch's CUDA kernel (deterministic, no int64 indices)
// Masks and offsets are packed in the memory order of the tensor they describe, little-endian
// within 32-bit words, one warp's 32 lanes filling whole words. Written once for the GPU and its
// CPU twin (see exec.h); the semantics are stock PyTorch's, NaN and -0 included.
#pragma once

#include <cstdint>
#include <cstring>

#include "codec_staged.h"

namespace division {

constexpr int kMaskThreads = 256;
constexpr int kMaskWarps = kMaskThreads / 32;

// torch.relu, as stock on each device: NaN passes; on the CPU -0 passes too (x < 0 ? 0 : x), on
// CUDA -0 becomes +0 (clamp_min takes fmaxf). threshold_backward lets the gradient through where
// !(y <= 0), the same on both.
template <typename scalar_t>
DIV_HD scalar_t relu_of(scalar_t v) {
  const float f = static_cast<float>(v);
#ifdef __CUDA_ARCH__
  return (f > 0.f || f != f) ? v : static_cast<scalar_t>(0.f);
#else
  return f < 0.f ? static_cast<scalar_t>(0.f) : v;
#endif
}

DIV_HD bool relu_passes(float y) { return !(y <= 0.f); }

// Loads / stores of `vec` consecutive elements: one 16-byte access when vec fills 16 bytes.
template <typename T, int VEC>
DIV_HD void load_run(const T* src, int64_t count, T* v) {
  if (VEC * sizeof(T) == 16 && count == VEC) {
    const Vec16 w = load_vector<Vec16>(src);
    memcpy(v, &w, sizeof(w));
  } else {
    for (int k = 0; k < VEC; ++k) v[k] = k < count ? src[k] : static_cast<T>(0);
  }
}

template <typename T, int VEC>
DIV_HD void store_run(T* dst, int64_t count, const T* v) {
  if (VEC * sizeof(T) == 16 && count == VEC) {
    Vec16 w;
    memcpy(&w, v, sizeof(w));
    store_vector<Vec16>(dst, w);
  } else {
    for (int k = 0; k < VEC && k < count; ++k) dst[k] = v[k];
  }
}

struct PackArgs {
  const void* x;   // relu: scalar_t; pack_bool: bool (one byte, 0 or 1)
  void* y;         // relu: scalar_t output, may be x (in place)
  uint32_t* bits;  // ceil(numel / 32) words
  int64_t numel;
};

// Elements [chunk * 32 * VEC, (chunk + 1) * 32 * VEC): lane l takes VEC consecutive ones.
template <typename scalar_t, int VEC, bool kRelu, typename Lanes>
DIV_HD void pack_chunk(const PackArgs& a, int64_t chunk, Lanes& lanes) {
  const int64_t base = chunk * 32 * VEC;
  if (base >= a.numel) return;  // uniform over the warp
  lanes.words(
      32 / VEC,
      [&](int lane) -> uint32_t {
        const int64_t e0 = base + static_cast<int64_t>(lane) * VEC;
        if (e0 >= a.numel) return 0u;
        const int64_t count = a.numel - e0 < VEC ? a.numel - e0 : VEC;
        scalar_t v[VEC];
        load_run<scalar_t, VEC>(static_cast<const scalar_t*>(a.x) + e0, count, v);
        uint32_t field = 0;
        for (int k = 0; k < VEC; ++k) {
          if constexpr (kRelu) {
            v[k] = relu_of(v[k]);
            field |= static_cast<uint32_t>(relu_passes(static_cast<float>(v[k]))) << k;
          } else {
            field |= static_cast<uint32_t>(static_cast<bool>(v[k])) << k;
          }
        }
        if constexpr (kRelu) store_run<scalar_t, VEC>(static_cast<scalar_t*>(a.y) + e0, count, v);
        return field << ((lane * VEC) & 31);  // past numel: v was padded with 0, bit 0
      },
      [&](int w, uint32_t word) {
        const int64_t wi = (base >> 5) + w;
        if (wi * 32 < a.numel) a.bits[wi] = word;
      });
}

struct MaskGradArgs {
  const void* grad;
  const uint32_t* bits;
  void* out;
  int64_t numel;
  float scale;  // dropout: the kept elements' factor
};

// relu: bit ? g : 0 (threshold_backward); dropout: (g * bit) * scale (native_dropout_backward,
// so a dropped inf gradient gives NaN and a dropped negative one -0, as stock).
template <typename scalar_t, int VEC, bool kRelu>
DIV_HD void mask_grad_chunk(const MaskGradArgs& a, int64_t chunk) {
  const int64_t e0 = chunk * VEC;
  if (e0 >= a.numel) return;
  const int64_t count = a.numel - e0 < VEC ? a.numel - e0 : VEC;
  const uint32_t word = a.bits[e0 >> 5] >> (e0 & 31);  // VEC divides 32: the run is in one word
  scalar_t g[VEC];
  load_run<scalar_t, VEC>(static_cast<const scalar_t*>(a.grad) + e0, count, g);
  for (int k = 0; k < VEC; ++k) {
    const bool bit = ((word >> k) & 1u) != 0;
    if constexpr (kRelu) {
      g[k] = bit ? g[k] : static_cast<scalar_t>(0.f);
    } else {
      g[k] = static_cast<scalar_t>(fmul(fmul(static_cast<float>(g[k]), bit ? 1.f : 0.f), a.scale));
    }
  }
  store_run<scalar_t, VEC>(static_cast<scalar_t*>(a.out) + e0, count, g);
}

// ---- max pooling -----------------------------------------------------------------------------

struct PoolArgs {
  const void* x;        // forward input / backward: unused
  void* y;              // forward output
  uint32_t* offsets;    // packed offsets (forward writes, backward reads as bytes)
  const void* grad;     // backward: gradient of y
  void* grad_in;        // backward: gradient of x
  int64_t channels;
  int32_t h, w, oh, ow;
  int32_t kh, kw, sh, sw, ph, pw, dh, dw;
  int bits;
  bool channels_last;
  int64_t out_numel, in_numel;
  FastDiv64 div_c, div_w, div_h, div_ow, div_oh;
  FastDiv div_sh, div_sw, div_dh, div_dw;  // by the strides and dilations (backward)
};

// (n, c, y, x) of element e in memory order of an (N, C, H, W) tensor; plane = n * C + c.
struct Pos {
  int64_t plane, n, c;
  int32_t y, x;
};

DIV_HD Pos position(int64_t e, bool channels_last, int64_t channels, int32_t h, int32_t w,
                    const FastDiv64& div_c, const FastDiv64& div_h, const FastDiv64& div_w) {
  Pos pos;
  uint64_t u = static_cast<uint64_t>(e);
  if (channels_last) {
    const uint64_t t = div_c.div(u);
    pos.c = static_cast<int64_t>(u - t * channels);
    const uint64_t t2 = div_w.div(t);
    pos.x = static_cast<int32_t>(t - t2 * w);
    pos.n = static_cast<int64_t>(div_h.div(t2));
    pos.y = static_cast<int32_t>(t2 - pos.n * h);
    pos.plane = pos.n * channels + pos.c;
  } else {
    const uint64_t t = div_w.div(u);
    pos.x = static_cast<int32_t>(u - t * w);
    pos.plane = static_cast<int64_t>(div_h.div(t));
    pos.y = static_cast<int32_t>(t - pos.plane * h);
    pos.n = pos.c = 0;  // unused: NCHW addresses need only the plane
  }
  return pos;
}

// Where the (h, w) plane of `pos` (in a tensor of that spatial size) lives: element (y, x) at
// base + (y * w + x) * step. No division: the tap loops only add.
struct PlaneAt {
  int64_t base, step;
};

DIV_HD PlaneAt plane_at(const Pos& pos, bool channels_last, int64_t channels, int32_t h, int32_t w) {
  const int64_t hw = static_cast<int64_t>(h) * w;
  if (!channels_last) return {pos.plane * hw, 1};
  return {pos.n * hw * channels + pos.c, channels};
}

// Output element e: y = max over the window (first maximum in scan order; a NaN wins and the last
// NaN is kept, as stock), and the argmax's offset kh * KW + kw.
template <typename scalar_t>
DIV_HD uint32_t pool_one(const PoolArgs& a, int64_t e) {
  const Pos o = position(e, a.channels_last, a.channels, a.oh, a.ow, a.div_c, a.div_oh, a.div_ow);
  const PlaneAt in = plane_at(o, a.channels_last, a.channels, a.h, a.w);
  const scalar_t* x = static_cast<const scalar_t*>(a.x) + in.base;
  const int32_t y0 = o.y * a.sh - a.ph, x0 = o.x * a.sw - a.pw;
  float best = -infinity();
  uint32_t best_off = 0xFFFFFFFFu;
  scalar_t best_value = static_cast<scalar_t>(best);
  for (int32_t i = 0; i < a.kh; ++i) {
    const int32_t iy = y0 + i * a.dh;
    if (iy < 0 || iy >= a.h) continue;
    for (int32_t k = 0; k < a.kw; ++k) {
      const int32_t ix = x0 + k * a.dw;
      if (ix < 0 || ix >= a.w) continue;
      const uint32_t off = static_cast<uint32_t>(i * a.kw + k);
      if (best_off == 0xFFFFFFFFu) best_off = off;  // the first valid position, as stock
      const scalar_t v = x[(static_cast<int64_t>(iy) * a.w + ix) * in.step];
      const float f = static_cast<float>(v);
      if (f > best || is_nan(f)) {
        best = f;
        best_off = off;
        best_value = v;
      }
    }
  }
  static_cast<scalar_t*>(a.y)[e] = best_value;
  // a window with no tap in the input (stock allows it with a dilation larger than the input):
  // -inf, as stock, and offset 0, a tap outside the input that no input element's gradient reads
  // (stock's index points past the plane there, and its CPU backward writes into the next plane)
  return best_off == 0xFFFFFFFFu ? 0u : best_off;
}

template <typename scalar_t, typename Lanes>
DIV_HD void pool_forward_chunk(const PoolArgs& a, int64_t chunk, Lanes& lanes) {
  const int64_t base = chunk * 32;
  if (base >= a.out_numel) return;  // uniform over the warp
  lanes.words(
      32 / a.bits,
      [&](int lane) -> uint32_t {
        const int64_t e = base + lane;
        if (e >= a.out_numel) return 0u;
        return pool_one<scalar_t>(a, e) << ((lane * a.bits) & 31);
      },
      [&](int w, uint32_t word) {
        const int64_t wi = ((base * a.bits) >> 5) + w;
        if (wi * 32 < a.out_numel * a.bits) a.offsets[wi] = word;
      });
}

DIV_HD uint32_t offset_of(const PoolArgs& a, int64_t e_out) {
  const int64_t bit = e_out * a.bits;
  const uint8_t byte = reinterpret_cast<const uint8_t*>(a.offsets)[bit >> 3];
  return (byte >> (bit & 7)) & ((1u << a.bits) - 1u);
}

// The outputs o in [lo, hi] along one axis whose window holds input coordinate v (padded:
// v + pad): 0 <= v + pad - o * stride <= (k - 1) * dilation. Two divisions per axis.
DIV_HD void window_range(int32_t vp, int32_t k, int32_t dil, const FastDiv& div_stride, int32_t out,
                         int32_t& lo, int32_t& hi) {
  const int32_t extent = (k - 1) * dil;
  lo = vp > extent ? static_cast<int32_t>(div_stride.div(static_cast<uint32_t>(vp - extent + div_stride.divisor - 1))) : 0;
  hi = min32(static_cast<int32_t>(div_stride.div(static_cast<uint32_t>(vp))), out - 1);
}

// Input element e: the sum, in float, of the gradients of the windows whose argmax it is, taken
// in increasing (oy, ox) as stock's CUDA kernel does. Only the windows that hold e are visited.
template <typename scalar_t>
DIV_HD void pool_backward_one(const PoolArgs& a, int64_t e) {
  if (e >= a.in_numel) return;
  const Pos in = position(e, a.channels_last, a.channels, a.h, a.w, a.div_c, a.div_h, a.div_w);
  const PlaneAt out = plane_at(in, a.channels_last, a.channels, a.oh, a.ow);
  const scalar_t* g = static_cast<const scalar_t*>(a.grad);
  const int32_t yy = in.y + a.ph, xx = in.x + a.pw;
  int32_t oy0, oy1, ox0, ox1;
  window_range(yy, a.kh, a.dh, a.div_sh, a.oh, oy0, oy1);
  window_range(xx, a.kw, a.dw, a.div_sw, a.ow, ox0, ox1);
  float acc = 0.f;
  for (int32_t oy = oy0; oy <= oy1; ++oy) {
    const int32_t ry = yy - oy * a.sh;  // i * dh
    const int32_t i = static_cast<int32_t>(a.div_dh.div(static_cast<uint32_t>(ry)));
    if (i * a.dh != ry) continue;
    for (int32_t ox = ox0; ox <= ox1; ++ox) {
      const int32_t rx = xx - ox * a.sw;
      const int32_t k = static_cast<int32_t>(a.div_dw.div(static_cast<uint32_t>(rx)));
      if (k * a.dw != rx) continue;
      const int64_t eo = out.base + (static_cast<int64_t>(oy) * a.ow + ox) * out.step;
      if (offset_of(a, eo) == static_cast<uint32_t>(i * a.kw + k)) acc = fadd(acc, static_cast<float>(g[eo]));
    }
  }
  static_cast<scalar_t*>(a.grad_in)[e] = static_cast<scalar_t>(acc);
}

}  // namespace division
