// Run-time switches read from the environment at each launch (host code only), so a test or a
// benchmark can select one kernel variant against another in the same process.
#pragma once
#include <cstdlib>
#include <cstring>

namespace raekern {

// True when environment variable `name` is set to exactly `value`.
inline bool env_equals(const char* name, const char* value) {
  const char* e = std::getenv(name);
  return e != nullptr && std::strcmp(e, value) == 0;
}

}  // namespace raekern
