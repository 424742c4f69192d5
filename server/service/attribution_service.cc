#include "server/service/attribution_service.h"

#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/file_util.h"
#include "common/status.h"
#include "server/service/grpc_status.h"

namespace retrace::service {
namespace {

constexpr char kBearerPrefix[] = "Bearer ";

// Compares without an early exit, so the time taken does not tell how much
// of a guessed token was right.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  }
  return diff == 0;
}

absl::Time Deadline(const grpc::ServerContext* context) {
  const auto deadline = context->deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(deadline);
}

}  // namespace

absl::StatusOr<std::vector<std::string>> LoadTokenFile(
    const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  std::vector<std::string> tokens;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    tokens.emplace_back(line);
  }
  if (tokens.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": no token in the token file"));
  }
  return tokens;
}

// Counts a request as in flight for its lifetime; refuses one beyond the
// limit.
class AttributionService::Admission {
 public:
  explicit Admission(AttributionService* service) : service_(service) {
    const int32_t now = service_->in_flight_.fetch_add(1) + 1;
    admitted_ = now <= service_->options_.max_concurrent;
    if (service_->metrics_ != nullptr) service_->metrics_->AddInFlight(1);
  }
  ~Admission() {
    service_->in_flight_.fetch_sub(1);
    if (service_->metrics_ != nullptr) service_->metrics_->AddInFlight(-1);
  }
  absl::Status status() const {
    if (admitted_) return absl::OkStatus();
    return absl::ResourceExhaustedError(
        absl::StrCat("too many concurrent requests (the limit is ",
                     service_->options_.max_concurrent, "); retry later"));
  }

 private:
  AttributionService* const service_;
  bool admitted_ = false;
};

AttributionService::AttributionService(ServiceOptions options,
                                       metrics::Metrics* metrics)
    : options_(std::move(options)), metrics_(metrics) {}

void AttributionService::SetEngine(ServingEngine* engine) {
  engine_.store(engine);
}

void AttributionService::StartDraining() { draining_.store(true); }

absl::Status AttributionService::Authenticate(
    grpc::ServerContext* context) const {
  if (options_.tokens.empty()) return absl::OkStatus();
  const auto& metadata = context->client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "missing 'authorization: Bearer <token>' metadata");
  }
  const absl::string_view value(it->second.data(), it->second.size());
  if (!absl::StartsWith(value, kBearerPrefix)) {
    return absl::UnauthenticatedError(
        "the authorization metadata is not of the form 'Bearer <token>'");
  }
  const absl::string_view token = value.substr(sizeof(kBearerPrefix) - 1);
  bool match = false;
  for (const std::string& t : options_.tokens) {
    match |= ConstantTimeEquals(token, t);
  }
  if (!match)
    return absl::UnauthenticatedError("the bearer token is not valid");
  return absl::OkStatus();
}

absl::StatusOr<ServingEngine*> AttributionService::Gate(
    grpc::ServerContext* context) const {
  if (draining_.load()) {
    return absl::UnavailableError("the server is shutting down");
  }
  ServingEngine* engine = engine_.load();
  if (engine == nullptr) {
    return absl::UnavailableError("the server is still loading its store");
  }
  RETURN_IF_ERROR(Authenticate(context));
  return engine;
}

grpc::Status AttributionService::Finish(absl::string_view method,
                                        absl::Time start,
                                        const absl::Status& status) {
  const grpc::Status wire = ToGrpcStatus(status);
  if (metrics_ != nullptr) {
    metrics_->CountRequest(method, CodeName(wire.error_code()));
    metrics_->ObserveRequest(method,
                             absl::ToDoubleSeconds(absl::Now() - start));
  }
  return wire;
}

absl::StatusOr<v1::AttributeResponse> AttributionService::AttributeOne(
    grpc::ServerContext* context, ServingEngine* engine,
    const v1::AttributeRequest& request) {
  Admission admission(this);
  RETURN_IF_ERROR(admission.status());
  if (context->IsCancelled()) {
    return absl::CancelledError("the client cancelled the request");
  }
  return engine->Attribute(request, Deadline(context));
}

