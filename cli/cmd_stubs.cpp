// Temporary: commands whose implementation has not been merged yet.
#include "cli/commands.h"
#include "runtime/core/error.h"

namespace llama3::cli {
int cmd_run(const Args&) { fail("run: not built yet"); }
}  // namespace llama3::cli
