// Format versions of the files q3vl writes (native checkpoints, HDF5 shards); readers refuse other versions.
#pragma once

namespace q3vl::io {

constexpr int kShardFormatVersion = 1;

}  // namespace q3vl::io
