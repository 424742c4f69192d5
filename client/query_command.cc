// `retrace query IMAGE...`: attributes each image, prints tables or JSON
// lines, and optionally draws a contact sheet per image.
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/command.h"
#include "client/contact_sheet.h"
#include "client/format.h"
#include "client/progress.h"
#include "common/file_util.h"

namespace retrace::client {
namespace {

constexpr char kCommand[] = "query";

struct QueryFlags {
  std::vector<std::string> images;
  int top_k = 10;
  std::string method = "both";
  std::string pairing = "matched";
  bool opponents = false;
  bool breakdown = false;
  bool json = false;
  bool thumbnails = false;
  std::string sheet;
  std::string font = kDefaultSheetFont;
  int sheet_columns = 5;
  int query_timesteps = 0;
  int noise_draws = 0;
  uint64_t seed = 0;
  std::string checkpoints;
  std::string buckets;
  bool no_progress = false;
};

// "0,2,5-7" -> {0, 2, 5, 6, 7}.
absl::StatusOr<std::vector<int32_t>> ParseIndexList(absl::string_view flag,
                                                    absl::string_view text) {
  std::vector<int32_t> out;
  if (text.empty()) return out;
  const auto bad = [&] {
    return absl::InvalidArgumentError(
        absl::StrCat(flag,
                     " takes indices >= 0 and ranges separated by commas, e.g. "
                     "\"0,2,5-7\"; got \"",
                     text, "\""));
  };
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    const std::vector<absl::string_view> range =
        absl::StrSplit(part, absl::MaxSplits('-', 1));
    int32_t first = 0;
    int32_t last = 0;
    if (!absl::SimpleAtoi(range[0], &first) || first < 0) return bad();
    last = first;
    if (range.size() == 2 &&
        (!absl::SimpleAtoi(range[1], &last) || last < first)) {
      return bad();
    }
    if (last - first >= 4096) return bad();
    for (int32_t i = first; i <= last; ++i) out.push_back(i);
  }
  return out;
}

// out.png -> out-3.png when several images share one --sheet name.
std::string SheetPath(const std::string& sheet, int index, int count) {
  if (count == 1) return sheet;
  const size_t slash = sheet.rfind('/');
  const size_t dot = sheet.rfind('.');
  const std::string suffix = absl::StrCat("-", index + 1);
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash) ||
      dot == (slash == std::string::npos ? 0 : slash + 1)) {
    return sheet + suffix;
  }
  return absl::StrCat(sheet.substr(0, dot), suffix, sheet.substr(dot));
}

std::string BaseName(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

int RunQuery(const QueryFlags& flags, const ConnectionFlags& connection) {
  // The upper bound of k is the server's to enforce (INVALID_ARGUMENT).
  if (flags.top_k < 1) {
    return ReportUsage(
        kCommand, absl::StrCat("--k must be at least 1, got ", flags.top_k));
  }
  if (flags.query_timesteps < 0 || flags.noise_draws < 0) {
    return ReportUsage(kCommand,
                       "--query-timesteps and --noise-draws must be >= 0");
  }
  v1::AttributeRequest request;
  request.set_top_k(flags.top_k);
  request.set_opponents(flags.opponents);
  if (flags.method == "tracin" || flags.method == "both") {
    request.add_methods(v1::TRACIN);
  }
  if (flags.method == "retrac" || flags.method == "both") {
    request.add_methods(v1::RETRAC);
  }
  request.set_pairing(flags.pairing == "replay" ? v1::REPLAY : v1::MATCHED);
  absl::StatusOr<std::vector<int32_t>> checkpoints =
      ParseIndexList("--checkpoints", flags.checkpoints);
  if (!checkpoints.ok())
    return ReportUsage(kCommand, checkpoints.status().message());
  absl::StatusOr<std::vector<int32_t>> buckets =
      ParseIndexList("--buckets", flags.buckets);
  if (!buckets.ok()) return ReportUsage(kCommand, buckets.status().message());
  request.mutable_checkpoints()->Add(checkpoints->begin(), checkpoints->end());
  request.mutable_buckets()->Add(buckets->begin(), buckets->end());
  request.set_query_timesteps(flags.query_timesteps);
  request.set_query_noise_draws(flags.noise_draws);
  request.set_seed(flags.seed);
  request.set_include_breakdown(flags.breakdown);
  const bool sheet = !flags.sheet.empty();
  request.set_include_thumbnails(flags.thumbnails || sheet);

  SheetOptions sheet_options;
  sheet_options.font_path = flags.font;
  sheet_options.columns = flags.sheet_columns;
  if (sheet) {
    if (absl::Status valid = ValidateSheetOptions(sheet_options); !valid.ok()) {
      return ReportUsage(kCommand, valid.message());
    }
  }

  // Every file is read before the first call, so that a typo in the last of
  // many paths costs no server time.
  std::vector<std::string> images;
  for (const std::string& path : flags.images) {
    absl::StatusOr<std::string> bytes = ReadFile(path);
    if (!bytes.ok()) {
      return ReportUsage(kCommand, absl::StrCat("cannot read image: ",
                                                bytes.status().message()));
    }
    images.push_back(*std::move(bytes));
  }

  int exit_code = kExitOk;
  std::unique_ptr<Client> client =
      ConnectOrReport(kCommand, connection, &exit_code);
  if (client == nullptr) return exit_code;

  AttributeFormatOptions format;
  format.opponents = flags.opponents;
  format.breakdown = flags.breakdown;
  format.thumbnails = flags.thumbnails;
  // Names the breakdown's slots by their timesteps; without it (an older or
  // failing server) they keep their indices, and a real problem shows up on
  // the Attribute call itself.
  absl::StatusOr<v1::StoreInfo> store = absl::UnknownError("not fetched");
  if (flags.breakdown && !flags.json) {
    store = client->GetStoreInfo();
    if (store.ok()) format.store = &*store;
  }

  const int count = static_cast<int>(images.size());
  const bool is_tty = ::isatty(STDERR_FILENO) == 1;
  QueryProgress progress(
      !flags.no_progress && (count > 1 || is_tty) ? stderr : nullptr, is_tty,
      count);
  bool server_failed = false;
  bool local_failed = false;
  for (int i = 0; i < count; ++i) {
    const std::string& path = flags.images[i];
    *request.mutable_image() = images[i];
    request.set_request_id(absl::StrCat(i));
    progress.Start(i, path);
    absl::StatusOr<v1::AttributeResponse> response = client->Attribute(request);
    progress.Clear();
    if (!response.ok()) {
      server_failed = true;
      ReportServerError(kCommand, path, response.status());
      if (flags.json) {
        std::printf("%s\n",
                    AttributeErrorJson(path, response.status()).dump().c_str());
      }
      // A bad image spoils only itself; anything else (authentication, an
      // overloaded or unreachable server) would fail every following image.
      if (response.status().code() != absl::StatusCode::kInvalidArgument) {
        if (i + 1 < count) {
          std::fprintf(stderr, "retrace query: stopped; %d image(s) not sent\n",
                       count - i - 1);
        }
        break;
      }
      continue;
    }
    if (flags.json) {
      std::printf("%s\n",
                  AttributeJson(path, *response, format).dump().c_str());
    } else {
      if (i > 0) std::printf("\n");
      std::printf("%s", FormatAttributeText(path, *response, format).c_str());
    }
    std::fflush(stdout);
    if (sheet) {
      sheet_options.title = BaseName(path);
      const std::string out = SheetPath(flags.sheet, i, count);
      absl::StatusOr<std::string> png =
          RenderContactSheet(*response, images[i], sheet_options);
      absl::Status written =
          png.ok() ? WriteFileAtomically(out, *png) : png.status();
      if (!written.ok()) {
        local_failed = true;
        std::fprintf(stderr,
                     "retrace query: %s: cannot write the contact sheet: %s\n",
                     path.c_str(), written.ToString().c_str());
      } else {
        std::fprintf(stderr, "retrace query: contact sheet %s\n", out.c_str());
      }
    }
  }
  if (server_failed) return kExitServer;
  return local_failed ? kExitFailure : kExitOk;
}

}  // namespace

