// A damaged or mismatched store is refused with an error that names the file
// and the field or tensor.
#include <cstring>
#include <filesystem>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/core/sha256.h"
#include "server/store/layout.h"
#include "server/store/safetensors.h"
#include "server/store/store_reader.h"
#include "tests/server/store/store_test_data.h"
#include "tests/server/store/store_test_util.h"

namespace retrace::store {
namespace {

using nlohmann::json;
using ::testing::AllOf;
using ::testing::HasSubstr;

class CorruptionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::FreshDir();
    absl::StatusOr<Manifest> m = testing::BuildStore(
        dir_, testing::MakeSpec(kernels::DType::kF16, /*replay=*/true, 4), 11,
        7);
    ASSERT_TRUE(m.ok()) << m.status();
    ASSERT_TRUE(StoreReader::Open(dir_).ok());
  }

  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  absl::Status Open(bool verify = true) const {
    StoreReader::Options options;
    options.verify_checksums = verify;
    return StoreReader::Open(dir_, options).status();
  }

  json ReadManifest() const {
    return json::parse(testing::ReadBytes(Path("manifest.json")));
  }
  void WriteManifest(const json& j) const {
    testing::WriteBytes(Path("manifest.json"), j.dump(2));
  }

  // Rewrites a shard and updates its checksum in the manifest, so that only
  // the intended defect remains.
  void ReplaceShard(int index, const std::string& bytes) const {
    const std::string name = ShardFileName(index);
    testing::WriteBytes(Path(name), bytes);
    json m = ReadManifest();
    m["shards"][index]["sha256"] = Sha256Hex(bytes);
    WriteManifest(m);
  }

  std::string dir_;
};

TEST_F(CorruptionTest, MissingManifest) {
  std::filesystem::remove(Path("manifest.json"));
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(Path("manifest.json") + ": missing"));
}

TEST_F(CorruptionTest, TruncatedShard) {
  const std::string path = Path("shard-00001.safetensors");
  const auto size = std::filesystem::file_size(path);
  std::filesystem::resize_file(path, size - 10);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("shard-00001.safetensors: truncated"),
                    HasSubstr("but the file holds")));
}

TEST_F(CorruptionTest, ShardTruncatedInsideItsHeader) {
  std::filesystem::resize_file(Path("shard-00000.safetensors"), 20);
  absl::Status s = Open(/*verify=*/false);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(),
              HasSubstr("shard-00000.safetensors: truncated: header length"));
}

TEST_F(CorruptionTest, FlippedByteIsAChecksumMismatch) {
  const std::string path = Path("shard-00002.safetensors");
  const std::string expected = ReadManifest()["shards"][2]["sha256"];
  testing::FlipByte(path, -3);
  const std::string actual = *Sha256File(path);
  ASSERT_NE(actual, expected);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr(path + ": checksum mismatch"),
                    HasSubstr("shards[2].sha256 expects " + expected),
                    HasSubstr("the file has " + actual)));
  // Skipping verification opens the store (the caller chose speed).
  EXPECT_TRUE(Open(/*verify=*/false).ok());
}

TEST_F(CorruptionTest, MalformedHeader) {
  std::string bytes = testing::ReadBytes(Path("shard-00001.safetensors"));
  bytes[8] = 'X';  // the opening brace of the JSON header
  ReplaceShard(1, bytes);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(
      s.message(),
      HasSubstr("shard-00001.safetensors: malformed safetensors header"));
}

TEST_F(CorruptionTest, MissingTensor) {
  std::string bytes = testing::ReadBytes(Path("shard-00000.safetensors"));
  const size_t at = bytes.find("\"labels\"");
  ASSERT_NE(at, std::string::npos);
  bytes.replace(at, 8, "\"labelz\"");  // same length: the header stays valid
  ReplaceShard(0, bytes);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(),
              HasSubstr("shard-00000.safetensors: tensor 'labels' missing"));
}

