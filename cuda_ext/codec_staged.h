// The fast kernels: a compress that reads x from device memory once, and decompress kernels that
// write whole 16-byte pieces: NCHW a thread per code word (word, staged through shared memory, or
// word_direct), per small plane (plane), per code word of planes staged whole (plane_words) or per
// 16 bytes (vec); channels_last 16 bytes of channels
// per pixel (channel) or through an on-chip transpose tile (tile). Written once for the GPU and its
// CPU twin (see exec.h); bit format v3. ops.cpp's decompress_path says which kernel takes a shape.
//
// Staged compress, one thread block of kStagedThreads threads per G planes of 1-D or 2-D shape:
//   load   x of the G planes -> shared memory, once (16-byte loads where aligned). NCHW: the planes
//          are one contiguous range; channels_last: G consecutive channels of one sample, read
//          pixel by pixel (G * element size contiguous bytes) and stored plane-major.
//   lfc    thread per (plane, LFC block): float64 block sum, min and max of x in one pass over the
//          block in shared memory (each thread starts at a lane-dependent element, which spreads
//          neighbouring threads over the banks); the rounded block mean goes to `lfc` and to
//          shared memory, float64 min - up and max - up into the plane's range with 64-bit
//          integer atomics on order-preserving bits (format v3: these are the plane's lo, hi).
//          The threads of the first plane also note, per run of elements, its LFC block (a table
//          every plane shares: the codes then look up up with one shared-memory load per run).
//   scale  thread per plane: shift, lo, scale, step, the plane's hash key; then every block's
//          up is multiplied by its plane's 2^shift.
//   codes  thread per 32-bit code word (32 / Q elements): runs of 4 elements in one LFC block
//          (one aligned load, one lookup, two pair hashes) where the geometry allows, pairs
//          otherwise; consecutive threads write consecutive words, no lanes exchange bits.
// Planes larger than shared memory and 3-D planes take the generic kernels (codec_generic.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "codec_generic.h"

namespace division {

constexpr int kStagedThreads = 256;

// Sixteen bytes moved with one load or store.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// Eight bytes moved with one load.
struct alignas(8) Vec8 {
  uint32_t w[2];
};

// One access of a whole V (Vec16, Vec8, a 32-bit word) at p. A GPU faults on one that is not
// aligned to sizeof(V) and a CPU does not, so the CPU twin checks each: the twin's tests then
// fail where a kernel would fault on the device.
template <typename V>
DIV_HD void check_aligned(const void* p) {
#ifndef __CUDA_ARCH__
  if (reinterpret_cast<uintptr_t>(p) % sizeof(V) != 0)
    throw std::logic_error("division kernels: a " + std::to_string(sizeof(V)) + "-byte access at a misaligned address");
#else
  (void)p;
#endif
}

template <typename V>
DIV_HD V load_vector(const void* p) {
  check_aligned<V>(p);
  return *static_cast<const V*>(p);
}

template <typename V>
DIV_HD void store_vector(void* p, const V& v) {
  check_aligned<V>(p);
  *static_cast<V*>(p) = v;
}

// Per staged plane, in shared memory.
struct PlaneSlot {
  unsigned long long lo, hi;  // ordered_bits_d of the running min / max of float64(x) - float64(up)
  uint32_t nan;               // some block's rounded LFC is NaN
  uint32_t key;               // K_p of format.py
  float lo_value, scale, p;   // the plane's lo, scale and 2^shift (format v3)
};

constexpr int kMaxRanks = 8;  // blocks of a cluster that splits a plane (the portable cluster size)

struct StagedPlan {
  int32_t planes;     // G; 0: the staged kernel does not take this shape
  int32_t groups;     // channels_last: C / G plane groups per sample
  int64_t blocks;     // thread blocks of the launch: plane groups x ranks
  int32_t smem_bytes;
  int32_t off_up, off_slots, off_table;  // byte offsets of up[G * strip_lfc] (float), PlaneSlot[G]
                                         // and the LFC block of every run of the strip (uint16)
  int32_t vec;        // elements per global load of x: a 16-byte load, or 1
  int32_t run;        // elements per table entry: 4 where every aligned run of 4 lies in one LFC
                      // block and one row (and P % 4 == 0), else 1
  int32_t stats_run;  // 4 or 2: every LFC block row is whole aligned runs of that many elements; else 1
  int32_t pairs;      // where run == 1, the codes' pairs (q even): 2 each in one LFC block and row, 2-aligned
                      // (W and B even); 1 the plane is one LFC block; 0 each element's block looked up
  int32_t ranks;      // blocks per plane group: 1, or a cluster of 2..kMaxRanks blocks, each one
                      // strip of rows (whole LFC block rows, whole code words) of the G planes
  int32_t strip_rows;   // rows per strip (H when ranks == 1); the last strip may have fewer
  int32_t strip_numel;  // elements of a full strip: strip_rows * W, the planes' stride in shared memory
  int32_t strip_lfc;    // LFC blocks of a full strip
  int32_t strip_words;  // code words of a full strip (g.words when ranks == 1)
  FastDiv div_lfc;    // by strip_lfc: LFC item -> (plane, block)
  FastDiv div_words;  // by strip_words: code item -> (plane, word)
  FastDiv div_units;  // channels_last: by G / vec, load item -> (pixel, unit of vec channels)
};

inline int64_t round_up16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

// Elements per entry of the codes phase's LFC block table: 4 where runs of four allow, else 1.
inline int32_t staged_run(const Geometry& g) { return runs_of_four(g) ? 4 : 1; }

// Shared memory of a block staging `planes` strips of `numel` elements and `lfc` LFC blocks each.
inline int64_t strip_bytes(const Geometry& g, int64_t esize, int64_t planes, int64_t numel, int64_t lfc) {
  return round_up16(planes * numel * esize) + round_up16(planes * lfc * 4) +
         round_up16(planes * static_cast<int64_t>(sizeof(PlaneSlot))) + round_up16(numel / staged_run(g) * 2);
}

inline int64_t staged_bytes(const Geometry& g, int64_t esize, int64_t planes) {
  return strip_bytes(g, esize, planes, g.numel, g.lfc_numel);
}

// The strips of a cluster of `ranks` blocks over G planes: whole LFC block rows and whole code
// words each, none empty; their shared bytes, or 0 where `ranks` cannot split the plane so.
inline int64_t split_bytes(const Geometry& g, int64_t esize, int64_t planes, int ranks, int32_t& rows) {
  const int32_t per_strip = (g.lh + ranks - 1) / ranks;  // LFC block rows
  if (g.lh < 2 || (g.lh + per_strip - 1) / per_strip != ranks) return 0;
  rows = per_strip * g.bh;
  if ((static_cast<int64_t>(rows) * g.w * g.bits) % 32 != 0) return 0;
  return strip_bytes(g, esize, planes, static_cast<int64_t>(rows) * g.w, static_cast<int64_t>(per_strip) * g.lw);
}

// How many planes a block stages: as many as fit in `target` bytes (at least one, at most `limit`
// bytes), all of one sample for channels_last, where G also divides C so that every block is full.
// channels_last reads G * element size contiguous bytes per pixel: the target grows, within the
// limit, to 16 of them (one vector load; fewer would waste most of each 32-byte sector read)
// unless `grow` is false. Where that leaves one block per multiprocessor (more than half the
// limit) and `clusters` allows, the planes are split in strips over a cluster of 2..8 blocks: the
// fewest that bring a block within the target, else within half the limit.
// planes == 0 when even one plane does not fit, or the planes are 3-D.
inline StagedPlan staged_plan(const Geometry& g, int64_t esize, int64_t target, int64_t limit,
                              bool x_aligned16, bool grow, bool clusters) {
  StagedPlan s{};
  if (g.d != 1 || g.planes == 0 || g.lfc_numel > 65535) return s;
  const int64_t per16 = 16 / esize;
  const bool wide = g.channels_last && g.channels % per16 == 0;
  int64_t planes = 1;
  int ranks = 1;
  int32_t rows = g.h;
  const int64_t want = wide && grow ? per16 : 1;  // planes a block should stage at least
  if (clusters && staged_bytes(g, esize, want) > limit / 2) {
    for (int k = 2; k <= kMaxRanks && ranks == 1; ++k) {
      int32_t r = 0;
      const int64_t bytes = split_bytes(g, esize, want, k, r);
      if (bytes > 0 && bytes <= target) ranks = k, rows = r;
    }
    for (int k = kMaxRanks; k >= 2 && ranks == 1; --k) {  // none within the target: the largest within half
      int32_t r = 0;
      const int64_t bytes = split_bytes(g, esize, want, k, r);
      if (bytes > 0 && bytes <= limit / 2) ranks = k, rows = r;
    }
  }
  if (ranks > 1) {
    planes = want;
  } else {
    if (staged_bytes(g, esize, 1) > limit) return s;
    if (wide && grow && staged_bytes(g, esize, per16) <= limit) target = std::max(target, staged_bytes(g, esize, per16));
    const int64_t cap = g.channels_last ? g.channels : g.planes;
    while (planes < cap && staged_bytes(g, esize, planes + 1) <= target) ++planes;
    if (g.channels_last) {
      while (g.channels % planes != 0) --planes;
    } else {  // whole 16-byte vectors per block: G * P * esize a multiple of 16 where G allows
      int64_t m = 1;
      while ((m * g.numel * esize) % 16 != 0) ++m;
      if (planes >= m) planes -= planes % m;
    }
  }
  s.planes = static_cast<int32_t>(planes);
  s.ranks = ranks;
  s.strip_rows = rows;
  s.strip_numel = rows * g.w;
  s.strip_lfc = ranks > 1 ? rows / g.bh * g.lw : g.lfc_numel;
  s.strip_words = ranks > 1 ? static_cast<int32_t>(static_cast<int64_t>(s.strip_numel) * g.bits / 32) : g.words;
  s.groups = g.channels_last ? static_cast<int32_t>(g.channels / planes) : 1;
  s.blocks = (g.channels_last ? (g.planes / g.channels) * s.groups : (g.planes + planes - 1) / planes) * ranks;
  s.off_up = static_cast<int32_t>(round_up16(planes * s.strip_numel * esize));
  s.off_slots = static_cast<int32_t>(s.off_up + round_up16(planes * s.strip_lfc * 4));
  s.off_table = static_cast<int32_t>(s.off_slots + round_up16(planes * static_cast<int64_t>(sizeof(PlaneSlot))));
  s.smem_bytes = static_cast<int32_t>(strip_bytes(g, esize, planes, s.strip_numel, s.strip_lfc));
  const bool vec_ok = g.channels_last
                          ? (planes % per16 == 0 && g.channels % per16 == 0)
                          : (planes * g.numel * esize) % 16 == 0 && (ranks == 1 || (int64_t{s.strip_numel} * esize) % 16 == 0);
  s.vec = x_aligned16 && vec_ok ? static_cast<int32_t>(per16) : 1;
  s.run = staged_run(g);
  const bool rows_of_two = g.w % 2 == 0 && g.bw % 2 == 0;
  s.stats_run = rows_of_four(g) ? 4 : rows_of_two ? 2 : 1;
  s.pairs = rows_of_two ? 2 : g.lfc_numel == 1 ? 1 : 0;
  s.div_lfc = FastDiv::make(static_cast<uint32_t>(s.strip_lfc));
  s.div_words = FastDiv::make(static_cast<uint32_t>(s.strip_words));
  s.div_units = FastDiv::make(static_cast<uint32_t>(planes / s.vec > 0 ? planes / s.vec : 1));
  return s;
}

// The planes and the strip of one thread block: planes p0 .. p0 + count - 1 (consecutive plane
// indices either way), rows y0 .. y0 + rows - 1 of each.
struct StagedBlock {
  int64_t p0;
  int64_t sample;  // channels_last: n
  int32_t c0;      // channels_last: the first channel
  int32_t count;
  int32_t rank;    // strip index, 0 .. ranks - 1
  int32_t q0;      // first element of the strip: y0 * W
  int32_t numel;   // elements of the strip
  int32_t j0;      // first LFC block of the strip
  int32_t lfc;     // LFC blocks of the strip
  int32_t w0;      // first code word of the strip
};

DIV_HD StagedBlock staged_block(const Geometry& g, const StagedPlan& s, int64_t block) {
  StagedBlock b{};
  const int64_t group = block / s.ranks;
  b.rank = static_cast<int32_t>(block - group * s.ranks);
  if (g.channels_last) {
    b.sample = group / s.groups;
    b.c0 = static_cast<int32_t>((group - b.sample * s.groups) * s.planes);
    b.p0 = b.sample * g.channels + b.c0;
    b.count = s.planes;
  } else {
    b.p0 = group * s.planes;
    const int64_t left = g.planes - b.p0;
    b.count = static_cast<int32_t>(left < s.planes ? left : s.planes);
  }
  const int32_t y0 = b.rank * s.strip_rows;
  const int32_t rows = min32(s.strip_rows, g.h - y0);
  b.q0 = y0 * g.w;
  b.numel = rows * g.w;
  b.j0 = y0 / g.bh * g.lw;
  b.lfc = (rows + g.bh - 1) / g.bh * g.lw;
  b.w0 = b.rank * s.strip_words;
  return b;
}

template <typename scalar_t>
struct StagedSmem {
  scalar_t* xs;     // the staged planes, plane-major, P elements each
  float* up;        // rounded LFC of every (plane, block), as float
  PlaneSlot* slot;  // per plane
  uint16_t* table;  // LFC block of each run of `run` elements (the same for every plane)

