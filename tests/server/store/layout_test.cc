// Offset arithmetic and safetensors headers, including sizes past 2^31 and
// 2^32 bytes (arithmetic only: no large files are written).
#include "server/store/layout.h"

#include <cstring>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/store/safetensors.h"

namespace retrace::store {
namespace {

using kernels::DType;
using ::testing::HasSubstr;

constexpr int64_t k2To31 = int64_t(1) << 31;
constexpr int64_t k2To32 = int64_t(1) << 32;

TEST(LayoutTest, RowBytesPerDtype) {
  EXPECT_EQ(RowBytes(2, 3, 16, DType::kF16), 2 * 3 * 16 * 2);
  EXPECT_EQ(RowBytes(2, 3, 16, DType::kBF16), 2 * 3 * 16 * 2);
  EXPECT_EQ(RowBytes(2, 3, 16, DType::kF32), 2 * 3 * 16 * 4);
}

TEST(LayoutTest, RowOffsetPast2To31) {
  // C = 4, S = 11, D = 4096, fp16: 360,448 bytes per row. Row 5958 is the
  // first that starts past 2^31 (5958 * 360448 = 2,147,549,184).
  const int64_t row = 4 * 11 * 4096 * 2;
  ASSERT_EQ(row, 360448);
  EXPECT_EQ(RowByteOffset(5957, 4, 11, 4096, DType::kF16), 2147188736);
  EXPECT_EQ(RowByteOffset(5958, 4, 11, 4096, DType::kF16), 2147549184);
  EXPECT_GT(RowByteOffset(5958, 4, 11, 4096, DType::kF16), k2To31);
}

TEST(LayoutTest, RowOffsetPast2To32And2To40) {
  // fp32, C = 8, S = 11, D = 16384: 5,767,168 bytes per row.
  EXPECT_EQ(RowByteOffset(745, 8, 11, 16384, DType::kF32),
            4296540160);  // > 2^32
  EXPECT_GT(RowByteOffset(745, 8, 11, 16384, DType::kF32), k2To32);
  // 2^20 samples of 1 MiB rows: exactly 2^40.
  EXPECT_EQ(
      RowByteOffset(int64_t(1) << 20, 1, 1, int64_t(1) << 19, DType::kF16),
      int64_t(1) << 40);
}

TEST(LayoutTest, ElementOffsetMatchesNestedLoopCount) {
  // Counting elements one by one in the natural nesting order must land on the
  // closed form, for a small geometry.
  const int64_t C = 3, S = 4, D = 5;
  int64_t counter = 0;
  for (int64_t n = 0; n < 3; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d, ++counter) {
          ASSERT_EQ(VectorElementByteOffset(n, c, s, d, C, S, D, DType::kBF16),
                    2 * counter);
        }
  // And past 2^32 elements' bytes, the last element of a big shard.
  const int64_t n = 100000, Cb = 4, Sb = 11, Db = 2048;
  EXPECT_EQ(VectorElementByteOffset(n - 1, Cb - 1, Sb - 1, Db - 1, Cb, Sb, Db,
                                    DType::kF16),
            n * Cb * Sb * Db * 2 - 2);
  EXPECT_GT(n * Cb * Sb * Db * 2, k2To32);
}

TEST(LayoutTest, ShardTensorsAreAlignedAndContiguous) {
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kF32}) {
    for (bool replay : {false, true}) {
      for (int64_t count : {1, 3, 7, 10}) {
        SCOPED_TRACE(::testing::Message()
                     << "dtype " << kernels::DTypeName(dtype) << " replay "
                     << replay << " count " << count);
        ShardGeometry g{count, 3, replay ? 4 : 3, 5, dtype, replay};
        std::vector<TensorEntry> tensors = ShardTensors(g);
        ASSERT_EQ(tensors.size(), replay ? 6u : 5u);
        int64_t offset = 0;
        for (const TensorEntry& t : tensors) {
          EXPECT_EQ(t.begin, offset) << t.name;
          EXPECT_EQ(t.begin % SafetensorsDTypeSize(t.dtype), 0) << t.name;
          offset = t.end;
        }
        EXPECT_EQ(ShardDataBytes(g), offset);
        // Data bytes: vectors + norms + ids + labels + self_influence (+
        // timesteps).
        int64_t expected =
            count * 3 * g.num_slots * 5 * kernels::DTypeSize(dtype) +
            count * 3 * g.num_slots * 4 + count * 8 + count * 4 +
            count * 2 * 4 + (replay ? count * 3 * 4 : 0);
        EXPECT_EQ(offset, expected);
      }
    }
  }
}

