// File helpers for tests: a per-test temporary directory removed afterwards, and whole-file byte reads/writes.
#pragma once

#include <filesystem>
#include <string>

namespace q3vl::test {

// A fresh directory under the system temp dir named after the process and the running gtest case.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

std::string read_all(const std::string& path);
void write_all(const std::string& path, const std::string& bytes);

}  // namespace q3vl::test
