// What the retrace CLI prints: aligned plain-text tables for people and JSON
// documents (nlohmann::json) for programs. Pure functions of the responses;
// docs/cli.md documents the JSON schema, which only grows (fields are never
// renamed or removed).
#ifndef RETRACE_CLIENT_FORMAT_H_
#define RETRACE_CLIENT_FORMAT_H_

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "retrace/v1/attribution.pb.h"

namespace retrace::client {

struct AttributeFormatOptions {
  bool opponents = false;  // print/emit the opponents lists
  bool breakdown = false;  // print/emit the per-(checkpoint, slot) terms
  // Text only: how many terms (largest |value| first) to show per sample.
  int breakdown_terms = 3;
  // JSON only: thumbnails as base64 PNG ("thumbnail_png_base64").
  bool thumbnails = false;
  // When set (not owned), breakdown slots are named by their timestep range
  // ("t300-399", "replay") instead of their index.
  const v1::StoreInfo* store = nullptr;
};

// A fixed-width number as the tables show it: 6 significant digits.
std::string FormatScore(double score);

// The slot of a breakdown term: "t300-399" / "replay" when `store` (may be
// null) describes the slot, else "slot 3".
std::string SlotName(int32_t slot, const v1::StoreInfo* store);

// Human-readable result of one query: a table per method (rank, index,
// sample id, label, label name when any, score), opponents and breakdowns
// when asked, and the stage timings. `image` names the query.
std::string FormatAttributeText(absl::string_view image,
                                const v1::AttributeResponse& response,
                                const AttributeFormatOptions& options);

// {"image", "store_id", "request_id", "results": {"tracin"|"retrac":
//   {"proponents": [sample...], "opponents": [sample...]}},
//  "timings_ms": {stage: ms}}; sample = {"rank", "index", "sample_id",
//  "label", "label_name", "score", ["breakdown": [{"checkpoint", "slot",
//  "value"}]], ["thumbnail_png_base64"]}. "opponents" is always present
// (empty unless asked).
nlohmann::json AttributeJson(absl::string_view image,
                             const v1::AttributeResponse& response,
                             const AttributeFormatOptions& options);

// {"image", "error": {"code": "INVALID_ARGUMENT", "message"}}: one failed
// query in a multi-image JSON output.
nlohmann::json AttributeErrorJson(absl::string_view image,
                                  const absl::Status& status);

// Ranked self-influence table.
std::string FormatSelfInfluenceText(
    v1::Method method, const std::vector<v1::AttributedSample>& samples);
// {"method": "retrac", "samples": [{"rank", "index", "sample_id", "label",
//  "label_name", "score"}]}.
nlohmann::json SelfInfluenceJson(
    v1::Method method, const std::vector<v1::AttributedSample>& samples);

// Store summary, the norm diagnostics per (checkpoint, slot) as a table and
// per checkpoint the Spearman correlation of timestep and norm with the
// max/min ratio of the bucket medians.
std::string FormatStoreInfoText(const v1::StoreInfo& info);
// Every StoreInfo field under its proto name, with numbers as JSON numbers;
// "diagnostics" entries carry "checkpoint", "slot", "replay" (bool),
// "timestep_begin", "timestep_end", "norm_mean", "norm_median", "norm_p95".
nlohmann::json StoreInfoJson(const v1::StoreInfo& info);

}  // namespace retrace::client

#endif  // RETRACE_CLIENT_FORMAT_H_
