// Writer/reader round trips for every dtype, determinism, resume, and the
// writer's input validation.
#include <cfenv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <thread>
#include <tuple>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/store/layout.h"
#include "server/store/store_reader.h"
#include "server/store/store_writer.h"
#include "tests/server/store/store_test_data.h"
#include "tests/server/store/store_test_util.h"

namespace retrace::store {
namespace {

using kernels::DType;
using testing::BuildStore;
using testing::DirContents;
using testing::FillSample;
using testing::FreshDir;
using ::testing::HasSubstr;
using testing::MakeSpec;
using testing::SampleData;

constexpr uint64_t kSeed = 7;

// Rounds x to the nearest value of a binary format with `mantissa_bits`
// explicit fraction bits and minimum normal exponent `min_exponent`, ties to
// even, in double arithmetic: independent of kernels/dtype.h.
double RoundToFormat(double x, int mantissa_bits, int min_exponent) {
  if (x == 0) return x;
  int exponent;
  std::frexp(x, &exponent);  // |x| = m * 2^exponent, m in [0.5, 1)
  const int e = std::max(exponent - 1, min_exponent);
  const double quantum = std::ldexp(1.0, e - mantissa_bits);
  EXPECT_EQ(std::fegetround(), FE_TONEAREST);
  return std::nearbyint(x / quantum) * quantum;
}

// Decodes stored element bits by the IEEE field layout, independently.
double DecodeHalf(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 31, mantissa = h & 1023;
  double v = exponent == 0 ? std::ldexp(mantissa, -24)
                           : std::ldexp(1024 + mantissa, exponent - 25);
  return sign ? -v : v;
}
double DecodeBf16(uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 7) & 255, mantissa = h & 127;
  double v = exponent == 0 ? std::ldexp(mantissa, -133)
                           : std::ldexp(128 + mantissa, exponent - 134);
  return sign ? -v : v;
}

// The value stored for `input` in `dtype`, computed without kernels/dtype.h.
double ExpectedStored(float input, DType dtype) {
  switch (dtype) {
    case DType::kF16:
      return RoundToFormat(input, 10, -14);
    case DType::kBF16:
      return RoundToFormat(input, 7, -126);
    case DType::kF32:
      return input;
  }
  return 0;
}

double DecodeStored(const void* vectors, int64_t index, DType dtype) {
  const uint8_t* p =
      static_cast<const uint8_t*>(vectors) + index * kernels::DTypeSize(dtype);
  if (dtype == DType::kF32) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return dtype == DType::kF16 ? DecodeHalf(h) : DecodeBf16(h);
}

TEST(ReferenceConversionTest, KnownValues) {
  EXPECT_EQ(RoundToFormat(1.0 + std::ldexp(1, -11), 10, -14),
            1.0);  // tie to even
  EXPECT_EQ(RoundToFormat(1.0 + 3 * std::ldexp(1, -11), 10, -14),
            1.0 + std::ldexp(1, -9));
  EXPECT_EQ(RoundToFormat(std::ldexp(3, -26), 10, -14),
            std::ldexp(1, -24));  // subnormal
  EXPECT_EQ(DecodeHalf(0x3c00), 1.0);
  EXPECT_EQ(DecodeHalf(0x0001), std::ldexp(1, -24));
  EXPECT_EQ(DecodeBf16(0x3f80), 1.0);
  EXPECT_EQ(DecodeBf16(0xc0a0), -5.0);
}

class RoundTripTest : public ::testing::TestWithParam<std::tuple<DType, bool>> {
};

TEST_P(RoundTripTest, ReaderReturnsWhatWasWritten) {
  const auto [dtype, replay] = GetParam();
  SCOPED_TRACE(::testing::Message()
               << "dtype " << kernels::DTypeName(dtype) << " replay " << replay
               << " seed " << kSeed);
  const std::string dir = FreshDir();
  const StoreSpec spec = MakeSpec(dtype, replay, /*samples_per_shard=*/4);
  const int64_t N = 11;  // shards of 4, 4, 3
  absl::StatusOr<Manifest> written = BuildStore(dir, spec, N, kSeed);
  ASSERT_TRUE(written.ok()) << written.status();

  absl::StatusOr<std::unique_ptr<StoreReader>> opened = StoreReader::Open(dir);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const StoreReader& r = **opened;
  const int64_t C = 2, B = 2, S = B + (replay ? 1 : 0), D = 12;
  EXPECT_EQ(r.num_samples(), N);
  EXPECT_EQ(r.num_checkpoints(), C);
  EXPECT_EQ(r.num_buckets(), B);
  EXPECT_EQ(r.num_slots(), S);
  EXPECT_EQ(r.has_replay(), replay);
  EXPECT_EQ(r.dim(), D);
  EXPECT_EQ(r.dtype(), dtype);
  EXPECT_EQ(r.row_bytes(), C * S * D * kernels::DTypeSize(dtype));
  EXPECT_EQ(r.total_vector_bytes(), N * r.row_bytes());
  EXPECT_TRUE(r.manifest().spec == spec);
  EXPECT_EQ(r.manifest().store_id, written->store_id);
  ASSERT_EQ(r.num_shards(), 3);
  EXPECT_EQ(r.shard(2).first, 8);
  EXPECT_EQ(r.shard(2).count, 3);
  EXPECT_EQ(r.manifest().diagnostics["spearman"][1], 0.25);

  for (int64_t n = 0; n < N; ++n) {
    SCOPED_TRACE(::testing::Message() << "sample " << n);
    absl::StatusOr<SampleBlock> b = r.Sample(n);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ(b->first, n);
    EXPECT_EQ(b->count, 1);
    EXPECT_EQ(b->shard, n / 4);
    SampleData expect;
    FillSample(spec, kSeed, n, &expect);
    for (int64_t i = 0; i < C * S * D; ++i) {
      ASSERT_EQ(DecodeStored(b->vectors, i, dtype),
                ExpectedStored(expect.vectors[size_t(i)], dtype))
          << "element " << i << " input " << expect.vectors[size_t(i)];
    }
    for (int64_t i = 0; i < C * S; ++i)
      EXPECT_EQ(b->norms[i], expect.norms[size_t(i)]);
    EXPECT_EQ(b->sample_ids[0], testing::SampleIdValue(uint64_t(n)));
    EXPECT_EQ(b->labels[0], expect.record.label);
    EXPECT_EQ(b->self_influence[0], expect.record.self_influence_tracin);
    EXPECT_EQ(b->self_influence[1], expect.record.self_influence_retrac);
    if (replay) {
      ASSERT_NE(b->train_timesteps, nullptr);
      for (int64_t c = 0; c < C; ++c)
        EXPECT_EQ(b->train_timesteps[c], expect.train_timesteps[size_t(c)]);
    } else {
      EXPECT_EQ(b->train_timesteps, nullptr);
    }
  }

  // Norm statistics against a brute-force computation over the formula.
  const nlohmann::json& stats = r.manifest().diagnostics["norm_stats"];
  EXPECT_EQ(stats["num_samples"], N);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t s = 0; s < S; ++s) {
      std::vector<double> v;
      for (int64_t n = 0; n < N; ++n)
        v.push_back(testing::NormValue(kSeed, uint64_t((n * C + c) * S + s)));
      double sum = 0;
      for (double x : v) sum += x;
      std::sort(v.begin(), v.end());
      // N = 11: median is the 6th value; p95 sits at position 9.5.
      EXPECT_DOUBLE_EQ(stats["mean"][c][s].get<double>(), sum / double(N));
      EXPECT_DOUBLE_EQ(stats["median"][c][s].get<double>(), v[5]);
      EXPECT_DOUBLE_EQ(stats["p95"][c][s].get<double>(), 0.5 * (v[9] + v[10]));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllDtypes, RoundTripTest,
    ::testing::Combine(::testing::Values(DType::kF16, DType::kBF16,
                                         DType::kF32),
                       ::testing::Bool()),
    [](const auto& info) {
      return std::string(kernels::DTypeName(std::get<0>(info.param))) +
             (std::get<1>(info.param) ? "_replay" : "_noreplay");
    });

TEST(StoreTest, RangesCrossShards) {
  const std::string dir = FreshDir();
  ASSERT_TRUE(BuildStore(dir, MakeSpec(DType::kF16, true, 4), 11, kSeed).ok());
  auto r = std::move(StoreReader::Open(dir)).value();
  absl::StatusOr<std::vector<SampleBlock>> blocks = r->Range(3, 10);
  ASSERT_TRUE(blocks.ok());
  ASSERT_EQ(blocks->size(), 3u);
  const std::vector<std::pair<int64_t, int64_t>> expected = {
      {3, 1}, {4, 4}, {8, 2}};
  for (size_t i = 0; i < 3; ++i) {
    const SampleBlock& b = (*blocks)[i];
    EXPECT_EQ(b.first, expected[i].first);
    EXPECT_EQ(b.count, expected[i].second);
    for (int64_t k = 0; k < b.count; ++k) {
      SampleBlock one = *r->Sample(b.first + k);
      EXPECT_EQ(static_cast<const uint8_t*>(b.vectors) + k * r->row_bytes(),
                one.vectors);
      EXPECT_EQ(b.norms + k * r->num_checkpoints() * r->num_slots(), one.norms);
      EXPECT_EQ(b.sample_ids[k], one.sample_ids[0]);
      EXPECT_EQ(b.train_timesteps + k * r->num_checkpoints(),
                one.train_timesteps);
      EXPECT_EQ(b.self_influence + 2 * k, one.self_influence);
    }
  }
  EXPECT_TRUE(r->Range(5, 5)->empty());
  EXPECT_EQ(r->Range(0, 11)->size(), 3u);
  EXPECT_EQ(r->Range(4, 8)->size(), 1u);
  EXPECT_EQ(r->Range(-1, 3).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r->Range(3, 12).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(r->Range(4, 3).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(*r->ShardOf(0), 0);
  EXPECT_EQ(*r->ShardOf(7), 1);
  EXPECT_EQ(*r->ShardOf(8), 2);
  EXPECT_EQ(r->ShardOf(11).status().code(), absl::StatusCode::kOutOfRange);
}

TEST(StoreTest, EmptyStore) {
  const std::string dir = FreshDir();
  ASSERT_TRUE(BuildStore(dir, MakeSpec(DType::kF32, false, 4), 0, kSeed).ok());
  auto r = StoreReader::Open(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->num_samples(), 0);
  EXPECT_EQ((*r)->num_shards(), 0);
  EXPECT_TRUE(
      (*r)->manifest().diagnostics["norm_stats"]["mean"][0][0].is_null());
}

TEST(StoreTest, TwoBuildsGiveIdenticalBytes) {
  const std::string a = FreshDir("_a"), b = FreshDir("_b");
  const StoreSpec spec = MakeSpec(DType::kBF16, true, 4);
  ASSERT_TRUE(BuildStore(a, spec, 10, kSeed).ok());
  ASSERT_TRUE(BuildStore(b, spec, 10, kSeed).ok());
  auto files = DirContents(a);
  EXPECT_EQ(files.size(), 4u);  // 3 shards + manifest, no leftovers
  EXPECT_EQ(files, DirContents(b));
}

TEST(StoreTest, ShardHeaderIsAlignedAndCarriesMetadata) {
  const std::string dir = FreshDir();
  ASSERT_TRUE(BuildStore(dir, MakeSpec(DType::kF16, false, 4), 5, kSeed).ok());
  const std::string bytes =
      testing::ReadBytes(dir + "/shard-00001.safetensors");
  absl::StatusOr<SafetensorsHeader> h =
      ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(bytes.data()),
                             int64_t(bytes.size()), "s");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->data_start % 8, 0);
  EXPECT_EQ(h->metadata.at("format"), "retrace-store");
  EXPECT_EQ(h->metadata.at("first"), "4");
  EXPECT_EQ(h->metadata.at("shard_index"), "1");
  EXPECT_EQ(h->Find("vectors")->shape, (std::vector<int64_t>{1, 2, 2, 12}));
}

TEST(StoreTest, ConcurrentReadersSeeTheSameData) {
  const std::string dir = FreshDir();
  ASSERT_TRUE(BuildStore(dir, MakeSpec(DType::kF16, true, 3), 20, kSeed).ok());
  auto r = std::move(StoreReader::Open(dir)).value();
  auto checksum = [&](int64_t step) {
    uint64_t sum = 0;
    for (int64_t begin = 0; begin < r->num_samples(); begin += step) {
      // Keep the StatusOr alive: a range-for over *temporary would dangle.
      const std::vector<SampleBlock> blocks =
          r->Range(begin, std::min(begin + step, r->num_samples())).value();
      for (const SampleBlock& b : blocks) {
        // Sample by sample, so that the hash does not depend on the blocking.
        const uint8_t* p = static_cast<const uint8_t*>(b.vectors);
        for (int64_t k = 0; k < b.count; ++k) {
          for (int64_t i = 0; i < r->row_bytes(); ++i)
            sum = sum * 31 + p[k * r->row_bytes() + i];
          sum = sum * 31 + uint64_t(b.sample_ids[k]);
        }
      }
    }
    return sum;
  };
  const uint64_t expected = checksum(20);
  std::vector<uint64_t> sums(4);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] { sums[size_t(t)] = checksum(t + 1); });
  for (auto& th : threads) th.join();
  for (uint64_t s : sums) EXPECT_EQ(s, expected);
}

