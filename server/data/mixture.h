// Training sets mixed from several sources, e.g. the demo's outlier
// experiment (docs/demo.md): Fashion-MNIST class 0 (train split) plus MNIST
// zeros making up 3.8% of the result:
//
//   fashion-mnist:train:classes=0 + mnist:classes=0:fraction=0.038
//
// Spec text: components joined by '+'; each is a source name followed by
// ':'-separated options. Sources: "fashion-mnist", "mnist", "folder" (needs
// path=; gray or RGB PNG/JPEG files read into the caller's image shape,
// DataLocations::folder_spec). Options:
//   train | test | split=train|test   Fashion-MNIST split (default train)
//   classes=0,3,7    keep only these source labels (default: all)
//   limit=N          keep at most N of the matching samples
//   fraction=F       size this component so it is F of the whole mixture
//                    (0 < F, all fractions together < 1); the others are the
//                    base: count = round(F · base / (1 − ΣF))
//   label=L          give every sample of this component label L
//   path=DIR         data location (folder root; overrides the default
//                    directory for fashion-mnist and mnist). No ':' or '+'.
//
// Sample identity: sample_id = (component index << 40) | index within source,
// so an id is stable for a given spec and names its image. When a component
// takes fewer samples than match, which ones is a pure function of (seed,
// component index); the final order is a seeded shuffle (or component order
// when shuffle is off). Same spec + seed + data -> same mixture, on any
// machine (the generator is SplitMix64, not the standard library's).
#ifndef RETRACE_SERVER_DATA_MIXTURE_H_
#define RETRACE_SERVER_DATA_MIXTURE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "server/data/idx.h"
#include "server/data/image_folder.h"
#include "server/data/image_set.h"

namespace retrace::data {

struct MixtureComponent {
  std::string source;            // "fashion-mnist", "mnist" or "folder"
  Split split = Split::kTrain;   // fashion-mnist only
  std::vector<int32_t> classes;  // empty: all labels
  std::optional<int64_t> limit;
  std::optional<double> fraction;
  std::optional<int32_t> label;  // relabel every sample
  std::string path;              // empty: the source's default location
};

struct MixtureSpec {
  std::vector<MixtureComponent> components;
  uint64_t seed = 0;
  bool shuffle = true;
};

// Parses the spec text above (seed and shuffle keep their defaults).
// INVALID_ARGUMENT says which component and option is wrong.
absl::StatusOr<MixtureSpec> ParseMixtureSpec(absl::string_view text);
// Canonical text form: ParseMixtureSpec(FormatMixtureSpec(s)) == s (up to seed
// and shuffle, which are not part of the text).
std::string FormatMixtureSpec(const MixtureSpec& spec);

inline constexpr int kSampleIdComponentShift = 40;

// Where a mixture sample came from.
struct SampleProvenance {
  int32_t component;        // index into Mixture::sources / spec.components
  int64_t index_in_source;  // position in that source's ImageSet
  int32_t source_label;     // label in the source
};

struct Mixture {
  ImageSet images;                           // labels after any relabelling
  std::vector<int64_t> sample_ids;           // one per image
  std::vector<SampleProvenance> provenance;  // one per image
  std::vector<std::string> sources;          // ImageSet::name per component
  // ImageSet::class_names per component (indexed by the source label).
  std::vector<std::vector<std::string>> source_class_names;
};

// Mixes already-loaded sources: sources[i] is the data of spec.components[i]
// (the same ImageSet may appear several times). INVALID_ARGUMENT when the
// sizes differ, counts are impossible (a fraction needing more samples than
// match, no base component, fractions summing to >= 1) or a component selects
// nothing.
absl::StatusOr<Mixture> MixImageSets(const MixtureSpec& spec,
                                     absl::Span<const ImageSet* const> sources);

// Default data locations for components without path=.
struct DataLocations {
  std::string fashion_mnist_dir = kDebianFashionMnistDir;
  std::string mnist_dir;  // empty: DefaultMnistDir()
  // The shape of the model that reads the data: images of "folder"
  // components are converted to it (image_folder.h says how) or refused.
  // Callers set their model's shape; the default is the built-in model's
  // 1x28x28, for the callers that train and serve only that model.
  ImageSpec folder_spec = {1, 28, 28};
};

// The locations given on a command line: each directory that is empty keeps
// its default.
DataLocations DataLocationsFrom(const std::string& fashion_mnist_dir,
                                const std::string& mnist_dir);

// Loads each component's source (each distinct source once) and mixes them.
// Errors of the readers pass through.
absl::StatusOr<Mixture> BuildMixture(const MixtureSpec& spec,
                                     const DataLocations& locations = {});

// The sample id of image `index_in_source` of component `component`.
inline int64_t MakeSampleId(int32_t component, int64_t index_in_source) {
  return (int64_t{component} << kSampleIdComponentShift) | index_in_source;
}

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_MIXTURE_H_
