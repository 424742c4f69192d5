#include "server/router/shard_set.h"

#include <grpcpp/grpcpp.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/blocking_counter.h"
#include "common/file_util.h"
#include "common/status.h"
#include "server/service/grpc_status.h"

namespace retrace::router {
namespace {

constexpr char kDnsPrefix[] = "dns:///";

// Retries of UNAVAILABLE with exponential backoff: a shard restarting or a
// connection reset costs a retry, not an error. gRPC retries only while the
// call's deadline allows.
constexpr char kServiceConfig[] = R"({
  "methodConfig": [{
    "name": [{"service": "retrace.v1.Attribution"}],
    "retryPolicy": {
      "maxAttempts": 3,
      "initialBackoff": "0.05s",
      "maxBackoff": "0.5s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
})";

absl::StatusOr<std::vector<std::string>> ResolveDns(absl::string_view target) {
  const size_t colon = target.rfind(':');
  int port = 0;
  if (colon == absl::string_view::npos || colon == 0 ||
      !absl::SimpleAtoi(target.substr(colon + 1), &port) || port < 1 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "shards: '", kDnsPrefix, target, "' needs the form dns:///NAME:PORT"));
  }
  const std::string host(target.substr(0, colon));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &found);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("shards: cannot resolve '", host,
                                               "': ", ::gai_strerror(rc)));
  }
  std::vector<std::string> addresses;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char text[NI_MAXHOST];
    if (::getnameinfo(a->ai_addr, a->ai_addrlen, text, sizeof(text), nullptr, 0,
                      NI_NUMERICHOST) != 0) {
      continue;
    }
    addresses.push_back(a->ai_family == AF_INET6
                            ? absl::StrCat("[", text, "]:", port)
                            : absl::StrCat(text, ":", port));
  }
  ::freeaddrinfo(found);
  std::sort(addresses.begin(), addresses.end());
  addresses.erase(std::unique(addresses.begin(), addresses.end()),
                  addresses.end());
  if (addresses.empty()) {
    return absl::UnavailableError(
        absl::StrCat("shards: '", host, "' resolves to no address"));
  }
  return addresses;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ResolveShardAddresses(
    const std::string& spec) {
  absl::string_view rest = spec;
  if (absl::ConsumePrefix(&rest, kDnsPrefix)) return ResolveDns(rest);
  std::vector<std::string> addresses;
  for (absl::string_view entry : absl::StrSplit(spec, ',')) {
    entry = absl::StripAsciiWhitespace(entry);
    if (entry.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("shards: empty entry in ", QuoteForError(spec),
                       "; give host:port,host:port or dns:///NAME:PORT"));
    }
    addresses.emplace_back(entry);
  }
  return addresses;
}

absl::StatusOr<std::shared_ptr<v1::Attribution::StubInterface>> ConnectShard(
    const std::string& address, const ShardConnection& connection) {
  std::shared_ptr<grpc::ChannelCredentials> credentials =
      grpc::InsecureChannelCredentials();
  if (!connection.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(connection.tls_ca_file));
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments arguments;
  arguments.SetServiceConfigJSON(kServiceConfig);
  arguments.SetMaxReceiveMessageSize(
      static_cast<int>(connection.max_message_bytes));
  arguments.SetMaxSendMessageSize(
      static_cast<int>(connection.max_message_bytes));
  return std::shared_ptr<v1::Attribution::StubInterface>(
      v1::Attribution::NewStub(
          grpc::CreateCustomChannel(address, credentials, arguments)));
}

void PrepareShardContext(const ShardConnection& connection, absl::Time deadline,
                         grpc::ClientContext* context) {
  context->set_deadline(absl::ToChronoTime(deadline));
  if (!connection.token.empty()) {
    context->AddMetadata("authorization",
                         absl::StrCat("Bearer ", connection.token));
  }
}

std::string DescribeShard(const Shard& shard) {
  return absl::StrCat("shard ", shard.address, " (samples [",
                      shard.first_sample, ", ", shard.end_sample, "))");
}