grpc::Status AttributionService::Attribute(grpc::ServerContext* context,
                                           const v1::AttributeRequest* request,
                                           v1::AttributeResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<ServingEngine*> engine = Gate(context);
  if (!engine.ok()) return Finish("Attribute", start, engine.status());
  absl::StatusOr<v1::AttributeResponse> r =
      AttributeOne(context, *engine, *request);
  if (r.ok()) *response = std::move(*r);
  return Finish("Attribute", start, r.status());
}

grpc::Status AttributionService::AttributeStream(
    grpc::ServerContext* context,
    grpc::ServerReaderWriter<v1::AttributeStreamResponse, v1::AttributeRequest>*
        stream) {
  const absl::Time start = absl::Now();
  absl::StatusOr<ServingEngine*> engine = Gate(context);
  if (!engine.ok()) return Finish("AttributeStream", start, engine.status());

  // Requests are processed concurrently (so that they can share batches) and
  // answered in request order by a writer thread. `pending` holds those not
  // yet written, oldest first.
  std::mutex mutex;
  std::condition_variable changed;
  std::deque<std::future<v1::AttributeStreamResponse>> pending;
  bool reading_done = false;
  std::thread writer([&] {
    while (true) {
      std::future<v1::AttributeStreamResponse>* next = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex);
        changed.wait(lock, [&] { return reading_done || !pending.empty(); });
        if (pending.empty()) return;
        next = &pending.front();  // deque: stays valid across push_back
      }
      // The request counts against the reader's limit until it is answered.
      stream->Write(next->get());  // a failed write: the client went away
      {
        std::lock_guard<std::mutex> lock(mutex);
        pending.pop_front();
      }
      changed.notify_all();  // room for the reader
    }
  });
  v1::AttributeRequest request;
  while (stream->Read(&request)) {
    // At most max_concurrent requests of a stream are outstanding; beyond,
    // the stream stops reading (gRPC flow control then holds the client back)
    // rather than starting a thread per request only to refuse it.
    {
      std::unique_lock<std::mutex> lock(mutex);
      changed.wait(lock, [&] {
        return static_cast<int32_t>(pending.size()) < options_.max_concurrent;
      });
    }
    std::future<v1::AttributeStreamResponse> f =
        std::async(std::launch::async, [this, context, e = *engine, request] {
          const absl::Time one_start = absl::Now();
          absl::StatusOr<v1::AttributeResponse> r =
              AttributeOne(context, e, request);
          const grpc::Status wire =
              Finish("AttributeStream", one_start, r.status());
          v1::AttributeStreamResponse out;
          out.set_request_id(request.request_id());
          if (r.ok()) {
            *out.mutable_response() = std::move(*r);
          } else {
            out.set_error_code(wire.error_code());
            out.set_error_message(wire.error_message());
          }
          return out;
        });
    {
      std::lock_guard<std::mutex> lock(mutex);
      pending.push_back(std::move(f));
    }
    changed.notify_all();
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    reading_done = true;
  }
  changed.notify_all();
  writer.join();
  return grpc::Status::OK;
}

grpc::Status AttributionService::SelfInfluence(
    grpc::ServerContext* context, const v1::SelfInfluenceRequest* request,
    v1::SelfInfluenceResponse* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<ServingEngine*> engine = Gate(context);
  if (!engine.ok()) return Finish("SelfInfluence", start, engine.status());
  Admission admission(this);
  absl::Status status = admission.status();
  if (status.ok()) {
    absl::StatusOr<v1::SelfInfluenceResponse> r =
        (*engine)->SelfInfluence(*request, Deadline(context));
    status = r.status();
    if (r.ok()) *response = std::move(*r);
  }
  return Finish("SelfInfluence", start, status);
}

grpc::Status AttributionService::GetStoreInfo(
    grpc::ServerContext* context, const v1::GetStoreInfoRequest* request,
    v1::StoreInfo* response) {
  const absl::Time start = absl::Now();
  absl::StatusOr<ServingEngine*> engine = Gate(context);
  if (!engine.ok()) return Finish("GetStoreInfo", start, engine.status());
  absl::StatusOr<v1::StoreInfo> info = (*engine)->StoreInfo(*request);
  if (info.ok()) *response = std::move(*info);
  return Finish("GetStoreInfo", start, info.status());
}

}  // namespace retrace::service
