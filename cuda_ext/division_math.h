// Per-element arithmetic of the DIVISION bit format v3 (division/format.py), shared by the CUDA
// kernels and their CPU twin so that both are bit-identical to the pure-PyTorch reference
// (division/reference.py).
//
// Every float operation is rounded on its own, as PyTorch's separate ops are: on the device the
// __f*_rn intrinsics forbid FMA contraction whatever nvcc's --fmad setting; host code is compiled
// with -ffp-contract=off. Double-precision sums use plain `+` (an add alone cannot contract).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef __CUDACC__
#define DIV_HD __host__ __device__ __forceinline__
#define DIV_UNROLL _Pragma("unroll")
#else
#define DIV_HD inline
#define DIV_UNROLL
#endif

namespace division {

constexpr float kTiny = 1e-30f;                       // format.TINY, floor of a normalized range
constexpr int kShiftMin = -126, kShiftMax = 127;       // format.SHIFT_MIN / SHIFT_MAX
constexpr float kFltMax = 3.4028234663852886e38f;     // FLT_MAX, ceiling of a plane's range
constexpr float kU24Scale = 5.9604644775390625e-08f;  // 2^-24
constexpr float kBf16Max = 3.3895313892515355e38f;    // torch.finfo(torch.bfloat16).max
constexpr float kHalfMax = 65504.f;                   // torch.finfo(torch.float16).max

enum Mode : int { kDivision = 0, kLfcOnly = 1, kHfcOnly = 2 };
enum LfcKind : int { kLfcBFloat16 = 0, kLfcFloat16 = 1, kLfcFloat32 = 2 };

// ---- float32 ops rounded one by one -------------------------------------------------------

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

DIV_HD bool is_nan(float v) { return v != v; }

DIV_HD float float_from_bits(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __int_as_float(static_cast<int>(bits));
#else
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

DIV_HD float quiet_nan() { return float_from_bits(0x7fc00000u); }

DIV_HD float infinity() { return float_from_bits(0x7f800000u); }

// ---- exact powers of two ---------------------------------------------------------------------

// float32 2^e for integer e in [-127, 127], exact (from its bits).
DIV_HD float power_of_two(int e) {
  return e >= -126 ? float_from_bits(static_cast<uint32_t>(e + 127) << 23) : float_from_bits(0x00400000u);
}

DIV_HD double power_of_two_d(int e) {  // |e| <= 1022
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(e + 1023) << 52);
#else
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

DIV_HD bool is_finite_d(double v) { return v - v == 0.0; }  // false for NaN and +-inf

// ---- the HFC range (format v3) ---------------------------------------------------------------
// lo_d and hi_d are the plane's min and max of float64(x) - float64(up), taken per LFC block from
// the block's float min and max (rounding is monotone, so that is the same). A block whose rounded
// LFC is NaN (it holds a NaN or an infinity) makes the plane non-finite.

struct RangeAcc {
  double lo, hi;
  bool nan;

  DIV_HD static RangeAcc empty() { return {static_cast<double>(infinity()), -static_cast<double>(infinity()), false}; }

  // A block with float min / max of x `xmin` / `xmax` and rounded LFC `up`.
  DIV_HD void add_block(float xmin, float xmax, float up) {
    if (is_nan(up)) {
      nan = true;
      return;
    }
    const double l = static_cast<double>(xmin) - static_cast<double>(up);
    const double h = static_cast<double>(xmax) - static_cast<double>(up);
    lo = l < lo ? l : lo;
    hi = h > hi ? h : hi;
  }

  DIV_HD void merge(const RangeAcc& o) {
    nan = nan || o.nan;
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
  }
};

// Per-plane constants, exactly as reference.py: shift e with (hi - lo) * 2^e in [1, 2), p = 2^e,
// lo and r in that scale (float32), scale = levels / r, step = r / levels; NaN for a non-finite plane.
struct PlaneScale {
  float lo, scale, step, p;
  int shift;
};

DIV_HD PlaneScale plane_scale(const RangeAcc& acc, int levels) {
  if (acc.nan) {
    const float n = quiet_nan();
    return {n, n, n, 1.f, 0};
  }
  const double r_d = acc.hi - acc.lo;
  int e = 0;
  if (r_d > 0.0) {
    int k;
    (void)frexp(r_d, &k);
    e = 1 - k;
    e = e < kShiftMin ? kShiftMin : (e > kShiftMax ? kShiftMax : e);
  }
  const double pd = power_of_two_d(e);
  const float lo = static_cast<float>((acc.lo + 0.0) * pd);  // -0 -> +0, as reference.py
  float r = static_cast<float>(r_d * pd);
  r = r < kTiny ? kTiny : (r > kFltMax ? kFltMax : r);
  const float lv = static_cast<float>(levels);
  return {lo, fdiv(lv, r), fdiv(r, lv), power_of_two(e), e};
}

// An order-preserving unsigned image of a double (-0 < +0; no NaN enters): the per-plane min and
// max are taken with integer atomics on these.
DIV_HD unsigned long long ordered_bits_d(double v) {
  unsigned long long b;
#ifdef __CUDA_ARCH__
  b = static_cast<unsigned long long>(__double_as_longlong(v));
#else
  std::memcpy(&b, &v, sizeof(b));
#endif
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

DIV_HD double from_ordered_bits_d(unsigned long long o) {
  const unsigned long long b = (o & 0x8000000000000000ull) ? (o & 0x7FFFFFFFFFFFFFFFull) : ~o;
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(b));
#else
  double v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
#endif
}

// ---- random numbers (hashing.py) -------------------------------------------------------------

// The 32-bit permutation of format.py (TheIronBorn's constants from hash-prospector), in two
// steps: mix32(x) == mix32_rest(mix32_first(x)).
DIV_HD uint32_t mix32_first(uint32_t x) { return x ^ (x >> 16); }

DIV_HD uint32_t mix32_rest(uint32_t x) {
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

DIV_HD uint32_t mix32(uint32_t x) { return mix32_rest(mix32_first(x)); }

// K_p = mix32(mix32(mix32(s1 ^ p1) ^ s0) ^ p0): once per plane.
DIV_HD uint32_t plane_key(uint64_t seed, uint64_t plane) {
  const uint32_t k = mix32(static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(plane >> 32));
  return mix32(mix32(k ^ static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(plane));
}

// The hash of element pair m = q >> 1 of a plane: its low half serves q = 2m, its high half 2m + 1.
DIV_HD uint32_t pair_hash(uint32_t key, uint32_t m) { return mix32(m ^ key); }

// The pairs m0 + j (j < 2^k <= 2^16) of a run that starts at a multiple m0 of 2^k (a code word's
// pairs) share the first step of their hashes: m0 + j == m0 ^ j, and j >> 16 == 0, so
// pair_hash(key, m0 + j) == mix32_rest(run_key(key, m0) ^ j). One shift and xor per code word
// instead of per pair, and no per-pair index arithmetic.
DIV_HD uint32_t run_key(uint32_t key, uint32_t m0) { return mix32_first(m0 ^ key); }

// u = k * 2^-16 + 2^-17 for the 16-bit half k of a pair hash (the low half for the even element,
// the high half for the odd one): 1 + u is built from its bits and 1 subtracted, both exact, so no
// int -> float conversion is needed. The bits of 1 + u, with k at bits 7..22 of `shifted`:
// (shifted & mask) | one, on the GPU one three-input logic op (the compiler splits it in two).
DIV_HD uint32_t one_plus_u_bits(uint32_t shifted) {
#ifdef __CUDA_ARCH__
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(shifted), "n"(0x7FFF80u), "r"(0x3F800040u));  // (a & b) | c
  return r;
#else
  return (shifted & 0x7FFF80u) | 0x3F800040u;
#endif
}

DIV_HD float uniform_even(uint32_t hash) { return fsub(float_from_bits(one_plus_u_bits(hash << 7)), 1.0f); }
DIV_HD float uniform_odd(uint32_t hash) { return fsub(float_from_bits(one_plus_u_bits(hash >> 9)), 1.0f); }

// f(std::integral_constant<int, Q>{}) for Q = bits (1, 2, 4 or 8): a kernel body specialized for
// its code width, chosen from the runtime Q once.
template <typename F>
DIV_HD void with_bits(int bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// ---- quantization and reconstruction ---------------------------------------------------------

// floor of t in [0, 2^Q - 1] (Q <= 8), as an integer.
DIV_HD uint32_t floor_small(float t) {
#ifdef __CUDA_ARCH__
  // t + 1.5 * 2^23 rounded down lands on the integer grid: its low bits are floor(t). An add
  // instead of a float -> int conversion, which runs at an eighth of the add rate.
  return __float_as_uint(__fadd_rd(t, 12582912.0f)) - 0x4B400000u;
#else
  return static_cast<uint32_t>(std::floor(t));
#endif
}

// code = floor(fmin(fmax(((x * p - up_p) - lo) * scale + u, 0), levels)), up_p = up * p; NaN
// gives 0.
DIV_HD uint32_t quantize(float x, float up_p, float p, float lo, float scale, float u, float levels) {
  const float t = fadd(fmul(fsub(fsub(fmul(x, p), up_p), lo), scale), u);
  return floor_small(fminf(fmaxf(t, 0.f), levels));
}

// The float value of a code (< 2^23) without a conversion instruction: exact.
DIV_HD float code_value(uint32_t code) {
  return fsub(float_from_bits(0x4B000000u | code), 8388608.0f);
}

// One plane's reconstruction constants: x_hat = clamp(up + ((code * step + lo) * q), -top, top).
struct PlaneDecode {
  float lo, step, q, top;
};

DIV_HD PlaneDecode plane_decode(float lo, float step, int shift, float top) {
  return {lo, step, power_of_two(-shift), top};
}

// NaN-propagating clamp, as torch.clamp.
DIV_HD float clamp_top(float v, float top) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // min/max that return NaN when an operand is NaN: two instructions instead of compares and selects
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(v), "f"(-top));
  asm("min.NaN.f32 %0, %0, %1;" : "+f"(r) : "f"(top));
  return r;
#else
  return v < -top ? -top : (v > top ? top : v);
#endif
}

// The LFC that hfc_only mode adds: x + (-0) == x for every x, -0 and NaN included.
constexpr float kNoLfc = -0.0f;

// up + ((code * step + lo) * q), clamped to the output dtype's finite range. One expression for
// every mode, so the hot loops do not branch on it: hfc_only passes up = kNoLfc, and lfc_only
// planes decode with step = lo = -0 and q = 1, which make the HFC term -0.
DIV_HD float reconstruct(float up, uint32_t code, const PlaneDecode& d) {
  const float hfc = fmul(fadd(fmul(code_value(code), d.step), d.lo), d.q);
  return clamp_top(fadd(up, hfc), d.top);
}

// The largest finite value of an output dtype, as float.
template <typename scalar_t>
DIV_HD float finite_top() {
  if (sizeof(scalar_t) == 4) return kFltMax;
  if (std::is_same<scalar_t, c10::Half>::value) return kHalfMax;
  return kBf16Max;
}

// ---- LFC storage -----------------------------------------------------------------------------

// The stored LFC of a block from its float64 mean: NaN when the mean is not finite (the block holds
// a NaN or an infinity), else rounded to float32, clamped to the LFC dtype's finite range and
// rounded to it (nearest even); returned as the float32 value the HFC is taken against.
DIV_HD float round_lfc(double mean_d, int kind) {
  if (!is_finite_d(mean_d)) return quiet_nan();
  float mean = static_cast<float>(mean_d);
  if (kind == kLfcBFloat16) {
    mean = mean < -kBf16Max ? -kBf16Max : (mean > kBf16Max ? kBf16Max : mean);
    return static_cast<float>(c10::BFloat16(mean));
  }
  if (kind == kLfcFloat16) {
    mean = mean < -kHalfMax ? -kHalfMax : (mean > kHalfMax ? kHalfMax : mean);
    return static_cast<float>(c10::Half(mean));
  }
  return mean < -kFltMax ? -kFltMax : (mean > kFltMax ? kFltMax : mean);
}

// `rounded` is already representable in the LFC dtype, so these conversions are exact.
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

// ---- index arithmetic ------------------------------------------------------------------------

// Division of n < 2^31 by an invariant divisor with a multiply and a shift (the method of
// ATen's IntDivider<unsigned int>); the same 32-bit arithmetic on host and device.
struct FastDiv {
  uint32_t divisor, magic, shift;

  static FastDiv make(uint32_t d) {  // host only; d in [1, 2^31)
    FastDiv f{d, 0, 0};
    while (f.shift < 32 && (1ull << f.shift) < d) ++f.shift;
    f.magic = static_cast<uint32_t>(((1ull << 32) * ((1ull << f.shift) - d)) / d + 1);
    return f;
  }

  DIV_HD uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t t = __umulhi(n, magic);
#else
    const uint32_t t = static_cast<uint32_t>((static_cast<uint64_t>(n) * magic) >> 32);
#endif
    return (t + n) >> shift;  // t <= n < 2^31: no overflow
  }

  DIV_HD uint32_t mod(uint32_t n) const { return n - div(n) * divisor; }
};

// The same for 64-bit dividends n < 2^63 and divisors d in [1, 2^32).
struct FastDiv64 {
  uint64_t divisor, magic;
  uint32_t shift;

