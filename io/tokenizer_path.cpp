// resolve_tokenizer_file / resolve_tokenizer_dir: a tokenizer.json file or the folder holding it.
#include "io/tokenizer_path.h"

#include <filesystem>

#include "core/check.h"

namespace q3vl::io {

namespace fs = std::filesystem;

std::string resolve_tokenizer_file(const std::string& path, const std::string& what) {
  Q3VL_CHECK(!path.empty(), what, ": empty path (expected a tokenizer.json file or the folder holding it)");
  std::error_code ec;
  if (fs::is_directory(path, ec)) {
    const fs::path file = fs::path(path) / "tokenizer.json";
    Q3VL_CHECK(fs::is_regular_file(file, ec), what, ": folder '", path, "' holds no tokenizer.json");
    return file.string();
  }
  Q3VL_CHECK(fs::is_regular_file(path, ec), what, ": cannot open '", path,
             "' (expected a tokenizer.json file or the folder holding it)");
  return path;
}

std::string resolve_tokenizer_dir(const std::string& path, const std::string& what) {
  const fs::path parent = fs::path(resolve_tokenizer_file(path, what)).parent_path();
  return parent.empty() ? "." : parent.string();
}

}  // namespace q3vl::io
