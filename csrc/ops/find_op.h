// What the families' C++ entry points share: the handle of a registered
// operator, looked up once by each entry point (in a function-local static).
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace torch_ext::ops {

// Throws when no schema of that name is registered (the library is not loaded).
inline c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

}  // namespace torch_ext::ops
