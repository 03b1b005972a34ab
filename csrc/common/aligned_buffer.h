// Cache-line aligned scratch for the CPU kernels. std::vector only guarantees 16 bytes, and an AMX
// tile row or a zmm load that straddles two lines costs two accesses.
#pragma once
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

namespace raekern::cpu {

template <class T> class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  // n elements, zero-filled.
  explicit AlignedBuffer(size_t n) : n_(n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes ? bytes : 64)));
    if (!p_) throw std::bad_alloc();
    std::memset(static_cast<void*>(p_.get()), 0, bytes);
  }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  T& operator[](size_t i) { return p_.get()[i]; }
  const T& operator[](size_t i) const { return p_.get()[i]; }
  size_t size() const { return n_; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
  size_t n_ = 0;
};

}  // namespace raekern::cpu
