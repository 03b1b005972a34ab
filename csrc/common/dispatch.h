// dtype dispatch used by every launcher: fp64 (CPU reference/gradcheck), fp32, bf16, fp16.
#pragma once
#include <ATen/Dispatch.h>

#define RAEKERN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
