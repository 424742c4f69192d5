// `retrace self-influence`, `retrace info` and `retrace health`: the calls
// about the served store and the server rather than about one image.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "client/command.h"
#include "client/format.h"

namespace retrace::client {
namespace {

struct SelfInfluenceFlags {
  int64_t top = 20;
  std::string method = "retrac";
  int32_t page_size = 0;
  bool json = false;
};

int RunSelfInfluence(const SelfInfluenceFlags& flags,
                     const ConnectionFlags& connection) {
  constexpr char kCommand[] = "self-influence";
  if (flags.top < 1) {
    return ReportUsage(
        kCommand, absl::StrCat("--top must be at least 1, got ", flags.top));
  }
  int exit_code = kExitOk;
  std::unique_ptr<Client> client =
      ConnectOrReport(kCommand, connection, &exit_code);
  if (client == nullptr) return exit_code;
  const v1::Method method = flags.method == "tracin" ? v1::TRACIN : v1::RETRAC;
  // One page for the usual --top; large requests page in 1000s.
  constexpr int64_t kDefaultPage = 1000;
  const int32_t page_size =
      flags.page_size > 0
          ? flags.page_size
          : static_cast<int32_t>(std::min(flags.top, kDefaultPage));
  absl::StatusOr<std::vector<v1::AttributedSample>> samples =
      client->TopSelfInfluence(method, flags.top, page_size);
  if (!samples.ok()) return ReportServerError(kCommand, "", samples.status());
  if (flags.json) {
    std::printf("%s\n", SelfInfluenceJson(method, *samples).dump().c_str());
  } else {
    std::printf("%s", FormatSelfInfluenceText(method, *samples).c_str());
  }
  return kExitOk;
}

int RunInfo(bool json, const ConnectionFlags& connection) {
  constexpr char kCommand[] = "info";
  int exit_code = kExitOk;
  std::unique_ptr<Client> client =
      ConnectOrReport(kCommand, connection, &exit_code);
  if (client == nullptr) return exit_code;
  absl::StatusOr<v1::StoreInfo> info = client->GetStoreInfo();
  if (!info.ok()) return ReportServerError(kCommand, "", info.status());
  if (json) {
    std::printf("%s\n", StoreInfoJson(*info).dump().c_str());
  } else {
    std::printf("%s", FormatStoreInfoText(*info).c_str());
  }
  return kExitOk;
}

int RunHealth(const std::string& service, const ConnectionFlags& connection) {
  constexpr char kCommand[] = "health";
  int exit_code = kExitOk;
  std::unique_ptr<Client> client =
      ConnectOrReport(kCommand, connection, &exit_code);
  if (client == nullptr) return exit_code;
  absl::StatusOr<ServingStatus> status = client->CheckHealth(service);
  if (!status.ok()) return ReportServerError(kCommand, "", status.status());
  std::printf("%s\n", std::string(ServingStatusName(*status)).c_str());
  return *status == ServingStatus::kServing ? kExitOk : kExitServer;
}

}  // namespace

Subcommand RegisterSelfInfluenceCommand(CLI::App& parent,
                                        const ConnectionFlags* connection) {
  auto flags = std::make_shared<SelfInfluenceFlags>();
  CLI::App* app = parent.add_subcommand(
      "self-influence",
      "Training samples ranked by self-influence, highest first (outlier "
      "candidates)");
  app->add_option("--top", flags->top, "How many samples")
      ->capture_default_str();
  app->add_option("--method", flags->method, "tracin or retrac")
      ->capture_default_str()
      ->check(CLI::IsMember({"tracin", "retrac"}));
  app->add_option("--page-size", flags->page_size,
                  "Samples per call (default: --top, at most 1000)")
      ->check(CLI::Range(1, 10000));
  app->add_flag("--json", flags->json, "One JSON object on stdout");
  return Subcommand{app, [flags, connection] {
                      return RunSelfInfluence(*flags, *connection);
                    }};
}

Subcommand RegisterInfoCommand(CLI::App& parent,
                               const ConnectionFlags* connection) {
  auto json = std::make_shared<bool>(false);
  CLI::App* app = parent.add_subcommand(
      "info",
      "The served store: summary, gradient-norm statistics per checkpoint "
      "and timestep bucket, Spearman correlation of timestep and norm");
  app->add_flag("--json", *json, "One JSON object on stdout");
  return Subcommand{app,
                    [json, connection] { return RunInfo(*json, *connection); }};
}

Subcommand RegisterHealthCommand(CLI::App& parent,
                                 const ConnectionFlags* connection) {
  auto service = std::make_shared<std::string>();
  CLI::App* app = parent.add_subcommand(
      "health",
      "grpc.health.v1 check: prints SERVING or NOT_SERVING; exit 0 only when "
      "SERVING");
  app->add_option("--service", *service,
                  "Service to ask about (default: the whole server), e.g. "
                  "retrace.v1.Attribution");
  return Subcommand{
      app, [service, connection] { return RunHealth(*service, *connection); }};
}

}  // namespace retrace::client
