// dtype dispatch of the fusion family's CUDA launchers: fp32/bf16/fp16 (fp64 is CPU-only).
#pragma once
#include <ATen/Dispatch.h>

#define RAEKERN_FUSION_DISPATCH_CUDA(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