  DIV_HD StagedSmem(unsigned char* base, const StagedPlan& s)
      : xs(reinterpret_cast<scalar_t*>(base)),
        up(reinterpret_cast<float*>(base + s.off_up)),
        slot(reinterpret_cast<PlaneSlot*>(base + s.off_slots)),
        table(reinterpret_cast<uint16_t*>(base + s.off_table)) {}
};

template <typename scalar_t>
DIV_HD void scatter_vec(scalar_t* dst, int32_t stride, const Vec16& v) {
  constexpr int kPer = 16 / sizeof(scalar_t);
  scalar_t e[kPer];
  static_assert(sizeof(e) == sizeof(v), "16 bytes");
  memcpy(e, &v, sizeof(v));
  for (int k = 0; k < kPer; ++k) dst[k * stride] = e[k];
}

// VEC values as one 16- or 8-byte store where they are that many bytes (dst then aligned to
// them), else one store each.
template <typename scalar_t, int VEC>
DIV_HD void store_values(scalar_t* dst, const scalar_t (&e)[VEC]) {
  if constexpr (VEC * sizeof(scalar_t) == 16) {
    Vec16 packed;
    memcpy(&packed, e, sizeof(packed));
    store_vector<Vec16>(dst, packed);
  } else if constexpr (VEC * sizeof(scalar_t) == 8) {
    Vec8 packed;
    memcpy(&packed, e, sizeof(packed));
    store_vector<Vec8>(dst, packed);
  } else {
    for (int k = 0; k < VEC; ++k) dst[k] = e[k];
  }
}

// dst[i] = src[i] for i < count, by the block's threads, four loads in flight per thread before
// their stores (one at a time would leave the memory system waiting on latency).
DIV_HD void copy_vectors(Vec16* dst, const Vec16* src, int32_t count, int tid) {
  if (count > 0) {  // then every dst[i], src[i] is aligned
    check_aligned<Vec16>(dst);
    check_aligned<Vec16>(src);
  }
  constexpr int32_t kStride = kStagedThreads;
  int32_t i = tid;
  for (; i + 3 * kStride < count; i += 4 * kStride) {
    const Vec16 a = src[i], b = src[i + kStride], c = src[i + 2 * kStride], d = src[i + 3 * kStride];
    dst[i] = a;
    dst[i + kStride] = b;
    dst[i + 2 * kStride] = c;
    dst[i + 3 * kStride] = d;
  }
  for (; i < count; i += kStride) dst[i] = src[i];
}

template <typename scalar_t>
DIV_HD void staged_load(const CompressArgs& a, const StagedPlan& s, const StagedBlock& b,
                        const StagedSmem<scalar_t>& m, int tid) {
  for (int32_t gi = tid; gi < b.count; gi += kStagedThreads) {
    m.slot[gi] = PlaneSlot{ordered_bits_d(static_cast<double>(infinity())),
                           ordered_bits_d(-static_cast<double>(infinity())), 0u, 0u, 0.f, 0.f, 1.f};
  }
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const int32_t P = a.g.numel, S = s.strip_numel;  // plane size; planes' stride in shared memory
  if (!a.g.channels_last) {  // the strips are one contiguous range of x: whole planes, or G = 1
    const scalar_t* src = x + b.p0 * P + b.q0;
    const int32_t count = s.ranks > 1 ? b.numel : b.count * P;
    const int32_t vectors = s.vec > 1 ? count / s.vec : 0;  // only the last block has a tail
    copy_vectors(reinterpret_cast<Vec16*>(m.xs), reinterpret_cast<const Vec16*>(src), vectors, tid);
    for (int32_t i = vectors * s.vec + tid; i < count; i += kStagedThreads) m.xs[i] = src[i];
    return;
  }
  // channels_last: element (q, c0 + g) at x[(n * P + q) * C + c0 + g]; threads on consecutive
  // channels of a pixel, so each pixel's G values are read as one contiguous piece
  const int64_t C = a.g.channels;
  const scalar_t* src = x + (b.sample * P + b.q0) * C + b.c0;
  const int32_t pixels = b.numel;
  if (s.vec > 1) {
    const int32_t units = b.count / s.vec;
    const auto load = [&](int32_t i, Vec16& v) -> int32_t {  // the pixel of item i
      const int32_t q = static_cast<int32_t>(s.div_units.div(static_cast<uint32_t>(i)));
      v = load_vector<Vec16>(src + q * C + (i - q * units) * s.vec);
      return q;
    };
    const auto store = [&](int32_t i, int32_t q, const Vec16& v) {
      scatter_vec(m.xs + ((i - q * units) * s.vec) * S + q, S, v);
    };
    int32_t i = tid;
    for (; i + kStagedThreads < pixels * units; i += 2 * kStagedThreads) {  // two loads in flight
      Vec16 a, b2;
      const int32_t qa = load(i, a), qb = load(i + kStagedThreads, b2);
      store(i, qa, a);
      store(i + kStagedThreads, qb, b2);
    }
    for (; i < pixels * units; i += kStagedThreads) {
      Vec16 a;
      const int32_t qa = load(i, a);
      store(i, qa, a);
    }
  } else {
    for (int32_t i = tid; i < pixels * b.count; i += kStagedThreads) {
      const int32_t q = static_cast<int32_t>(s.div_units.div(static_cast<uint32_t>(i)));
      const int32_t gi = i - q * b.count;
      m.xs[gi * S + q] = src[q * C + gi];
    }
  }
}

// The runs of `run` elements of LFC block j (each inside it; see staged_run) -> j.
// With run 4 and L = 1 the writes at multiples of 4 of each row are at most 4 elements apart, so
// they reach every run even when W % 4 != 0.
DIV_HD void fill_table(const Geometry& g, int32_t run, const BlockRange& br, uint16_t j, uint16_t* table) {
  for (int32_t y = br.y0; y < br.y1; ++y)
    for (int32_t x = br.x0; x < br.x1; x += run) table[(y * g.w + x) / run] = j;
}

// N elements from shared memory as float: one 16- or 8-byte load where N elements are that many
// bytes (src then aligned to them), else one load each. Two or four bfloat16 come as 32-bit words
// whose halves become floats by a shift or a mask each (the generic conversion extracts the high
// half first: three instructions a pair instead of two).
template <typename scalar_t, int N>
DIV_HD void load_elements(const scalar_t* src, float (&out)[N]) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && (N == 2 || N == 4)) {
    uint32_t w[N / 2];
    if constexpr (N == 4) {
      const Vec8 v = load_vector<Vec8>(src);
      w[0] = v.w[0];
      w[1] = v.w[1];
    } else {
      w[0] = load_vector<uint32_t>(src);
    }
    for (int k = 0; k < N / 2; ++k) {
      out[2 * k] = float_from_bits(w[k] << 16);
      out[2 * k + 1] = float_from_bits(w[k] & 0xFFFF0000u);
    }
    return;
  }
  scalar_t e[N];
  if (N * sizeof(scalar_t) == 16) {
    const Vec16 v = load_vector<Vec16>(src);
    memcpy(e, &v, sizeof(e));
  } else if (N * sizeof(scalar_t) == 8) {
    const Vec8 v = load_vector<Vec8>(src);
    memcpy(e, &v, sizeof(e));
  } else {
    for (int k = 0; k < N; ++k) e[k] = src[k];
  }
  for (int k = 0; k < N; ++k) out[k] = static_cast<float>(e[k]);
}

