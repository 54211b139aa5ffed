// Argument checks shared by all layers.
#include "core/layer_checks.h"

#include <sstream>

namespace q3vl {

namespace {
std::string pattern(std::initializer_list<int64_t> e) {
  std::ostringstream os;
  os << "[";
  int i = 0;
  for (int64_t v : e) {
    os << (i++ ? "," : "");
    if (v < 0) os << "*"; else os << v;
  }
  os << "]";
  return os.str();
}
}  // namespace

void require_shape(const char* layer, const char* name, const Tensor& t, std::initializer_list<int64_t> expected) {
  bool ok = t.ndim() == static_cast<int>(expected.size());
  int i = 0;
  for (int64_t v : expected) {
    if (!ok) break;
    if (v >= 0 && t.size(i) != v) ok = false;
    ++i;
  }
  Q3VL_CHECK(ok, layer, ": ", name, " has shape ", t.shape().str(), ", expected ", pattern(expected));
}

void require_dtype(const char* layer, const char* name, const Tensor& t, DType dtype) {
  Q3VL_CHECK(t.dtype() == dtype, layer, ": ", name, " has dtype ", dtype_name(t.dtype()), ", expected ",
             dtype_name(dtype));
}

void require(const char* layer, const char* name, const Tensor& t, DType dtype, std::initializer_list<int64_t> expected) {
  Q3VL_CHECK(t.defined(), layer, ": ", name, " is missing");
  require_dtype(layer, name, t, dtype);
  require_shape(layer, name, t, expected);
  Q3VL_CHECK(t.device() == Device::cpu, layer, ": ", name, " ", t.str(), " is not in host memory");
  Q3VL_CHECK(t.is_contiguous(), layer, ": ", name, " ", t.str(), " is not contiguous");
}

void require_on(Device device, const char* layer, const char* name, const Tensor& t, DType dtype,
                std::initializer_list<int64_t> expected) {
  if (device == Device::cpu) return require(layer, name, t, dtype, expected);
  Q3VL_CHECK(t.defined(), layer, ": ", name, " is missing");
  require_dtype(layer, name, t, dtype);
  require_shape(layer, name, t, expected);
  Q3VL_CHECK(t.device() == device, layer, ": ", name, " ", t.str(), " is in host memory, but x is on the CUDA device");
  Q3VL_CHECK(t.is_contiguous(), layer, ": ", name, " ", t.str(), " is not contiguous");
}

}  // namespace q3vl
