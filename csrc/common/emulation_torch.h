// Torch side of the host emulation, for the test-only launchers in csrc/<family>/<op>_emu.cpp:
// tensors become guarded "device" buffers, the same CUDA element types the real launchers use.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <string>
#include <utility>
#include <vector>

#include "common/host_emulation.h"

namespace raekern::emu {

template <class T> struct EmuType { using type = T; };
template <> struct EmuType<c10::Half> { using type = __half; };
template <> struct EmuType<c10::BFloat16> { using type = __nv_bfloat16; };
// The element type a kernel sees, as cuda_t<T> in common/cuda_launch.h.
template <class T> using emu_t = typename EmuType<T>::type;

// Stands in for GPU memory during one emulated op. Each tensor is copied into its own guarded buffer
// covering exactly the storage span its view addresses (so strides, stride-0 dimensions and storage
// offsets - hence alignment - are preserved); finish() checks every canary and copies outputs back.
class DeviceMemory {
 public:
  // Read-only input.
  template <class T> const emu_t<T>* in(const at::Tensor& t, const char* name) {
    return static_cast<const emu_t<T>*>(place<T>(t, name, Kind::kIn));
  }
  // Output the kernel must write completely: starts as NaN, so an element it misses reads NaN.
  template <class T> emu_t<T>* out(const at::Tensor& t, const char* name) {
    return static_cast<emu_t<T>*>(place<T>(t, name, Kind::kOut));
  }
  // Input and output (accumulators, atomics).
  template <class T> emu_t<T>* inout(const at::Tensor& t, const char* name) {
    return static_cast<emu_t<T>*>(place<T>(t, name, Kind::kInOut));
  }
  // A tensor that may be undefined (optional arguments): nullptr then.
  template <class T> const emu_t<T>* in_opt(const c10::optional<at::Tensor>& t, const char* name) {
    return t.has_value() && t->defined() ? in<T>(*t, name) : nullptr;
  }

  // Raw host memory of `bytes` bytes (for launchers that take parameter structs of pointers).
  const void* in_bytes(const void* host, size_t bytes, const char* name) {
    return place_bytes(const_cast<void*>(host), bytes, name, Kind::kIn);
  }
  void* out_bytes(void* host, size_t bytes, const char* name) { return place_bytes(host, bytes, name, Kind::kOut); }
  void* inout_bytes(void* host, size_t bytes, const char* name) {
    return place_bytes(host, bytes, name, Kind::kInOut);
  }

  // Checks every canary (EmulationError naming the buffer), then copies outputs back to the host.
  void finish() {
    arena_.check();
    for (const Back& b : back_)
      if (b.bytes) std::memcpy(b.host, b.buf, b.bytes);
    back_.clear();
  }

 private:
  enum class Kind { kIn, kOut, kInOut };
  struct Back {
    at::Tensor keep_alive;
    void* host;
    void* buf;
    size_t bytes;
  };

  void* place_bytes(void* host, size_t bytes, const char* name, Kind kind, at::Tensor keep = {}) {
    if (host == nullptr) return nullptr;
    void* buf = arena_.alloc(bytes, reinterpret_cast<uintptr_t>(host), name, kind == Kind::kOut);
    if (kind != Kind::kOut && bytes) std::memcpy(buf, host, bytes);
    if (kind != Kind::kIn) back_.push_back({std::move(keep), host, buf, bytes});
    return buf;
  }

  template <class T> void* place(const at::Tensor& t, const char* name, Kind kind) {
    TORCH_CHECK(t.device().is_cpu(), "host emulation: '", name, "' must be a CPU tensor");
    TORCH_CHECK(t.scalar_type() == c10::CppTypeToScalarType<T>::value, "host emulation: '", name,
                "' has dtype ", t.scalar_type(), ", the launcher expected ", c10::CppTypeToScalarType<T>::value);
    TORCH_CHECK(kind != Kind::kOut || t.is_non_overlapping_and_dense(), "host emulation: output '", name,
                "' must be dense (use inout() for a strided output)");
    int64_t span = t.numel() > 0 ? 1 : 0;
    for (int64_t d = 0; d < t.dim() && span; ++d) span += (t.size(d) - 1) * t.stride(d);
    void* buf = place_bytes(t.data_ptr(), size_t(span) * sizeof(T), name, kind, t);
    // An empty tensor still gets a (zero-byte, guarded) buffer, so the kernel sees a valid pointer.
    return buf ? buf : arena_.alloc(0, 0, name, true);
  }

  Arena arena_;
  std::vector<Back> back_;
};

// The emulation's side of host plans written once for CUDA and the emulation (attention's *_host.h;
// common/cuda_launch.h has the CUDA side): guarded buffers, emulated launches.
struct Mem {
  DeviceMemory mem;
  template <class T> using dev_t = emu_t<T>;
  template <class T> const dev_t<T>* in(const at::Tensor& t, const char* name) { return mem.in<T>(t, name); }
  template <class T> dev_t<T>* out(const at::Tensor& t, const char* name) { return mem.out<T>(t, name); }
  template <class T> dev_t<T>* inout(const at::Tensor& t, const char* name) { return mem.inout<T>(t, name); }
  void sync() { mem.finish(); }
};

struct Launch {
  template <class... P, class... A>
  void operator()(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    emulate_launch(kernel, grid, block, smem, std::forward<A>(args)...);
  }
};

inline Schedule parse_schedule(const std::string& s) {
  if (s == "forward") return Schedule::kForward;
  if (s == "reverse") return Schedule::kReverse;
  TORCH_CHECK_VALUE(s == "random", "host emulation: argument 'policy' must be 'forward', 'reverse' or 'random', got '",
                    s, "'");
  return Schedule::kRandom;
}

}  // namespace raekern::emu

// The dtypes the CUDA kernels take (fp32, bf16, fp16), as RAEKERN_DISPATCH_FLOATING does on the host.
#define RAEKERN_EMU_DISPATCH(TYPE, NAME, ...)                         \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