// The float64 sum and the float min and max of x over LFC block `br` of a staged plane. Each thread
// starts at a lane-dependent element (any order gives the same exact sum, format.py), which
// spreads neighbouring threads over the banks.
template <typename scalar_t>
DIV_HD void block_stats_any(const scalar_t* plane, int32_t W, const BlockRange& br, int lane,
                            double& sum, float& lo, float& hi) {
  const int32_t rows = br.y1 - br.y0, cols = br.x1 - br.x0, count = rows * cols;
  const scalar_t* corner = plane + br.y0 * W + br.x0;
  const int32_t e0 = lane % count;
  int32_t r = e0 / cols, c = e0 - r * cols;
  double sum0 = 0.0, sum1 = 0.0;  // two chains for latency
  lo = infinity();
  hi = -infinity();
  for (int32_t k = 0; k < count; ++k) {
    const float v = static_cast<float>(corner[r * W + c]);
    if (k & 1) {
      sum1 += static_cast<double>(v);
    } else {
      sum0 += static_cast<double>(v);
    }
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
    if (++c == cols) {
      c = 0;
      if (++r == rows) r = 0;
    }
  }
  sum = sum0 + sum1;
}

// The same where every row of the block is whole aligned runs of R = 4 or 2 elements
// (StagedPlan::stats_run): one 16-, 8- or 4-byte load per run, rows from a lane-dependent start.
template <typename scalar_t, int R>
DIV_HD void block_stats_runs(const scalar_t* plane, int32_t W, const BlockRange& br, int lane,
                             double& sum, float& lo, float& hi) {
  const int32_t rows = br.y1 - br.y0, runs = (br.x1 - br.x0) / R;
  int32_t r = lane % rows;
  double sum0 = 0.0, sum1 = 0.0;
  lo = infinity();
  hi = -infinity();
  for (int32_t k = 0; k < rows; ++k) {
    const scalar_t* row = plane + (br.y0 + r) * W + br.x0;
    for (int32_t c = 0; c < runs; ++c) {
      float v[R];
      load_elements<scalar_t, R>(row + R * c, v);
      float vlo = fminf(v[0], v[1]), vhi = fmaxf(v[0], v[1]);
      sum0 += static_cast<double>(v[0]);
      sum1 += static_cast<double>(v[1]);
      if constexpr (R == 4) {
        sum0 += static_cast<double>(v[2]);
        sum1 += static_cast<double>(v[3]);
        vlo = fminf(vlo, fminf(v[2], v[3]));
        vhi = fmaxf(vhi, fmaxf(v[2], v[3]));
      }
      lo = fminf(lo, vlo);
      hi = fmaxf(hi, vhi);
    }
    if (++r == rows) r = 0;
  }
  sum = sum0 + sum1;
}

