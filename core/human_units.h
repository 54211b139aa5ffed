// Human-readable amounts for progress lines and reports: durations ("1h05m", "3m07s", "42s") and byte counts
// ("512 B", "1.50 MiB", "3.20 GiB", binary units).
#pragma once

#include <cstdint>
#include <string>

namespace q3vl {

std::string human_duration(double seconds);
std::string human_bytes(double bytes);

}  // namespace q3vl
