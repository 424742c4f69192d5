#include "server/data/mixture.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status.h"
#include "server/data/mnist_json.h"

namespace retrace::data {
namespace {

constexpr int64_t kMaxIndexInSource =
    (int64_t{1} << kSampleIdComponentShift) - 1;

// SplitMix64: a fully specified generator, so permutations are identical on
// every platform and standard library.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) by multiply-shift (bias below 2^-32 for n < 2^32).
  uint64_t Below(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >>
                                 64);
  }

 private:
  uint64_t state_;
};

template <typename T>
void Shuffle(std::vector<T>& values, SplitMix64& rng) {
  for (size_t i = values.size(); i > 1; --i) {
    std::swap(values[i - 1], values[rng.Below(i)]);
  }
}

absl::Status ParseOption(absl::string_view option, MixtureComponent& c,
                         absl::string_view where) {
  if (option == "train" || option == "test") {
    c.split = option == "train" ? Split::kTrain : Split::kTest;
    return absl::OkStatus();
  }
  std::pair<absl::string_view, absl::string_view> kv =
      absl::StrSplit(option, absl::MaxSplits('=', 1));
  const absl::string_view key = kv.first, value = kv.second;
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("mixture spec ", where, ": option '", option, "' ", why));
  };
  if (value.empty()) return bad("needs a value (key=value)");
  if (key == "split") {
    absl::StatusOr<Split> split = ParseSplit(value);
    if (!split.ok()) return bad("is not train or test");
    c.split = *split;
  } else if (key == "classes") {
    c.classes.clear();
    for (absl::string_view item : absl::StrSplit(value, ',')) {
      int32_t label;
      if (!absl::SimpleAtoi(item, &label) || label < 0) {
        return bad("must list non-negative integers separated by ','");
      }
      c.classes.push_back(label);
    }
  } else if (key == "limit") {
    int64_t limit;
    if (!absl::SimpleAtoi(value, &limit) || limit < 1) {
      return bad("must be a positive integer");
    }
    c.limit = limit;
  } else if (key == "fraction") {
    double fraction;
    if (!absl::SimpleAtod(value, &fraction) || !(fraction > 0.0) ||
        !(fraction < 1.0)) {
      return bad("must be a number in (0, 1)");
    }
    c.fraction = fraction;
  } else if (key == "label") {
    int32_t label;
    if (!absl::SimpleAtoi(value, &label) || label < 0) {
      return bad("must be a non-negative integer");
    }
    c.label = label;
  } else if (key == "path") {
    c.path = std::string(value);
  } else {
    return bad(
        "is unknown (expected train, test, split=, classes=, limit=, "
        "fraction=, label=, path=)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MixtureSpec> ParseMixtureSpec(absl::string_view text) {
  MixtureSpec spec;
  int index = 0;
  for (absl::string_view part : absl::StrSplit(text, '+')) {
    const std::string where = absl::StrCat(
        "component ", index, " ('", absl::StripAsciiWhitespace(part), "')");
    std::vector<absl::string_view> tokens =
        absl::StrSplit(absl::StripAsciiWhitespace(part), ':');
    MixtureComponent component;
    component.source = std::string(absl::StripAsciiWhitespace(tokens[0]));
    if (component.source != "fashion-mnist" && component.source != "mnist" &&
        component.source != "folder") {
      return absl::InvalidArgumentError(absl::StrCat(
          "mixture spec ", where, ": unknown source '", component.source,
          "' (expected fashion-mnist, mnist or folder)"));
    }
    for (size_t i = 1; i < tokens.size(); ++i) {
      RETURN_IF_ERROR(
          ParseOption(absl::StripAsciiWhitespace(tokens[i]), component, where));
    }
    if (component.source == "folder" && component.path.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("mixture spec ", where, ": folder needs path=DIR"));
    }
    spec.components.push_back(std::move(component));
    ++index;
  }
  return spec;
}

std::string FormatMixtureSpec(const MixtureSpec& spec) {
  std::vector<std::string> parts;
  for (const MixtureComponent& c : spec.components) {
    std::string part = c.source;
    if (c.source == "fashion-mnist")
      absl::StrAppend(&part, ":", SplitName(c.split));
    if (!c.classes.empty()) {
      absl::StrAppend(&part, ":classes=", absl::StrJoin(c.classes, ","));
    }
    if (c.limit) absl::StrAppend(&part, ":limit=", *c.limit);
    if (c.fraction) absl::StrAppend(&part, ":fraction=", *c.fraction);
    if (c.label) absl::StrAppend(&part, ":label=", *c.label);
    if (!c.path.empty()) absl::StrAppend(&part, ":path=", c.path);
    parts.push_back(std::move(part));
  }
  return absl::StrJoin(parts, " + ");
}