// The same where the block spans whole rows (one block column: 7x7 at B = 8), so its elements are
// contiguous: a flat walk from a lane-dependent element to the end, then from the start to it,
// two at a time, without a row or wrap test per element.
template <typename scalar_t>
DIV_HD void block_stats_flat(const scalar_t* plane, int32_t W, const BlockRange& br, int lane,
                             double& sum, float& lo, float& hi) {
  const int32_t count = br.count();
  const scalar_t* first = plane + br.y0 * W;
  const int32_t e0 = lane % count;
  double sum0 = 0.0, sum1 = 0.0;
  lo = infinity();
  hi = -infinity();
  const auto span = [&](int32_t i, int32_t end) {
    for (; i + 1 < end; i += 2) {
      const float v0 = static_cast<float>(first[i]), v1 = static_cast<float>(first[i + 1]);
      sum0 += static_cast<double>(v0);
      sum1 += static_cast<double>(v1);
      lo = fminf(lo, fminf(v0, v1));
      hi = fmaxf(hi, fmaxf(v0, v1));
    }
    if (i < end) {
      const float v = static_cast<float>(first[i]);
      sum0 += static_cast<double>(v);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
  };
  span(e0, count);
  span(0, e0);
  sum = sum0 + sum1;
}

// Thread per (plane, LFC block of the strip). Block rows are whole in a strip, so a block's
// element range, made relative to the strip, indexes the staged strip; its LFC goes to `lfc` at
// its plane-wide index and to up[gi * strip_lfc + jr], and the table holds jr.
template <typename scalar_t>
DIV_HD void staged_lfc(const CompressArgs& a, const StagedPlan& s, const StagedBlock& b,
                       const StagedSmem<scalar_t>& m, int tid) {
  const Geometry& g = a.g;
  const int32_t L = g.lfc_numel, Ls = s.strip_lfc, y0 = b.q0 / g.w;
  const bool keep_hfc = a.mode != kLfcOnly;
  for (int32_t it = tid; it < b.count * Ls; it += kStagedThreads) {
    const int32_t gi = static_cast<int32_t>(s.div_lfc.div(static_cast<uint32_t>(it)));
    const int32_t jr = it - gi * Ls;
    if (jr >= b.lfc) continue;  // the last strip's missing rows
    const int32_t j = b.j0 + jr;
    BlockRange br = block_range(g, static_cast<uint32_t>(j));
    br.y0 -= y0;
    br.y1 -= y0;
    const scalar_t* plane = m.xs + gi * s.strip_numel;
    double sum;
    float lo, hi;
    if (s.stats_run == 4) {
      block_stats_runs<scalar_t, 4>(plane, g.w, br, tid & 31, sum, lo, hi);
    } else if (br.x0 == 0 && br.x1 == g.w) {
      block_stats_flat(plane, g.w, br, tid & 31, sum, lo, hi);
    } else if (s.stats_run == 2) {
      block_stats_runs<scalar_t, 2>(plane, g.w, br, tid & 31, sum, lo, hi);
    } else {
      block_stats_any(plane, g.w, br, tid & 31, sum, lo, hi);
    }
    const int32_t count = br.count();
    const float up = round_lfc(sum / static_cast<double>(count), a.lfc_kind);
    store_lfc(a.lfc, a.lfc_kind, (b.p0 + gi) * L + j, up);
    m.up[it] = up;
    if (!keep_hfc) continue;
    if (gi == 0) fill_table(g, s.run, br, static_cast<uint16_t>(jr), m.table);
    PlaneSlot& slot = m.slot[gi];
    if (is_nan(up)) {  // a non-finite block: the plane's constants are NaN (format v3)
      shared_or(&slot.nan, 1u);
    } else {
      shared_min(&slot.lo, ordered_bits_d(static_cast<double>(lo) - static_cast<double>(up)));
      shared_max(&slot.hi, ordered_bits_d(static_cast<double>(hi) - static_cast<double>(up)));
    }
  }
}

// Thread per plane: the plane's range from the strips' partial ranges (`peers`: the PlaneSlot
// arrays of the cluster's blocks, this block's own when ranks == 1), then its constants; the
// first strip's block writes them out.
DIV_HD void staged_scale(const CompressArgs& a, const StagedPlan& s, const StagedBlock& b, PlaneSlot* slots,
                         PlaneSlot* const* peers, int tid) {
  for (int32_t gi = tid; gi < b.count; gi += kStagedThreads) {
    unsigned long long lo = peers[0][gi].lo, hi = peers[0][gi].hi;
    uint32_t nan = peers[0][gi].nan;
    for (int r = 1; r < s.ranks; ++r) {
      const PlaneSlot& other = peers[r][gi];
      lo = other.lo < lo ? other.lo : lo;
      hi = other.hi > hi ? other.hi : hi;
      nan |= other.nan;
    }
    PlaneSlot& slot = slots[gi];
    const int64_t p = b.p0 + gi;
    const RangeAcc acc{from_ordered_bits_d(lo), from_ordered_bits_d(hi), nan != 0};
    const PlaneScale ps = b.rank == 0 ? store_plane_scale(a, acc, p) : plane_scale(acc, a.levels);
    slot.lo_value = ps.lo;
    slot.scale = ps.scale;
    slot.p = ps.p;
    slot.key = plane_key(read_seed(a), a.first_plane + static_cast<uint64_t>(p));
  }
}

// up of every block times its plane's 2^shift, in place (what the codes subtract).
template <typename scalar_t>
DIV_HD void staged_scale_up(const CompressArgs& a, const StagedPlan& s, const StagedBlock& b,
                            const StagedSmem<scalar_t>& m, int tid) {
  for (int32_t it = tid; it < b.count * s.strip_lfc; it += kStagedThreads)
    m.up[it] = fmul(m.up[it], m.slot[s.div_lfc.div(static_cast<uint32_t>(it))].p);
}

// One plane's quantization constants, read once per word.
struct CodeConsts {
  float lo, scale, p, levels;
  uint32_t key;
};

// The codes of elements q .. q + RUN - 1 of a staged strip as a field of RUN * BITS bits. RUN = 4:
// one LFC block, q % 4 == 0, one aligned load. RUN = 2: a pair (q even); PAIRS (StagedPlan::pairs)
// 2: in one LFC block, one lookup and one aligned load; 1: the plane is one LFC block, no lookup;
// 0: each element looked up. Unless FULL, the second only when q + 1 < P, the strip's size. `up` is the
// strip's (scaled) LFC. The hashes: element q is pair j0 + k / 2 of its code word, whose run_key
// is `word_key`.
template <typename scalar_t, int BITS, int RUN, int PAIRS, bool FULL>
DIV_HD uint32_t code_run(const scalar_t* plane, const float* up, const uint16_t* table, int32_t q,
                         uint32_t word_key, uint32_t j0, int32_t P, const CodeConsts& c) {
  float v[RUN];
  float u[RUN];
  for (int k = 0; k < RUN; k += 2) {
    const uint32_t h = mix32_rest(word_key ^ (j0 + k / 2));
    u[k] = uniform_even(h);
    u[k + 1] = uniform_odd(h);
  }
  uint32_t field = 0;
  if constexpr (RUN == 4) {
    load_elements<scalar_t, RUN>(plane + q, v);
    const float up_p = up[table[q >> 2]];
    for (int k = 0; k < RUN; ++k) field |= quantize(v[k], up_p, c.p, c.lo, c.scale, u[k], c.levels) << (k * BITS);
  } else if constexpr (PAIRS == 2) {  // P even: the pair is whole
    load_elements<scalar_t, 2>(plane + q, v);
    const float up_p = up[table[q]];
    field = quantize(v[0], up_p, c.p, c.lo, c.scale, u[0], c.levels) |
            quantize(v[1], up_p, c.p, c.lo, c.scale, u[1], c.levels) << BITS;
  } else {
    const float up0 = PAIRS == 1 ? up[0] : up[table[q]];  // 1: one LFC block per plane
    field = quantize(static_cast<float>(plane[q]), up0, c.p, c.lo, c.scale, u[0], c.levels);
    if (FULL || q + 1 < P) {
      const float up1 = PAIRS == 1 ? up0 : up[table[q + 1]];
      field |= quantize(static_cast<float>(plane[q + 1]), up1, c.p, c.lo, c.scale, u[1], c.levels) << BITS;
    }
  }
  return field;
}

// Thread per code word: word w of the strip of staged plane gi from its 32 / BITS elements, in
// runs of RUN (see staged_run); strips are whole words. Consecutive threads take consecutive words,
// so the stores are coalesced and no lanes exchange bits; each thread starts at a lane-dependent
// run, which spreads the shared memory loads of a warp over the banks.
template <typename scalar_t, int BITS, int RUN, int PAIRS>
DIV_HD void staged_codes(const CompressArgs& a, const StagedPlan& s, const StagedBlock& b,
                         const StagedSmem<scalar_t>& m, int tid) {
  constexpr int kElements = 32 / BITS;
  constexpr int kRuns = kElements / RUN;  // a power of two
  const Geometry& g = a.g;
  const int32_t P = g.numel, W = g.words, Ws = s.strip_words, left = P - b.q0;
  const int rot = ((tid & 31) * kElements * static_cast<int>(sizeof(scalar_t))) >> 7;
  for (int32_t it = tid; it < b.count * Ws; it += kStagedThreads) {
    const int32_t gi = static_cast<int32_t>(s.div_words.div(static_cast<uint32_t>(it)));
    const int32_t w = b.w0 + (it - gi * Ws);
    if (w >= W) continue;  // the last strip's missing words
    const PlaneSlot& slot = m.slot[gi];
    const CodeConsts c{slot.lo_value, slot.scale, slot.p, static_cast<float>(a.levels), slot.key};
    const scalar_t* plane = m.xs + gi * s.strip_numel;
    const float* up = m.up + gi * s.strip_lfc;
    const int32_t q0 = w * kElements - b.q0;  // in the strip
    const uint32_t key = run_key(c.key, static_cast<uint32_t>(w) * (kElements / 2));  // its pairs' hashes
    uint32_t word = 0;
    if (q0 + kElements <= left) {
DIV_UNROLL
      for (int k = 0; k < kRuns; ++k) {
        const int r = (k + rot) & (kRuns - 1);
        word |= code_run<scalar_t, BITS, RUN, PAIRS, true>(plane, up, m.table, q0 + r * RUN, key, r * (RUN / 2), left, c)
                << (r * RUN * BITS);
      }
    } else {  // the plane's last word: its runs past P stay 0
      for (int r = 0; r < kRuns && q0 + r * RUN < left; ++r)
        word |= code_run<scalar_t, BITS, RUN, PAIRS, false>(plane, up, m.table, q0 + r * RUN, key, r * (RUN / 2), left, c)
                << (r * RUN * BITS);
    }
    a.codes[(b.p0 + gi) * W + w] = word;
  }
}

template <typename scalar_t, int BITS>
DIV_HD void staged_codes_bits(const CompressArgs& a, const StagedPlan& s, const StagedBlock& b,
                              const StagedSmem<scalar_t>& m, int tid) {
  if (s.run == 4) {
    staged_codes<scalar_t, BITS, 4, 0>(a, s, b, m, tid);
  } else if (s.pairs == 2) {
    staged_codes<scalar_t, BITS, 2, 2>(a, s, b, m, tid);
  } else if (s.pairs == 1) {
    staged_codes<scalar_t, BITS, 2, 1>(a, s, b, m, tid);
  } else {
    staged_codes<scalar_t, BITS, 2, 0>(a, s, b, m, tid);
  }
}

// The staged compress of one block in three stages, between which the blocks of a cluster that
// split a plane wait for each other (ranks > 1): first each strip's load and LFC blocks with its
// partial ranges; then the planes' constants from every strip's range (`peers`); then, once no
// block reads another's shared memory any more, the codes.
template <typename scalar_t, typename Exec>
DIV_HD void staged_first(Exec& ex, const CompressArgs& a, const StagedPlan& s, unsigned char* smem, int64_t block) {
  const StagedSmem<scalar_t> m(smem, s);
  const StagedBlock b = staged_block(a.g, s, block);
  ex.each([&](int tid) { staged_load<scalar_t>(a, s, b, m, tid); });
  ex.sync();
  ex.each([&](int tid) { staged_lfc<scalar_t>(a, s, b, m, tid); });
}

template <typename scalar_t, typename Exec>
DIV_HD void staged_second(Exec& ex, const CompressArgs& a, const StagedPlan& s, unsigned char* smem,
                          PlaneSlot* const* peers, int64_t block) {
  const StagedSmem<scalar_t> m(smem, s);
  const StagedBlock b = staged_block(a.g, s, block);
  ex.each([&](int tid) { staged_scale(a, s, b, m.slot, peers, tid); });
}

template <typename scalar_t, typename Exec>
DIV_HD void staged_third(Exec& ex, const CompressArgs& a, const StagedPlan& s, unsigned char* smem, int64_t block) {
  const StagedSmem<scalar_t> m(smem, s);
  const StagedBlock b = staged_block(a.g, s, block);
  ex.each([&](int tid) { staged_scale_up<scalar_t>(a, s, b, m, tid); });
  ex.sync();
  ex.each([&](int tid) {
    with_bits(a.bits, [&](auto q) { staged_codes_bits<scalar_t, decltype(q)::value>(a, s, b, m, tid); });
  });
}

// A block of a plan with ranks == 1: the three stages with block barriers between them.
template <typename scalar_t, typename Exec>
DIV_HD void staged_compress_block(Exec& ex, const CompressArgs& a, const StagedPlan& s,
                                  unsigned char* smem, int64_t block) {
  staged_first<scalar_t>(ex, a, s, smem, block);
  if (a.mode == kLfcOnly) return;  // uniform over the block: no thread skips a barrier alone
  ex.sync();
  PlaneSlot* const self[1] = {StagedSmem<scalar_t>(smem, s).slot};
  staged_second<scalar_t>(ex, a, s, smem, self, block);
  ex.sync();
  staged_third<scalar_t>(ex, a, s, smem, block);
}

// ---- decompress: runs of four ------------------------------------------------------------

// x_hat of elements q .. q + 3 of plane p, where runs of four allow (runs_of_four; q % 4 == 0):
// one LFC load, and their 4Q code bits from one word.
template <typename scalar_t>
DIV_HD void decode_run4(const DecompressArgs& a, int64_t p, const PlaneDecode& d, int32_t q, float (&out)[4]) {
  const Geometry& g = a.g;
  uint32_t codes = 0;
  if (a.mode != kLfcOnly) {
    const uint32_t uq = static_cast<uint32_t>(q);  // word and bit apart: q * Q may pass 2^31 on a large plane
    codes = a.codes[p * g.words + (uq >> (5 - a.bits_log2))] >> ((uq << a.bits_log2) & 31u);
  }
  const float up = a.mode != kHfcOnly ? load_lfc(a.lfc, a.lfc_kind, p * g.lfc_numel + block_of(g, static_cast<uint32_t>(q))) : kNoLfc;
  const uint32_t mask = (1u << a.bits) - 1u;
  for (int k = 0; k < 4; ++k) out[k] = reconstruct(up, (codes >> (k << a.bits_log2)) & mask, d);
}

// ---- decompress, NCHW: one thread per 16 output bytes --------------------------------------
//
// Thread t rebuilds elements t * vec .. t * vec + vec - 1 of the flat output (vec = 16 bytes'
// worth where N * C * P allows, else 1) and writes them with one 16-byte store. A chunk may span
// planes where P % vec != 0 (7x7, bfloat16 14x14). Where runs of four allow, it is vec / 4 runs,
// each with one LFC load and its 4Q code bits from one word (P % 4 == 0: a run never spans
// planes); otherwise it walks its elements, reloading the code word, LFC value and plane constants
// only when they change.

struct VecPlan {
  int32_t vec;            // elements per thread
  int32_t runs;           // 1: vec is 4 or 8 and runs of four allow (one LFC load per run)
  int64_t chunks;         // N * C * P / vec
  int64_t blocks;         // of kStagedThreads threads
  FastDiv64 div_numel;    // by P: flat element -> plane
};

inline VecPlan vec_plan(const Geometry& g, int64_t esize) {
  VecPlan v{};
  const int32_t per16 = static_cast<int32_t>(16 / esize);
  v.vec = (g.planes * g.numel) % per16 == 0 ? per16 : 1;
  v.runs = v.vec > 1 && runs_of_four(g);  // a run's 4Q bits lie in one code word
  v.chunks = g.planes * g.numel / v.vec;
  v.blocks = (v.chunks + kStagedThreads - 1) / kStagedThreads;
  v.div_numel = FastDiv64::make(static_cast<uint64_t>(g.numel));
  return v;
}

template <typename scalar_t, int VEC, bool RUNS>
DIV_HD void vec_decompress_chunk(const DecompressArgs& a, const VecPlan& v, int64_t chunk) {
  if (chunk >= v.chunks) return;
  const Geometry& g = a.g;
  const int64_t e0 = chunk * VEC;
  int64_t p = static_cast<int64_t>(v.div_numel.div(static_cast<uint64_t>(e0)));
  int32_t q = static_cast<int32_t>(e0 - p * g.numel);
  scalar_t out[VEC];
  if (RUNS) {  // VEC is 4 or 8 and runs of four allow: one LFC load per run
    PlaneDecode d = plane_decode_of<scalar_t>(a, p);
    for (int r = 0; r < VEC; r += 4) {
      if (r > 0 && (q += 4) == g.numel) {  // the chunk's next run starts the next plane
        q = 0;
        d = plane_decode_of<scalar_t>(a, ++p);
      }
      float run[4];
      decode_run4<scalar_t>(a, p, d, q, run);
      for (int k = 0; k < 4; ++k) out[r + k] = static_cast<scalar_t>(run[k]);
    }
  } else {
    ElementWriter<scalar_t> w(a, p);
    Cursor cur;
    cur.seek(g, static_cast<uint32_t>(q));
DIV_UNROLL
    for (int k = 0; k < VEC; ++k) {
      if (q == g.numel) {  // the chunk goes on in the next plane
        q = 0;
        w = ElementWriter<scalar_t>(a, ++p);
        cur.seek(g, 0u);
      }
      out[k] = static_cast<scalar_t>(w.value(q, cur.block()));
      cur.next(g, static_cast<uint32_t>(++q));
    }
  }
  store_values<scalar_t, VEC>(static_cast<scalar_t*>(a.out) + e0, out);
}

template <typename scalar_t, int VEC, bool RUNS, typename Exec>
DIV_HD void vec_decompress_block(Exec& ex, const DecompressArgs& a, const VecPlan& v, int64_t block) {
  ex.each([&](int tid) { vec_decompress_chunk<scalar_t, VEC, RUNS>(a, v, block * kStagedThreads + tid); });
}

// up[i] = the LFC value at index(i), i < N: the LFC dtype's branch taken once for all N loads.
template <int N, typename Index>
DIV_HD void load_lfc_n(const DecompressArgs& a, Index index, float (&up)[N]) {
  if (a.lfc_kind == kLfcBFloat16) {
    const c10::BFloat16* l = static_cast<const c10::BFloat16*>(a.lfc);
    for (int i = 0; i < N; ++i) up[i] = static_cast<float>(l[index(i)]);
  } else if (a.lfc_kind == kLfcFloat16) {
    const c10::Half* l = static_cast<const c10::Half*>(a.lfc);
    for (int i = 0; i < N; ++i) up[i] = static_cast<float>(l[index(i)]);
  } else {
    const float* l = static_cast<const float*>(a.lfc);
    for (int i = 0; i < N; ++i) up[i] = l[index(i)];
  }
}

// ---- decompress, NCHW: one thread per code word ----------------------------------------------
//
// Thread t rebuilds the 32 / Q elements of code word t (Q = 2: 16 elements, 64 bytes of float32):
// one code-word load, one set of plane constants and one block lookup for all of them, where a
// thread per 16 bytes repeats those for every 4 (float32) or 8 (16-bit) elements. The LFC blocks
// of its runs of four follow by additions (a division only at a row's end), their values come in
// one gather (one branch on the LFC dtype), and the elements then decode without a branch. It
// applies where a plane is whole code words (P % (32 / Q) == 0, so word t of the codes is the
// output's elements t * 32 / Q .. and no word spans planes), a word's elements are whole 16-byte
// stores, and runs of four lie in one LFC block (rows_of_four): every ResNet-50 NCHW shape but
// 14x14 and 7x7 at Q = 2.
//
// A thread's 16-byte pieces are contiguous, so a warp's store instruction would write one piece in
// every 32 / Q * size bytes (half sectors for float32 at Q = 2). The `word` path therefore stages
// a block's words in shared memory, pieces swizzled so that neither side conflicts on banks, and
// the block then copies its one contiguous range out with whole-warp 16-byte stores; `word_direct`
// stores each thread's pieces straight from registers (the GPU run compares the two).

struct WordPlan {
  int32_t run;          // elements per thread, 32 / Q; 0 when the path does not apply
  int32_t smem_bytes;   // the staged variant's shared memory: a block's words
  int64_t threads;      // N * C * words per plane
  int64_t blocks;       // of kStagedThreads threads
  FastDiv64 div_words;  // by the words of a plane
};

inline WordPlan word_plan(const Geometry& g, int64_t esize) {
  WordPlan w{};
  const int32_t run = 32 / g.bits;
  if (g.channels_last || !rows_of_four(g) || g.numel % run != 0 || run * esize % 16 != 0) return w;
  w.run = run;
  w.smem_bytes = static_cast<int32_t>(kStagedThreads * run * esize);
  w.threads = g.planes * g.words;
  w.blocks = (w.threads + kStagedThreads - 1) / kStagedThreads;
  w.div_words = FastDiv64::make(static_cast<uint64_t>(g.words));
  return w;
}

// Whether a word of Q bits per code is whole 16-byte pieces of scalar_t (Q = 8 is 8 bytes of a
// 16-bit dtype: word_plan never takes the path there, and its kernels are empty).
template <typename scalar_t, int BITS>
constexpr bool word_fits() {
  return (32 / BITS) % (16 / sizeof(scalar_t)) == 0;
}

// Decodes word t and hands its pieces to store(k, piece): the k-th 16 bytes of its elements.
template <typename scalar_t, int BITS, typename Store>
DIV_HD void decode_word(const DecompressArgs& a, const WordPlan& w, int64_t t, Store&& store) {
  constexpr int kRun = 32 / BITS;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const Geometry& g = a.g;
  const int64_t p = static_cast<int64_t>(w.div_words.div(static_cast<uint64_t>(t)));
  const int32_t q0 = static_cast<int32_t>(t - p * g.words) * kRun;
  uint32_t word = a.mode != kLfcOnly ? a.codes[t] : 0u;  // word t - p * words of plane p
  const PlaneDecode d = plane_decode_of<scalar_t>(a, p);
  float up[kRun / 4];  // the LFC of each run of four
  if (a.mode != kHfcOnly) {
    int32_t block[kRun / 4];
    Cursor cur;
    cur.seek(g, static_cast<uint32_t>(q0));
DIV_UNROLL
    for (int r = 0; r < kRun / 4; ++r) {
      block[r] = cur.block();
      if (r + 1 < kRun / 4) cur.skip(g, static_cast<uint32_t>(q0 + 4 * r + 4), 4);
    }
    const int64_t lfc_base = p * g.lfc_numel;
    load_lfc_n<kRun / 4>(a, [&](int r) { return lfc_base + block[r]; }, up);
  } else {
    for (int r = 0; r < kRun / 4; ++r) up[r] = kNoLfc;
  }
DIV_UNROLL
  for (int k = 0; k < kRun / kVec; ++k) {
    scalar_t e[kVec];
DIV_UNROLL
    for (int i = 0; i < kVec; ++i) {
      e[i] = static_cast<scalar_t>(reconstruct(up[(k * kVec + i) / 4], word & kMask, d));
      word >>= BITS;
    }
    store(k, e);
  }
}

// word_direct: each thread stores its pieces where they belong.
template <typename scalar_t, int BITS>
DIV_HD void word_direct_thread(const DecompressArgs& a, const WordPlan& w, int64_t t) {
  if constexpr (word_fits<scalar_t, BITS>()) {
    if (t >= w.threads) return;
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* out = static_cast<scalar_t*>(a.out) + t * (32 / BITS);
    decode_word<scalar_t, BITS>(a, w, t, [&](int k, const scalar_t (&e)[kVec]) { store_values<scalar_t, kVec>(out + k * kVec, e); });
  }
}

template <typename scalar_t, int BITS, typename Exec>
DIV_HD void word_direct_block(Exec& ex, const DecompressArgs& a, const WordPlan& w, int64_t block) {
  ex.each([&](int tid) { word_direct_thread<scalar_t, BITS>(a, w, block * kStagedThreads + tid); });
}

// word (staged): piece k of thread tid goes to 16-byte slot tid * K + (k + tid / (8 / K)) % K of
// shared memory (K pieces a word, 1 to 8): the 8 threads of a store wavefront, and the 8
// consecutive slots of a load wavefront, then fall in 8 different bank groups.
DIV_HD uint32_t word_slot(uint32_t tid, uint32_t k, uint32_t pieces) {
  return tid * pieces + (k + tid / (8 / pieces)) % pieces;  // pieces: a power of two
}

template <typename scalar_t, int BITS, typename Exec>
DIV_HD void word_staged_block(Exec& ex, const DecompressArgs& a, const WordPlan& w, unsigned char* smem, int64_t block) {
  if constexpr (word_fits<scalar_t, BITS>()) {
    constexpr int kVec = 16 / sizeof(scalar_t);
    constexpr uint32_t kPieces = (32 / BITS) / kVec;
    Vec16* slots = reinterpret_cast<Vec16*>(smem);
    const int64_t t0 = block * kStagedThreads;
    const int32_t words = static_cast<int32_t>(w.threads - t0 < kStagedThreads ? w.threads - t0 : kStagedThreads);
    ex.each([&](int tid) {
      if (tid >= words) return;
      decode_word<scalar_t, BITS>(a, w, t0 + tid, [&](int k, const scalar_t (&e)[kVec]) {
        store_values<scalar_t, kVec>(reinterpret_cast<scalar_t*>(slots + word_slot(tid, k, kPieces)), e);
      });
    });
    ex.sync();
    ex.each([&](int tid) {
      Vec16* out = reinterpret_cast<Vec16*>(static_cast<scalar_t*>(a.out) + t0 * (32 / BITS));
      check_aligned<Vec16>(out);  // then every out[v] is
      for (uint32_t v = tid; v < static_cast<uint32_t>(words * kPieces); v += kStagedThreads)
        out[v] = slots[word_slot(v / kPieces, v % kPieces, kPieces)];
    });
  }
}

// ---- decompress, NCHW: one thread per small plane ---------------------------------------------
//
// Planes of at most kPlaneBytes bytes that are not whole code words (7x7, or 5x5 and 6x6 maps):
// vec's thread per 16 bytes there spans planes and walks element by element. Here thread g of a
// block rebuilds plane p0 + g whole, with one set of plane constants and, where the plane is one
// LFC block (7x7 at B = 8), one LFC load for all of it (else the block of each element from a
// table the block builds once), into shared memory; the block then copies its planes, one
// contiguous range of the output, out with whole-warp 16-byte stores.

// A block's `planes` staged planes, from plane p0 on, out to their contiguous range of the output
// with whole-warp 16-byte stores (the range must start 16-byte aligned); a tail below 16 bytes
// element by element.
template <typename scalar_t>
DIV_HD void copy_planes_out(const DecompressArgs& a, const scalar_t* stage, int64_t p0, int32_t planes, int tid) {
  const int32_t count = planes * a.g.numel, vectors = count * static_cast<int32_t>(sizeof(scalar_t)) / 16;
  scalar_t* out = static_cast<scalar_t*>(a.out) + p0 * a.g.numel;
  copy_vectors(reinterpret_cast<Vec16*>(out), reinterpret_cast<const Vec16*>(stage), vectors, tid);
  constexpr int32_t kPer16 = 16 / static_cast<int32_t>(sizeof(scalar_t));
  for (int32_t i = vectors * kPer16 + tid; i < count; i += kStagedThreads) out[i] = stage[i];
}

constexpr int32_t kPlaneBytes = 256;

struct PlanePlan {
  int32_t bytes;        // of one plane: P * element size; 0 when the path does not apply
  int32_t smem_bytes;   // kStagedThreads planes, then the LFC block of each element (int16)
  int32_t off_table;    // byte offset of the table; 0 when the plane is one LFC block
  int64_t blocks;       // of kStagedThreads planes
};

inline PlanePlan plane_plan(const Geometry& g, int64_t esize) {
  PlanePlan pp{};
  const int64_t bytes = static_cast<int64_t>(g.numel) * esize;
  if (g.channels_last || bytes > kPlaneBytes) return pp;
  pp.bytes = static_cast<int32_t>(bytes);
  const int64_t planes_bytes = round_up16(kStagedThreads * bytes);
  pp.off_table = g.lfc_numel > 1 ? static_cast<int32_t>(planes_bytes) : 0;
  pp.smem_bytes = static_cast<int32_t>(planes_bytes + (g.lfc_numel > 1 ? round_up16(g.numel * 2) : 0));
  pp.blocks = (g.planes + kStagedThreads - 1) / kStagedThreads;
  return pp;
}

// Plane p, whole, into dst[0 .. P - 1].
template <typename scalar_t, int BITS>
DIV_HD void decode_plane(const DecompressArgs& a, int64_t p, const int16_t* table, scalar_t* dst) {
  constexpr int32_t kRun = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const Geometry& g = a.g;
  const PlaneDecode d = plane_decode_of<scalar_t>(a, p);
  const int64_t lfc_base = p * g.lfc_numel;
  const bool one_block = table == nullptr;
  const float up0 = a.mode != kHfcOnly && one_block ? load_lfc(a.lfc, a.lfc_kind, lfc_base) : kNoLfc;
  const uint32_t* words = a.mode != kLfcOnly ? a.codes + p * g.words : nullptr;
  const auto element = [&](int32_t q, uint32_t code) {
    const float up = one_block || a.mode == kHfcOnly ? up0 : load_lfc(a.lfc, a.lfc_kind, lfc_base + table[q]);
    dst[q] = static_cast<scalar_t>(reconstruct(up, code, d));
  };
  const int32_t full = g.numel / kRun;  // whole words; the last one's padding is skipped
  for (int32_t wi = 0; wi < full; ++wi) {
    uint32_t word = words != nullptr ? words[wi] : 0u;
DIV_UNROLL
    for (int32_t m = 0; m < kRun; ++m, word >>= BITS) element(wi * kRun + m, word & kMask);
  }
  uint32_t word = words != nullptr && full < g.words ? words[full] : 0u;
  for (int32_t q = full * kRun; q < g.numel; ++q, word >>= BITS) element(q, word & kMask);
}

template <typename scalar_t, int BITS, typename Exec>
DIV_HD void plane_decompress_block(Exec& ex, const DecompressArgs& a, const PlanePlan& pp, unsigned char* smem,
                                   int64_t block) {
  const Geometry& g = a.g;
  const int64_t p0 = block * kStagedThreads;
  const int32_t planes = static_cast<int32_t>(g.planes - p0 < kStagedThreads ? g.planes - p0 : kStagedThreads);
  scalar_t* stage = reinterpret_cast<scalar_t*>(smem);
  int16_t* table = pp.off_table > 0 ? reinterpret_cast<int16_t*>(smem + pp.off_table) : nullptr;
  if (table != nullptr) {
    ex.each([&](int tid) {
      for (int32_t q = tid; q < g.numel; q += kStagedThreads) table[q] = static_cast<int16_t>(block_of(g, static_cast<uint32_t>(q)));
    });
    ex.sync();
  }
  ex.each([&](int tid) {
    if (tid < planes) decode_plane<scalar_t, BITS>(a, p0 + tid, table, stage + static_cast<int64_t>(tid) * g.numel);
  });
  ex.sync();
  ex.each([&](int tid) { copy_planes_out(a, stage, p0, planes, tid); });  // p0 is a multiple of 256
}

// ---- decompress, NCHW: a block's planes in shared memory, a thread per code word --------------
//
// Planes above kPlaneBytes that `word` does not take (W or the block width not a multiple of 4,
// or P not whole code words: 14x14 at B = 8, a fifth of ResNet-50's elements), where vec's thread
// per 16 bytes walks element by element, reloading the code word, LFC value and plane constants
// as they change. Here a block owns G whole planes, one contiguous range of the output:
//   1. the G planes' LFC values (as float; -0 in hfc_only mode) and the LFC block of each element
//      of a plane (int16) into shared memory;
//   2. a thread per code word (consecutive threads, consecutive words of the codes: coalesced
//      loads) decodes its 32 / Q elements (fewer in a plane's last word) in groups of 4, each
//      group one 16-byte (float32) or 8-byte (16-bit) store into the staged planes;
//   3. the block copies its range out with whole-warp 16-byte stores.
// It needs P % 4 == 0 (a group never spans planes) and planes of at most a quarter of the stage.

constexpr int32_t kPlaneWordsStage = 24 * 1024;  // ~26 KB a block: 8 blocks of 256 threads per SM

struct PlaneWordsPlan {
  int32_t planes;      // G whole planes per block; 0 when the path does not apply
  int32_t smem_bytes;  // the G planes, their LFC values (float), the element -> block table
  int32_t off_lfc;
  int32_t off_table;
  int64_t blocks;      // ceil(N * C / G)
  FastDiv div_words;   // by the code words of a plane
};

inline PlaneWordsPlan plane_words_plan(const Geometry& g, int64_t esize) {
  PlaneWordsPlan pw{};
  const int64_t bytes = static_cast<int64_t>(g.numel) * esize;
  if (g.channels_last || g.numel % 4 != 0 || 4 * bytes > kPlaneWordsStage) return pw;
  const int64_t unit = bytes % 16 == 0 ? 1 : 2;  // planes per 16-byte multiple (bytes % 8 == 0)
  int64_t planes = kPlaneWordsStage / bytes / unit * unit;
  const int64_t needed = (g.planes + unit - 1) / unit * unit;  // no more than the tensor has
  if (planes > needed) planes = needed;
  pw.planes = static_cast<int32_t>(planes);
  pw.off_lfc = static_cast<int32_t>(round_up16(planes * bytes));
  pw.off_table = pw.off_lfc + static_cast<int32_t>(round_up16(planes * g.lfc_numel * 4));
  pw.smem_bytes = pw.off_table + static_cast<int32_t>(round_up16(static_cast<int64_t>(g.numel) * 2));
  pw.blocks = (g.planes + planes - 1) / planes;
  pw.div_words = FastDiv::make(static_cast<uint32_t>(g.words));
  return pw;
}

// Phase 2 for one thread: code words tid, tid + threads, ... of the block's `planes` planes.
template <typename scalar_t, int BITS>
DIV_HD void plane_words_thread(const DecompressArgs& a, const PlaneWordsPlan& pw, int64_t p0, int32_t planes,
                               const float* lfc, const int16_t* table, scalar_t* stage, int tid) {
  constexpr int32_t kRun = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const Geometry& g = a.g;
  const int32_t items = planes * g.words;
  const uint32_t* codes = a.mode != kLfcOnly ? a.codes + p0 * g.words : nullptr;
  for (int32_t i = tid; i < items; i += kStagedThreads) {
    const int32_t j = static_cast<int32_t>(pw.div_words.div(static_cast<uint32_t>(i)));
    const int32_t q0 = (i - j * g.words) * kRun;
    const int32_t n = min32(kRun, g.numel - q0);  // a multiple of 4
    const PlaneDecode d = plane_decode_of<scalar_t>(a, p0 + j);
    const float* up = lfc + j * g.lfc_numel;
    const int16_t* blocks = table + q0;
    scalar_t* dst = stage + j * g.numel + q0;
    uint32_t word = codes != nullptr ? codes[i] : 0u;
DIV_UNROLL
    for (int32_t k = 0; k < kRun; k += 4) {
      if (k >= n) break;
      scalar_t e[4];
DIV_UNROLL
      for (int32_t m = 0; m < 4; ++m, word >>= BITS) e[m] = static_cast<scalar_t>(reconstruct(up[blocks[k + m]], word & kMask, d));
      store_values<scalar_t, 4>(dst + k, e);  // 16 bytes of float32, 8 of a 16-bit dtype
    }
  }
}

template <typename scalar_t, int BITS, typename Exec>
DIV_HD void plane_words_block(Exec& ex, const DecompressArgs& a, const PlaneWordsPlan& pw, unsigned char* smem,
                              int64_t block) {
  const Geometry& g = a.g;
  const int64_t p0 = block * pw.planes;
  const int32_t planes = static_cast<int32_t>(g.planes - p0 < pw.planes ? g.planes - p0 : pw.planes);
  scalar_t* stage = reinterpret_cast<scalar_t*>(smem);
  float* lfc = reinterpret_cast<float*>(smem + pw.off_lfc);
  int16_t* table = reinterpret_cast<int16_t*>(smem + pw.off_table);
  ex.each([&](int tid) {
    for (int32_t q = tid; q < g.numel; q += kStagedThreads) table[q] = static_cast<int16_t>(block_of(g, static_cast<uint32_t>(q)));
    const int32_t values = planes * g.lfc_numel;
    for (int32_t v = tid; v < values; v += kStagedThreads)
      lfc[v] = a.mode != kHfcOnly ? load_lfc(a.lfc, a.lfc_kind, p0 * g.lfc_numel + v) : kNoLfc;
  });
  ex.sync();
  ex.each([&](int tid) { plane_words_thread<scalar_t, BITS>(a, pw, p0, planes, lfc, table, stage, tid); });
  ex.sync();
  ex.each([&](int tid) { copy_planes_out(a, stage, p0, planes, tid); });  // G planes are 16-byte multiples
}

// ---- decompress, channels_last: through a transpose tile -----------------------------------
//
// A block rebuilds a tile of `pixels` pixels x `channels` channels of one sample: first plane by
// plane (each thread a run of 8 consecutive pixels of one channel: one code word, few LFC loads)
// into shared memory, then pixel by pixel, each pixel's channels one contiguous piece of output.

constexpr int32_t kTileRun = 8;

struct TilePlan {
  int32_t channels;        // Gc: divides C
  int32_t pixels;          // Tq: a multiple of kTileRun
  int32_t channel_groups;  // C / Gc
  int32_t pixel_tiles;     // ceil(P / Tq)
  int64_t blocks;
  int32_t smem_bytes;      // float tile[Tq][Gc + 1]
  int32_t runs;            // 1: runs of four allow (one LFC load and code word per run)
  FastDiv div_tiles;       // by channel_groups * pixel_tiles
  FastDiv div_pixel_tiles; // by pixel_tiles
  FastDiv div_channels;    // by Gc
  FastDiv div_runs;        // by Tq / kTileRun
};

inline TilePlan tile_plan(const Geometry& g) {
  TilePlan t{};
  int32_t gc = static_cast<int32_t>(g.channels < 32 ? g.channels : 32);
  while (g.channels % gc != 0) --gc;
  t.channels = gc;
  t.pixels = (2048 / gc + kTileRun - 1) / kTileRun * kTileRun;
  t.channel_groups = static_cast<int32_t>(g.channels / gc);
  t.pixel_tiles = (g.numel + t.pixels - 1) / t.pixels;
  t.blocks = (g.planes / g.channels) * t.channel_groups * t.pixel_tiles;
  t.smem_bytes = t.pixels * (gc + 1) * 4;
  t.runs = runs_of_four(g);
  t.div_tiles = FastDiv::make(static_cast<uint32_t>(t.channel_groups * t.pixel_tiles));
  t.div_pixel_tiles = FastDiv::make(static_cast<uint32_t>(t.pixel_tiles));
  t.div_channels = FastDiv::make(static_cast<uint32_t>(gc));
  t.div_runs = FastDiv::make(static_cast<uint32_t>(t.pixels / kTileRun));
  return t;
}

template <typename scalar_t, bool RUNS, typename Exec>
DIV_HD void tile_decompress_block(Exec& ex, const DecompressArgs& a, const TilePlan& t,
                                  unsigned char* smem, int64_t block) {
  const Geometry& g = a.g;
  float* tile = reinterpret_cast<float*>(smem);
  const int32_t pitch = t.channels + 1;
  const int64_t n = t.div_tiles.div(static_cast<uint32_t>(block));
  const int32_t rest = static_cast<int32_t>(block - n * t.channel_groups * t.pixel_tiles);
  const int32_t cg = static_cast<int32_t>(t.div_pixel_tiles.div(static_cast<uint32_t>(rest)));
  const int32_t c0 = cg * t.channels;
  const int32_t q0 = (rest - cg * t.pixel_tiles) * t.pixels;
  const int32_t tq = min32(t.pixels, g.numel - q0);
  const int32_t runs = t.pixels / kTileRun;
  ex.each([&](int tid) {
    for (int32_t it = tid; it < t.channels * runs; it += kStagedThreads) {
      const int32_t gi = static_cast<int32_t>(t.div_runs.div(static_cast<uint32_t>(it)));
      const int32_t first = (it - gi * runs) * kTileRun;
      if (first >= tq) continue;
      const int64_t p = n * g.channels + c0 + gi;
      if (RUNS) {  // tq % 4 == 0 (P % 4 == 0, q0 % 8 == 0): whole runs
        const PlaneDecode d = plane_decode_of<scalar_t>(a, p);
        for (int32_t k = first; k < min32(first + kTileRun, tq); k += 4) {
          float run[4];
          decode_run4<scalar_t>(a, p, d, q0 + k, run);
          for (int e = 0; e < 4; ++e) tile[(k + e) * pitch + gi] = run[e];
        }
        continue;
      }
      ElementWriter<scalar_t> w(a, p);
      Cursor cur;
      cur.seek(g, static_cast<uint32_t>(q0 + first));
      for (int32_t k = first; k < min32(first + kTileRun, tq); ++k) {
        tile[k * pitch + gi] = w.value(q0 + k, cur.block());
        cur.next(g, static_cast<uint32_t>(q0 + k + 1));
      }
    }
  });
  ex.sync();
  ex.each([&](int tid) {
    scalar_t* out = static_cast<scalar_t*>(a.out) + (n * g.numel + q0) * g.channels + c0;
    for (int32_t it = tid; it < tq * t.channels; it += kStagedThreads) {
      const int32_t k = static_cast<int32_t>(t.div_channels.div(static_cast<uint32_t>(it)));
      const int32_t gi = it - k * t.channels;
      out[static_cast<int64_t>(k) * g.channels + gi] = static_cast<scalar_t>(tile[k * pitch + gi]);
    }
  });
}


// ---- decompress, channels_last: 16 bytes of channels per store, straight from the codes ------
//
// Thread t rebuilds `VEC` consecutive channels (16 bytes) of the 32 / BITS consecutive pixels that
// one code word of each of those planes holds: it loads each channel's code word and constants once
// and an LFC value per channel when the pixels enter a new block, then writes each pixel's VEC
// channels with one 16-byte store. Consecutive threads take consecutive channel groups of the same
// pixels, so a warp's stores are whole C * element-size pieces of the output. No shared memory and
// no transpose: the channels_last pieces are assembled in registers. Needs C % VEC == 0.

struct ChannelPlan {
  int32_t vec;          // channels per thread: 16 bytes' worth, or 0 when C does not allow it
  int32_t run;          // pixels per thread: the elements of one code word, 32 / Q
  int32_t groups;       // C / vec
  int32_t runs;         // code words per plane that hold pixels: ceil(P / run)
  int64_t threads;      // N * runs * groups
  int64_t blocks;       // of kStagedThreads threads
  FastDiv64 div_groups; // by groups
  FastDiv64 div_runs;   // by runs
};

inline ChannelPlan channel_plan(const Geometry& g, int64_t esize, int bits) {
  ChannelPlan c{};
  const int32_t per16 = static_cast<int32_t>(16 / esize);
  if (!g.channels_last || g.channels % per16 != 0) return c;
  c.vec = per16;
  c.run = 32 / bits;
  c.groups = static_cast<int32_t>(g.channels / per16);
  c.runs = (g.numel + c.run - 1) / c.run;
  c.threads = (g.planes / g.channels) * c.runs * c.groups;
  c.blocks = (c.threads + kStagedThreads - 1) / kStagedThreads;
  c.div_groups = FastDiv64::make(static_cast<uint64_t>(c.groups));
  c.div_runs = FastDiv64::make(static_cast<uint64_t>(c.runs));
  return c;
}

// up[i] = the LFC of block j of planes p0 .. p0 + VEC - 1.
template <int VEC>
DIV_HD void load_lfc_planes(const DecompressArgs& a, int64_t p0, int32_t j, float (&up)[VEC]) {
  const int64_t L = a.g.lfc_numel, first = p0 * L + j;
  load_lfc_n<VEC>(a, [&](int i) { return first + i * L; }, up);
}

// Pixels q0 .. q0 + count - 1 walk in segments, each inside one LFC block and one row: the LFC
// values are loaded once per segment, and the per-pixel loop does only the arithmetic and the store.
template <typename scalar_t, int VEC, int BITS>
DIV_HD void channel_decompress_thread(const DecompressArgs& a, const ChannelPlan& c, int64_t t) {
  constexpr int kRun = 32 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  if (t >= c.threads) return;
  const Geometry& g = a.g;
  const int64_t nr = static_cast<int64_t>(c.div_groups.div(static_cast<uint64_t>(t)));
  const int32_t cg = static_cast<int32_t>(t - nr * c.groups);
  const int64_t n = static_cast<int64_t>(c.div_runs.div(static_cast<uint64_t>(nr)));
  const int32_t r = static_cast<int32_t>(nr - n * c.runs);
  const int64_t p0 = n * g.channels + static_cast<int64_t>(cg) * VEC;  // plane of the first channel
  const int32_t q0 = r * kRun;
  const bool use_lfc = a.mode != kHfcOnly;
  uint32_t words[VEC];
  PlaneDecode d[VEC];
  float up[VEC];
  for (int i = 0; i < VEC; ++i) {
    words[i] = a.mode != kLfcOnly ? a.codes[(p0 + i) * g.words + r] : 0u;
    d[i] = plane_decode_of<scalar_t>(a, p0 + i);
    up[i] = kNoLfc;
  }
  scalar_t* out = static_cast<scalar_t*>(a.out) + (n * g.numel + q0) * g.channels + cg * VEC;
  const int32_t count = min32(kRun, g.numel - q0);
  Cursor cur;
  cur.seek(g, static_cast<uint32_t>(q0));
  for (int32_t k = 0; k < count;) {
    const int32_t len = min32(min32(g.bw - cur.xr, g.w - cur.x), count - k);
    if (use_lfc) load_lfc_planes<VEC>(a, p0, cur.block(), up);
    for (int32_t m = 0; m < len; ++m) {
      scalar_t e[VEC];
      for (int i = 0; i < VEC; ++i) {
        e[i] = static_cast<scalar_t>(reconstruct(up[i], words[i] & kMask, d[i]));
        words[i] >>= BITS;
      }
      store_values<scalar_t, VEC>(out, e);  // VEC: 16 bytes
      out += g.channels;
    }
    k += len;
    cur.skip(g, static_cast<uint32_t>(q0 + k), len);
  }
}

template <typename scalar_t, int VEC, int BITS, typename Exec>
DIV_HD void channel_decompress_block(Exec& ex, const DecompressArgs& a, const ChannelPlan& c, int64_t block) {
  ex.each([&](int tid) { channel_decompress_thread<scalar_t, VEC, BITS>(a, c, block * kStagedThreads + tid); });
}

}  // namespace division