Subcommand RegisterQueryCommand(CLI::App& parent,
                                const ConnectionFlags* connection) {
  auto flags = std::make_shared<QueryFlags>();
  CLI::App* app = parent.add_subcommand(
      "query",
      "Attribute images (PNG or JPEG files): the training samples with the "
      "highest (and lowest) TracIn and ReTrac scores");
  app->add_option("images", flags->images, "Image files to attribute")
      ->required();
  // Ranges of numbers are checked after conversion (RunQuery) so that a
  // non-number gets CLI11's conversion message rather than a range message.
  app->add_option("-k,--k", flags->top_k,
                  "Proponents (and opponents) per method, 1..4096")
      ->capture_default_str();
  app->add_option("--method", flags->method, "tracin, retrac or both")
      ->capture_default_str()
      ->check(CLI::IsMember({"tracin", "retrac", "both"}));
  app->add_option("--pairing", flags->pairing,
                  "matched (bucket meets bucket) or replay (the training "
                  "step's own timestep; needs a store with a replay slot)")
      ->capture_default_str()
      ->check(CLI::IsMember({"matched", "replay"}));
  app->add_flag("--opponents", flags->opponents,
                "Also list the k lowest scores");
  app->add_flag("--breakdown", flags->breakdown,
                "Show each score's largest (checkpoint, timestep) terms");
  app->add_flag("--json", flags->json,
                "One JSON object per image on stdout (docs/cli.md)");
  app->add_flag("--thumbnails", flags->thumbnails,
                "Request the training images (base64 PNG in --json output)");
  app->add_option("--sheet", flags->sheet,
                  "Write a contact sheet PNG; with several images OUT.png "
                  "becomes OUT-1.png, OUT-2.png, ...");
  app->add_option("--font", flags->font, "TrueType font of the contact sheet")
      ->envname("RETRACE_FONT")
      ->capture_default_str();
  app->add_option("--sheet-columns", flags->sheet_columns,
                  "Thumbnails per row on the contact sheet")
      ->capture_default_str()
      ->check(CLI::Range(1, 64));
  app->add_option("--query-timesteps", flags->query_timesteps,
                  "Timesteps per bucket for the query gradients; 0: the "
                  "server's default");
  app->add_option("--noise-draws", flags->noise_draws,
                  "Noise draws per timestep; 0: the server's default");
  app->add_option("--seed", flags->seed, "Seed of the query's noise")
      ->capture_default_str();
  app->add_option(
      "--checkpoints", flags->checkpoints,
      "Only these checkpoints, e.g. \"0,2\" or \"1-3\"; default all");
  app->add_option("--buckets", flags->buckets,
                  "Only these timestep buckets, e.g. \"0-4\"; default all");
  app->add_flag("--no-progress", flags->no_progress, "No progress on stderr");
  return Subcommand{
      app, [flags, connection] { return RunQuery(*flags, *connection); }};
}

}  // namespace retrace::client
