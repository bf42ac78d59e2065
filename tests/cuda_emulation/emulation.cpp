// The CUDA operator's kernels run on CPU: the host code of elsa_op/csrc/cuda/launch.h and the kernel bodies
// of kernels.cuh, compiled by the host compiler, with a Runner that walks each launch's full grid in order
// instead of launching it. Built and used by tests/test_cuda_emulation.py.
//
// Emulation rules, so that what passes here holds on the GPU:
//   - every grid is the one the CUDA runner launches (launch.h's item_grid, stride_grid, ghost_reduce_blocks, the
//   attention
//     plan), block by block and thread by thread, grid-stride loops included;
//   - a block's shared memory starts as NaN, so a read of a slot no thread wrote poisons the result;
//   - two `threads` steps of a block with no `sync` between them are an error (a missing barrier);
//   - every output buffer starts as NaN, so an element no thread writes fails the comparison;
//   - every access to global or shared memory is checked as access.h describes (compiled with
//     ELSA_CHECK_ACCESS): aligned to its size, inside the storage of the tensor it was reached from (each
//     tensor the launcher hands a kernel is registered with its storage and view), an element of that
//     tensor's view, and inside its shared-memory array. A failed check raises, naming the kernel and the
//     address.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels.cuh"
#include "launch.h"

namespace elsa_op::gpu {
namespace {

template <typename T>
void poison(T* p, int64_t n) {
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
}

template <class Thread>
struct HostBlock {
  std::vector<Thread> states;
  std::vector<double> smem;  // (double: aligned for every accumulation type)
  bool synced = true;
  HostBlock(int threads, int64_t shared_bytes) : states(threads), smem((shared_bytes + 7) / 8) {
    poison(smem.data(), int64_t(smem.size()));
  }
  char* shared() { return reinterpret_cast<char*>(smem.data()); }
  template <class F>
  void threads(F&& f) {
    TORCH_CHECK(synced, "emulation: two steps of a block without a barrier between them");
    synced = false;
    for (int t = 0; t < int(states.size()); ++t) f(t, states[t]);
  }
  void sync() { synced = true; }
};

struct EmulationRunner {
  // >= 0: run only the rows and blocks of this image, so that a batch whose indices pass 2^31 needs memory
  // (and time) for one image only.
  int64_t only_batch = -1;
  // The instantiations that ran, "kernel<KT,V>", for the tests to see which paths they covered.
  std::vector<std::string> ran;

  template <typename T, int KT, int V, bool kGradFeatures, bool kMul, bool kAdd>
  void gather(const GatherArgs<T>& A, int rows) {
    const auto& g = A.geometry;
    ran.push_back(std::string(kGradFeatures ? "features" : "forward") + "<" + std::to_string(KT) + "," +
                  std::to_string(V) + ">");
    access::kernel = ran.back();
    const int64_t rows_per_image = kGradFeatures ? g.H : g.Ho, cols = kGradFeatures ? g.W : g.Wo;
    const int64_t image = rows_per_image * cols * g.C;
    poison(raw(A.destination) + (only_batch >= 0 ? only_batch * image : 0), only_batch >= 0 ? image : g.B * image);
    auto item = [&](int row, int it) {
      if constexpr (kGradFeatures) {
        features_item<T, KT, V, kMul, kAdd>(A, row, it);
      } else {
        forward_item<T, KT, V, kMul, kAdd>(A, row, it);
      }
    };
    const auto grid = item_grid(gather_items_per_row(A, kGradFeatures), rows);
    if (only_batch >= 0) {  // the same (row, item) pairs as the grid gives these rows
      for (int64_t row = only_batch * rows_per_image; row < (only_batch + 1) * rows_per_image; ++row)
        for (int64_t bx = 0; bx < grid.x; ++bx)
          for (int tid = 0; tid < kItemThreads; ++tid) item(int(row), int(bx * kItemThreads + tid));
      return;
    }
    for (int64_t by = 0; by < grid.y; ++by)
      for (int64_t bx = 0; bx < grid.x; ++bx)
        for (int tid = 0; tid < kItemThreads; ++tid)
          for (int64_t row = by; row < rows; row += grid.y) item(int(row), int(bx * kItemThreads + tid));
  }

