// How the kernels of kernels.cuh touch memory: every global or shared access goes through the helpers
// here (load, store, ref, load_vec, load_acc, store_vec), on pointers of type Global<T> or Shared<T>.
//
// For nvcc (and any build without ELSA_CHECK_ACCESS) Global<T> and Shared<T> are plain T* and the helpers
// are a dereference: they compile to exactly the code a raw access would.
//
// The CPU emulation of the kernels (tests/cuda_emulation) defines ELSA_CHECK_ACCESS. Then Global<T> and
// Shared<T> are `Checked<T>`: a pointer that carries the region it points into (a tensor the launcher
// registered, or one array of a block's shared memory), and every access is checked for what the GPU
// would fault on or silently get wrong, where host memory would not:
//   - alignment: an access of n bytes must be n-byte aligned (a 16-byte vector load from an address that
//     is only 4-byte aligned aborts a CUDA kernel with "misaligned address"; x86 does not care);
//   - bounds: every byte inside the storage of the tensor the pointer was made from (or the shared array),
//     so that a read past a slice into other valid host memory fails instead of reading garbage;
//   - membership: for a tensor that is a strided view (a channel slice of a wider tensor), every element
//     accessed must be an element of the view, not a neighbour inside the same storage.
// Checked<T> has no operator[] or operator*, so an access that bypasses the helpers does not compile in
// the emulation. A failed check throws, naming the kernel (access::kernel, set by the emulation's runner),
// the region, the kind of access and its address.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef ELSA_CHECK_ACCESS
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <deque>
#include <sstream>
#include <string>
#include <utility>
#include <vector>
#endif

#ifndef ELSA_HD
#ifdef __CUDACC__
#define ELSA_HD __host__ __device__ __forceinline__
#else
#define ELSA_HD inline
#endif
#endif

namespace elsa_op::gpu {

#ifndef ELSA_CHECK_ACCESS

template <typename T>
using Global = T*;
template <typename T>
using Shared = T*;

template <typename T>
ELSA_HD T* raw(T* p) {
  return p;
}
// Reports nothing on the GPU: the hardware checks (and compute-sanitizer reports) there.
template <typename T>
ELSA_HD void check_access(T*, int, int, const char*) {}

// An array of `count` T at byte `offset` of a block's shared memory `base` (of `bytes` bytes).
template <typename T>
ELSA_HD T* shared_region(char* base, int64_t, int64_t offset, int64_t, const char*) {
  return reinterpret_cast<T*>(base + offset);
}

#else

namespace access {

// Memory the kernels may touch through one pointer: a registered tensor, or one array of shared memory.
struct Region {
  std::string name;
  const char *lo = nullptr, *hi = nullptr;  // the storage's bytes [lo, hi)
  // The view, for membership: its first element, the element size, and its dimensions of more than one
  // element as (stride, size), largest stride first. `nested`: each stride exceeds the span of all
  // smaller ones, so that an offset decomposes in one way (greedily). `dense`: the view fills its span.
  const char* data = nullptr;
  int64_t item = 1;
  std::vector<std::pair<int64_t, int64_t> > dims;
  bool nested = false, dense = true;
  int64_t span_lo = 0, span_hi = 0;  // the view's element offsets [span_lo, span_hi] from `data`
};

// The regions of the current operator call (cleared by the emulation before each call; a deque keeps
// references stable as it grows) and the kernel that runs.
inline thread_local std::deque<Region> regions;
inline thread_local std::string kernel = "(no kernel)";

// A tensor's region, given its storage and its view (sizes and strides in elements).
inline const Region* watch(std::string name, const void* storage, int64_t storage_bytes, const void* data, int64_t item,
                           const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  Region r;
  r.name = std::move(name);
  r.lo = static_cast<const char*>(storage);
  r.hi = r.lo + storage_bytes;
  r.data = static_cast<const char*>(data);
  r.item = item;
  int64_t numel = 1;
  for (size_t d = 0; d < sizes.size(); ++d) {
    numel *= sizes[d];
    if (sizes[d] > 1 && strides[d] != 0) r.dims.emplace_back(strides[d], sizes[d]);
    if (sizes[d] > 1 && strides[d] < 0) r.span_lo += (sizes[d] - 1) * strides[d];
    if (sizes[d] > 1 && strides[d] > 0) r.span_hi += (sizes[d] - 1) * strides[d];
  }
  std::sort(r.dims.begin(), r.dims.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  int64_t inner_span = 0;  // span of the dimensions already seen, smallest stride first
  r.nested = numel > 0;
  for (auto it = r.dims.rbegin(); it != r.dims.rend(); ++it) {
    if (it->first <= 0 || it->first <= inner_span) r.nested = false;
    inner_span += (it->second - 1) * it->first;
  }
  r.dense = r.nested && r.span_lo == 0 && r.span_hi + 1 == numel;
  regions.push_back(std::move(r));
  return &regions.back();
}

[[noreturn]] inline void fail(const Region* r, const char* what, const void* p, int64_t bytes, const std::string& why) {
  std::ostringstream s;
  s << "emulation: kernel " << kernel << ": " << what << " of " << bytes << " bytes at " << p;
  if (r)
    s << " through " << r->name << " (storage " << static_cast<const void*>(r->lo) << ".."
      << static_cast<const void*>(r->hi) << ")";
  s << ": " << why;
  TORCH_CHECK(false, s.str());
}

// Whether the element at `offset` (in elements from the view's first element) belongs to the view.
inline bool member(const Region& r, int64_t offset) {
  if (r.dense) return offset >= r.span_lo && offset <= r.span_hi;
  if (offset < 0) return false;
  for (const auto& [stride, size] : r.dims) {
    const int64_t i = offset / stride;
    if (i >= size) return false;
    offset -= i * stride;
  }
  return offset == 0;
}

}  // namespace access

// A pointer into one region. Pointer arithmetic is free (a pointer may step past its region, as the
// kernels' row pointers do after their last row); only accesses are checked.
template <typename T>
class Checked {
 public:
  Checked() = default;
  Checked(std::nullptr_t) {}
  Checked(T* p, const access::Region* r) : p_(p), r_(r) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*> > >
  Checked(const Checked<U>& o) : p_(o.get()), r_(o.region()) {}

