#include "server/router/router_engine.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/blocking_counter.h"
#include "common/status.h"
#include "server/service/grpc_status.h"
#include "server/service/page_token.h"

namespace retrace::router {
namespace {

constexpr char kPageTokenPrefix[] = "rsi1:";

double SecondsSince(absl::Time start) {
  return absl::ToDoubleSeconds(absl::Now() - start);
}

// The ranking order of one scan (kernels/scoring.h): higher (top list) or
// lower (bottom list) score first, ties by the lower global index, NaN last.
bool RanksBefore(const v1::AttributedSample& a, const v1::AttributedSample& b,
                 bool highest_first) {
  const bool a_nan = std::isnan(a.score()), b_nan = std::isnan(b.score());
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.score() != b.score()) {
    return highest_first ? a.score() > b.score() : a.score() < b.score();
  }
  return a.index() < b.index();
}

// The k first of the shards' lists in RanksBefore order, ranked from 1.
void MergeLists(std::vector<const v1::AttributedSample*> samples, int32_t k,
                bool highest_first,
                google::protobuf::RepeatedPtrField<v1::AttributedSample>* out) {
  std::sort(samples.begin(), samples.end(),
            [highest_first](const v1::AttributedSample* a,
                            const v1::AttributedSample* b) {
              return RanksBefore(*a, *b, highest_first);
            });
  const size_t n = std::min(samples.size(), static_cast<size_t>(k));
  for (size_t i = 0; i < n; ++i) {
    v1::AttributedSample* s = out->Add();
    *s = *samples[i];
    s->set_rank(static_cast<int32_t>(i + 1));
  }
}

// The calls of one fan-out, by shard.
template <typename Response>
struct Calls {
  std::vector<grpc::ClientContext> contexts;
  std::vector<Response> responses;
  std::vector<grpc::Status> statuses;
  std::vector<double> seconds;
};

// One call per wanted shard, all at once; waits for every answer. `start`
// issues the asynchronous call of shard i.
template <typename Response>
void CallAll(
    const std::vector<Shard>& shards, const ShardConnection& connection,
    absl::Time deadline, const std::vector<bool>& wanted,
    const std::function<void(size_t, grpc::ClientContext*, Response*,
                             std::function<void(grpc::Status)>)>& start,
    Calls<Response>* calls) {
  const size_t n = shards.size();
  calls->contexts = std::vector<grpc::ClientContext>(n);
  calls->responses.assign(n, Response());
  calls->statuses.assign(n, grpc::Status::OK);
  calls->seconds.assign(n, 0.0);
  int count = 0;
  for (size_t i = 0; i < n; ++i) count += wanted[i] ? 1 : 0;
  absl::BlockingCounter done(count);
  for (size_t i = 0; i < n; ++i) {
    if (!wanted[i]) continue;
    PrepareShardContext(connection, deadline, &calls->contexts[i]);
    const absl::Time begin = absl::Now();
    start(i, &calls->contexts[i], &calls->responses[i],
          [calls, i, begin, &done](grpc::Status status) {
            calls->statuses[i] = std::move(status);
            calls->seconds[i] = SecondsSince(begin);
            done.DecrementCount();
          });
  }
  done.Wait();
}

}  // namespace

scoring::StoreShape ShapeOf(const store::Manifest& manifest) {
  const store::StoreSpec& spec = manifest.spec;
  scoring::StoreShape shape;
  shape.num_checkpoints = static_cast<int32_t>(spec.num_checkpoints());
  shape.num_buckets = static_cast<int32_t>(spec.num_buckets());
  shape.has_replay = spec.buckets.replay;
  shape.dim = spec.projection.dim;
  for (const auto& checkpoint : spec.model.checkpoints) {
    shape.checkpoint_weights.push_back(static_cast<float>(checkpoint.weight));
  }
  return shape;
}

namespace {

service::QueryInputParts InputParts(const ShardTopology& topology,
                                    service::QueryFeaturizer* featurizer,
                                    metrics::Metrics* metrics, Clock* clock) {
  service::QueryInputParts parts;
  parts.shape = ShapeOf(topology.manifest);
  parts.store_id = topology.info.store_id();
  parts.featurizer = featurizer;
  parts.metrics = metrics;
  parts.clock = clock;
  return parts;
}

}  // namespace

