// The generic compress and decompress kernels: any 1-D to 3-D shape and layout, any plane size.
// They read x several times (from L1/L2 when the planes still sit there) and serve what the staged
// kernels of codec_staged.h do not take: 3-D planes and planes too large for shared memory.
// Written once for the GPU and its CPU twin (see exec.h).
//
// A thread block of kBlockThreads threads owns `planes_per_block` whole planes (p = n * C + c),
// `threads_per_plane` threads each. The work of a block is a fixed sequence of phases separated
// by barriers; a phase is a function of (block, thread id) that communicates with other threads
// only through the block's shared state, and only across a barrier. An executor runs the
// sequence: on the device every thread runs each phase for its own id and barriers are
// __syncthreads(); on the host (codec.cpp) each phase runs for ids 0..kBlockThreads-1 in turn and
// barriers are no-ops. So the CPU build tests the kernels' own indexing, work split, reductions
// and packing against the reference, not a rewrite of them.
//
// compress, per block:
//   1. LFC: thread r of plane g takes LFC blocks j = r, r + T, ...: float64 sum and float min and
//      max in (z, y, x) order; the mean -> LFC dtype, stored to `lfc`; (min or max) - up in
//      float64 into the thread's running range of the plane.
//   2. range: tree reduction over the T threads of each plane in shared memory.
//   3. thread 0 of each plane: shift, lo, scale, step (format v3).
//   4. codes: thread r of plane g assembles words wi = r, r + T, ... of the packed plane, each
//      from 32 / Q consecutive elements (x re-read, up re-read from `lfc` when the block changes,
//      one pair hash per two elements).
// decompress: thread r of plane g rebuilds elements from up, code, lo and step: q = r, r + T, ...
// (plane-major), or one run of consecutive q per thread (plane-minor), caching word and up.
//
// Thread -> (plane g, rank r): "plane-major" (r = tid % T) gives consecutive threads consecutive
// elements of one plane: coalesced for NCHW. "plane-minor" (g = tid % G) gives consecutive threads
// the same element of consecutive planes = consecutive channels: coalesced for channels_last.
#pragma once

#include <cstdint>

#include "division_math.h"
#include "exec.h"