// --- resume ---

class ResumeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    reference_ = FreshDir("_reference");
    dir_ = FreshDir();
    ASSERT_TRUE(BuildStore(reference_, spec_, kN, kSeed).ok());
  }

  // Appends samples [writer->next_sample(), end) from the formula.
  void AppendUpTo(StoreWriter* writer, int64_t end) {
    SampleData data;
    for (int64_t n = writer->next_sample(); n < end; ++n) {
      FillSample(spec_, kSeed, n, &data);
      ASSERT_TRUE(writer->Append(data.record).ok());
    }
  }

  void FinishAndCompare(int64_t expected_resume_point) {
    absl::StatusOr<std::unique_ptr<StoreWriter>> writer =
        StoreWriter::Create(dir_, spec_);
    ASSERT_TRUE(writer.ok()) << writer.status();
    EXPECT_EQ((*writer)->next_sample(), expected_resume_point);
    EXPECT_EQ((*writer)->resumed_shards(), expected_resume_point / 4);
    AppendUpTo(writer->get(), kN);
    ASSERT_TRUE((*writer)->Finish({{"spearman", {-0.5, 0.25}}}).ok());
    EXPECT_EQ(DirContents(dir_), DirContents(reference_));
    EXPECT_TRUE(StoreReader::Open(dir_).ok());
  }

  static constexpr int64_t kN = 11;
  const StoreSpec spec_ = MakeSpec(DType::kF16, true, 4);
  std::string reference_, dir_;
};

