// Runtime value -> compile-time constant: the launchers pick a kernel instance (vectors per lane, stream
// count, ...) from a number known only at launch. Plain C++, usable from kernel headers and the host
// emulation alike.
#pragma once
#include <type_traits>

namespace raekern {

// f(std::integral_constant<int, N>{}) for the N of Ns equal to n; nothing when none is.
template <int... Ns, class F>
inline void with_constant(int n, F&& f) {
  (void)((n == Ns ? (f(std::integral_constant<int, Ns>{}), true) : false) || ...);
}

}  // namespace raekern
