#include "server/data/mixture.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <set>

#include "server/data/mnist_json.h"

namespace retrace::data {
namespace {

// n 2×2 images; image i has every pixel = i / 1000 + offset; label = i %
// classes.
ImageSet MakeSet(const std::string& name, int64_t n, int32_t classes,
                 float offset) {
  ImageSet set;
  set.name = name;
  set.height = 2;
  set.width = 2;
  for (int64_t i = 0; i < n; ++i) {
    set.pixels.insert(set.pixels.end(), 4, i / 1000.0f + offset);
    set.labels.push_back(static_cast<int32_t>(i % classes));
  }
  return set;
}

TEST(MixtureSpecTest, ParsesAndFormats) {
  auto spec = ParseMixtureSpec(
      "fashion-mnist:train:classes=0 + mnist:classes=0:fraction=0.038");
  ASSERT_TRUE(spec.ok()) << spec.status();
  ASSERT_EQ(spec->components.size(), 2u);
  const MixtureComponent& a = spec->components[0];
  const MixtureComponent& b = spec->components[1];
  EXPECT_EQ(a.source, "fashion-mnist");
  EXPECT_EQ(a.split, Split::kTrain);
  EXPECT_EQ(a.classes, std::vector<int32_t>{0});
  EXPECT_FALSE(a.fraction.has_value());
  EXPECT_EQ(b.source, "mnist");
  EXPECT_DOUBLE_EQ(*b.fraction, 0.038);
  EXPECT_EQ(FormatMixtureSpec(*spec),
            "fashion-mnist:train:classes=0 + mnist:classes=0:fraction=0.038");

  auto full = ParseMixtureSpec(
      "fashion-mnist:split=test:classes=1,2:limit=10 + "
      "folder:path=/data/x:label=11");
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->components[0].split, Split::kTest);
  EXPECT_EQ(full->components[0].classes, (std::vector<int32_t>{1, 2}));
  EXPECT_EQ(*full->components[0].limit, 10);
  EXPECT_EQ(full->components[1].path, "/data/x");
  EXPECT_EQ(*full->components[1].label, 11);
  auto again = ParseMixtureSpec(FormatMixtureSpec(*full));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(FormatMixtureSpec(*again), FormatMixtureSpec(*full));
}

TEST(MixtureSpecTest, Errors) {
  for (const char* text : {"cifar", "mnist:classes=a", "mnist:fraction=1.5",
                           "mnist:limit=0", "mnist:colour=red", "folder",
                           "mnist:classes=", "fashion-mnist:split=val"}) {
    SCOPED_TRACE(text);
    auto spec = ParseMixtureSpec(text);
    EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  }
  auto spec = ParseMixtureSpec("mnist + mnist:colour=red");
  EXPECT_NE(spec.status().message().find("component 1"), std::string::npos)
      << spec.status();
  EXPECT_NE(spec.status().message().find("colour=red"), std::string::npos);
}

TEST(MixtureTest, FractionCountsIdsAndProvenance) {
  const ImageSet base = MakeSet("base", 200, 2, 0.0f);   // 100 of class 0
  const ImageSet extra = MakeSet("extra", 50, 5, 0.5f);  // 10 of class 0
  MixtureSpec spec =
      *ParseMixtureSpec("mnist:classes=0 + mnist:classes=0:fraction=0.038");
  spec.seed = 42;
  const ImageSet* sources[] = {&base, &extra};
  auto mixture = MixImageSets(spec, sources);
  ASSERT_TRUE(mixture.ok()) << mixture.status();
  // round(0.038 · 100 / 0.962) = round(3.95) = 4.
  ASSERT_EQ(mixture->images.size(), 104);
  EXPECT_EQ(mixture->sources, (std::vector<std::string>{"base", "extra"}));
  std::map<int32_t, int> per_component;
  std::set<int64_t> ids;
  for (int64_t i = 0; i < mixture->images.size(); ++i) {
    const SampleProvenance& p = mixture->provenance[i];
    const ImageSet& source = *sources[p.component];
    ++per_component[p.component];
    EXPECT_TRUE(ids.insert(mixture->sample_ids[i]).second);
    EXPECT_EQ(mixture->sample_ids[i],
              (int64_t{p.component} << 40) | p.index_in_source);
    EXPECT_EQ(p.source_label, 0);
    EXPECT_EQ(source.labels[p.index_in_source], 0);
    EXPECT_EQ(mixture->images.labels[i], 0);
    EXPECT_EQ(mixture->images.Image(i)[3], source.Image(p.index_in_source)[3]);
  }
  EXPECT_EQ(per_component[0], 100);
  EXPECT_EQ(per_component[1], 4);
  // The order is shuffled: not simply component 0 first.
  bool interleaved = false;
  for (int64_t i = 0; i < 100; ++i)
    interleaved |= mixture->provenance[i].component == 1;
  EXPECT_TRUE(interleaved);
}

TEST(MixtureTest, DeterministicFromSeed) {
  const ImageSet base = MakeSet("base", 300, 3, 0.0f);
  const ImageSet* sources[] = {&base, &base};
  MixtureSpec spec = *ParseMixtureSpec(
      "mnist:classes=1:limit=40 + mnist:classes=2:limit=7:label=9");
  spec.seed = 5;
  auto a = MixImageSets(spec, sources);
  auto b = MixImageSets(spec, sources);
  spec.seed = 6;
  auto c = MixImageSets(spec, sources);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->sample_ids, b->sample_ids);
  EXPECT_EQ(a->images.pixels, b->images.pixels);
  EXPECT_NE(a->sample_ids, c->sample_ids);
  EXPECT_EQ(a->images.size(), 47);
  for (int64_t i = 0; i < a->images.size(); ++i) {
    const SampleProvenance& p = a->provenance[i];
    EXPECT_EQ(a->images.labels[i], p.component == 0 ? 1 : 9);
    EXPECT_EQ(p.source_label, p.component == 0 ? 1 : 2);
  }
  // Without shuffling: component order, ascending indices within each.
  spec.shuffle = false;
  auto ordered = MixImageSets(spec, sources);
  ASSERT_TRUE(ordered.ok());
  for (int64_t i = 1; i < ordered->images.size(); ++i) {
    EXPECT_LT(ordered->sample_ids[i - 1], ordered->sample_ids[i]);
  }
}