TEST(LayoutTest, ShardTensorShapesAndOrder) {
  ShardGeometry g{10, 2, 3, 16, DType::kF16, true};
  std::vector<TensorEntry> t = ShardTensors(g);
  std::vector<std::string> names;
  for (const auto& e : t) names.push_back(e.name);
  EXPECT_THAT(names, ::testing::ElementsAre("sample_ids", "labels", "norms",
                                            "self_influence", "train_timesteps",
                                            "vectors"));
  EXPECT_EQ(t[5].shape, (std::vector<int64_t>{10, 2, 3, 16}));
  EXPECT_EQ(t[5].dtype, "F16");
  EXPECT_EQ(t[2].shape, (std::vector<int64_t>{10, 2, 3}));
  EXPECT_EQ(t[3].shape, (std::vector<int64_t>{10, 2}));
  EXPECT_EQ(t[4].shape, (std::vector<int64_t>{10, 2}));
}

TEST(LayoutTest, HugeShardOffsetsSurviveTheHeader) {
  // 300,000 samples x 4 x 11 x 2048 fp16 = 54 GB of vectors: offsets far past
  // 2^32 must be written and parsed back exactly.
  ShardGeometry g{300000, 4, 11, 2048, DType::kF16, true};
  std::vector<TensorEntry> tensors = ShardTensors(g);
  const TensorEntry& vectors = tensors.back();
  ASSERT_EQ(vectors.name, "vectors");
  EXPECT_EQ(vectors.end - vectors.begin, int64_t(300000) * 4 * 11 * 2048 * 2);
  EXPECT_GT(vectors.end, 12 * k2To32);
  absl::StatusOr<std::string> header =
      EncodeSafetensorsHeader(tensors, {{"k", "v"}});
  ASSERT_TRUE(header.ok()) << header.status();
  // The parser only reads the header; claim the file is as long as described.
  const int64_t file_size = int64_t(header->size()) + vectors.end;
  absl::StatusOr<SafetensorsHeader> parsed =
      ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(header->data()),
                             file_size, "huge.safetensors");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->data_start, int64_t(header->size()));
  EXPECT_EQ(parsed->data_size, vectors.end);
  ASSERT_NE(parsed->Find("vectors"), nullptr);
  EXPECT_EQ(parsed->Find("vectors")->begin, vectors.begin);
  EXPECT_EQ(parsed->Find("vectors")->end, vectors.end);
  EXPECT_EQ(parsed->metadata.at("k"), "v");
}

TEST(LayoutTest, ShardFileNames) {
  EXPECT_EQ(ShardFileName(0), "shard-00000.safetensors");
  EXPECT_EQ(ShardFileName(42), "shard-00042.safetensors");
  EXPECT_EQ(ShardFileName(123456), "shard-123456.safetensors");
}

TEST(LayoutTest, ParseShardFileNameIsTheExactInverse) {
  for (int64_t index :
       {int64_t(0), int64_t(42), int64_t(99999), int64_t(123456)}) {
    int64_t parsed = -1;
    EXPECT_TRUE(ParseShardFileName(ShardFileName(index), &parsed));
    EXPECT_EQ(parsed, index);
  }
  int64_t parsed;
  for (const char* bad :
       {"shard-7.safetensors", "shard-000042.safetensors", "shard-.safetensors",
        "shard-00042.safetensors.tmp", "shard--0042.safetensors",
        "part-00042.safetensors", "shard-0004x.safetensors"}) {
    EXPECT_FALSE(ParseShardFileName(bad, &parsed)) << bad;
  }
}

TEST(LayoutTest, ShardGridCounts) {
  EXPECT_EQ(NumShards(0, 4), 0);
  EXPECT_EQ(NumShards(1, 4), 1);
  EXPECT_EQ(NumShards(8, 4), 2);
  EXPECT_EQ(NumShards(9, 4), 3);
  EXPECT_EQ(ShardSampleCount(0, 9, 4), 4);
  EXPECT_EQ(ShardSampleCount(1, 9, 4), 4);
  EXPECT_EQ(ShardSampleCount(2, 9, 4), 1);
  EXPECT_EQ(ShardSampleCount(1, 8, 4), 4);
}

// --- safetensors header encoding and parsing ---

