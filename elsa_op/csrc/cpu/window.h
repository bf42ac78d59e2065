// Window arithmetic of the channels-last CPU kernels. Plain C++, so that every
// instruction-set build of the channels-last kernels can use it (see nhwc_kernels.h).
#pragma once

#include <cstdint>

namespace elsa_op {

// Output positions j in [0, out_size) whose input position j * stride + offset lies inside [0, size),
// as [j0, j1).
inline void valid_columns(int64_t offset, int64_t stride, int64_t size, int64_t out_size, int64_t& j0,
                          int64_t& j1) {
  j0 = offset < 0 ? (-offset + stride - 1) / stride : 0;
  const int64_t last = size - 1 - offset;
  j1 = last < 0 ? 0 : last / stride + 1;
  if (j1 > out_size) j1 = out_size;
  if (j1 < j0) j1 = j0;
}

}  // namespace elsa_op
