#include "client/client.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/generic/generic_stub.h>

#include <algorithm>
#include <future>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/file_util.h"
#include "common/status.h"

namespace retrace::client {
namespace {

constexpr char kHealthCheckMethod[] = "/grpc.health.v1.Health/Check";
constexpr char kUserAgent[] = "retrace-cli";

absl::StatusOr<std::string> ReadPem(const std::string& path,
                                    absl::string_view what) {
  absl::StatusOr<std::string> pem = ReadFile(path);
  if (!pem.ok()) {
    return Annotate(pem.status(), absl::StrCat("cannot read the ", what));
  }
  if (pem->find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the ", what, " '", path, "' is not a PEM file (no -----BEGIN line)"));
  }
  return pem;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeCredentials(
    const ConnectionOptions& options) {
  const bool tls =
      options.tls || !options.ca_file.empty() || !options.cert_file.empty();
  if (options.cert_file.empty() != options.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a client certificate and its key go together: give both or neither");
  }
  if (!tls) {
    if (!options.tls_server_name.empty()) {
      return absl::InvalidArgumentError(
          "a TLS server name needs TLS (--tls or --ca)");
    }
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions ssl;
  if (!options.ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs,
                     ReadPem(options.ca_file, "CA certificate file"));
  }
  if (!options.cert_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                     ReadPem(options.cert_file, "client certificate file"));
    ASSIGN_OR_RETURN(ssl.pem_private_key,
                     ReadPem(options.key_file, "client key file"));
  }
  return grpc::SslCredentials(ssl);
}

// HealthCheckRequest { string service = 1; } in wire format.
std::string EncodeHealthCheckRequest(absl::string_view service) {
  std::string bytes;
  if (service.empty()) return bytes;
  google::protobuf::io::StringOutputStream stream(&bytes);
  google::protobuf::io::CodedOutputStream out(&stream);
  out.WriteTag(google::protobuf::internal::WireFormatLite::MakeTag(
      1,
      google::protobuf::internal::WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
  out.WriteVarint32(static_cast<uint32_t>(service.size()));
  out.WriteRaw(service.data(), static_cast<int>(service.size()));
  return bytes;
}

// HealthCheckResponse { ServingStatus status = 1; }; other fields skipped.
absl::StatusOr<ServingStatus> DecodeHealthCheckResponse(
    const std::string& bytes) {
  using google::protobuf::internal::WireFormatLite;
  google::protobuf::io::CodedInputStream in(
      reinterpret_cast<const uint8_t*>(bytes.data()),
      static_cast<int>(bytes.size()));
  uint32_t status = 0;  // absent: UNKNOWN
  while (const uint32_t tag = in.ReadTag()) {
    if (tag == WireFormatLite::MakeTag(1, WireFormatLite::WIRETYPE_VARINT)) {
      if (!in.ReadVarint32(&status)) break;
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return absl::DataLossError("malformed grpc.health.v1 response");
    }
  }
  if (!in.ConsumedEntireMessage()) {
    return absl::DataLossError("malformed grpc.health.v1 response");
  }
  if (status > static_cast<uint32_t>(ServingStatus::kServiceUnknown)) {
    return ServingStatus::kUnknown;
  }
  return static_cast<ServingStatus>(status);
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return Annotate(text.status(), "cannot read the token file");
  for (absl::string_view line : absl::StrSplit(*text, '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line.front() == '#') continue;
    return std::string(line);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("the token file '", path, "' holds no token"));
}

absl::string_view ServingStatusName(ServingStatus status) {
  switch (status) {
    case ServingStatus::kServing:
      return "SERVING";
    case ServingStatus::kNotServing:
      return "NOT_SERVING";
    case ServingStatus::kServiceUnknown:
      return "SERVICE_UNKNOWN";
    case ServingStatus::kUnknown:
      break;
  }
  return "UNKNOWN";
}

absl::string_view MethodName(v1::Method method) {
  switch (method) {
    case v1::TRACIN:
      return "tracin";
    case v1::RETRAC:
      return "retrac";
    default:
      return "unspecified";
  }
}

absl::string_view MethodTitle(v1::Method method) {
  switch (method) {
    case v1::TRACIN:
      return "TracIn";
    case v1::RETRAC:
      return "ReTrac";
    default:
      return "Unspecified";
  }
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(
    const ConnectionOptions& options) {
  if (options.server.empty()) {
    return absl::InvalidArgumentError("the server address is empty");
  }
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ChannelCredentials> credentials,
                   MakeCredentials(options));
  grpc::ChannelArguments arguments;
  arguments.SetMaxReceiveMessageSize(options.max_receive_bytes);
  arguments.SetUserAgentPrefix(kUserAgent);
  if (!options.tls_server_name.empty()) {
    arguments.SetSslTargetNameOverride(options.tls_server_name);
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(options.server, credentials, arguments);
  return std::unique_ptr<Client>(new Client(options, std::move(channel)));
}

Client::Client(ConnectionOptions options,
               std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::Attribution::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> Client::NewContext() const {
  auto context = std::make_unique<grpc::ClientContext>();
  if (options_.timeout > absl::ZeroDuration() &&
      options_.timeout != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + options_.timeout));
  }
  if (!options_.token.empty()) {
    context->AddMetadata("authorization",
                         absl::StrCat("Bearer ", options_.token));
  }
  return context;
}

absl::StatusOr<v1::AttributeResponse> Client::Attribute(
    const v1::AttributeRequest& request) const {
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::AttributeResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->Attribute(context.get(), request, &response)));
  return response;
}

absl::StatusOr<v1::SelfInfluenceResponse> Client::SelfInfluence(
    const v1::SelfInfluenceRequest& request) const {
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::SelfInfluenceResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->SelfInfluence(context.get(), request, &response)));
  return response;
}

absl::StatusOr<std::vector<v1::AttributedSample>> Client::TopSelfInfluence(
    v1::Method method, int64_t count, int32_t page_size) const {
  std::vector<v1::AttributedSample> samples;
  v1::SelfInfluenceRequest request;
  request.set_method(method);
  while (static_cast<int64_t>(samples.size()) < count) {
    const int64_t wanted = count - static_cast<int64_t>(samples.size());
    // The last page asks for no more than is still wanted.
    request.set_page_size(static_cast<int32_t>(
        page_size > 0 ? std::min<int64_t>(page_size, wanted) : 0));
    ASSIGN_OR_RETURN(v1::SelfInfluenceResponse page, SelfInfluence(request));
    for (v1::AttributedSample& sample : *page.mutable_samples()) {
      if (static_cast<int64_t>(samples.size()) == count) break;
      samples.push_back(std::move(sample));
    }
    if (page.next_page_token().empty()) break;
    if (page.samples().empty()) {
      // A server that returns empty pages with a token would loop forever.
      return absl::DataLossError(
          "the server returned an empty SelfInfluence page with a next page "
          "token");
    }
    request.set_page_token(page.next_page_token());
  }
  return samples;
}

absl::StatusOr<v1::StoreInfo> Client::GetStoreInfo() const {
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  v1::StoreInfo info;
  RETURN_IF_ERROR(FromGrpcStatus(
      stub_->GetStoreInfo(context.get(), v1::GetStoreInfoRequest(), &info)));
  return info;
}

absl::StatusOr<ServingStatus> Client::CheckHealth(
    absl::string_view service) const {
  // The health messages are hand-encoded rather than generated so that this
  // library registers no grpc.health.v1 descriptors, which would collide with
  // any other copy linked into the same process.
  std::unique_ptr<grpc::ClientContext> context = NewContext();
  const std::string request_bytes = EncodeHealthCheckRequest(service);
  grpc::Slice slice(request_bytes);
  const grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  std::promise<grpc::Status> done;
  grpc::GenericStub stub(channel_);
  stub.UnaryCall(context.get(), kHealthCheckMethod, grpc::StubOptions(),
                 &request, &response,
                 [&done](grpc::Status status) { done.set_value(status); });
  RETURN_IF_ERROR(FromGrpcStatus(done.get_future().get()));
  std::vector<grpc::Slice> slices;
  RETURN_IF_ERROR(FromGrpcStatus(response.Dump(&slices)));
  std::string response_bytes;
  for (const grpc::Slice& part : slices) {
    response_bytes.append(reinterpret_cast<const char*>(part.begin()),
                          part.size());
  }
  return DecodeHealthCheckResponse(response_bytes);
}

}  // namespace retrace::client