TEST_F(ResumeTest, AfterTheWriterWasDestroyedMidShard) {
  {
    auto writer = std::move(StoreWriter::Create(dir_, spec_)).value();
    AppendUpTo(writer.get(), 7);  // shard 0 written, 3 samples buffered
  }
  FinishAndCompare(4);
}

TEST_F(ResumeTest, AtAShardBoundary) {
  {
    auto writer = std::move(StoreWriter::Create(dir_, spec_)).value();
    AppendUpTo(writer.get(), 8);
  }
  FinishAndCompare(8);
}

TEST_F(ResumeTest, ResumeTwice) {
  {
    auto writer = std::move(StoreWriter::Create(dir_, spec_)).value();
    AppendUpTo(writer.get(), 5);
  }
  {
    auto writer = std::move(StoreWriter::Create(dir_, spec_)).value();
    EXPECT_EQ(writer->next_sample(), 4);
    AppendUpTo(writer.get(), 9);
  }
  FinishAndCompare(8);
}

TEST_F(ResumeTest, KilledBeforeTheManifestWasRenamed) {
  // Everything but the manifest made it; temporaries of the killed run remain.
  ASSERT_TRUE(BuildStore(dir_, spec_, kN, kSeed).ok());
  std::filesystem::rename(dir_ + "/manifest.json", dir_ + "/manifest.json.tmp");
  testing::WriteBytes(dir_ + "/shard-00003.safetensors.tmp", "half a shard");
  FinishAndCompare(8);  // the partial last shard is rebuilt
}

