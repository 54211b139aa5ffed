// q3vl selfcheck: placeholder filled in once all layers exist.
#include "app/commands.h"

namespace q3vl::app {
int run_selfcheck(const std::vector<std::string>&) { return 0; }
}  // namespace q3vl::app