RouterEngine::RouterEngine(RouterOptions options, ShardTopology topology,
                           service::QueryFeaturizer* featurizer,
                           metrics::Metrics* metrics, Clock* clock)
    : options_(std::move(options)),
      shape_(ShapeOf(topology.manifest)),
      featurizer_(featurizer),
      metrics_(metrics),
      clock_(clock),
      input_(InputParts(topology, featurizer, metrics, clock)),
      topology_(std::make_shared<const ShardTopology>(std::move(topology))) {}

std::shared_ptr<const ShardTopology> RouterEngine::topology() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return topology_;
}

std::vector<Shard> RouterEngine::shards() const { return topology()->shards; }

absl::Status RouterEngine::ShardError(const Shard& shard,
                                      const absl::Status& status,
                                      absl::Time deadline) const {
  const std::string what =
      absl::StrCat(DescribeShard(shard), ": ", status.ToString());
  if (absl::IsDeadlineExceeded(status) && absl::Now() >= deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("the deadline passed waiting for ", what));
  }
  if (absl::IsResourceExhausted(status) || absl::IsFailedPrecondition(status)) {
    return absl::Status(status.code(), what);
  }
  // Down, slow, serving another store, or refusing what this router checked
  // already: the deployment's fault, not the request's.
  return absl::UnavailableError(what);
}