TEST_F(ResumeTest, DamagedShardIsRebuiltWithEverythingAfterIt) {
  ASSERT_TRUE(BuildStore(dir_, spec_, kN, kSeed).ok());
  std::filesystem::remove(dir_ + "/manifest.json");
  testing::FlipByte(dir_ + "/shard-00001.safetensors", -5);
  FinishAndCompare(4);
}

TEST_F(ResumeTest, TruncatedFirstShardRestartsFromZero) {
  ASSERT_TRUE(BuildStore(dir_, spec_, kN, kSeed).ok());
  std::filesystem::remove(dir_ + "/manifest.json");
  std::filesystem::resize_file(dir_ + "/shard-00000.safetensors", 100);
  FinishAndCompare(0);
}

TEST_F(ResumeTest, MissingMiddleShardDropsTheRest) {
  ASSERT_TRUE(BuildStore(dir_, spec_, kN, kSeed).ok());
  std::filesystem::remove(dir_ + "/manifest.json");
  std::filesystem::remove(dir_ + "/shard-00001.safetensors");
  FinishAndCompare(4);
}

TEST_F(ResumeTest, DifferentSpecIsRefusedAndNothingIsRemoved) {
  {
    auto writer = std::move(StoreWriter::Create(dir_, spec_)).value();
    AppendUpTo(writer.get(), 5);
  }
  StoreSpec other = spec_;
  other.projection.seed += 1;
  absl::StatusOr<std::unique_ptr<StoreWriter>> writer =
      StoreWriter::Create(dir_, other);
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(writer.status().message(), HasSubstr("shard-00000.safetensors"));
  EXPECT_THAT(writer.status().message(), HasSubstr("different spec"));
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/shard-00000.safetensors"));
}

