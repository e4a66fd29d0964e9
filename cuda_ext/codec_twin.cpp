// The CPU twin of the codec's kernels (codec_generic.h, codec_staged.h): what ops.cpp runs for CPU
// tensors, as it runs the launchers of compress_cuda.cu and decompress_cuda.cu for CUDA ones. The
// blocks of a launch run in parallel over host threads, each block's phases thread by thread
// (exec.h, twin.h), so a machine without a GPU runs the kernels' own code; the tests compare it
// bit for bit with the reference.
#include "kernels.h"
#include "twin.h"

namespace division {
namespace {

template <typename scalar_t>
void generic_compress_blocks(const CompressArgs& a, const Launch& l) {
  at::parallel_for(0, blocks_for(a.g, l), 1, [&](int64_t begin, int64_t end) {
    CompressShared shared;
    for (int64_t b = begin; b < end; ++b) {
      HostExec<kBlockThreads> ex;
      generic_compress_block<scalar_t>(ex, a, l, shared, b);
    }
  });
}

// The blocks of a plane group (a cluster when ranks > 1) run each stage in turn, as the device's
// barriers order them, each with its own shared memory.
template <typename scalar_t>
void staged_compress_blocks(const CompressArgs& a, const StagedPlan& s) {
  at::parallel_for(0, s.blocks / s.ranks, 1, [&](int64_t begin, int64_t end) {
    std::vector<HostSmem> smem;
    for (int r = 0; r < s.ranks; ++r) smem.emplace_back(s.smem_bytes);
    PlaneSlot* peers[kMaxRanks];
    for (int r = 0; r < s.ranks; ++r) peers[r] = StagedSmem<scalar_t>(smem[r].data(), s).slot;
    for (int64_t c = begin; c < end; ++c) {
      std::vector<HostExec<kStagedThreads>> ex(static_cast<size_t>(s.ranks));
      const auto cluster_sync = [&] { for (auto& e : ex) e.sync(); };  // a cluster barrier is also a block's
      for (int r = 0; r < s.ranks; ++r) staged_first<scalar_t>(ex[r], a, s, smem[r].data(), c * s.ranks + r);
      if (a.mode == kLfcOnly) continue;
      cluster_sync();
      for (int r = 0; r < s.ranks; ++r) staged_second<scalar_t>(ex[r], a, s, smem[r].data(), peers, c * s.ranks + r);
      cluster_sync();
      for (int r = 0; r < s.ranks; ++r) staged_third<scalar_t>(ex[r], a, s, smem[r].data(), c * s.ranks + r);
    }
  });
}

template <typename scalar_t>
void generic_decompress_blocks(const DecompressArgs& a, const Launch& l) {
  for_blocks(blocks_for(a.g, l), [&](int64_t b) {
    HostExec<kBlockThreads> ex;
    generic_decompress_block<scalar_t>(ex, a, l, b);
  });
}

template <typename scalar_t>
void vec_decompress_blocks(const DecompressArgs& a, const VecPlan& v) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  for_blocks(v.blocks, [&](int64_t b) {
    HostExec<kStagedThreads> ex;
    if (v.vec == kVec && v.runs) {
      vec_decompress_block<scalar_t, kVec, true>(ex, a, v, b);
    } else if (v.vec == kVec) {
      vec_decompress_block<scalar_t, kVec, false>(ex, a, v, b);
    } else {
      vec_decompress_block<scalar_t, 1, false>(ex, a, v, b);
    }
  });
}

template <typename scalar_t>
void word_decompress_blocks(const DecompressArgs& a, const WordPlan& w, bool staged) {
  for_blocks_with_smem(w.blocks, staged ? w.smem_bytes : 0, [&](int64_t b, unsigned char* smem) {
    HostExec<kStagedThreads> ex;
    with_bits(a.bits, [&](auto q) {
      constexpr int kBits = decltype(q)::value;
      if (staged) {
        word_staged_block<scalar_t, kBits>(ex, a, w, smem, b);
      } else {
        word_direct_block<scalar_t, kBits>(ex, a, w, b);
      }
    });
  });
}

template <typename scalar_t>
void plane_decompress_blocks(const DecompressArgs& a, const PlanePlan& pp) {
  for_blocks_with_smem(pp.blocks, pp.smem_bytes, [&](int64_t b, unsigned char* smem) {
    HostExec<kStagedThreads> ex;
    with_bits(a.bits, [&](auto q) { plane_decompress_block<scalar_t, decltype(q)::value>(ex, a, pp, smem, b); });
  });
}

template <typename scalar_t>
void plane_words_decompress_blocks(const DecompressArgs& a, const PlaneWordsPlan& pw) {
  for_blocks_with_smem(pw.blocks, pw.smem_bytes, [&](int64_t b, unsigned char* smem) {
    HostExec<kStagedThreads> ex;
    with_bits(a.bits, [&](auto q) { plane_words_block<scalar_t, decltype(q)::value>(ex, a, pw, smem, b); });
  });
}

template <typename scalar_t>
void tile_decompress_blocks(const DecompressArgs& a, const TilePlan& t) {
  for_blocks_with_smem(t.blocks, t.smem_bytes, [&](int64_t b, unsigned char* smem) {
    HostExec<kStagedThreads> ex;
    if (t.runs) {
      tile_decompress_block<scalar_t, true>(ex, a, t, smem, b);
    } else {
      tile_decompress_block<scalar_t, false>(ex, a, t, smem, b);
    }
  });
}

template <typename scalar_t>
void channel_decompress_blocks(const DecompressArgs& a, const ChannelPlan& c) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  for_blocks(c.blocks, [&](int64_t b) {
    HostExec<kStagedThreads> ex;
    with_bits(a.bits, [&](auto q) { channel_decompress_block<scalar_t, kVec, decltype(q)::value>(ex, a, c, b); });
  });
}

}  // namespace

void twin_generic_compress(const CompressArgs& a, const Launch& l, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_compress_cpu", [&] { generic_compress_blocks<scalar_t>(a, l); });
}

void twin_staged_compress(const CompressArgs& a, const StagedPlan& s, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_compress_cpu", [&] { staged_compress_blocks<scalar_t>(a, s); });
}

void twin_generic_decompress(const DecompressArgs& a, const Launch& l, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { generic_decompress_blocks<scalar_t>(a, l); });
}

void twin_vec_decompress(const DecompressArgs& a, const VecPlan& v, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { vec_decompress_blocks<scalar_t>(a, v); });
}

void twin_word_decompress(const DecompressArgs& a, const WordPlan& w, bool staged, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { word_decompress_blocks<scalar_t>(a, w, staged); });
}

void twin_plane_decompress(const DecompressArgs& a, const PlanePlan& pp, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { plane_decompress_blocks<scalar_t>(a, pp); });
}

void twin_plane_words_decompress(const DecompressArgs& a, const PlaneWordsPlan& pw, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { plane_words_decompress_blocks<scalar_t>(a, pw); });
}

void twin_tile_decompress(const DecompressArgs& a, const TilePlan& t, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { tile_decompress_blocks<scalar_t>(a, t); });
}

void twin_channel_decompress(const DecompressArgs& a, const ChannelPlan& c, at::ScalarType dtype) {
  DIVISION_DISPATCH(dtype, "division_decompress_cpu", [&] { channel_decompress_blocks<scalar_t>(a, c); });
}

}  // namespace division