namespace division {

constexpr int kBlockThreads = 256;

struct Launch {
  int threads_per_plane;  // T: a power of two in [1, kBlockThreads]
  int planes_per_block;   // G = kBlockThreads / T
  bool plane_minor;
};

DIV_HD void thread_slot(const Launch& l, int tid, int& g, int& r) {
  if (l.plane_minor) {
    g = tid % l.planes_per_block;
    r = tid / l.planes_per_block;
  } else {
    r = tid % l.threads_per_plane;
    g = tid / l.threads_per_plane;
  }
}

DIV_HD int slot_thread(const Launch& l, int g, int r) {
  return l.plane_minor ? r * l.planes_per_block + g : g * l.threads_per_plane + r;
}

// What every compress kernel reads and writes.
struct CompressArgs {
  const void* x;  // scalar_t, contiguous or channels_last (Geometry::channels_last)
  Geometry g;
  int bits, bits_log2, levels, mode, lfc_kind;
  const int64_t* seed;  // the 0-d seed tensor, on x's device
  uint64_t first_plane; // the hash's index of plane 0 (format.py: planes numbered across a forward)
  void* lfc;            // (planes, lfc_numel) of the LFC dtype; scratch in hfc_only mode
  uint32_t* codes;      // (planes, words); unused in lfc_only mode
  float* lo_out;        // (planes,)
  float* step_out;      // (planes,)
  int8_t* shift_out;    // (planes,)
};

DIV_HD uint64_t read_seed(const CompressArgs& a) { return static_cast<uint64_t>(*a.seed); }

struct CompressShared {
  double lo[kBlockThreads];
  double hi[kBlockThreads];
  unsigned char nan[kBlockThreads];
  float plane_lo[kBlockThreads];  // per plane slot g, written in phase 3
  float plane_scale[kBlockThreads];
  float plane_p[kBlockThreads];
};

// Writes a plane's constants (format v3) to the outputs; returns them.
DIV_HD PlaneScale store_plane_scale(const CompressArgs& a, const RangeAcc& acc, int64_t p) {
  const PlaneScale ps = plane_scale(acc, a.levels);
  a.lo_out[p] = ps.lo;
  a.step_out[p] = ps.step;
  a.shift_out[p] = static_cast<int8_t>(ps.shift);
  return ps;
}

// ---- compress phases -------------------------------------------------------------------------

template <typename scalar_t>
DIV_HD void compress_lfc_phase(const CompressArgs& a, const Launch& l, CompressShared& s,
                               int64_t block, int tid) {
  int g, r;
  thread_slot(l, tid, g, r);
  const int64_t p = block * l.planes_per_block + g;
  RangeAcc acc = RangeAcc::empty();
  if (p < a.g.planes) {
    const scalar_t* x = static_cast<const scalar_t*>(a.x);
    const PlaneView v = plane_view(a.g, p);
    const bool keep_hfc = a.mode != kLfcOnly;
    for (int32_t j = r; j < a.g.lfc_numel; j += l.threads_per_plane) {
      const BlockRange br = block_range(a.g, static_cast<uint32_t>(j));
      double sum = 0.0;
      float xmin = infinity(), xmax = -infinity();
      for (int32_t z = br.z0; z < br.z1; ++z)
        for (int32_t y = br.y0; y < br.y1; ++y) {
          const int64_t row = v.base + static_cast<int64_t>((z * a.g.h + y) * a.g.w) * v.stride;
          for (int32_t xx = br.x0; xx < br.x1; ++xx) {
            const float e = static_cast<float>(x[row + xx * v.stride]);
            sum += static_cast<double>(e);
            xmin = fminf(xmin, e);
            xmax = fmaxf(xmax, e);
          }
        }
      const float up = round_lfc(sum / static_cast<double>(br.count()), a.lfc_kind);
      store_lfc(a.lfc, a.lfc_kind, p * a.g.lfc_numel + j, up);
      if (keep_hfc) acc.add_block(xmin, xmax, up);
    }
  }
  s.lo[tid] = acc.lo;
  s.hi[tid] = acc.hi;
  s.nan[tid] = acc.nan ? 1 : 0;
}

// One level of the tree: rank r < stride folds in rank r + stride of the same plane.
DIV_HD void compress_reduce_phase(const Launch& l, CompressShared& s, int stride, int tid) {
  int g, r;
  thread_slot(l, tid, g, r);
  if (r >= stride) return;
  const int other = slot_thread(l, g, r + stride);
  RangeAcc acc{s.lo[tid], s.hi[tid], s.nan[tid] != 0};
  acc.merge(RangeAcc{s.lo[other], s.hi[other], s.nan[other] != 0});
  s.lo[tid] = acc.lo;
  s.hi[tid] = acc.hi;
  s.nan[tid] = acc.nan ? 1 : 0;
}

DIV_HD void compress_scale_phase(const CompressArgs& a, const Launch& l, CompressShared& s,
                                 int64_t block, int tid) {
  int g, r;
  thread_slot(l, tid, g, r);
  const int64_t p = block * l.planes_per_block + g;
  if (r != 0 || p >= a.g.planes) return;
  const PlaneScale ps = store_plane_scale(a, RangeAcc{s.lo[tid], s.hi[tid], s.nan[tid] != 0}, p);
  s.plane_lo[g] = ps.lo;
  s.plane_scale[g] = ps.scale;
  s.plane_p[g] = ps.p;
}

template <typename scalar_t>
DIV_HD void compress_codes_phase(const CompressArgs& a, const Launch& l, const CompressShared& s,
                                 int64_t block, int tid) {
  int g, r;
  thread_slot(l, tid, g, r);
  const int64_t p = block * l.planes_per_block + g;
  if (p >= a.g.planes) return;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const PlaneView v = plane_view(a.g, p);
  const float lo = s.plane_lo[g], scale = s.plane_scale[g], pow2 = s.plane_p[g];
  const float levels = static_cast<float>(a.levels);
  const uint32_t key = plane_key(read_seed(a), a.first_plane + static_cast<uint64_t>(p));
  const int32_t per_word = 32 >> a.bits_log2;  // even: a word holds whole element pairs
  const int64_t lfc_base = p * a.g.lfc_numel;
  uint32_t* out = a.codes + p * a.g.words;
  for (int32_t wi = r; wi < a.g.words; wi += l.threads_per_plane) {
    const int32_t q0 = wi * per_word;
    const int32_t q1 = min32(q0 + per_word, a.g.numel);
    uint32_t word = 0;  // elements past the plane leave their (padding) bits zero
    Cursor cur;
    cur.seek(a.g, static_cast<uint32_t>(q0));
    int32_t j = -1;
    float up_p = 0.f;
    uint32_t hash = 0;
    for (int32_t q = q0; q < q1; ++q) {
      if (cur.block() != j) {
        j = cur.block();
        up_p = fmul(load_lfc(a.lfc, a.lfc_kind, lfc_base + j), pow2);
      }
      const bool odd = (q & 1) != 0;
      if (!odd) hash = pair_hash(key, static_cast<uint32_t>(q >> 1));
      const float u = odd ? uniform_odd(hash) : uniform_even(hash);
      const float xe = static_cast<float>(x[v.base + q * v.stride]);
      word |= quantize(xe, up_p, pow2, lo, scale, u, levels) << ((q - q0) << a.bits_log2);
      cur.next(a.g, static_cast<uint32_t>(q + 1));
    }
    out[wi] = word;
  }
}

// The whole of one block's compress work, run by an executor (see the top of this file).
template <typename scalar_t, typename Exec>
DIV_HD void generic_compress_block(Exec& ex, const CompressArgs& a, const Launch& l,
                                   CompressShared& s, int64_t block) {
  ex.each([&](int tid) { compress_lfc_phase<scalar_t>(a, l, s, block, tid); });
  if (a.mode == kLfcOnly) return;  // uniform over the block: no thread skips a barrier alone
  ex.sync();
  for (int stride = l.threads_per_plane / 2; stride > 0; stride /= 2) {
    ex.each([&](int tid) { compress_reduce_phase(l, s, stride, tid); });
    ex.sync();
  }
  ex.each([&](int tid) { compress_scale_phase(a, l, s, block, tid); });
  ex.sync();
  ex.each([&](int tid) { compress_codes_phase<scalar_t>(a, l, s, block, tid); });
}

// ---- decompress ------------------------------------------------------------------------------

// What every decompress kernel reads and writes.
struct DecompressArgs {
  Geometry g;
  int bits, bits_log2, mode, lfc_kind;
  const void* lfc;         // unused in hfc_only mode
  const uint32_t* codes;   // unused in lfc_only mode
  const float* lo;
  const float* step;
  const int8_t* shift;
  void* out;               // scalar_t, contiguous or channels_last (Geometry::channels_last)
};

// Plane p's reconstruction constants for output dtype scalar_t.
template <typename scalar_t>
DIV_HD PlaneDecode plane_decode_of(const DecompressArgs& a, int64_t p) {
  if (a.mode == kLfcOnly) return plane_decode(-0.f, -0.f, 0, finite_top<scalar_t>());  // HFC term -0
  return plane_decode(a.lo[p], a.step[p], a.shift[p], finite_top<scalar_t>());
}

// Element q of plane p: reads its code word (cached while q stays in it) and up (cached while q
// stays in its LFC block) and writes x_hat in the output's dtype.
template <typename scalar_t>
struct ElementWriter {
  const DecompressArgs* a;  // a pointer, so that a writer can be reassigned to another plane
  scalar_t* out;
  PlaneView v;
  const uint32_t* words;
  int64_t lfc_base;
  PlaneDecode d;
  int32_t word_index = -1, block = -1;
  uint32_t word = 0;
  float up = kNoLfc;

