// Host helpers of the CPU twin (codec_twin.cpp, mask_twin.cpp): blocks run in parallel over host
// threads, each block's phases thread by thread (exec.h). The codec's twin gives each block a
// HostExec of its own, which checks that the block passes a barrier between any two of its phases.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "codec_staged.h"

namespace division {

constexpr int64_t kTwinSharedLimit = 227 * 1024;  // the twin plans as on an H100

template <typename F>
void for_blocks(int64_t blocks, F&& f) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b);
  });
}

// Shared memory of one host thread's blocks, 16-byte aligned.
struct HostSmem {
  std::vector<Vec16> buffer;
  // a block's shared memory, no more than an H100 gives one (a launch asking more fails there)
  explicit HostSmem(int64_t bytes) : buffer(static_cast<size_t>((bytes + 15) / 16)) {
    TORCH_CHECK(bytes <= kTwinSharedLimit, "division kernels: a block asks for ", bytes,
                " bytes of shared memory, more than a GPU block can have (", kTwinSharedLimit, ")");
  }
  unsigned char* data() { return reinterpret_cast<unsigned char*>(buffer.data()); }
};

// for_blocks for blocks with `smem_bytes` of shared memory each: f(b, smem), one buffer per host thread.
template <typename F>
void for_blocks_with_smem(int64_t blocks, int64_t smem_bytes, F&& f) {
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    HostSmem smem(smem_bytes);
    for (int64_t b = begin; b < end; ++b) f(b, smem.data());
  });
}

}  // namespace division