absl::StatusOr<Mixture> MixImageSets(
    const MixtureSpec& spec, absl::Span<const ImageSet* const> sources) {
  const size_t count = spec.components.size();
  if (count == 0) {
    return absl::InvalidArgumentError("mixture spec has no components");
  }
  if (sources.size() != count) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mixture: ", count, " components but ", sources.size(), " sources"));
  }
  const ImageSet& first = *sources[0];
  for (size_t i = 0; i < count; ++i) {
    const ImageSet& s = *sources[i];
    if (s.channels != first.channels || s.height != first.height ||
        s.width != first.width) {
      return absl::InvalidArgumentError(absl::StrCat(
          "mixture: source ", s.name, " has images of ", s.channels, "x",
          s.height, "x", s.width, ", but ", first.name, " has ", first.channels,
          "x", first.height, "x", first.width));
    }
    if (s.size() > kMaxIndexInSource) {
      return absl::InvalidArgumentError(absl::StrCat(
          "mixture: source ", s.name, " is too large for sample ids"));
    }
  }

  // Candidates per component, in source order.
  std::vector<std::vector<int64_t>> candidates(count);
  for (size_t i = 0; i < count; ++i) {
    const MixtureComponent& c = spec.components[i];
    const ImageSet& s = *sources[i];
    for (int64_t n = 0; n < s.size(); ++n) {
      if (c.classes.empty() || std::find(c.classes.begin(), c.classes.end(),
                                         s.labels[n]) != c.classes.end()) {
        candidates[i].push_back(n);
      }
    }
  }

  // Counts: base components first, then fractions of the whole.
  std::vector<int64_t> take(count, 0);
  int64_t base_total = 0;
  double fraction_sum = 0.0;
  for (size_t i = 0; i < count; ++i) {
    const MixtureComponent& c = spec.components[i];
    if (c.fraction) {
      fraction_sum += *c.fraction;
      continue;
    }
    take[i] = static_cast<int64_t>(candidates[i].size());
    if (c.limit) take[i] = std::min(take[i], *c.limit);
    base_total += take[i];
  }
  if (fraction_sum > 0.0) {
    if (!(fraction_sum < 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "mixture: fractions sum to ", fraction_sum, ", must be below 1"));
    }
    if (base_total == 0) {
      return absl::InvalidArgumentError(
          "mixture: fraction= needs at least one component without fraction= "
          "that selects samples");
    }
    for (size_t i = 0; i < count; ++i) {
      const MixtureComponent& c = spec.components[i];
      if (!c.fraction) continue;
      take[i] = std::llround(*c.fraction * base_total / (1.0 - fraction_sum));
      if (c.limit) take[i] = std::min(take[i], *c.limit);
      if (take[i] > static_cast<int64_t>(candidates[i].size())) {
        return absl::InvalidArgumentError(
            absl::StrCat("mixture: component ", i, " (", sources[i]->name,
                         ") fraction ", *c.fraction, " needs ", take[i],
                         " samples but only ", candidates[i].size(), " match"));
      }
    }
  }

  Mixture mixture;
  std::vector<std::pair<int32_t, int64_t>> chosen;  // (component, index)
  for (size_t i = 0; i < count; ++i) {
    if (take[i] == 0) {
      return absl::InvalidArgumentError(absl::StrCat("mixture: component ", i,
                                                     " (", sources[i]->name,
                                                     ") selects no samples"));
    }
    std::vector<int64_t>& pool = candidates[i];
    if (take[i] < static_cast<int64_t>(pool.size())) {
      SplitMix64 rng(spec.seed ^ (0xA0761D6478BD642Full * (i + 1)));
      Shuffle(pool, rng);
      pool.resize(take[i]);
      std::sort(pool.begin(), pool.end());
    }
    for (int64_t n : pool) chosen.emplace_back(static_cast<int32_t>(i), n);
    mixture.sources.push_back(sources[i]->name);
    mixture.source_class_names.push_back(sources[i]->class_names);
  }
  if (spec.shuffle) {
    SplitMix64 rng(spec.seed);
    Shuffle(chosen, rng);
  }

  ImageSet& images = mixture.images;
  images.name = FormatMixtureSpec(spec);
  images.channels = first.channels;
  images.height = first.height;
  images.width = first.width;
  images.pixels.reserve(chosen.size() * first.image_numel());
  for (const auto& [component, index] : chosen) {
    const ImageSet& s = *sources[component];
    const MixtureComponent& c = spec.components[component];
    absl::Span<const float> image = s.Image(index);
    images.pixels.insert(images.pixels.end(), image.begin(), image.end());
    const int32_t source_label = s.labels[index];
    images.labels.push_back(c.label ? *c.label : source_label);
    if (!s.paths.empty()) images.paths.push_back(s.paths[index]);
    mixture.sample_ids.push_back(MakeSampleId(component, index));
    mixture.provenance.push_back(
        SampleProvenance{component, index, source_label});
  }
  if (images.paths.size() != images.labels.size()) images.paths.clear();
  return mixture;
}

absl::StatusOr<Mixture> BuildMixture(const MixtureSpec& spec,
                                     const DataLocations& locations) {
  // One load per distinct (source, split, path).
  std::map<std::tuple<std::string, int, std::string>, ImageSet> loaded;
  std::vector<const ImageSet*> sources;
  for (const MixtureComponent& c : spec.components) {
    auto key = std::make_tuple(c.source, static_cast<int>(c.split), c.path);
    auto it = loaded.find(key);
    if (it == loaded.end()) {
      absl::StatusOr<ImageSet> set;
      if (c.source == "fashion-mnist") {
        set = LoadFashionMnist(
            c.path.empty() ? locations.fashion_mnist_dir : c.path, c.split);
      } else if (c.source == "mnist") {
        std::string dir = c.path;
        if (dir.empty()) dir = locations.mnist_dir;
        if (dir.empty()) dir = DefaultMnistDir();
        set = LoadMnistDigits(dir);
      } else if (c.source == "folder") {
        set = LoadImageFolder(c.path, locations.folder_spec);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("mixture: unknown source '", c.source, "'"));
      }
      if (!set.ok()) return set.status();
      it = loaded.emplace(key, *std::move(set)).first;
    }
    sources.push_back(&it->second);
  }
  return MixImageSets(spec, sources);
}

DataLocations DataLocationsFrom(const std::string& fashion_mnist_dir,
                                const std::string& mnist_dir) {
  DataLocations locations;
  if (!fashion_mnist_dir.empty()) {
    locations.fashion_mnist_dir = fashion_mnist_dir;
  }
  locations.mnist_dir = mnist_dir;
  return locations;
}

}  // namespace retrace::data