TEST_F(CorruptionTest, MisalignedTensor) {
  // One more space of header padding shifts every tensor by one byte.
  std::string bytes = testing::ReadBytes(Path("shard-00000.safetensors"));
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i)
    length |= uint64_t(uint8_t(bytes[size_t(i)])) << (8 * i);
  ++length;
  for (int i = 0; i < 8; ++i)
    bytes[size_t(i)] = char((length >> (8 * i)) & 0xff);
  bytes.insert(size_t(8 + length - 1), " ");
  ReplaceShard(0, bytes);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("shard-00000.safetensors: tensor 'vectors'"),
                    HasSubstr("not a multiple of its element size 2")));
}

TEST_F(CorruptionTest, DtypeDisagreesWithManifest) {
  json m = ReadManifest();
  m["dtype"] = "BF16";
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(
      s.message(),
      HasSubstr("shard-00000.safetensors: tensor 'vectors' has dtype F16, "
                "manifest.json implies BF16"));
}

TEST_F(CorruptionTest, ShapeDisagreesWithManifest) {
  json m = ReadManifest();
  m["projection"]["dim"] = 6;
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(), AllOf(HasSubstr("shard-00000.safetensors: tensor "
                                           "'vectors' has shape [4, 2, 3, 12]"),
                                 HasSubstr("implies [4, 2, 3, 6]"),
                                 HasSubstr("projection.dim")));
}

TEST_F(CorruptionTest, CountDisagreesWithManifest) {
  json m = ReadManifest();
  m["shards"][0]["count"] = 3;
  m["shards"][1]["first"] = 3;
  m["shards"][2]["first"] = 7;
  m["num_samples"] = 10;
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(),
              HasSubstr("shard-00000.safetensors: tensor 'vectors' has shape "
                        "[4, 2, 3, 12], manifest.json implies [3, 2, 3, 12]"));
}

TEST_F(CorruptionTest, ReplaySlotDisagreesWithManifest) {
  json m = ReadManifest();
  m["buckets"]["replay"] = false;
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("unexpected tensor 'train_timesteps'"),
                    HasSubstr("'buckets.replay' is false")));
}

TEST_F(CorruptionTest, MissingShard) {
  std::filesystem::remove(Path("shard-00002.safetensors"));
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(),
              HasSubstr(Path("shard-00002.safetensors") +
                        ": missing (listed in manifest.json shards[2])"));
}

TEST_F(CorruptionTest, UnknownFormatVersion) {
  json m = ReadManifest();
  m["format_version"] = 2;
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(s.message(),
              HasSubstr("manifest.json: field 'format_version' is 2"));
}

TEST_F(CorruptionTest, ManifestFieldMissing) {
  json m = ReadManifest();
  m["projection"].erase("dim");
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(),
              HasSubstr("manifest.json: field 'projection.dim' missing"));
}

TEST_F(CorruptionTest, ManifestNotJson) {
  testing::WriteBytes(Path("manifest.json"), "{\"format\": \"retrace-store\",");
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("manifest.json: malformed JSON"));
}

TEST_F(CorruptionTest, DuplicateSampleIdsNameBothIndices) {
  // Sample 9 (shard 2, row 1) gets the id of sample 2 (shard 0).
  std::string bytes = testing::ReadBytes(Path("shard-00002.safetensors"));
  absl::StatusOr<SafetensorsHeader> h =
      ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(bytes.data()),
                             int64_t(bytes.size()), "shard 2");
  ASSERT_TRUE(h.ok()) << h.status();
  const int64_t duplicate = testing::SampleIdValue(2);
  std::memcpy(&bytes[size_t(h->data_start + h->Find("sample_ids")->begin + 8)],
              &duplicate, 8);
  ReplaceShard(2, bytes);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(
      s.message(),
      HasSubstr("duplicate sample_id 5000000006 at sample indices 2 "
                "(shard-00000.safetensors) and 9 (shard-00002.safetensors)"));
}

}  // namespace
}  // namespace retrace::store
