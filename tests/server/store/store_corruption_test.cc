// A damaged or mismatched store is refused with an error that names the file
// and the field or tensor.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "common/sha256.h"
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

TEST_F(CorruptionTest, SpecDisagreesWithTheShardsSpecSha256) {
  // No tensor shape depends on the projection seed; the shards' record of
  // the spec does.
  json m = ReadManifest();
  m["projection"]["seed"] = m["projection"]["seed"].get<uint64_t>() + 1;
  WriteManifest(m);
  absl::Status s = Open();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(),
              AllOf(HasSubstr("shard-00000.safetensors: metadata spec_sha256"),
                    HasSubstr("but the spec in manifest.json hashes to")));
}

// A bit flip at every byte of a shard file is refused: the header's checks
// or the manifest's sha256 of the whole file catch it, and the error names
// the file. Two of the eight bits per byte (bit i % 8 and (i + 3) % 8 at
// byte i, so every bit occurs at every byte offset mod 8) keep the test at a
// few seconds; the checksum covers every bit alike.
TEST_F(CorruptionTest, EveryBitFlipOfAShardIsRefused) {
  for (int shard : {0, 2}) {  // a full shard and the partial last one
    const std::string path = Path(ShardFileName(shard));
    const std::string original = testing::ReadBytes(path);
    for (size_t pos = 0; pos < original.size(); ++pos) {
      for (int bit : {int(pos % 8), int((pos + 3) % 8)}) {
        SCOPED_TRACE(absl::StrCat(path, " byte ", pos, " bit ", bit));
        std::string flipped = original;
        flipped[pos] = char(uint8_t(flipped[pos]) ^ (1u << bit));
        testing::WriteBytes(path, flipped);
        absl::Status s = Open();
        ASSERT_FALSE(s.ok());
        EXPECT_THAT(s.message(), HasSubstr(path + ": "));
        if (HasFailure()) return;
      }
    }
    testing::WriteBytes(path, original);
  }
  EXPECT_TRUE(Open().ok());
}

// A bit flip at every byte of manifest.json (two bits per byte, chosen as
// above) is either refused with an error
// naming manifest.json (malformed JSON, a missing or invalid field, a shard
// that disagrees with it, or the spec disagreeing with the spec_sha256 the
// shards record), or it lands where the reader reads nothing it serves:
// "store_id" (opaque to readers), "diagnostics" (informational, see
// docs/store-format.md) or a key name the format does not define. Such a
// flip must leave the spec, the shard list and the sample count unchanged.
TEST_F(CorruptionTest, EveryBitFlipOfTheManifestIsRefusedOrHarmless) {
  const std::string path = Path("manifest.json");
  const std::string original = testing::ReadBytes(path);
  absl::StatusOr<Manifest> expected = Manifest::Parse(original);
  ASSERT_TRUE(expected.ok()) << expected.status();
  int64_t refused = 0, harmless = 0;
  for (size_t pos = 0; pos < original.size(); ++pos) {
    for (int bit : {int(pos % 8), int((pos + 3) % 8)}) {
      SCOPED_TRACE(absl::StrCat("byte ", pos, " ('", original.substr(pos, 1),
                                "') bit ", bit));
      std::string flipped = original;
      flipped[pos] = char(uint8_t(flipped[pos]) ^ (1u << bit));
      testing::WriteBytes(path, flipped);
      absl::StatusOr<std::unique_ptr<StoreReader>> r = StoreReader::Open(dir_);
      if (!r.ok()) {
        EXPECT_THAT(r.status().message(), HasSubstr("manifest.json"));
        ++refused;
      } else {
        const Manifest& m = (*r)->manifest();
        EXPECT_TRUE(m.spec == expected->spec);
        EXPECT_EQ(m.shards, expected->shards);
        EXPECT_EQ(m.num_samples, expected->num_samples);
        ++harmless;
      }
      if (HasFailure()) return;
    }
  }
  testing::WriteBytes(path, original);
  std::printf("manifest.json: %lld bit flips refused, %lld harmless\n",
              static_cast<long long>(refused),
              static_cast<long long>(harmless));
}

}  // namespace
}  // namespace retrace::store
