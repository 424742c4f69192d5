// File helpers shared by the store tests.
#ifndef RETRACE_TESTS_SERVER_STORE_STORE_TEST_UTIL_H_
#define RETRACE_TESTS_SERVER_STORE_STORE_TEST_UTIL_H_

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "gtest/gtest.h"

namespace retrace::store::testing {

// A fresh empty directory under the test temp dir, named after the running
// test.
inline std::string FreshDir(const std::string& suffix = "") {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name =
      std::string(info->test_suite_name()) + "." + info->name() + suffix;
  for (char& ch : name) {
    if (ch == '/') ch = '_';
  }
  std::filesystem::path dir =
      std::filesystem::path(::testing::TempDir()) / "retrace_store" / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir.string();
}

inline std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

inline void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

// File name -> contents, for byte-for-byte comparison of two store dirs.
inline std::map<std::string, std::string> DirContents(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    out[entry.path().filename().string()] = ReadBytes(entry.path().string());
  }
  return out;
}

inline void FlipByte(const std::string& path, int64_t offset) {
  std::string bytes = ReadBytes(path);
  if (offset < 0) offset += int64_t(bytes.size());
  bytes[size_t(offset)] = char(bytes[size_t(offset)] ^ 0x20);
  WriteBytes(path, bytes);
}

}  // namespace retrace::store::testing

#endif  // RETRACE_TESTS_SERVER_STORE_STORE_TEST_UTIL_H_