TEST_F(ResumeTest, FinishedStoreIsRefused) {
  absl::StatusOr<std::unique_ptr<StoreWriter>> writer =
      StoreWriter::Create(reference_, spec_);
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(writer.status().message(), HasSubstr("manifest.json"));
}

TEST_F(ResumeTest, SecondWriterOnTheSameDirectoryIsRefused) {
  auto first = std::move(StoreWriter::Create(dir_, spec_)).value();
  absl::StatusOr<std::unique_ptr<StoreWriter>> second =
      StoreWriter::Create(dir_, spec_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(second.status().message(), HasSubstr("another store build"));
  first.reset();
  EXPECT_TRUE(StoreWriter::Create(dir_, spec_).ok());
}

// --- writer input validation ---

class WriterValidationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    writer_ = std::move(StoreWriter::Create(FreshDir(), spec_)).value();
    FillSample(spec_, kSeed, 0, &data_);
  }
  void AppendExpectingError(const std::string& message) {
    absl::Status s = writer_->Append(data_.record);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(s.message(), HasSubstr(message));
  }
  const StoreSpec spec_ = MakeSpec(DType::kF16, true, 4);
  std::unique_ptr<StoreWriter> writer_;
  SampleData data_;
};

TEST_F(WriterValidationTest, WrongSizes) {
  data_.record.vectors = absl::MakeSpan(data_.vectors).subspan(1);
  AppendExpectingError("sample 0: vectors has 71 values, expected 72");
  FillSample(spec_, kSeed, 0, &data_);
  data_.record.norms = absl::MakeSpan(data_.norms).subspan(1);
  AppendExpectingError("norms has 5 values, expected 6");
  FillSample(spec_, kSeed, 0, &data_);
  data_.record.train_timesteps = {};
  AppendExpectingError("train_timesteps has 0 values, expected 2");
  EXPECT_EQ(writer_->next_sample(), 0);
}

TEST_F(WriterValidationTest, BadValues) {
  data_.vectors[3] = std::numeric_limits<float>::quiet_NaN();
  AppendExpectingError("vectors[3] is not finite");
  FillSample(spec_, kSeed, 0, &data_);
  data_.vectors[5] = 70000.0f;  // finite in float, infinite in fp16
  AppendExpectingError("vectors[5] = 70000 overflows F16");
  FillSample(spec_, kSeed, 0, &data_);
  data_.norms[1] = -1.0f;
  AppendExpectingError("norms[1] must be finite and >= 0");
  FillSample(spec_, kSeed, 0, &data_);
  data_.train_timesteps[1] = 1000;
  AppendExpectingError("train_timesteps[1] = 1000 is outside [0, 1000)");
}

TEST_F(WriterValidationTest, DuplicateSampleIdNamesBothIndices) {
  ASSERT_TRUE(writer_->Append(data_.record).ok());
  FillSample(spec_, kSeed, 1, &data_);
  ASSERT_TRUE(writer_->Append(data_.record).ok());
  FillSample(spec_, kSeed, 2, &data_);
  data_.record.sample_id = testing::SampleIdValue(0);
  AppendExpectingError(
      "sample 2: sample_id 5000000000 is already used by sample 0");
}

TEST_F(WriterValidationTest, DiagnosticsAndFinish) {
  ASSERT_TRUE(writer_->Append(data_.record).ok());
  EXPECT_EQ(writer_->Finish({{"norm_stats", 1}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(writer_->Finish(nlohmann::json::array()).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(writer_->Finish().ok());
  EXPECT_EQ(writer_->Append(data_.record).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(writer_->Finish().status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(WriterCreateTest, InvalidSpec) {
  StoreSpec spec = MakeSpec(DType::kF16, false, 4);
  spec.projection.dim = 0;
  absl::StatusOr<std::unique_ptr<StoreWriter>> w =
      StoreWriter::Create(FreshDir(), spec);
  EXPECT_EQ(w.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(w.status().message(), HasSubstr("projection.dim"));
}

}  // namespace
}  // namespace retrace::store