absl::StatusOr<v1::AttributeResponse> RouterEngine::Attribute(
    const v1::AttributeRequest& request, absl::Time deadline) {
  const std::shared_ptr<const ShardTopology> topology = this->topology();
  const std::string& store_id = topology->info.store_id();
  v1::AttributeResponse response;
  response.set_request_id(request.request_id());
  response.set_store_id(store_id);
  ASSIGN_OR_RETURN(service::CheckedRequest checked,
                   service::CheckAttributeRequest(
                       request, shape_, topology->manifest.num_samples));
  ASSIGN_OR_RETURN(scoring::BucketQuery vectors,
                   input_.Vectors(request, deadline, &response));
  RETURN_IF_ERROR(
      scoring::PlanQuery(shape_, vectors, checked.query.plan).status());
  RETURN_IF_ERROR(
      service::CheckDeadline(*clock_, deadline, "asking the shards"));

  // The shards get the projected query and everything else as asked.
  v1::AttributeRequest shard_request = request;
  shard_request.clear_input();
  v1::QueryVectors* q = shard_request.mutable_query_vectors();
  q->set_num_checkpoints(shape_.num_checkpoints);
  q->set_num_slots(shape_.num_buckets);
  q->set_dim(static_cast<int32_t>(shape_.dim));
  q->mutable_raw()->Add(vectors.raw.begin(), vectors.raw.end());
  q->mutable_unit()->Add(vectors.unit.begin(), vectors.unit.end());
  q->set_store_id(store_id);
  shard_request.set_top_k(checked.query.k);
  shard_request.set_allow_partial(false);

  const std::vector<Shard>& shards = topology->shards;
  const absl::Time shard_deadline =
      std::min(deadline, absl::Now() + options_.shard_timeout);
  const absl::Time fan_out_start = absl::Now();
  Calls<v1::AttributeResponse> calls;
  CallAll<v1::AttributeResponse>(
      shards, options_.connection, shard_deadline,
      std::vector<bool>(shards.size(), true),
      [&](size_t i, grpc::ClientContext* context, v1::AttributeResponse* out,
          std::function<void(grpc::Status)> done) {
        shards[i].stub->async()->Attribute(context, &shard_request, out,
                                           std::move(done));
      },
      &calls);
  const double fan_out_seconds = SecondsSince(fan_out_start);

  const absl::Time select_start = absl::Now();
  const std::vector<v1::Method>& methods = checked.methods;
  std::vector<const v1::AttributeResponse*> answered;
  for (size_t i = 0; i < shards.size(); ++i) {
    absl::Status status = service::FromGrpcStatus(calls.statuses[i]);
    const v1::AttributeResponse& r = calls.responses[i];
    if (status.ok() && r.store_id() != store_id) {
      status = absl::UnavailableError(absl::StrCat("answered for store ",
                                                   QuoteForError(r.store_id()),
                                                   ", not ", store_id));
    }
    if (status.ok() && r.results_size() != static_cast<int>(methods.size())) {
      status = absl::UnavailableError(
          absl::StrCat("answered ", r.results_size(), " method results for ",
                       methods.size(), " asked"));
    }
    for (int m = 0; status.ok() && m < r.results_size(); ++m) {
      if (r.results(m).method() != methods[static_cast<size_t>(m)]) {
        status = absl::UnavailableError("answered the methods out of order");
      }
    }
    if (metrics_ != nullptr) {
      metrics_->ObserveShardCall(shards[i].address,
                                 absl::StatusCodeToString(status.code()),
                                 calls.seconds[i]);
    }
    if (status.ok()) {
      answered.push_back(&r);
      continue;
    }
    const absl::Status error = ShardError(shards[i], status, deadline);
    if (!request.allow_partial() || !absl::IsUnavailable(error)) return error;
    v1::SampleRange* missing = response.add_missing_ranges();
    missing->set_first_sample(shards[i].first_sample);
    missing->set_end_sample(shards[i].end_sample);
    missing->set_shard(shards[i].address);
    missing->set_reason(std::string(status.message()));
  }
  if (answered.empty()) {
    return absl::UnavailableError(absl::StrCat(
        "no shard answered; the first: ", response.missing_ranges(0).shard(),
        ": ", response.missing_ranges(0).reason()));
  }

  // Queue and score are the slowest shard's: the answer waited for it.
  double queue = 0, score = 0;
  for (const v1::AttributeResponse* r : answered) {
    for (const v1::StageTiming& t : r->timings()) {
      if (t.stage() == "queue") queue = std::max(queue, t.milliseconds());
      if (t.stage() == "score") score = std::max(score, t.milliseconds());
    }
  }
  input_.AddTiming("queue", metrics::Stage::kQueue, queue / 1e3, &response);
  input_.AddTiming("score", metrics::Stage::kScore, score / 1e3, &response);
  v1::StageTiming* shards_timing = response.add_timings();
  shards_timing->set_stage("shards");
  shards_timing->set_milliseconds(fan_out_seconds * 1e3);

  for (size_t m = 0; m < methods.size(); ++m) {
    std::vector<const v1::AttributedSample*> top, bottom;
    for (const v1::AttributeResponse* r : answered) {
      const v1::MethodResult& result = r->results(static_cast<int>(m));
      for (const v1::AttributedSample& s : result.proponents()) {
        top.push_back(&s);
      }
      for (const v1::AttributedSample& s : result.opponents()) {
        bottom.push_back(&s);
      }
    }
    v1::MethodResult* out = response.add_results();
    out->set_method(methods[m]);
    MergeLists(std::move(top), checked.query.k, /*highest_first=*/true,
               out->mutable_proponents());
    MergeLists(std::move(bottom), checked.query.k, /*highest_first=*/false,
               out->mutable_opponents());
  }
  input_.AddTiming("select", metrics::Stage::kSelect,
                   SecondsSince(select_start), &response);
  return response;
}

