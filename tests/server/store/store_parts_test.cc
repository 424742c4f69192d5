// Building a store in parts and joining them: the split, byte-identity with a
// whole-store build, resume of a killed part, locks, and the join's refusals.
#include "server/store/store_parts.h"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/store/layout.h"
#include "server/store/store_reader.h"
#include "server/store/store_writer.h"
#include "tests/server/store/store_test_data.h"
#include "tests/server/store/store_test_util.h"

namespace retrace::store {
namespace {

using kernels::DType;
using nlohmann::json;
using testing::BuildStore;
using testing::DirContents;
using testing::FillSample;
using testing::FreshDir;
using ::testing::HasSubstr;
using testing::MakeSpec;
using testing::SampleData;

constexpr uint64_t kSeed = 7;
// BuildStore passes these diagnostics; the joins below pass the same.
const json kDiagnostics = {{"spearman", {-0.5, 0.25}}};

// Appends samples [part->next_sample(), end) from the test formulas.
absl::Status AppendUpTo(StorePartWriter* part, int64_t end) {
  SampleData data;
  for (int64_t n = part->next_sample(); n < end; ++n) {
    FillSample(part->spec(), kSeed, n, &data);
    absl::Status s = part->Append(data.record);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<PartRecord> BuildPart(const std::string& dir,
                                     const StoreSpec& spec, int64_t index,
                                     int64_t num_parts, int64_t total) {
  absl::StatusOr<std::unique_ptr<StorePartWriter>> part =
      StorePartWriter::Create(dir, spec, index, num_parts, total);
  if (!part.ok()) return part.status();
  absl::Status appended = AppendUpTo(part->get(), (*part)->range().end_sample);
  if (!appended.ok()) return appended;
  return (*part)->Finish();
}

bool Exists(const std::string& path) { return std::filesystem::exists(path); }

// Copies every file of `from` into `to`.
void CopyFiles(const std::string& from, const std::string& to) {
  for (const auto& entry : std::filesystem::directory_iterator(from)) {
    std::filesystem::copy_file(
        entry.path(), std::filesystem::path(to) / entry.path().filename(),
        std::filesystem::copy_options::overwrite_existing);
  }
}

// --- the split ---

TEST(PartRangeTest, KnownSplit) {
  // N = 11, 4 per shard: J = 3 shards of 4, 4, 3; four parts, so one is empty.
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> expected = {
      {0, 0, 0, 0}, {0, 1, 0, 4}, {1, 2, 4, 8}, {2, 3, 8, 11}};
  for (int64_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(::testing::Message() << "part " << i);
    absl::StatusOr<PartRange> r = ComputePartRange(11, 4, i, 4);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->first_shard, std::get<0>(expected[size_t(i)]));
    EXPECT_EQ(r->end_shard, std::get<1>(expected[size_t(i)]));
    EXPECT_EQ(r->first_sample, std::get<2>(expected[size_t(i)]));
    EXPECT_EQ(r->end_sample, std::get<3>(expected[size_t(i)]));
  }
}

TEST(PartRangeTest, PartsTileTheShardGridEvenly) {
  for (int64_t spp : {1, 3, 4}) {
    for (int64_t total = 0; total <= 40; ++total) {
      const int64_t J = (total + spp - 1) / spp;
      for (int64_t n = 1; n <= 12; ++n) {
        SCOPED_TRACE(::testing::Message()
                     << "N " << total << " spp " << spp << " parts " << n);
        int64_t next_shard = 0, next_sample = 0, smallest = J, largest = 0;
        for (int64_t i = 0; i < n; ++i) {
          absl::StatusOr<PartRange> r = ComputePartRange(total, spp, i, n);
          ASSERT_TRUE(r.ok()) << r.status();
          EXPECT_EQ(r->first_shard, next_shard);
          EXPECT_EQ(r->first_sample, next_sample);
          EXPECT_LE(r->first_shard, r->end_shard);
          // Sample bounds sit on the shard grid (or at N).
          EXPECT_EQ(r->first_sample, std::min(r->first_shard * spp, total));
          EXPECT_EQ(r->end_sample, std::min(r->end_shard * spp, total));
          smallest = std::min(smallest, r->num_shards());
          largest = std::max(largest, r->num_shards());
          next_shard = r->end_shard;
          next_sample = r->end_sample;
        }
        EXPECT_EQ(next_shard, J);
        EXPECT_EQ(next_sample, total);
        EXPECT_LE(largest - smallest, 1);
      }
    }
  }
}

TEST(PartRangeTest, InvalidArguments) {
  EXPECT_THAT(ComputePartRange(-1, 4, 0, 1).status().message(),
              HasSubstr("total_samples"));
  EXPECT_THAT(ComputePartRange(10, 0, 0, 1).status().message(),
              HasSubstr("samples_per_shard"));
  EXPECT_THAT(ComputePartRange(10, 4, 0, 0).status().message(),
              HasSubstr("num_parts"));
  EXPECT_THAT(ComputePartRange(10, 4, 3, 3).status().message(),
              HasSubstr("part_index must be in [0, 3), got 3"));
  EXPECT_EQ(ComputePartRange(10, 4, -1, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PartFileNameTest, RoundTrip) {
  EXPECT_EQ(PartRecordFileName(3, 8), "part-0003-of-0008.json");
  EXPECT_EQ(PartLockFileName(3, 8), "part-0003-of-0008.lock");
  EXPECT_EQ(PartRecordFileName(12345, 20000), "part-12345-of-20000.json");
  int64_t i = -1, n = -1;
  EXPECT_TRUE(ParsePartRecordFileName("part-0003-of-0008.json", &i, &n));
  EXPECT_EQ(i, 3);
  EXPECT_EQ(n, 8);
  EXPECT_TRUE(ParsePartLockFileName("part-12345-of-20000.lock", &i, &n));
  EXPECT_EQ(i, 12345);
  for (const char* bad :
       {"part-3-of-8.json", "part-0008-of-0008.json", "part-0003-of-0008.lock",
        "part-00003-of-0008.json", "part--001-of-0008.json",
        "part-0003-0008.json", "part-0003-of-0008.json.tmp"}) {
    EXPECT_FALSE(ParsePartRecordFileName(bad, &i, &n)) << bad;
  }
}

TEST(PartRecordTest, SerializeParseRoundTrip) {
  PartRecord record;
  record.spec_sha256 = std::string(64, 'c');
  record.range = *ComputePartRange(11, 4, 2, 4);
  record.shards = {{"shard-00001.safetensors", 4, 4, std::string(64, 'd')}};
  const std::string text = record.Serialize();
  EXPECT_EQ(text.back(), '\n');
  absl::StatusOr<PartRecord> parsed = PartRecord::Parse(text, "r.json");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(*parsed == record);
  EXPECT_EQ(parsed->Serialize(), text);

  json j = json::parse(text);
  j.erase("end_sample");
  EXPECT_THAT(PartRecord::Parse(j.dump(), "r.json").status().message(),
              HasSubstr("r.json: field 'end_sample' missing"));
  j = json::parse(text);
  j["shards"][0]["sha256"] = "xyz";
  EXPECT_THAT(PartRecord::Parse(j.dump(), "r.json").status().message(),
              HasSubstr("field 'shards[0].sha256'"));
  j = json::parse(text);
  j["format_version"] = 2;
  EXPECT_EQ(PartRecord::Parse(j.dump(), "r.json").status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(PartRecord::Parse("[1]", "r.json").status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- joins are byte-identical to whole-store builds ---

struct JoinCase {
  int64_t num_parts;
  int64_t num_samples;
  int64_t samples_per_shard;
  DType dtype;
  bool replay;
};

class JoinMatchesWholeBuildTest : public ::testing::TestWithParam<JoinCase> {
 protected:
  void SetUp() override {
    const JoinCase& c = GetParam();
    spec_ = MakeSpec(c.dtype, c.replay, c.samples_per_shard);
    reference_ = FreshDir("_reference");
    absl::StatusOr<Manifest> m =
        BuildStore(reference_, spec_, c.num_samples, kSeed);
    ASSERT_TRUE(m.ok()) << m.status();
    reference_manifest_ = *m;
  }

  // Joins `dir` and checks every file and the returned manifest against the
  // whole-store build.
  void JoinAndCompare(const std::string& dir) {
    absl::StatusOr<Manifest> joined = JoinStoreParts(dir, spec_, kDiagnostics);
    ASSERT_TRUE(joined.ok()) << joined.status();
    EXPECT_EQ(*joined->Serialize(), *reference_manifest_.Serialize());
    const std::map<std::string, std::string> got = DirContents(dir);
    const std::map<std::string, std::string> want = DirContents(reference_);
    std::vector<std::string> got_names, want_names;
    for (const auto& [name, bytes] : got) got_names.push_back(name);
    for (const auto& [name, bytes] : want) want_names.push_back(name);
    ASSERT_EQ(got_names, want_names);
    for (const auto& [name, bytes] : want) {
      EXPECT_TRUE(got.at(name) == bytes) << name << " differs";
    }
    absl::StatusOr<std::unique_ptr<StoreReader>> reader =
        StoreReader::Open(dir);
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_EQ((*reader)->num_samples(), GetParam().num_samples);
  }

  StoreSpec spec_;
  std::string reference_;
  Manifest reference_manifest_;
};

TEST_P(JoinMatchesWholeBuildTest, PartsInOneDirectory) {
  const JoinCase& c = GetParam();
  const std::string dir = FreshDir();
  // Last part first: the order parts finish in does not matter.
  for (int64_t i = c.num_parts - 1; i >= 0; --i) {
    SCOPED_TRACE(::testing::Message() << "part " << i);
    absl::StatusOr<PartRecord> record =
        BuildPart(dir, spec_, i, c.num_parts, c.num_samples);
    ASSERT_TRUE(record.ok()) << record.status();
    EXPECT_EQ(int64_t(record->shards.size()), record->range.num_shards());
    EXPECT_TRUE(Exists(dir + "/" + PartRecordFileName(i, c.num_parts)));
  }
  JoinAndCompare(dir);
}

TEST_P(JoinMatchesWholeBuildTest, PartsInSeparateDirectoriesCopiedTogether) {
  const JoinCase& c = GetParam();
  const std::string dir = FreshDir();
  for (int64_t i = 0; i < c.num_parts; ++i) {
    SCOPED_TRACE(::testing::Message() << "part " << i);
    const std::string own = FreshDir("_part" + std::to_string(i));
    ASSERT_TRUE(BuildPart(own, spec_, i, c.num_parts, c.num_samples).ok());
    CopyFiles(own, dir);
  }
  JoinAndCompare(dir);
}

TEST_P(JoinMatchesWholeBuildTest, PartsWrittenConcurrently) {
  const JoinCase& c = GetParam();
  const std::string dir = FreshDir();
  std::vector<std::unique_ptr<StorePartWriter>> parts;
  for (int64_t i = 0; i < c.num_parts; ++i) {
    absl::StatusOr<std::unique_ptr<StorePartWriter>> part =
        StorePartWriter::Create(dir, spec_, i, c.num_parts, c.num_samples);
    ASSERT_TRUE(part.ok()) << part.status();
    parts.push_back(std::move(*part));
  }
  // Round-robin, one sample each, so that the parts' writes interleave.
  SampleData data;
  for (bool progress = true; progress;) {
    progress = false;
    for (auto& part : parts) {
      if (part->next_sample() == part->range().end_sample) continue;
      FillSample(spec_, kSeed, part->next_sample(), &data);
      ASSERT_TRUE(part->Append(data.record).ok());
      progress = true;
    }
  }
  for (auto& part : parts) ASSERT_TRUE(part->Finish().ok());
  parts.clear();  // releases the locks
  JoinAndCompare(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Splits, JoinMatchesWholeBuildTest,
    ::testing::Values(
        JoinCase{1, 11, 4, DType::kF16, true},
        JoinCase{3, 11, 4, DType::kF16, true},
        JoinCase{4, 11, 4, DType::kF16, true},    // one part owns no shard
        JoinCase{5, 11, 4, DType::kBF16, false},  // two parts own no shard
        JoinCase{2, 8, 4, DType::kF32, true},     // N a multiple of the shard
        JoinCase{7, 23, 3, DType::kF16, false},
        JoinCase{3, 0, 4, DType::kF16, true}),  // an empty store
    [](const ::testing::TestParamInfo<JoinCase>& info) {
      const JoinCase& c = info.param;
      return "n" + std::to_string(c.num_parts) + "_N" +
             std::to_string(c.num_samples) + "_spp" +
             std::to_string(c.samples_per_shard) + "_" +
             kernels::DTypeName(c.dtype) + (c.replay ? "_replay" : "");
    });

// --- resume, locks, misuse ---

// N = 23 in shards of 3: J = 8; three parts own shards [0, 2), [2, 5), [5, 8),
// i.e. samples [0, 6), [6, 15), [15, 23) (the last shard holds 2).
class PartResumeTest : public ::testing::Test {
 protected:
  static constexpr int64_t kN = 23, kParts = 3;

  void SetUp() override {
    reference_ = FreshDir("_reference");
    dir_ = FreshDir();
    ASSERT_TRUE(BuildStore(reference_, spec_, kN, kSeed).ok());
  }

  std::unique_ptr<StorePartWriter> Create(int64_t index) {
    absl::StatusOr<std::unique_ptr<StorePartWriter>> part =
        StorePartWriter::Create(dir_, spec_, index, kParts, kN);
    EXPECT_TRUE(part.ok()) << part.status();
    return part.ok() ? std::move(*part) : nullptr;
  }

  void JoinAndCompare() {
    absl::StatusOr<Manifest> joined = JoinStoreParts(dir_, spec_, kDiagnostics);
    ASSERT_TRUE(joined.ok()) << joined.status();
    EXPECT_TRUE(DirContents(dir_) == DirContents(reference_));
  }

  // The files of parts other than `index`, to check they are left alone.
  std::map<std::string, std::string> OtherPartsFiles(int64_t index) {
    const PartRange mine = *ComputePartRange(kN, 3, index, kParts);
    std::map<std::string, std::string> out;
    for (const auto& [name, bytes] : DirContents(dir_)) {
      int64_t shard, i, n;
      if (ParseShardFileName(name, &shard) &&
          (shard >= mine.first_shard && shard < mine.end_shard)) {
        continue;
      }
      if ((ParsePartRecordFileName(name, &i, &n) ||
           ParsePartLockFileName(name, &i, &n)) &&
          i == index) {
        continue;
      }
      out[name] = bytes;
    }
    return out;
  }

  const StoreSpec spec_ = MakeSpec(DType::kF16, true, 3);
  std::string reference_, dir_;
};

TEST_F(PartResumeTest, KilledMidShardResumesAndJoinsIdentically) {
  ASSERT_TRUE(BuildPart(dir_, spec_, 0, kParts, kN).ok());
  ASSERT_TRUE(BuildPart(dir_, spec_, 2, kParts, kN).ok());
  {
    std::unique_ptr<StorePartWriter> part = Create(1);
    ASSERT_NE(part, nullptr);
    EXPECT_EQ(part->next_sample(), 6);
    ASSERT_TRUE(
        AppendUpTo(part.get(), 10).ok());  // shard 2 written, 1 buffered
  }  // destroyed before Finish: a killed run
  EXPECT_FALSE(Exists(dir_ + "/part-0001-of-0003.json"));
  // Another part's temporary (it may be mid-write): part 1 must leave it.
  testing::WriteBytes(dir_ + "/shard-00000.safetensors.tmp", "in flight");
  const auto others = OtherPartsFiles(1);
  // A stray temporary of this part, as a kill during a rename leaves it.
  testing::WriteBytes(dir_ + "/shard-00003.safetensors.tmp", "half a shard");

  std::unique_ptr<StorePartWriter> part = Create(1);
  ASSERT_NE(part, nullptr);
  EXPECT_EQ(part->next_sample(), 9);
  EXPECT_EQ(part->resumed_shards(), 1);
  EXPECT_FALSE(Exists(dir_ + "/shard-00003.safetensors.tmp"));
  ASSERT_TRUE(AppendUpTo(part.get(), 15).ok());
  ASSERT_TRUE(part->Finish().ok());
  part.reset();
  EXPECT_TRUE(OtherPartsFiles(1) == others);
  JoinAndCompare();
}

TEST_F(PartResumeTest, KilledAfterItsLastShardKeepsThePartialLastShard) {
  ASSERT_TRUE(BuildPart(dir_, spec_, 0, kParts, kN).ok());
  ASSERT_TRUE(BuildPart(dir_, spec_, 1, kParts, kN).ok());
  {
    std::unique_ptr<StorePartWriter> part = Create(2);
    ASSERT_NE(part, nullptr);
    ASSERT_TRUE(AppendUpTo(part.get(), kN).ok());
  }
  // The store's last shard (2 samples) is complete: the part knows N.
  std::unique_ptr<StorePartWriter> part = Create(2);
  ASSERT_NE(part, nullptr);
  EXPECT_EQ(part->next_sample(), kN);
  EXPECT_EQ(part->resumed_shards(), 3);
  ASSERT_TRUE(part->Finish().ok());
  part.reset();
  JoinAndCompare();
}

TEST_F(PartResumeTest, DamagedShardOfAPartIsRebuiltWithTheRestOfItsRange) {
  for (int64_t i = 0; i < kParts; ++i)
    ASSERT_TRUE(BuildPart(dir_, spec_, i, kParts, kN).ok());
  testing::FlipByte(dir_ + "/shard-00003.safetensors", -5);
  const auto others = OtherPartsFiles(1);
  std::unique_ptr<StorePartWriter> part = Create(1);
  ASSERT_NE(part, nullptr);
  EXPECT_EQ(part->next_sample(), 9);  // shard 2 kept, 3 and 4 rebuilt
  EXPECT_EQ(part->resumed_shards(), 1);
  // The stale record went first, so it never lists a removed shard.
  EXPECT_FALSE(Exists(dir_ + "/part-0001-of-0003.json"));
  EXPECT_FALSE(Exists(dir_ + "/shard-00004.safetensors"));
  ASSERT_TRUE(AppendUpTo(part.get(), 15).ok());
  ASSERT_TRUE(part->Finish().ok());
  part.reset();
  EXPECT_TRUE(OtherPartsFiles(1) == others);
  JoinAndCompare();
}

TEST_F(PartResumeTest, RerunOfAFinishedPartWritesTheSameRecord) {
  ASSERT_TRUE(BuildPart(dir_, spec_, 1, kParts, kN).ok());
  const std::string before =
      testing::ReadBytes(dir_ + "/part-0001-of-0003.json");
  std::unique_ptr<StorePartWriter> part = Create(1);
  ASSERT_NE(part, nullptr);
  EXPECT_EQ(part->next_sample(), 15);
  EXPECT_EQ(part->resumed_shards(), 3);
  ASSERT_TRUE(part->Finish().ok());
  EXPECT_EQ(testing::ReadBytes(dir_ + "/part-0001-of-0003.json"), before);
}

TEST_F(PartResumeTest, ShardsOfAKilledWholeStoreBuildAreReused) {
  {
    auto writer = std::move(StoreWriter::Create(dir_, spec_)).value();
    SampleData data;
    for (int64_t n = 0; n < 8; ++n) {
      FillSample(spec_, kSeed, n, &data);
      ASSERT_TRUE(writer->Append(data.record).ok());
    }
  }
  std::unique_ptr<StorePartWriter> part = Create(0);
  ASSERT_NE(part, nullptr);
  EXPECT_EQ(part->next_sample(), 6);  // the same shard bytes
  std::unique_ptr<StorePartWriter> second = Create(1);
  ASSERT_NE(second, nullptr);
  EXPECT_EQ(second->next_sample(), 6);
}

TEST_F(PartResumeTest, LocksSeparatePartsFromEachOtherAndFromWholeBuilds) {
  std::unique_ptr<StorePartWriter> part0 = Create(0);
  ASSERT_NE(part0, nullptr);
  std::unique_ptr<StorePartWriter> part1 = Create(1);  // side by side: fine
  ASSERT_NE(part1, nullptr);

  absl::StatusOr<std::unique_ptr<StorePartWriter>> twin =
      StorePartWriter::Create(dir_, spec_, 0, kParts, kN);
  EXPECT_EQ(twin.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(twin.status().message(), HasSubstr("part-0000-of-0003.lock"));

  absl::StatusOr<std::unique_ptr<StoreWriter>> whole =
      StoreWriter::Create(dir_, spec_);
  EXPECT_EQ(whole.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(whole.status().message(), HasSubstr("another store build"));

  absl::StatusOr<Manifest> joined = JoinStoreParts(dir_, spec_, kDiagnostics);
  EXPECT_EQ(joined.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(joined.status().message(), HasSubstr("another store build"));
  part0.reset();
  part1.reset();

  // Parts were here: a whole-store build must not take their files over.
  whole = StoreWriter::Create(dir_, spec_);
  EXPECT_EQ(whole.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(whole.status().message(), HasSubstr("part-0000-of-0003"));
  EXPECT_THAT(whole.status().message(), HasSubstr("JoinStoreParts"));
}

TEST_F(PartResumeTest, MisuseIsRefused) {
  std::unique_ptr<StorePartWriter> part = Create(0);
  ASSERT_NE(part, nullptr);
  ASSERT_TRUE(AppendUpTo(part.get(), 4).ok());
  absl::StatusOr<PartRecord> early = part->Finish();
  EXPECT_EQ(early.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(early.status().message(),
              HasSubstr("only [0, 4) were appended (2 missing)"));
  ASSERT_TRUE(AppendUpTo(part.get(), 6).ok());
  SampleData data;
  FillSample(spec_, kSeed, 6, &data);
  absl::Status beyond = part->Append(data.record);
  EXPECT_EQ(beyond.code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(beyond.message(), HasSubstr("holds samples [0, 6)"));
  ASSERT_TRUE(part->Finish().ok());
  EXPECT_EQ(part->Finish().status().code(),
            absl::StatusCode::kFailedPrecondition);

  EXPECT_EQ(StorePartWriter::Create(dir_, spec_, 3, 3, kN).status().code(),
            absl::StatusCode::kInvalidArgument);
  StoreSpec bad = spec_;
  bad.projection.dim = 0;
  EXPECT_THAT(StorePartWriter::Create(dir_, bad, 0, 3, kN).status().message(),
              HasSubstr("projection.dim"));
  // A finished store is not built into.
  EXPECT_EQ(
      StorePartWriter::Create(reference_, spec_, 0, 3, kN).status().code(),
      absl::StatusCode::kFailedPrecondition);
}

TEST_F(PartResumeTest, DuplicateSampleIdWithinAPartIsRefused) {
  std::unique_ptr<StorePartWriter> part = Create(1);
  ASSERT_NE(part, nullptr);
  SampleData data;
  FillSample(spec_, kSeed, 6, &data);
  ASSERT_TRUE(part->Append(data.record).ok());
  FillSample(spec_, kSeed, 7, &data);
  data.record.sample_id = testing::SampleIdValue(6);
  EXPECT_THAT(part->Append(data.record).message(),
              HasSubstr("sample 7: sample_id 5000000018 is already used by "
                        "sample 6"));
}

// --- the join's refusals ---

class JoinRefusalTest : public PartResumeTest {
 protected:
  void BuildAllBut(int64_t skipped) {
    for (int64_t i = 0; i < kParts; ++i) {
      if (i != skipped) ASSERT_TRUE(BuildPart(dir_, spec_, i, kParts, kN).ok());
    }
  }

  // Joins, expecting failure with `code` and every one of `parts` in the
  // message, and that nothing was written.
  void ExpectRefused(absl::StatusCode code,
                     const std::vector<std::string>& parts) {
    absl::StatusOr<Manifest> joined = JoinStoreParts(dir_, spec_, kDiagnostics);
    ASSERT_FALSE(joined.ok());
    EXPECT_EQ(joined.status().code(), code) << joined.status();
    for (const std::string& part : parts)
      EXPECT_THAT(joined.status().message(), HasSubstr(part));
    EXPECT_FALSE(Exists(dir_ + "/manifest.json"));
  }

  void EditRecord(int64_t index, const std::function<void(json*)>& edit) {
    const std::string path = dir_ + "/" + PartRecordFileName(index, kParts);
    json j = json::parse(testing::ReadBytes(path));
    edit(&j);
    testing::WriteBytes(path, j.dump(2));
  }
};

TEST_F(JoinRefusalTest, MissingPart) {
  BuildAllBut(1);
  ExpectRefused(absl::StatusCode::kNotFound,
                {"part-0001-of-0003.json", "part 1 of 3 has not finished"});
}

TEST_F(JoinRefusalTest, NoPartsAtAll) {
  ExpectRefused(absl::StatusCode::kNotFound, {"no part records"});
}

TEST_F(JoinRefusalTest, PartBuiltWithADifferentSpec) {
  BuildAllBut(2);
  StoreSpec other = spec_;
  other.projection.seed += 1;
  ASSERT_TRUE(BuildPart(dir_, other, 2, kParts, kN).ok());
  ExpectRefused(absl::StatusCode::kFailedPrecondition,
                {"part-0002-of-0003.json", "spec_sha256", "different spec"});
}

TEST_F(JoinRefusalTest, PartsOfDifferentSplits) {
  BuildAllBut(2);
  ASSERT_TRUE(BuildPart(dir_, spec_, 1, 2, kN).ok());  // of 2, not of 3
  ExpectRefused(
      absl::StatusCode::kFailedPrecondition,
      {"part-0000-of-0003.json", "part-0001-of-0002.json", "different splits"});
}

TEST_F(JoinRefusalTest, PartsForDifferentSampleCounts) {
  BuildAllBut(2);
  // Same spec, but this part believes the store has 24 samples: its range
  // starts where it should yet its last shard is a full one.
  ASSERT_TRUE(BuildPart(dir_, spec_, 2, kParts, kN + 1).ok());
  ExpectRefused(absl::StatusCode::kFailedPrecondition,
                {"part-0002-of-0003.json", "field 'num_samples' is 24",
                 "part-0000-of-0003.json has 23"});
}

TEST_F(JoinRefusalTest, RecordRangeThatDisagreesWithTheSplit) {
  BuildAllBut(-1);
  EditRecord(1, [](json* j) { (*j)["first_sample"] = 5; });
  ExpectRefused(
      absl::StatusCode::kInvalidArgument,
      {"part-0001-of-0003.json", "field 'first_sample' is 5", "has 6"});
}

TEST_F(JoinRefusalTest, RecordClaimingAnotherPartsIndex) {
  BuildAllBut(-1);
  // A copy of part 0's record under part 1's name: overlapping ranges.
  std::filesystem::copy_file(dir_ + "/part-0000-of-0003.json",
                             dir_ + "/part-0001-of-0003.json",
                             std::filesystem::copy_options::overwrite_existing);
  ExpectRefused(absl::StatusCode::kFailedPrecondition,
                {"part-0001-of-0003.json", "field 'part_index' is 0"});
}

TEST_F(JoinRefusalTest, RecordListingTheWrongShards) {
  BuildAllBut(-1);
  EditRecord(2, [](json* j) { (*j)["shards"][1]["count"] = 2; });
  ExpectRefused(
      absl::StatusCode::kFailedPrecondition,
      {"part-0002-of-0003.json", "field 'shards[1].count' is 2", "expected 3"});
  EditRecord(2, [](json* j) { (*j)["shards"].erase(1); });
  ExpectRefused(absl::StatusCode::kFailedPrecondition,
                {"part-0002-of-0003.json", "field 'shards' lists 2 shards"});
}

TEST_F(JoinRefusalTest, CorruptedShard) {
  BuildAllBut(-1);
  testing::FlipByte(dir_ + "/shard-00004.safetensors", -3);
  ExpectRefused(absl::StatusCode::kDataLoss,
                {"shard-00004.safetensors", "checksum mismatch",
                 "part-0001-of-0003.json shards[2].sha256"});
}

TEST_F(JoinRefusalTest, MissingShard) {
  BuildAllBut(-1);
  std::filesystem::remove(dir_ + "/shard-00006.safetensors");
  ExpectRefused(absl::StatusCode::kNotFound,
                {"shard-00006.safetensors", "part-0002-of-0003.json"});
}

TEST_F(JoinRefusalTest, DuplicateSampleIdAcrossParts) {
  BuildAllBut(2);
  // Part 2's sample 20 reuses the id of part 0's sample 1.
  auto part =
      std::move(StorePartWriter::Create(dir_, spec_, 2, kParts, kN)).value();
  SampleData data;
  for (int64_t n = part->next_sample(); n < kN; ++n) {
    FillSample(spec_, kSeed, n, &data);
    if (n == 20) data.record.sample_id = testing::SampleIdValue(1);
    ASSERT_TRUE(part->Append(data.record).ok());
  }
  ASSERT_TRUE(part->Finish().ok());
  part.reset();
  ExpectRefused(absl::StatusCode::kFailedPrecondition,
                {"duplicate sample_id 5000000003",
                 "1 (shard-00000.safetensors, part-0000-of-0003.json)",
                 "20 (shard-00006.safetensors, part-0002-of-0003.json)"});
}

TEST_F(JoinRefusalTest, AlreadyJoinedAndReservedDiagnostics) {
  BuildAllBut(-1);
  absl::StatusOr<Manifest> bad =
      JoinStoreParts(dir_, spec_, {{"norm_stats", 1}});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(JoinStoreParts(dir_, spec_, json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);
  JoinAndCompare();
  absl::StatusOr<Manifest> again = JoinStoreParts(dir_, spec_, kDiagnostics);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(again.status().message(), HasSubstr("manifest.json"));
  // And a finished store refuses new parts.
  EXPECT_EQ(StorePartWriter::Create(dir_, spec_, 0, kParts, kN).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(JoinRefusalTest, StrayFilesAreRemovedByTheJoin) {
  BuildAllBut(-1);
  // Left by an earlier build of a larger dataset, and a killed rename.
  std::filesystem::copy_file(dir_ + "/shard-00000.safetensors",
                             dir_ + "/shard-00009.safetensors");
  testing::WriteBytes(dir_ + "/shard-00002.safetensors.tmp", "x");
  testing::WriteBytes(dir_ + "/part-0001-of-0003.json.tmp", "x");
  JoinAndCompare();
}

}  // namespace
}  // namespace retrace::store