  static FastDiv64 make(uint64_t d) {  // host only
    FastDiv64 f{d, 0, 0};
    while (f.shift < 63 && (uint64_t{1} << f.shift) < d) ++f.shift;
    const unsigned __int128 one = 1;
    f.magic = static_cast<uint64_t>(((one << 64) * ((one << f.shift) - d)) / d + 1);
    return f;
  }

  DIV_HD uint64_t div(uint64_t n) const {
#ifdef __CUDA_ARCH__
    const uint64_t t = __umul64hi(n, magic);
#else
    const uint64_t t = static_cast<uint64_t>((static_cast<unsigned __int128>(n) * magic) >> 64);
#endif
    return (t + n) >> shift;  // t <= n < 2^63: no overflow
  }
};

// ---- shared-memory atomics: real atomics on the device, plain updates in the CPU twin (which
// runs the threads of a block one after another) ------------------------------------------------

DIV_HD void shared_min(unsigned long long* a, unsigned long long v) {
#ifdef __CUDA_ARCH__
  atomicMin(a, v);
#else
  if (v < *a) *a = v;
#endif
}

DIV_HD void shared_max(unsigned long long* a, unsigned long long v) {
#ifdef __CUDA_ARCH__
  atomicMax(a, v);
#else
  if (v > *a) *a = v;
#endif
}

DIV_HD void shared_or(uint32_t* a, uint32_t v) {
#ifdef __CUDA_ARCH__
  atomicOr(a, v);
#else
  *a |= v;
#endif
}

// One plane's spatial geometry, padded to three dims (D, H, W); sizes < 2^31 since a plane
// holds fewer than 2^31 elements (checked by the bindings).
struct Geometry {
  int64_t planes;    // N * C
  int64_t channels;  // C
  int64_t plane_bytes;
  int32_t d, h, w;     // spatial sizes
  int32_t bd, bh, bw;  // block sides: min(B, size)
  int32_t ld, lh, lw;  // LFC blocks per dim: ceil(size / side)
  int32_t numel;       // d * h * w
  int32_t lfc_numel;   // ld * lh * lw
  int32_t words;       // 32-bit words of packed codes per plane: plane_bytes / 4
  int32_t bits;        // Q
  FastDiv div_w, div_h, div_bd, div_bh, div_bw, div_lw, div_lh;
  bool channels_last;  // NHWC / NDHWC: element (n, c, q) at (n * numel + q) * C + c
};

// Where a plane's elements live: element q at base + q * stride.
struct PlaneView {
  int64_t base, stride;
};

DIV_HD PlaneView plane_view(const Geometry& g, int64_t plane) {
  if (!g.channels_last) return {plane * g.numel, 1};
  const int64_t n = plane / g.channels, c = plane - n * g.channels;
  return {n * g.numel * g.channels + c, g.channels};
}

// LFC block of element q (row-major over D, H, W).
DIV_HD int32_t block_of(const Geometry& g, uint32_t q) {
  const uint32_t rows = g.div_w.div(q);
  const uint32_t x = q - rows * g.div_w.divisor;
  if (g.d == 1) return static_cast<int32_t>(g.div_bh.div(rows) * g.lw + g.div_bw.div(x));
  const uint32_t z = g.div_h.div(rows);
  const uint32_t y = rows - z * g.div_h.divisor;
  return static_cast<int32_t>((g.div_bd.div(z) * g.lh + g.div_bh.div(y)) * g.lw + g.div_bw.div(x));
}

// Whether every row of every LFC block is whole runs of 4 elements starting at multiples of 4:
// W and the block width are multiples of 4.
DIV_HD bool rows_of_four(const Geometry& g) { return g.w % 4 == 0 && g.bw % 4 == 0; }

// Whether every run of 4 elements starting at a multiple of 4 lies in one LFC block: its rows are
// runs of four (a run stays in one row and one block column), or the plane is one block; and
// P % 4 == 0 (no run is cut by the plane's end). Such a run then takes one LFC lookup and, Q bits
// a code, 4Q bits of one code word.
DIV_HD bool runs_of_four(const Geometry& g) {
  return g.numel % 4 == 0 && (g.lfc_numel == 1 || rows_of_four(g));
}

// The element ranges [z0, z1) x [y0, y1) x [x0, x1) that LFC block j covers.
struct BlockRange {
  int32_t z0, z1, y0, y1, x0, x1;
  DIV_HD int32_t count() const { return (z1 - z0) * (y1 - y0) * (x1 - x0); }
};

DIV_HD int32_t min32(int32_t a, int32_t b) { return a < b ? a : b; }

DIV_HD BlockRange block_range(const Geometry& g, uint32_t j) {
  const uint32_t rows = g.div_lw.div(j);
  const uint32_t jw = j - rows * g.div_lw.divisor;
  const uint32_t jd = g.div_lh.div(rows);
  const uint32_t jh = rows - jd * g.div_lh.divisor;
  BlockRange r;
  r.z0 = static_cast<int32_t>(jd) * g.bd;
  r.y0 = static_cast<int32_t>(jh) * g.bh;
  r.x0 = static_cast<int32_t>(jw) * g.bw;
  r.z1 = min32(r.z0 + g.bd, g.d);
  r.y1 = min32(r.y0 + g.bh, g.h);
  r.x1 = min32(r.x0 + g.bw, g.w);
  return r;
}

// Walks a plane's elements q, q + 1, ... keeping the LFC block index up to date with additions;
// divides only when a row of W ends.
struct Cursor {
  int32_t x, xr, bx, row_block;  // column; its offset in its block; block column; LFC index of
                                 // the row's first block

