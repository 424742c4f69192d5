// Helpers that write small data files for the data tests: IDX bytes written by
// hand, MNIST-style JSON, PNGs through stb_image_write. Nothing touches the
// network.
#ifndef RETRACE_TESTS_SERVER_DATA_TEST_FILES_H_
#define RETRACE_TESTS_SERVER_DATA_TEST_FILES_H_

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace retrace::data::testing_files {

// A fresh empty directory under the test temp dir, named after the test.
inline std::string FreshDir(const std::string& leaf) {
  const ::testing::TestInfo* info =
      ::testing::UnitTest::GetInstance()->current_test_info();
  std::string dir = ::testing::TempDir() + "/retrace_data_" +
                    info->test_suite_name() + "_" + info->name() + "_" + leaf;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

inline void WriteBytes(const std::string& path,
                       const std::vector<uint8_t>& bytes, bool gzip = false) {
  if (gzip) {
    gzFile file = gzopen(path.c_str(), "wb");
    ASSERT_NE(file, nullptr) << path;
    ASSERT_EQ(gzwrite(file, bytes.data(), bytes.size()),
              static_cast<int>(bytes.size()));
    gzclose(file);
  } else {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
}

// IDX header for unsigned bytes with the given dimensions, then `data`.
inline std::vector<uint8_t> IdxBytes(const std::vector<uint32_t>& dims,
                                     const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out = {0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims) {
    out.push_back(d >> 24);
    out.push_back((d >> 16) & 0xFF);
    out.push_back((d >> 8) & 0xFF);
    out.push_back(d & 0xFF);
  }
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

}  // namespace retrace::data::testing_files

#endif  // RETRACE_TESTS_SERVER_DATA_TEST_FILES_H_