absl::StatusOr<v1::SelfInfluenceResponse> RouterEngine::SelfInfluence(
    const v1::SelfInfluenceRequest& request, absl::Time deadline) {
  const std::shared_ptr<const ShardTopology> topology = this->topology();
  const std::vector<Shard>& shards = topology->shards;
  ASSIGN_OR_RETURN(const service::SelfInfluencePage page,
                   service::CheckSelfInfluenceRequest(request));
  // Each shard's position in its own listing.
  std::vector<int64_t> offsets(shards.size(), 0);
  if (!request.page_token().empty()) {
    const std::string& token = request.page_token();
    const auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(
          absl::StrCat("page_token ", QuoteForError(token), " ", why,
                       "; pass the next_page_token of the previous page"));
    };
    if (token.size() > 32 + 21 * shards.size()) return bad("is too long");
    absl::string_view rest = token;
    if (!absl::ConsumePrefix(&rest, kPageTokenPrefix)) {
      return bad("is not a router's page token");
    }
    std::vector<absl::string_view> parts = absl::StrSplit(rest, ':');
    int column = -1;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &column) ||
        (column != 0 && column != 1)) {
      return bad("is malformed");
    }
    if (column != page.column) {
      return absl::InvalidArgumentError(
          "page_token belongs to a listing of the other method");
    }
    std::vector<absl::string_view> values = absl::StrSplit(parts[1], ',');
    if (values.size() != shards.size()) {
      return bad("was made for another set of shards");
    }
    for (size_t i = 0; i < shards.size(); ++i) {
      const int64_t n = shards[i].end_sample - shards[i].first_sample;
      if (!absl::SimpleAtoi(values[i], &offsets[i]) || offsets[i] < 0 ||
          offsets[i] > n) {
        return bad("is malformed");
      }
    }
  }
  RETURN_IF_ERROR(
      service::CheckDeadline(*clock_, deadline, "asking the shards"));

  std::vector<bool> wanted(shards.size());
  std::vector<v1::SelfInfluenceRequest> requests(shards.size());
  for (size_t i = 0; i < shards.size(); ++i) {
    const int64_t n = shards[i].end_sample - shards[i].first_sample;
    wanted[i] = offsets[i] < n;
    requests[i].set_method(page.column == 0 ? v1::TRACIN : v1::RETRAC);
    requests[i].set_page_size(page.page_size);
    if (offsets[i] > 0) {
      requests[i].set_page_token(
          service::EncodePageToken({page.column, offsets[i]}));
    }
  }
  Calls<v1::SelfInfluenceResponse> calls;
  CallAll<v1::SelfInfluenceResponse>(
      shards, options_.connection,
      std::min(deadline, absl::Now() + options_.shard_timeout), wanted,
      [&](size_t i, grpc::ClientContext* context,
          v1::SelfInfluenceResponse* out,
          std::function<void(grpc::Status)> done) {
        shards[i].stub->async()->SelfInfluence(context, &requests[i], out,
                                               std::move(done));
      },
      &calls);
  for (size_t i = 0; i < shards.size(); ++i) {
    if (!wanted[i]) continue;
    absl::Status status = service::FromGrpcStatus(calls.statuses[i]);
    const int64_t n = shards[i].end_sample - shards[i].first_sample;
    const int64_t expected = std::min<int64_t>(page.page_size, n - offsets[i]);
    if (status.ok() && calls.responses[i].samples_size() != expected) {
      status = absl::UnavailableError(
          absl::StrCat("answered ", calls.responses[i].samples_size(),
                       " samples for a page of ", expected));
    }
    if (metrics_ != nullptr) {
      metrics_->ObserveShardCall(shards[i].address,
                                 absl::StatusCodeToString(status.code()),
                                 calls.seconds[i]);
    }
    if (!status.ok()) return ShardError(shards[i], status, deadline);
  }

  // A k-way merge of the shards' pages in the listing's order (highest
  // first, ties by the lower index).
  int64_t position = 0;
  for (int64_t o : offsets) position += o;
  std::vector<int> heads(shards.size(), 0);
  v1::SelfInfluenceResponse response;
  for (int32_t taken = 0; taken < page.page_size; ++taken) {
    int best = -1;
    for (size_t i = 0; i < shards.size(); ++i) {
      if (!wanted[i] || heads[i] >= calls.responses[i].samples_size()) continue;
      if (best < 0 ||
          RanksBefore(calls.responses[i].samples(heads[i]),
                      calls.responses[static_cast<size_t>(best)].samples(
                          heads[static_cast<size_t>(best)]),
                      /*highest_first=*/true)) {
        best = static_cast<int>(i);
      }
    }
    if (best < 0) break;
    const size_t b = static_cast<size_t>(best);
    v1::AttributedSample* s = response.add_samples();
    *s = calls.responses[b].samples(heads[b]);
    ++heads[b];
    ++offsets[b];
    s->set_rank(static_cast<int32_t>(++position));
  }
  if (position < topology->manifest.num_samples) {
    response.set_next_page_token(absl::StrCat(
        kPageTokenPrefix, page.column, ":", absl::StrJoin(offsets, ",")));
  }
  return response;
}

