// The product's environment switches (ZI_*: A/B runs, experiments, off-switches of defaults).
#pragma once
#include <cstdlib>
#include <cstring>

namespace zi {

// "1" on, "0" off; unset or anything else: `dflt`.
inline bool env_flag(const char* name, bool dflt) {
  const char* e = std::getenv(name);
  if (e && !std::strcmp(e, "1")) return true;
  if (e && !std::strcmp(e, "0")) return false;
  return dflt;
}

}  // namespace zi