  Checked operator+(int64_t n) const { return Checked(p_ + n, r_); }
  Checked operator-(int64_t n) const { return Checked(p_ - n, r_); }
  Checked& operator+=(int64_t n) {
    p_ += n;
    return *this;
  }
  Checked& operator-=(int64_t n) {
    p_ -= n;
    return *this;
  }
  explicit operator bool() const { return p_ != nullptr; }
  bool operator==(std::nullptr_t) const { return p_ == nullptr; }
  bool operator!=(std::nullptr_t) const { return p_ != nullptr; }

  T* get() const { return p_; }
  const access::Region* region() const { return r_; }

  // An access of `count` elements from here, as one `align`-byte aligned transaction.
  void check(int count, int align, const char* what) const {
    const auto* b = reinterpret_cast<const char*>(p_);
    const int64_t bytes = int64_t(count) * int64_t(sizeof(T));
    if (!p_ || !r_) access::fail(r_, what, p_, bytes, "through a null or unregistered pointer");
    if (reinterpret_cast<uintptr_t>(b) % uintptr_t(align) != 0)
      access::fail(r_, what, p_, bytes, "misaligned (needs " + std::to_string(align) + "-byte alignment)");
    if (b < r_->lo || b + bytes > r_->hi) access::fail(r_, what, p_, bytes, "outside the storage");
    if (r_->data && r_->nested) {
      const int64_t first = b - r_->data;
      if (first % r_->item != 0) access::fail(r_, what, p_, bytes, "between two elements of the tensor");
      for (int64_t k = 0; k < bytes / r_->item; ++k)
        if (!access::member(*r_, first / r_->item + k))
          access::fail(r_, what, p_, bytes,
                       "element " + std::to_string(first / r_->item + k) +
                           " (from the view's first) is inside the storage but not part of the tensor");
    }
  }

 private:
  T* p_ = nullptr;
  const access::Region* r_ = nullptr;
};

template <typename T>
using Global = Checked<T>;
template <typename T>
using Shared = Checked<T>;

template <typename T>
T* raw(const Checked<T>& p) {
  return p.get();
}
template <typename T>
void check_access(const Checked<T>& p, int count, int align, const char* what) {
  p.check(count, align, what);
}

// An array of `count` T at byte `offset` of a block's shared memory `base` (of `bytes` bytes).
template <typename T>
Checked<T> shared_region(char* base, int64_t bytes, int64_t offset, int64_t count, const char* name) {
  access::Region r;
  r.name = std::string("shared memory ") + name;
  r.lo = base + offset;
  r.hi = base + offset + count * int64_t(sizeof(T));
  if (r.hi > base + bytes) TORCH_CHECK(false, "emulation: ", name, " does not fit the block's shared memory");
  access::regions.push_back(std::move(r));
  return Checked<T>(reinterpret_cast<T*>(base + offset), &access::regions.back());
}

#endif

// One element: read, written, or referred to (shared-memory structs).
// (A scalar's alignment is its size; a struct's is its largest member's, as the compiler splits it.)
template <typename P>
ELSA_HD auto load(const P& p) {
  check_access(p, 1, int(alignof(std::remove_reference_t<decltype(*raw(p))>)), "load");
  return *raw(p);
}
template <typename P, typename U>
ELSA_HD void store(const P& p, const U& v) {
  check_access(p, 1, int(alignof(std::remove_reference_t<decltype(*raw(p))>)), "store");
  *raw(p) = v;
}
template <typename P>
ELSA_HD auto& ref(const P& p) {
  check_access(p, 1, int(alignof(std::remove_reference_t<decltype(*raw(p))>)), "access");
  return *raw(p);
}

}  // namespace elsa_op::gpu
