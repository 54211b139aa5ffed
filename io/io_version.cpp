// Format versions of the files q3vl writes; readers refuse other versions.
#include "io/io_version.h"