std::string LengthPrefixed(const std::string& json) {
  std::string out(8, '\0');
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) out[i] = char((n >> (8 * i)) & 0xff);
  return out + json;
}

absl::StatusOr<SafetensorsHeader> Parse(const std::string& file) {
  return ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(file.data()),
                                int64_t(file.size()), "t.safetensors");
}

TEST(SafetensorsTest, EncodedHeaderIsPaddedWithSpacesTo8Bytes) {
  for (int name_length = 1; name_length < 12; ++name_length) {
    std::vector<TensorEntry> tensors = {
        {std::string(size_t(name_length), 'x'), "F32", {2}, 0, 8}};
    absl::StatusOr<std::string> header = EncodeSafetensorsHeader(tensors, {});
    ASSERT_TRUE(header.ok());
    EXPECT_EQ(header->size() % 8, 0u);
    uint64_t length = 0;
    for (int i = 0; i < 8; ++i)
      length |= uint64_t(uint8_t((*header)[i])) << (8 * i);
    EXPECT_EQ(length + 8, header->size());
    const std::string json = header->substr(8);
    const size_t close = json.rfind('}');
    EXPECT_EQ(json.find_first_not_of(' ', close + 1), std::string::npos);
  }
}

TEST(SafetensorsTest, EncodeRejectsNonContiguousOffsets) {
  std::vector<TensorEntry> tensors = {{"a", "F32", {2}, 0, 8},
                                      {"b", "F32", {2}, 12, 20}};
  EXPECT_EQ(EncodeSafetensorsHeader(tensors, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SafetensorsTest, ParsesAHandWrittenFile) {
  std::string file = LengthPrefixed(
      R"({"b":{"dtype":"I32","shape":[1],"data_offsets":[8,12]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"x":"y"}})");
  file += std::string(12, '\0');
  absl::StatusOr<SafetensorsHeader> h = Parse(file);
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors.size(), 2u);
  EXPECT_EQ(h->tensors[0].name, "a");  // sorted by offset
  EXPECT_EQ(h->tensors[1].name, "b");
  EXPECT_EQ(h->metadata.at("x"), "y");
  EXPECT_EQ(h->data_size, 12);
}

struct BadHeaderCase {
  const char* label;
  std::string file;
  const char* message;
};

TEST(SafetensorsTest, RejectsMalformedFilesWithSpecificMessages) {
  const std::string a =
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  std::vector<BadHeaderCase> cases = {
      {"short", "abc", "truncated"},
      {"length past end", LengthPrefixed("{}").substr(0, 9), "truncated"},
      {"not json", LengthPrefixed("{nope") + std::string(8, '\0'),
       "malformed safetensors header"},
      {"not object", LengthPrefixed("[1,2]"), "not a JSON object"},
      {"unknown dtype",
       LengthPrefixed(
           R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})") +
           std::string(8, '\0'),
       "unknown dtype 'Q7'"},
      {"size mismatch",
       LengthPrefixed(
           R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})") +
           std::string(8, '\0'),
       "disagree with shape"},
      {"hole",
       LengthPrefixed(
           "{" + a +
           R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}})") +
           std::string(16, '\0'),
       "without holes or overlaps"},
      {"overlap",
       LengthPrefixed(
           "{" + a +
           R"(,"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})") +
           std::string(8, '\0'),
       "without holes or overlaps"},
      {"truncated data", LengthPrefixed("{" + a + "}") + std::string(5, '\0'),
       "truncated: the header describes 8 data bytes but the file holds 5"},
      {"trailing bytes", LengthPrefixed("{" + a + "}") + std::string(9, '\0'),
       "1 bytes follow the last tensor"},
      {"negative shape",
       LengthPrefixed(
           R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})") +
           std::string(8, '\0'),
       "'shape'"},
      {"shape overflow",
       LengthPrefixed(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],)"
                      R"("data_offsets":[0,8]}})") +
           std::string(8, '\0'),
       "disagree with shape"},
  };
  std::string huge(8, '\xff');
  cases.push_back({"huge length", huge + "{}", "exceeds the limit"});
  for (const BadHeaderCase& c : cases) {
    SCOPED_TRACE(c.label);
    absl::StatusOr<SafetensorsHeader> h = Parse(c.file);
    ASSERT_FALSE(h.ok());
    EXPECT_EQ(h.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(h.status().message(), HasSubstr("t.safetensors: "));
    EXPECT_THAT(h.status().message(), HasSubstr(c.message));
  }
}

}  // namespace
}  // namespace retrace::store
