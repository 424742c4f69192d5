// `retrace-batch held-out`: writes an image of a data source that the run did
// not train on, as a PNG, for querying the server with (scripts/demo.sh uses
// it to pick a Fashion-MNIST test image and an MNIST zero outside the
// training mixture).
#include <cstdio>
#include <set>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "jobs/command.h"
#include "jobs/run_dir.h"
#include "common/file_util.h"
#include "server/data/image_folder.h"
#include "server/data/mixture.h"

namespace retrace::jobs {
namespace {

struct HeldOutFlags {
  std::string run_dir;
  std::string source;
  int64_t index = 0;
  std::string out;
  std::string fashion_mnist_dir;
  std::string mnist_dir;
};

int Fail(const std::string& message) {
  std::fprintf(stderr, "retrace-batch held-out: %s\n", message.c_str());
  return kExitFailure;
}

int RunHeldOut(const HeldOutFlags& flags) {
  absl::StatusOr<RunManifest> run =
      LoadRun(flags.run_dir, /*verify_checksums=*/false);
  if (!run.ok()) return Fail(run.status().ToString());
  const data::DataLocations locations =
      data::DataLocationsFrom(flags.fashion_mnist_dir, flags.mnist_dir);

  // What the run trained on, as (source name, index in the source).
  absl::StatusOr<data::MixtureSpec> train_spec =
      data::ParseMixtureSpec(run->config.dataset_spec);
  if (!train_spec.ok()) return Fail(train_spec.status().ToString());
  train_spec->seed = run->config.dataset_seed;
  absl::StatusOr<data::Mixture> train =
      data::BuildMixture(*train_spec, locations);
  if (!train.ok()) return Fail(train.status().ToString());
  std::set<std::pair<std::string, int64_t>> trained;
  for (const data::SampleProvenance& p : train->provenance) {
    trained.emplace(train->sources[static_cast<size_t>(p.component)],
                    p.index_in_source);
  }

  absl::StatusOr<data::MixtureSpec> spec = data::ParseMixtureSpec(flags.source);
  if (!spec.ok()) {
    std::fprintf(stderr, "retrace-batch held-out: --source: %s\n",
                 std::string(spec.status().message()).c_str());
    return kExitUsage;
  }
  spec->shuffle = false;  // source order, so --index means the same always
  absl::StatusOr<data::Mixture> source = data::BuildMixture(*spec, locations);
  if (!source.ok()) return Fail(source.status().ToString());
  int64_t seen = 0;
  for (int64_t i = 0; i < source->images.size(); ++i) {
    const data::SampleProvenance& p =
        source->provenance[static_cast<size_t>(i)];
    const std::string& name = source->sources[static_cast<size_t>(p.component)];
    if (trained.count({name, p.index_in_source}) != 0) continue;
    if (seen++ < flags.index) continue;
    const data::ImageSet& set = source->images;
    absl::StatusOr<std::string> png = data::EncodePng(
        set.Image(i).data(), set.channels, set.height, set.width);
    if (!png.ok()) return Fail(png.status().ToString());
    if (absl::Status written = WriteFileAtomically(flags.out, *png);
        !written.ok()) {
      return Fail(written.ToString());
    }
    std::printf("%s: %s image %lld (label %d), not in the run's training set\n",
                flags.out.c_str(), name.c_str(),
                static_cast<long long>(p.index_in_source), p.source_label);
    return kExitOk;
  }
  return Fail(absl::StrCat("--source \"", flags.source, "\" has only ", seen,
                           " images outside the run's training set"));
}

}  // namespace

Subcommand RegisterHeldOutCommand(CLI::App& parent) {
  auto flags = std::make_shared<HeldOutFlags>();
  CLI::App* app = parent.add_subcommand(
      "held-out",
      "Write an image that the run did not train on (PNG), e.g. to query "
      "the server with");
  app->add_option("--run", flags->run_dir, "Training run directory")
      ->required();
  app->add_option("--source", flags->source,
                  "Where to take it from, as a mixture spec, e.g. "
                  "\"fashion-mnist:test:classes=0\" or \"mnist:classes=0\"")
      ->required();
  app->add_option("--index", flags->index,
                  "Which one: the k-th held-out image in source order")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--out", flags->out, "PNG file to write")->required();
  app->add_option("--fashion-mnist-dir", flags->fashion_mnist_dir,
                  "Fashion-MNIST IDX directory");
  app->add_option("--mnist-dir", flags->mnist_dir, "MNIST JSON directory");
  return {app, [flags] { return RunHeldOut(*flags); }};
}

}  // namespace retrace::jobs
