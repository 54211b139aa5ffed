// File helpers for tests: a per-test temporary directory removed afterwards, whole-file byte reads/writes, and
// running a command (the q3vl binary) for its exit code and output.
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

struct CommandRun {
  int exit_code = -1;  // -1 when the command did not exit normally
  std::string output;  // stdout and stderr
};
// Runs `command` through the shell with stderr merged into stdout.
CommandRun run_command(const std::string& command);

}  // namespace q3vl::test