absl::StatusOr<v1::StoreInfo> RouterEngine::StoreInfo(
    const v1::GetStoreInfoRequest& request) const {
  const std::shared_ptr<const ShardTopology> topology = this->topology();
  v1::StoreInfo info = topology->info;
  info.set_num_samples(topology->manifest.num_samples);
  info.set_store_bytes(topology->store_bytes);
  info.set_role("router");
  info.set_served_first_sample(0);
  info.set_served_end_sample(topology->manifest.num_samples);
  info.set_part_index(0);
  info.set_num_parts(1);
  info.clear_image_shape();
  info.set_accepts_images(featurizer_ != nullptr);
  if (featurizer_ != nullptr) {
    for (int64_t d : featurizer_->image_shape()) info.add_image_shape(d);
  }
  for (const Shard& shard : topology->shards) {
    v1::SampleRange* range = info.add_shards();
    range->set_first_sample(shard.first_sample);
    range->set_end_sample(shard.end_sample);
    range->set_shard(shard.address);
  }
  if (request.include_manifest()) {
    ASSIGN_OR_RETURN(*info.mutable_manifest_json(),
                     topology->manifest.Serialize());
  }
  return info;
}

absl::Status RouterEngine::Watch(absl::Time deadline) {
  const std::shared_ptr<const ShardTopology> current = topology();
  ASSIGN_OR_RETURN(std::vector<std::string> addresses,
                   ResolveShardAddresses(options_.shards));
  std::vector<std::string> known;
  for (const Shard& shard : current->shards) known.push_back(shard.address);
  std::sort(addresses.begin(), addresses.end());
  std::sort(known.begin(), known.end());
  if (addresses == known) {
    // The same shards: each must still serve its range of the store.
    const std::vector<Shard>& shards = current->shards;
    v1::GetStoreInfoRequest request;
    Calls<v1::StoreInfo> calls;
    CallAll<v1::StoreInfo>(
        shards, options_.connection, deadline,
        std::vector<bool>(shards.size(), true),
        [&](size_t i, grpc::ClientContext* context, v1::StoreInfo* out,
            std::function<void(grpc::Status)> done) {
          shards[i].stub->async()->GetStoreInfo(context, &request, out,
                                                std::move(done));
        },
        &calls);
    for (size_t i = 0; i < shards.size(); ++i) {
      const v1::StoreInfo& info = calls.responses[i];
      if (!calls.statuses[i].ok()) {
        return absl::UnavailableError(absl::StrCat(
            DescribeShard(shards[i]), ": ",
            service::FromGrpcStatus(calls.statuses[i]).ToString()));
      }
      if (info.store_id() != current->info.store_id() ||
          info.served_first_sample() != shards[i].first_sample ||
          info.served_end_sample() != shards[i].end_sample) {
        return absl::UnavailableError(absl::StrCat(
            DescribeShard(shards[i]), " now serves samples [",
            info.served_first_sample(), ", ", info.served_end_sample(),
            ") of store ", info.store_id()));
      }
    }
    return absl::OkStatus();
  }
  // Shards came or went (a pod restarted with a new address): discover
  // again, and take the new layout if it serves the same store.
  ASSIGN_OR_RETURN(ShardTopology fresh,
                   DiscoverShards(addresses, options_.connection, deadline));
  if (fresh.info.store_id() != current->info.store_id()) {
    return absl::UnavailableError(
        absl::StrCat("the shards now serve store ", fresh.info.store_id(),
                     "; this router was started for ", current->info.store_id(),
                     " (restart it)"));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  topology_ = std::make_shared<const ShardTopology>(std::move(fresh));
  return absl::OkStatus();
}

}  // namespace retrace::router