TEST(MixtureTest, Errors) {
  const ImageSet base = MakeSet("base", 100, 2, 0.0f);
  const ImageSet few = MakeSet("few", 10, 10, 0.0f);  // one of each label
  ImageSet other_size = MakeSet("big", 10, 1, 0.0f);
  other_size.height = 1;
  other_size.width = 4;
  {
    const ImageSet* sources[] = {&base, &few};
    auto spec =
        *ParseMixtureSpec("mnist:classes=0 + mnist:classes=0:fraction=0.2");
    auto m = MixImageSets(spec, sources);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(m.status().message().find("needs 13 samples but only 1 match"),
              std::string::npos)
        << m.status();
  }
  {
    const ImageSet* sources[] = {&base, &other_size};
    auto m = MixImageSets(*ParseMixtureSpec("mnist + mnist"), sources);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  }
  {
    const ImageSet* sources[] = {&base};
    auto m = MixImageSets(*ParseMixtureSpec("mnist:classes=7"), sources);
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(m.status().message().find("selects no samples"),
              std::string::npos);
    auto all_fraction =
        MixImageSets(*ParseMixtureSpec("mnist:fraction=0.5"), sources);
    EXPECT_EQ(all_fraction.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

// The demo's outlier-experiment data (docs/demo.md) from the real sources, when
// both are present.
TEST(MixtureTest, FashionMnistClassZeroPlusMnistZeros) {
  DataLocations locations;
  if (!std::filesystem::exists(locations.fashion_mnist_dir) ||
      !std::filesystem::exists(DefaultMnistDir() + "/0.json")) {
    GTEST_SKIP() << "needs dataset-fashion-mnist and scripts/fetch_data.sh";
  }
  MixtureSpec spec = *ParseMixtureSpec(
      "fashion-mnist:train:classes=0 + mnist:classes=0:fraction=0.038");
  spec.seed = 1;
  auto mixture = BuildMixture(spec, locations);
  ASSERT_TRUE(mixture.ok()) << mixture.status();
  // round(0.038 · 6000 / 0.962) = 237.
  EXPECT_EQ(mixture->images.size(), 6237);
  int64_t planted = 0;
  for (const SampleProvenance& p : mixture->provenance)
    planted += p.component == 1;
  EXPECT_EQ(planted, 237);
  EXPECT_EQ(mixture->sources,
            (std::vector<std::string>{"fashion-mnist/train", "mnist"}));
}

}  // namespace
}  // namespace retrace::data