absl::StatusOr<ShardTopology> DiscoverShards(
    const std::vector<std::string>& addresses,
    const ShardConnection& connection, absl::Time deadline) {
  if (addresses.empty()) {
    return absl::InvalidArgumentError("shards: the list is empty");
  }
  const size_t n = addresses.size();
  std::vector<Shard> shards(n);
  for (size_t i = 0; i < n; ++i) {
    shards[i].address = addresses[i];
    ASSIGN_OR_RETURN(shards[i].stub, ConnectShard(addresses[i], connection));
  }
  struct Call {
    grpc::ClientContext context;
    v1::GetStoreInfoRequest request;
    v1::StoreInfo info;
    grpc::Status status;
  };
  std::vector<Call> calls(n);
  absl::BlockingCounter done(static_cast<int>(n));
  for (size_t i = 0; i < n; ++i) {
    Call& call = calls[i];
    call.request.set_include_manifest(i == 0);
    PrepareShardContext(connection, deadline, &call.context);
    shards[i].stub->async()->GetStoreInfo(&call.context, &call.request,
                                          &call.info,
                                          [&call, &done](grpc::Status status) {
                                            call.status = std::move(status);
                                            done.DecrementCount();
                                          });
  }
  done.Wait();

  ShardTopology topology;
  for (size_t i = 0; i < n; ++i) {
    if (!calls[i].status.ok()) {
      return absl::UnavailableError(
          absl::StrCat("shard ", addresses[i], " did not describe its store: ",
                       service::FromGrpcStatus(calls[i].status).ToString()));
    }
  }
  const v1::StoreInfo& first = calls[0].info;
  ASSIGN_OR_RETURN(topology.manifest,
                   store::Manifest::Parse(
                       first.manifest_json(),
                       absl::StrCat("shard ", addresses[0], " manifest.json")));
  ASSIGN_OR_RETURN(const std::string computed_id,
                   store::ComputeStoreId(topology.manifest.spec,
                                         topology.manifest.num_samples,
                                         topology.manifest.shards));
  if (computed_id != first.store_id()) {
    return absl::UnavailableError(
        absl::StrCat("shard ", addresses[0], " sent a manifest of store ",
                     computed_id, " but serves store ", first.store_id()));
  }
  for (size_t i = 0; i < n; ++i) {
    const v1::StoreInfo& info = calls[i].info;
    if (info.store_id() != first.store_id()) {
      return absl::UnavailableError(absl::StrCat(
          "shard ", addresses[i], " serves store ", info.store_id(), ", shard ",
          addresses[0], " serves ", first.store_id(),
          "; every shard must serve the same store"));
    }
    if (info.role() == "router") {
      return absl::UnavailableError(
          absl::StrCat("shard ", addresses[i], " is a router, not a shard"));
    }
    shards[i].first_sample = info.served_first_sample();
    shards[i].end_sample = info.served_end_sample();
    topology.store_bytes += info.store_bytes();
  }
  std::sort(shards.begin(), shards.end(), [](const Shard& a, const Shard& b) {
    return a.first_sample != b.first_sample ? a.first_sample < b.first_sample
                                            : a.end_sample < b.end_sample;
  });
  int64_t next = 0;
  for (const Shard& shard : shards) {
    if (shard.first_sample != next) {
      return absl::UnavailableError(absl::StrCat(
          DescribeShard(shard),
          shard.first_sample > next
              ? absl::StrCat(" leaves samples [", next, ", ",
                             shard.first_sample, ") unserved")
              : absl::StrCat(" overlaps the shard before it, which ends at ",
                             next)));
    }
    next = shard.end_sample;
  }
  if (next != topology.manifest.num_samples) {
    return absl::UnavailableError(
        absl::StrCat("the shards serve samples [0, ", next, ") of a store of ",
                     topology.manifest.num_samples, "; samples [", next, ", ",
                     topology.manifest.num_samples, ") have no shard"));
  }
  topology.info = first;
  topology.info.clear_manifest_json();
  topology.shards = std::move(shards);
  return topology;
}

}  // namespace retrace::router
