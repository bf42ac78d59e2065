// CUDA kernels of the ELSA operator: thin __global__ wrappers around the bodies of kernels.cuh, launched
// by the host code of launch.h (shared with the CPU emulation of the tests).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <string>

#include "../elsa_common.h"
#include "kernels.cuh"
#include "launch.h"

// The archs this library has code for, separated by '/' (sm_80: SASS, compute_90: PTX); setup.py defines it.
#ifndef ELSA_CUDA_ARCHS
#define ELSA_CUDA_ARCHS ""
#endif

namespace elsa_op::gpu {
namespace {

// Before the first launch on a device: elsa_op::check_cuda_arch (registered by elsa_op/_registration.py)
// raises a one-line error if none of ELSA_CUDA_ARCHS runs there, instead of CUDA's "no kernel image is
// available". A program without Python, where it is not registered, goes without the check.
void check_arch_once(const c10::Device& device) {
  static std::array<std::atomic<bool>, C10_COMPILE_TIME_MAX_GPUS> checked{};
  auto& done = checked.at(device.index());
  if (done.load(std::memory_order_acquire)) return;
  if (const auto op = c10::Dispatcher::singleton().findSchema({"elsa_op::check_cuda_arch", ""})) {
    op->typed<void(int64_t)>().call(device.index());
  }
  done.store(true, std::memory_order_release);
}

// Rows (b, row of the grid written) go over gridDim.y, strided; the items of a row over x.
template <typename T, int KT, int V, bool kGradFeatures, bool kMul, bool kAdd>
__global__ void __launch_bounds__(kItemThreads, 2) gather_kernel(const GatherArgs<T> args, int rows) {
  const int item = blockIdx.x * kItemThreads + threadIdx.x;
  for (int row = blockIdx.y; row < rows; row += gridDim.y) {
    if constexpr (kGradFeatures) {
      features_item<T, KT, V, kMul, kAdd>(args, row, item);
    } else {
      forward_item<T, KT, V, kMul, kAdd>(args, row, item);
    }
  }
}

// kernels.cuh's Block for one CUDA thread block: the thread's state lives in registers.
template <class Thread>
struct DeviceBlock {
  Thread state;
  __device__ char* shared() {
    extern __shared__ __align__(16) char smem[];
    return smem;
  }
  template <class F>
  __device__ void threads(F&& f) {
    f(int(threadIdx.x), state);
  }
  __device__ void sync() { __syncthreads(); }
};

template <typename T, int KT, int V>
__global__ void __launch_bounds__(kAttnThreads, 2) attn_ghost_kernel(const AttnGhostArgs<T> args) {
  DeviceBlock<AttnGhostThread<acc_of<T>, V>> block;
  attn_ghost_block<T, KT, V>(args, block, int(blockIdx.x), int(blockIdx.y), int(blockIdx.z));
}

template <typename A>
__global__ void __launch_bounds__(kReduceThreads) ghost_reduce_kernel(const GhostReduceArgs<A> args, int64_t items) {
  DeviceBlock<GhostReduceThread<A>> block;
  ghost_reduce_block(args, block, int64_t(blockIdx.x), items);
}

template <typename T>
__global__ void __launch_bounds__(kItemThreads) chunk_sum_kernel(const ChunkSumArgs<T> args) {
  for (int64_t item = blockIdx.x * int64_t(kItemThreads) + threadIdx.x; item < args.numel;
       item += int64_t(gridDim.x) * kItemThreads)
    attn_chunk_sum_item(args, item);
}

struct CudaRunner {
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  template <typename T, int KT, int V, bool kGradFeatures, bool kMul, bool kAdd>
  void gather(const GatherArgs<T>& args, int rows) {
    const auto n = item_grid(gather_items_per_row(args, kGradFeatures), rows);
    gather_kernel<T, KT, V, kGradFeatures, kMul, kAdd>
        <<<dim3(unsigned(n.x), unsigned(n.y)), kItemThreads, 0, stream>>>(args, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T, int KT, int V>
  void attn_ghost(const AttnGhostArgs<T>& args, int blocks_x) {
    const dim3 grid(blocks_x, args.geometry.G, args.channel_chunks * attn_ghost_t_chunks(args));
    attn_ghost_kernel<T, KT, V><<<grid, kAttnThreads, attn_ghost_shared_bytes(args), stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename A>
  void ghost_reduce(const GhostReduceArgs<A>& args, int64_t items) {
    ghost_reduce_kernel<A>
        <<<unsigned(ghost_reduce_blocks(items)), kReduceThreads, kReduceThreads * sizeof(A), stream>>>(args, items);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  void chunk_sum(const ChunkSumArgs<T>& args) {
    chunk_sum_kernel<T><<<unsigned(stride_grid(args.numel)), kItemThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor forward_cuda(const at::Tensor& features, const at::Tensor& h_attn,
                        const std::optional<at::Tensor>& ghost_mul, const std::optional<at::Tensor>& ghost_add,
                        int64_t kernel_size, int64_t dilation, int64_t stride) {
  const c10::cuda::CUDAGuard guard(features.device());
  check_arch_once(features.device());
  CudaRunner run;
  return forward_impl(run, features, h_attn, ghost_mul, ghost_add, kernel_size, dilation, stride);
}

at::Tensor backward_features_cuda(const at::Tensor& grad_out, const at::Tensor& h_attn,
                                  const std::optional<at::Tensor>& ghost_mul,
                                  const std::optional<at::Tensor>& ghost_add, int64_t height, int64_t width,
                                  int64_t kernel_size, int64_t dilation, int64_t stride) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_arch_once(grad_out.device());
  CudaRunner run;
  return backward_features_impl(run, grad_out, h_attn, ghost_mul, ghost_add, height, width, kernel_size, dilation,
                                stride);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_attn_ghost_cuda(
    const at::Tensor& grad_out, const at::Tensor& features, const std::optional<at::Tensor>& h_attn,
    const std::optional<at::Tensor>& ghost_mul, int64_t groups, int64_t kernel_size, int64_t dilation, int64_t stride,
    bool need_attn, bool need_mul, bool need_add, bool mul_batched, bool add_batched) {
  const c10::cuda::CUDAGuard guard(features.device());
  check_arch_once(features.device());
  CudaRunner run;
  return backward_attn_ghost_impl(run, grad_out, features, h_attn, ghost_mul, groups, kernel_size, dilation, stride,
                                  need_attn, need_mul, need_add, mul_batched, add_batched);
}

}  // namespace
}  // namespace elsa_op::gpu

TORCH_LIBRARY_FRAGMENT(elsa_op, m) {
  m.def("cuda_archs() -> str", [] { return std::string(ELSA_CUDA_ARCHS); });
}

TORCH_LIBRARY_IMPL(elsa_op, CUDA, m) {
  m.impl("elsa_forward", &elsa_op::gpu::forward_cuda);
  m.impl("elsa_backward_features", &elsa_op::gpu::backward_features_cuda);
  m.impl("elsa_backward_attn_ghost", &elsa_op::gpu::backward_attn_ghost_cuda);
}
