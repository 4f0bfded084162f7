// The floor of a C++ gRPC front end on this machine: every unary call answered with canned
// bytes chosen by its method (one file per method), through the callback API's generic service,
// nothing parsed. benchmarks/echo_floor.py builds it and drives it beside benchmarks/echo_server.py
// (the same canned answers over grpc.aio).
//
//   echo_cxx PORT /package.Service/Method=answer.bin ...   (PORT 0: any free one)
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

namespace {

std::map<std::string, std::string> answers;  // method -> serialized answer

// One call: read its request, answer with the method's canned bytes (or UNIMPLEMENTED).
class Call : public grpc::ServerGenericBidiReactor {
 public:
  explicit Call(grpc::GenericCallbackServerContext* context) : context_(context) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
      return;
    }
    auto answer = answers.find(context_->method());
    if (answer == answers.end()) {
      Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, context_->method()));
      return;
    }
    grpc::Slice slice(answer->second);
    response_ = grpc::ByteBuffer(&slice, 1);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  void OnDone() override { delete this; }

 private:
  grpc::GenericCallbackServerContext* context_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
};

class Service : public grpc::CallbackGenericService {
  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    return new Call(context);
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: echo_cxx PORT /package.Service/Method=answer.bin ..." << std::endl;
    return 2;
  }
  for (int i = 2; i < argc; ++i) {
    std::string pair(argv[i]);
    auto equals = pair.find('=');
    std::ifstream file(pair.substr(equals + 1), std::ios::binary);
    if (equals == std::string::npos || !file) {
      std::cerr << "cannot read " << pair << std::endl;
      return 2;
    }
    std::stringstream bytes;
    bytes << file.rdbuf();
    answers[pair.substr(0, equals)] = bytes.str();
  }
  Service service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(std::string("127.0.0.1:") + argv[1], grpc::InsecureServerCredentials(),
                           &port);
  builder.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << "cannot listen on 127.0.0.1:" << argv[1] << std::endl;
    return 1;
  }
  std::cout << "serving on 127.0.0.1:" << port << std::endl;
  server->Wait();
}
