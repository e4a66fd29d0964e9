// How a kernel body runs: on the GPU, and as its CPU twin.
//
// Every kernel of division._C is written once, as a sequence of *phases* over one thread block,
// separated by barriers (ex.sync()). A per-thread phase is `ex.each([&](int tid) {...})`; a
// per-warp phase is `ex.each_warp([&](int warp, auto& lanes) {...})`, whose body is the same for
// all lanes of the warp (warp-uniform) and hands per-lane work to `lanes`:
//   lanes.words(group, field, store): each lane l computes field(l), its 32 / group bits already
//   shifted to their place in a 32-bit word; the fields of each `group` consecutive lanes (a power
//   of two) are ORed into one word, and store(i, word) is called once for the i-th word of the warp
//   (with group = 32, one bit per lane, the GPU takes it with __ballot_sync).
// On the GPU (exec_device.cuh) each thread runs every phase for its own id, barriers are
// __syncthreads() and `words` uses warp shuffles or __ballot_sync. The CPU twin (HostExec below)
// runs each phase for ids 0 .. threads-1 one after another and `words` loops over the lanes, so
// a machine without a GPU tests the kernels' own indexing, work split, reductions and bit packing.
// A GPU runs a phase's threads in no set order; the twin runs them in the reverse order (and the
// warps of a per-warp phase too) when the environment says DIVISION_TWIN_ORDER=reverse, so that a
// kernel whose bits depend on the order (a thread reading what another writes in the same phase:
// a missing barrier) differs from the reference in one of the two orders. The tests run both.
// A barrier left out between two phases (ex.each(A); ex.each(B)) is what neither order shows, since
// the twin runs each phase whole: on a GPU each thread runs A and B back to back, so B may read
// what other threads have not yet written in A. The twin refuses it: a block (one HostExec) must
// pass a barrier between any two of its phases, and throws at the second phase otherwise.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace division {

// Whether the twin runs phases in reverse thread order (DIVISION_TWIN_ORDER=reverse, read once).
inline bool twin_reverse_order() {
  static const bool reverse = [] {
    const char* order = std::getenv("DIVISION_TWIN_ORDER");
    return order != nullptr && std::strcmp(order, "reverse") == 0;
  }();
  return reverse;
}

struct HostLanes {
  template <typename Field, typename Store>
  void words(int group, Field&& field, Store&& store) {
    for (int w = 0; w < 32 / group; ++w) {
      uint32_t word = 0;
      for (int l = 0; l < group; ++l) word |= field(w * group + l);
      store(w, word);
    }
  }
};

template <int Threads>
struct HostExec {
  static_assert(Threads % 32 == 0, "a block is whole warps");

  const bool reverse = twin_reverse_order();
  bool phase_open = false;  // a phase ran since the last barrier

  template <typename F>
  void each(F&& f) {
    begin_phase();
    for (int k = 0; k < Threads; ++k) f(reverse ? Threads - 1 - k : k);
  }

  template <typename F>
  void each_warp(F&& f) {
    begin_phase();
    HostLanes lanes;
    constexpr int kWarps = Threads / 32;
    for (int k = 0; k < kWarps; ++k) f(reverse ? kWarps - 1 - k : k, lanes);
  }

  void sync() { phase_open = false; }

 private:
  void begin_phase() {
    if (phase_open) {
      throw std::logic_error(
          "division kernels: two phases of a block without a barrier between them (add ex.sync()): on a "
          "GPU each thread runs them back to back, and the second may read what the first has not written");
    }
    phase_open = true;
  }
};

}  // namespace division