  DIV_HD void seek(const Geometry& g, uint32_t q) {
    const uint32_t rows = g.div_w.div(q);
    const uint32_t z = g.div_h.div(rows);
    const uint32_t y = rows - z * g.div_h.divisor;
    x = static_cast<int32_t>(q - rows * g.div_w.divisor);
    bx = static_cast<int32_t>(g.div_bw.div(static_cast<uint32_t>(x)));
    xr = x - bx * g.bw;
    row_block = static_cast<int32_t>((g.div_bd.div(z) * g.lh + g.div_bh.div(y)) * g.lw);
  }

  DIV_HD int32_t block() const { return row_block + bx; }

  // From element q to q_next = q + len, where q .. q_next - 1 lie in one block and one row.
  DIV_HD void skip(const Geometry& g, uint32_t q_next, int32_t len) {
    x += len;
    if (x == g.w) {
      seek(g, q_next);
    } else if ((xr += len) == g.bw) {
      xr = 0;
      ++bx;
    }
  }

  // From element q to q + 1 (q + 1 <= numel < 2^31).
  DIV_HD void next(const Geometry& g, uint32_t q_next) {
    if (++x == g.w) {
      seek(g, q_next);
    } else if (++xr == g.bw) {
      xr = 0;
      ++bx;
    }
  }
};

}  // namespace division
