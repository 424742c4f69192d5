// The shards behind a router: where they are, which samples each serves, and
// the store they serve together.
//
//   ASSIGN_OR_RETURN(std::vector<std::string> addresses,
//                    ResolveShardAddresses("dns:///retrace-shards:50051"));
//   ASSIGN_OR_RETURN(ShardTopology topology,
//                    DiscoverShards(addresses, ShardConnection{}, deadline));
//
// Shards are found from a static list ("host:port,host:port") or from one DNS
// name that resolves to many addresses ("dns:///name:port", a Kubernetes
// headless Service): every address is one shard. Which samples a shard
// serves is what it says in GetStoreInfo; DiscoverShards checks that the
// shards serve one store (one store_id, and the manifest that hashes to it)
// and that their ranges tile [0, N) without gap or overlap, and sorts them by
// range.
#ifndef RETRACE_SERVER_ROUTER_SHARD_SET_H_
#define RETRACE_SERVER_ROUTER_SHARD_SET_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "retrace/v1/attribution.grpc.pb.h"
#include "server/store/manifest.h"

namespace retrace::router {

// How the router reaches its shards.
struct ShardConnection {
  // Sent as "authorization: Bearer <token>" when not empty.
  std::string token;
  // PEM file of the CA that signed the shards' certificates; empty:
  // plaintext (shards on a private network).
  std::string tls_ca_file;
  int64_t max_message_bytes = int64_t{64} << 20;
};

// One shard: its address, the samples it serves and a stub on a channel
// whose calls are retried with backoff on UNAVAILABLE (every call of the API
// is idempotent).
struct Shard {
  std::string address;
  int64_t first_sample = 0;
  int64_t end_sample = 0;
  std::shared_ptr<v1::Attribution::StubInterface> stub;
};

struct ShardTopology {
  std::vector<Shard> shards;  // sorted by first_sample
  store::Manifest manifest;   // the store's, from the first shard
  v1::StoreInfo info;         // the first shard's StoreInfo, without manifest
  int64_t store_bytes = 0;    // sum over the shards
};

// "a:1,b:2" -> {"a:1", "b:2"}; "dns:///name:port" -> every address that name
// resolves to now ("10.0.0.7:port", ...), sorted. InvalidArgument for an
// empty list or an empty entry, Unavailable when the name does not resolve.
absl::StatusOr<std::vector<std::string>> ResolveShardAddresses(
    const std::string& spec);

// A stub for `address` with the connection's credentials and retry policy.
absl::StatusOr<std::shared_ptr<v1::Attribution::StubInterface>> ConnectShard(
    const std::string& address, const ShardConnection& connection);

// Asks every shard for its StoreInfo (the first also for the manifest), in
// parallel, by `deadline`. Unavailable naming the shard when one does not
// answer or serves another store, and naming the gap or the overlap when the
// ranges do not tile the store.
absl::StatusOr<ShardTopology> DiscoverShards(
    const std::vector<std::string>& addresses,
    const ShardConnection& connection, absl::Time deadline);

// Adds the bearer token (when there is one) and the deadline to `context`.
void PrepareShardContext(const ShardConnection& connection, absl::Time deadline,
                         grpc::ClientContext* context);

// "shard 10.0.0.7:50051 (samples [0, 5000))", for errors.
std::string DescribeShard(const Shard& shard);

}  // namespace retrace::router

#endif  // RETRACE_SERVER_ROUTER_SHARD_SET_H_