  template <typename T, int KT, int V>
  void attn_ghost(const AttnGhostArgs<T>& A, int blocks_x) {
    ran.push_back("attn_ghost<" + std::to_string(KT) + "," + std::to_string(V) + ">");
    access::kernel = ran.back();
    const auto& g = A.geometry;
    const int64_t kk = int64_t(g.K) * g.K, attn = int64_t(g.Ho) * g.Wo * g.G * kk, table = kk * g.C;
    const int64_t b0 = only_batch >= 0 ? only_batch : 0, nb = only_batch >= 0 ? 1 : g.B;
    if (A.grad_attention) poison(raw(A.grad_attention) + b0 * attn, nb * attn);
    if (A.grad_attention_partials)
      for (int c = 0; c < A.channel_chunks; ++c)
        poison(raw(A.grad_attention_partials) + c * g.B * attn + b0 * attn, nb * attn);
    for (auto* part : {raw(A.ghost_mul_partials), raw(A.ghost_add_partials)})
      if (part) poison(part + b0 * A.tiles_per_image * table, nb * A.tiles_per_image * table);
    const int z = A.channel_chunks * attn_ghost_t_chunks(A);
    for (int bx = 0; bx < blocks_x; ++bx) {
      if (only_batch >= 0 && bx / A.tiles_per_image != only_batch) continue;
      for (int by = 0; by < g.G; ++by)
        for (int bz = 0; bz < z; ++bz) {
          HostBlock<AttnGhostThread<acc_of<T>, V>> block(kAttnThreads, attn_ghost_shared_bytes(A));
          const size_t regions = access::regions.size();
          attn_ghost_block<T, KT, V>(A, block, bx, by, bz);
          access::regions.resize(regions);  // the block's shared arrays end with it
        }
    }
  }

  template <typename A>
  void ghost_reduce(const GhostReduceArgs<A>& R, int64_t items) {
    ran.push_back("ghost_reduce");
    access::kernel = ran.back();
    const int64_t table = R.taps * R.channels;
    const int64_t lo = only_batch >= 0 ? only_batch * table : 0, hi = only_batch >= 0 ? lo + table : items;
    poison(raw(R.output) + lo, hi - lo);
    // the blocks that hold the items [lo, hi) (with only_batch, a block may reach into a neighbouring unit)
    for (int64_t bx = lo / kReduceItems; bx < std::min(ghost_reduce_blocks(hi), ghost_reduce_blocks(items)); ++bx) {
      HostBlock<GhostReduceThread<A>> block(kReduceThreads, kReduceThreads * int64_t(sizeof(A)));
      const size_t regions = access::regions.size();
      ghost_reduce_block(R, block, bx, items);
      access::regions.resize(regions);
    }
  }

  template <typename T>
  void chunk_sum(const ChunkSumArgs<T>& S) {
    ran.push_back("chunk_sum");
    access::kernel = ran.back();
    TORCH_CHECK(only_batch < 0, "emulation: chunk_sum runs on whole batches only");
    poison(raw(S.output), S.numel);
    const int64_t blocks = stride_grid(S.numel), step = blocks * kItemThreads;
    for (int64_t bx = 0; bx < blocks; ++bx)
      for (int tid = 0; tid < kItemThreads; ++tid)
        for (int64_t item = bx * kItemThreads + tid; item < S.numel; item += step) attn_chunk_sum_item(S, item);
  }
};

py::tuple forward(const at::Tensor& features, const at::Tensor& h_attn, const std::optional<at::Tensor>& ghost_mul,
                  const std::optional<at::Tensor>& ghost_add, int64_t K, int64_t dilation, int64_t stride,
                  int64_t only_batch) {
  access::regions.clear();
  EmulationRunner run{only_batch};
  auto out = forward_impl(run, features, h_attn, ghost_mul, ghost_add, K, dilation, stride);
  return py::make_tuple(out, run.ran);
}

py::tuple backward_features(const at::Tensor& grad_out, const at::Tensor& h_attn,
                            const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                            int64_t height, int64_t width, int64_t K, int64_t dilation, int64_t stride,
                            int64_t only_batch) {
  access::regions.clear();
  EmulationRunner run{only_batch};
  auto gx = backward_features_impl(run, grad_out, h_attn, ghost_mul, ghost_add, height, width, K, dilation, stride);
  return py::make_tuple(gx, run.ran);
}

py::tuple backward_attn_ghost(const at::Tensor& grad_out, const at::Tensor& features,
                              const std::optional<at::Tensor>& h_attn, const std::optional<at::Tensor>& ghost_mul,
                              int64_t groups, int64_t K, int64_t dilation, int64_t stride, bool need_attn,
                              bool need_mul, bool need_add, bool mul_batched, bool add_batched, int64_t only_batch) {
  access::regions.clear();
  EmulationRunner run{only_batch};
  auto [gh, gm, ga] = backward_attn_ghost_impl(run, grad_out, features, h_attn, ghost_mul, groups, K, dilation, stride,
                                               need_attn, need_mul, need_add, mul_batched, add_batched);
  return py::make_tuple(gh, gm, ga, run.ran);
}

// The checks themselves, for their own tests: a load of `count` float32 elements at element `offset` from
// the first element of `t`, as one `align`-byte access, made by a kernel called "probe".
void probe_access(const at::Tensor& t, int64_t offset, int64_t count, int64_t align) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "probe_access takes float32 tensors");
  access::regions.clear();
  access::kernel = "probe";
  check_access(global_ptr<const float>(t, "the probed tensor") + offset, int(count), int(align), "load");
}

}  // namespace
}  // namespace elsa_op::gpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace elsa_op::gpu;
  m.def("forward", &forward);
  m.def("backward_features", &backward_features);
  m.def("backward_attn_ghost", &backward_attn_ghost);
  m.def("probe_access", &probe_access);
}