  DIV_HD ElementWriter(const DecompressArgs& args, int64_t p)
      : a(&args), out(static_cast<scalar_t*>(args.out)), v(plane_view(args.g, p)),
        words(args.mode != kLfcOnly ? args.codes + p * args.g.words : nullptr),
        lfc_base(p * args.g.lfc_numel), d(plane_decode_of<scalar_t>(args, p)) {}

  // x_hat of element q, in block j, as float32.
  DIV_HD float value(int32_t q, int32_t j) {
    uint32_t code = 0;
    if (a->mode != kLfcOnly) {
      const int32_t wi = q >> (5 - a->bits_log2);
      if (wi != word_index) {
        word_index = wi;
        word = words[wi];
      }
      const int32_t k = q & ((32 >> a->bits_log2) - 1);  // position of q in its word
      code = (word >> (k << a->bits_log2)) & ((1u << a->bits) - 1u);
    }
    if (a->mode != kHfcOnly && j != block) {
      block = j;
      up = load_lfc(a->lfc, a->lfc_kind, lfc_base + j);
    }
    return reconstruct(up, code, d);
  }

  DIV_HD void write(int32_t q, int32_t j) { out[v.base + q * v.stride] = static_cast<scalar_t>(value(q, j)); }
};

template <typename scalar_t>
DIV_HD void decompress_phase(const DecompressArgs& a, const Launch& l, int64_t block, int tid) {
  int g, r;
  thread_slot(l, tid, g, r);
  const int64_t p = block * l.planes_per_block + g;
  if (p >= a.g.planes) return;
  ElementWriter<scalar_t> w(a, p);
  const int32_t T = l.threads_per_plane;
  if (!l.plane_minor) {  // consecutive threads, consecutive elements
    for (int32_t q = r; q < a.g.numel; q += T) w.write(q, block_of(a.g, static_cast<uint32_t>(q)));
    return;
  }
  // consecutive threads, consecutive planes: each thread one run of consecutive elements
  const int64_t run = (a.g.numel + T - 1) / T;
  const int64_t start = r * run;
  if (start >= a.g.numel) return;
  const int32_t q0 = static_cast<int32_t>(start);
  const int32_t q1 = static_cast<int32_t>(start + run < a.g.numel ? start + run : a.g.numel);
  Cursor cur;
  cur.seek(a.g, static_cast<uint32_t>(q0));
  for (int32_t q = q0; q < q1; ++q) {
    w.write(q, cur.block());
    cur.next(a.g, static_cast<uint32_t>(q + 1));
  }
}

template <typename scalar_t, typename Exec>
DIV_HD void generic_decompress_block(Exec& ex, const DecompressArgs& a, const Launch& l,
                                     int64_t block) {
  ex.each([&](int tid) { decompress_phase<scalar_t>(a, l, block, tid); });
}

// ---- launch shapes ---------------------------------------------------------------------------

inline int pow2_at_least(int64_t n, int cap) {
  int t = 1;
  while (t < n && t < cap) t *= 2;
  return t;
}

inline Launch make_launch(int threads_per_plane, bool plane_minor) {
  return Launch{threads_per_plane, kBlockThreads / threads_per_plane, plane_minor};
}

// compress: about one LFC block per thread. NCHW: up to a whole block per plane, consecutive
// threads on consecutive LFC blocks / code words. channels_last: at least 16 planes (channels)
// per block, consecutive threads on consecutive channels of one pixel.
inline Launch compress_launch(const Geometry& g) {
  if (g.channels_last) return make_launch(pow2_at_least(g.lfc_numel, 16), true);
  return make_launch(pow2_at_least(g.lfc_numel, kBlockThreads), false);
}

// decompress: NCHW: at least a warp per plane, consecutive threads on consecutive elements;
// channels_last: 16 channels per block, consecutive threads on consecutive channels.
inline Launch decompress_launch(const Geometry& g) {
  if (g.channels_last) return make_launch(16, true);
  const int t = pow2_at_least(g.numel, kBlockThreads);
  return make_launch(t < 32 ? 32 : t, false);
}

inline int64_t blocks_for(const Geometry& g, const Launch& l) {
  return (g.planes + l.planes_per_block - 1) / l.planes_per_block;
}

}  // namespace division
