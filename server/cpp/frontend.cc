// The C++ gRPC front end: gRPC's C++ callback server owns a port, reads each call's one
// request message on gRPC's own threads and queues the call; the Python event loop takes the
// queued calls in groups (an eventfd wakes it) and answers each with bytes or a status, or,
// for a method that answers with a stream (Health/Watch), writes messages and then ends it.
// A method that streams requests (named at the start) is queued as it opens, and its messages
// are read one at a time as Python asks for the next (snapfront_read), so a stream holds at
// most one read message here and the rest wait in HTTP/2's flow control.
// Nothing here parses a message: what a call means is Python's business (server/api/cpp.py),
// so both front ends run the same handlers.
//
// Why: grpc.aio does its per-call work (accepting one call at a time, its poller, a task and
// a context per call) on the event loop's thread under the GIL. Here that work runs on gRPC's
// C++ threads without the GIL, and the loop is woken once per group of calls.
//
// The C interface below is what server/cpp/binding.py loads with ctypes.
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_posix.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

class Call;

// What Python reads of one queued call (binding.py's CallView mirrors it). The pointers stay
// valid until the call is answered.
struct CallView {
  uint64_t id;
  const char* method;
  int64_t method_len;
  const char* data;
  int64_t data_len;
  const char* metadata;  // key \0 value \0 ..., ASCII metadata only (gRPC's keys are lower case)
  int64_t metadata_len;
  double timeout;  // seconds left before the call's deadline; negative: none
};

// What a stream tells Python (binding.py's MessageView mirrors what snapfront_messages hands
// out): a request message read, the requests' end, or room to write again.
enum Event : int32_t { kMessage = 0, kEnd = 1, kWritable = 2 };

struct Inbound {
  uint64_t id;
  std::string data;
  Event event;
};

struct MessageView {
  uint64_t id;
  const char* data;
  int64_t data_len;
  int32_t event;
};

// A connection accepted and not yet handed to gRPC: it must send the whole preface by its
// deadline (gRPC applies its handshake timeout only to connections it accepts itself).
struct Newcomer {
  int fd;
  std::chrono::steady_clock::time_point deadline;
  bool partial;  // part of the preface came: readable, so looked at on a timer, not polled
};

struct Frontend {
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<grpc::CallbackGenericService> service;
  int wake_fd = -1;
  size_t max_queued = 0;  // calls read and not yet taken by Python: beyond it, RESOURCE_EXHAUSTED
  std::unordered_set<std::string> streaming;  // methods that stream requests (set at start)
  std::mutex mutex;       // guards everything below
  std::deque<Call*> queue;
  std::unordered_map<uint64_t, Call*> taken;  // taken by Python, not yet answered
  std::deque<uint64_t> cancelled;  // taken calls their clients cancelled, for Python to stop
  // Streams' events for taken calls (a message read: one per stream at most, as the next read
  // starts when Python asks; the requests' end; room to write), and those handed to Python by
  // the last snapfront_messages, alive until the next one (Python copies them first).
  std::deque<Inbound> inbound;
  std::vector<Inbound> handed;
  uint64_t next_id = 1;
  bool closed = false;  // draining: new calls get UNAVAILABLE
  uint64_t refused_full = 0;
  uint64_t refused_closed = 0;
  // Answers go out on a thread of ours: writing one (gRPC frames and sends it inline) would
  // otherwise take a large share of the event loop's thread (docs/performance.md).
  std::mutex answers_mutex;  // guards the two below
  std::condition_variable answers_ready;
  std::deque<Call*> answers;
  bool answering = true;
  std::thread answerer;
  // A plaintext port with a connection cap listens here (libgrpc 1.51 ignores
  // grpc.max_allowed_incoming_connections): our thread accepts, and hands each connection to
  // gRPC (AddInsecureChannelFromFd) while fewer than max_connections are open, else closes it.
  std::vector<int> listeners;
  int stop_fd = -1;  // an eventfd: the accepting thread ends when it is written
  std::thread acceptor;
  size_t max_connections = 0;
  // The connections handed to gRPC, as (descriptor, inode): gRPC closes a descriptor when its
  // connection ends, so one whose number no longer names that socket is gone. Only the
  // accepting thread touches it.
  std::vector<std::pair<int, ino_t>> connections;
  std::vector<Newcomer> newcomers;  // accepted, waiting for their preface
  std::chrono::milliseconds handshake{10000};  // grpc.server_handshake_timeout_ms
  std::atomic<uint64_t> refused_connections{0};
};

constexpr char kFullMessage[] =
    "the server has too many calls waiting to be taken in (C++ front end queue full); "
    "retry later";
constexpr char kClosedMessage[] = "the server is shutting down; retry on another instance";
// A streamed answer's messages the client has not taken yet: at kPauseWrites Python waits
// (snapfront_write says so) until they are down to kResumeWrites, so a client that reads slowly
// slows its stream, as HTTP/2's flow control does on grpc.aio. kMaxPendingWrites is the hard
// bound behind that (the write is refused and Python ends the call).
constexpr size_t kPauseWrites = 16;
constexpr size_t kResumeWrites = 4;
constexpr size_t kMaxPendingWrites = 64;

// Wakes the event loop: one write per group of calls, as Python drains everything once woken.
void Wake(Frontend* frontend) {
  uint64_t one = 1;
  ssize_t written = write(frontend->wake_fd, &one, sizeof one);
  (void)written;  // EAGAIN: the counter is already non-zero, Python is woken anyway
}

class Call : public grpc::ServerGenericBidiReactor {
 public:
  Call(Frontend* frontend, grpc::GenericCallbackServerContext* context)
      : frontend_(frontend), context_(context) {
    streaming_ = frontend->streaming.count(context->method()) != 0;
    if (streaming_) {
      Queue();  // Python starts the handler now and asks for each message as it needs one
    } else {
      StartRead(&request_);
    }
  }

  void OnReadDone(bool ok) override {
    if (streaming_) {
      Arrived(ok);
      return;
    }
    if (!ok) {  // the client half-closed without a message, or went away
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "no request message: a unary call carries exactly one"));
      return;
    }
    if (!Copy(&data_)) {
      Finish(grpc::Status(grpc::StatusCode::INTERNAL, "cannot read the request's bytes"));
      return;
    }
    Queue();
  }

  // Starts reading a stream's next message (Python asks, on the loop's thread); false if a
  // read is already under way or the stream has ended.
  bool Read() {
    {
      std::lock_guard<std::mutex> lock(read_mutex_);
      if (reading_ || read_ended_) return false;
      reading_ = true;
    }
    StartRead(&request_);  // unlocked: gRPC may run OnReadDone before this returns
    return true;
  }

 private:
  // One contiguous copy of the read message (the buffer may be several slices).
  bool Copy(std::string* out) {
    std::vector<grpc::Slice> slices;
    if (!request_.Dump(&slices).ok()) return false;
    size_t size = 0;
    for (const auto& slice : slices) size += slice.size();
    out->reserve(size);
    for (const auto& slice : slices) out->append(reinterpret_cast<const char*>(slice.begin()),
                                                 slice.size());
    request_.Clear();
    return true;
  }

  // A stream's read finished: its message (or its end) goes to Python, if Python still holds
  // the call (a read outstanding when the call was answered ends here, unseen).
  void Arrived(bool ok) {
    Inbound message{id_, std::string(), ok ? kMessage : kEnd};
    if (ok && !Copy(&message.data)) message.event = kEnd;
    {
      std::lock_guard<std::mutex> lock(read_mutex_);
      reading_ = false;
      read_ended_ = message.event == kEnd;
    }
    Tell(std::move(message));
  }

  // Hands Python a stream's event, if Python still holds the call (a read outstanding when
  // the call was answered ends here, unseen).
  void Tell(Inbound event) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(frontend_->mutex);
      if (frontend_->taken.count(id_) == 0) return;
      wake = frontend_->inbound.empty();  // each of the three queues wakes on its own
      frontend_->inbound.push_back(std::move(event));
    }
    if (wake) Wake(frontend_);
  }

  // The call goes to Python's queue (or is refused: the front end closed, or its queue full).
  void Queue() {
    method_ = context_->method();
    for (const auto& [key, value] : context_->client_metadata()) {
      if (key.size() >= 4 && std::memcmp(key.data() + key.size() - 4, "-bin", 4) == 0) {
        continue;  // binary values may hold \0; no handler reads one
      }
      metadata_.append(key.data(), key.size()).push_back('\0');
      metadata_.append(value.data(), value.size()).push_back('\0');
    }
    auto deadline = context_->deadline();
    if (deadline == std::chrono::system_clock::time_point::max()) {
      timeout_ = -1.0;
    } else {
      timeout_ = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
      if (timeout_ < 0.0) timeout_ = 0.0;
    }
    const char* refusal = nullptr;
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(frontend_->mutex);
      if (frontend_->closed) {
        refusal = kClosedMessage;
        ++frontend_->refused_closed;
      } else if (frontend_->queue.size() >= frontend_->max_queued) {
        refusal = kFullMessage;
        ++frontend_->refused_full;
      } else {
        id_ = frontend_->next_id++;
        wake = frontend_->queue.empty();
        frontend_->queue.push_back(this);
      }
    }
    if (refusal != nullptr) {
      Finish(grpc::Status(refusal == kClosedMessage ? grpc::StatusCode::UNAVAILABLE
                                                    : grpc::StatusCode::RESOURCE_EXHAUSTED,
                          refusal));
      return;
    }
    if (wake) Wake(frontend_);  // Python drains the whole queue once woken
  }

 public:
  void OnDone() override { delete this; }

  // The client went away (or its deadline passed). A call still queued is finished as it is
  // taken; one Python holds is reported to it (snapfront_cancelled), which stops its work.
  void OnCancel() override {
    cancelled_ = true;
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(frontend_->mutex);
      if (id_ != 0 && frontend_->taken.count(id_) != 0) {
        wake = frontend_->cancelled.empty();
        frontend_->cancelled.push_back(id_);
      }
    }
    if (wake) Wake(frontend_);
  }

  bool Cancelled() const { return cancelled_; }

  void View(CallView* view) const {
    view->id = id_;
    view->method = method_.data();
    view->method_len = static_cast<int64_t>(method_.size());
    view->data = data_.data();
    view->data_len = static_cast<int64_t>(data_.size());
    view->metadata = metadata_.data();
    view->metadata_len = static_cast<int64_t>(metadata_.size());
    view->timeout = timeout_;
  }

  // Keeps the answer: `data` with OK (code 0; no data: a stream's end, OK), or the status
  // `code` with `message`; `trailer` (key \0 value \0 ...) as trailing metadata. Called once,
  // with the GIL held: copies only.
  void Keep(int code, const char* data, int64_t data_len, const char* message,
            const char* trailer, int64_t trailer_len) {
    code_ = code;
    end_only_ = code == 0 && data == nullptr;
    data_.assign(data != nullptr ? data : "", static_cast<size_t>(data != nullptr ? data_len : 0));
    message_ = message != nullptr ? message : "";
    trailer_.assign(trailer != nullptr ? trailer : "",
                    static_cast<size_t>(trailer != nullptr ? trailer_len : 0));
  }

  // Writes one message of a streamed answer: at once, or after the ones before it. 0; 1 when
  // kPauseWrites wait for the client (written: Python waits for kWritable before the next);
  // -1 when kMaxPendingWrites already wait (not written).
  int Write(const char* data, int64_t data_len) {
    std::lock_guard<std::mutex> lock(write_mutex_);
    if (!writing_) {
      writing_ = true;
      StartMessage(std::string(data, static_cast<size_t>(data_len)));
      return 0;
    }
    if (pending_writes_.size() >= kMaxPendingWrites) return -1;
    pending_writes_.emplace_back(data, static_cast<size_t>(data_len));
    if (pending_writes_.size() < kPauseWrites) return 0;
    paused_ = true;
    return 1;
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock<std::mutex> lock(write_mutex_);
    bool resume = false;
    if (ok && !pending_writes_.empty()) {
      std::string next = std::move(pending_writes_.front());
      pending_writes_.pop_front();
      StartMessage(std::move(next));
      resume = paused_ && pending_writes_.size() <= kResumeWrites;
      if (resume) paused_ = false;
      lock.unlock();
      if (resume) Tell(Inbound{id_, std::string(), kWritable});
      return;
    }
    pending_writes_.clear();  // !ok: the client is gone; OnCancel tells Python
    writing_ = false;
    resume = paused_;  // a paused writer is not left waiting on a call that ends
    paused_ = false;
    bool send = send_after_writes_;
    lock.unlock();
    if (resume) Tell(Inbound{id_, std::string(), kWritable});
    if (send) SendNow();
  }

  // Sends the kept answer (on the answering thread, or the loop's for a lone one); after the
  // messages a stream still has to write.
  void Send() {
    {
      std::lock_guard<std::mutex> lock(write_mutex_);
      if (writing_) {
        send_after_writes_ = true;
        return;
      }
    }
    SendNow();
  }

 private:
  void StartMessage(std::string message) {  // with write_mutex_ held
    grpc::Slice slice(message);
    stream_message_ = grpc::ByteBuffer(&slice, 1);
    StartWrite(&stream_message_);
  }

  void SendNow() {
    for (size_t at = 0; at < trailer_.size();) {
      std::string key(trailer_.c_str() + at);
      at += key.size() + 1;
      std::string value(trailer_.c_str() + at);
      at += value.size() + 1;
      context_->AddTrailingMetadata(key, value);
    }
    if (code_ != 0 || end_only_) {  // a status, or the end of a stream
      Finish(grpc::Status(static_cast<grpc::StatusCode>(code_), message_));
      return;
    }
    grpc::Slice slice(data_);
    response_ = grpc::ByteBuffer(&slice, 1);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  Frontend* frontend_;
  grpc::GenericCallbackServerContext* context_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::string method_;
  std::string data_;
  std::string metadata_;
  double timeout_ = -1.0;
  uint64_t id_ = 0;
  int code_ = 0;
  std::atomic<bool> cancelled_{false};
  std::string message_;
  std::string trailer_;
  bool end_only_ = false;  // OK without a message: a stream's end
  std::mutex write_mutex_;  // guards the five below (Python writes, gRPC reports writes done)
  bool writing_ = false;
  bool paused_ = false;  // Python waits for kWritable
  bool send_after_writes_ = false;
  std::deque<std::string> pending_writes_;
  grpc::ByteBuffer stream_message_;
  bool streaming_ = false;  // the method streams requests
  std::mutex read_mutex_;   // guards the two below (Python starts reads, gRPC ends them)
  bool reading_ = false;
  bool read_ended_ = false;
};

void Answering(Frontend* frontend) {
  pthread_setname_np(pthread_self(), "cpp-answer");  // for top -H and /proc
  std::deque<Call*> batch;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(frontend->answers_mutex);
      frontend->answers_ready.wait(
          lock, [frontend] { return !frontend->answers.empty() || !frontend->answering; });
      if (frontend->answers.empty()) return;  // stopped, and nothing left to send
      batch.swap(frontend->answers);
    }
    for (Call* call : batch) call->Send();
    batch.clear();
  }
}

void Post(Frontend* frontend, Call* call) {
  bool idle;
  {
    std::lock_guard<std::mutex> lock(frontend->answers_mutex);
    idle = frontend->answers.empty();  // otherwise the thread is awake and takes this one too
    frontend->answers.push_back(call);
  }
  if (idle) frontend->answers_ready.notify_one();
}

class Service : public grpc::CallbackGenericService {
 public:
  explicit Service(Frontend* frontend) : frontend_(frontend) {}

  grpc::ServerGenericBidiReactor* CreateReactor(
      grpc::GenericCallbackServerContext* context) override {
    return new Call(frontend_, context);
  }

 private:
  Frontend* frontend_;
};

// The taken call `id`, or nullptr. It stays taken (so alive) until Python answers it, which
// it does on the thread that asks here.
Call* Taken(Frontend* frontend, uint64_t id) {
  std::lock_guard<std::mutex> lock(frontend->mutex);
  auto found = frontend->taken.find(id);
  return found == frontend->taken.end() ? nullptr : found->second;
}

// Drops the connections gRPC has closed (their descriptor closed, or reused by another file).
void Sweep(Frontend* frontend) {
  auto& open = frontend->connections;
  size_t kept = 0;
  for (const auto& [fd, inode] : open) {
    struct stat now;
    if (fstat(fd, &now) == 0 && S_ISSOCK(now.st_mode) && now.st_ino == inode) {
      open[kept++] = {fd, inode};
    }
  }
  open.resize(kept);
}

// HTTP/2's connection preface, which a client sends first.
constexpr char kPreface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
constexpr size_t kPrefaceSize = sizeof kPreface - 1;

// One accepted connection: counted while the cap has room (exactly: the closed ones are swept
// out first when it looks full), else closed at once.
void Admit(Frontend* frontend, int fd) {
  size_t open = frontend->connections.size() + frontend->newcomers.size();
  if (open >= frontend->max_connections) {
    Sweep(frontend);
    open = frontend->connections.size() + frontend->newcomers.size();
  }
  if (open >= frontend->max_connections) {
    // Counted before the close: a client that sees its refusal finds it counted.
    frontend->refused_connections.fetch_add(1, std::memory_order_relaxed);
    close(fd);
    return;
  }
  frontend->newcomers.push_back(
      {fd, std::chrono::steady_clock::now() + frontend->handshake, false});
}

// A newcomer whose preface has come goes to gRPC (the bytes stay unread, for gRPC); one that
// sent something else, closed, or ran out of time is closed. True when it is settled.
bool Settle(Frontend* frontend, Newcomer& newcomer, std::chrono::steady_clock::time_point now) {
  char head[kPrefaceSize];
  ssize_t got = recv(newcomer.fd, head, sizeof head, MSG_PEEK);
  bool waiting = got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR);
  size_t seen = got > 0 ? static_cast<size_t>(got) : 0;
  bool so_far = std::memcmp(head, kPreface, seen) == 0;
  if (got >= static_cast<ssize_t>(kPrefaceSize) && so_far) {
    struct stat socket_stat;
    if (fstat(newcomer.fd, &socket_stat) == 0) {
      int one = 1;
      setsockopt(newcomer.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // as gRPC does
      frontend->connections.emplace_back(newcomer.fd, socket_stat.st_ino);
      grpc::AddInsecureChannelFromFd(frontend->server.get(), newcomer.fd);
      return true;
    }
  } else if ((waiting || (got > 0 && so_far)) && now < newcomer.deadline) {
    newcomer.partial = got > 0;
    return false;  // nothing yet, or part of the preface: it has until its deadline
  }
  close(newcomer.fd);
  return true;
}

void Accepting(Frontend* frontend) {
  pthread_setname_np(pthread_self(), "cpp-accept");
  std::vector<pollfd> watched;
  int backoff_ms = -1;  // out of descriptors: look again later rather than spin on the backlog
  auto& newcomers = frontend->newcomers;
  const size_t stop = frontend->listeners.size();  // where stop_fd sits in `watched`
  for (;;) {
    watched.clear();
    for (int fd : frontend->listeners) watched.push_back({fd, POLLIN, 0});
    watched.push_back({frontend->stop_fd, POLLIN, 0});
    // A newcomer wakes this thread when its first bytes come; one that sent part of its
    // preface stays readable (polling on it would spin), so it is looked at every 10 ms.
    int timeout_ms = backoff_ms;
    auto now = std::chrono::steady_clock::now();
    for (const Newcomer& newcomer : newcomers) {
      if (!newcomer.partial) watched.push_back({newcomer.fd, POLLIN, 0});
      int left = static_cast<int>(std::chrono::ceil<std::chrono::milliseconds>(
                                      newcomer.deadline - now).count());
      left = std::max(newcomer.partial ? std::min(left, 10) : left, 0);
      timeout_ms = timeout_ms < 0 ? left : std::min(timeout_ms, left);
    }
    int ready = poll(watched.data(), watched.size(), timeout_ms);
    if (ready < 0 && errno != EINTR) return;
    if (watched[stop].revents != 0) return;  // stopping
    bool retry = backoff_ms >= 0;
    backoff_ms = -1;
    for (size_t i = 0; i < stop; ++i) {
      if (!retry && (watched[i].revents & POLLIN) == 0) continue;
      for (;;) {  // the whole backlog
        int fd = accept4(watched[i].fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd >= 0) {
          Admit(frontend, fd);
          continue;
        }
        if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
          backoff_ms = 100;
        }
        break;  // EAGAIN: nothing more waits; other errors: the client's, gone already
      }
    }
    now = std::chrono::steady_clock::now();
    newcomers.erase(std::remove_if(newcomers.begin(), newcomers.end(),
                                   [&](Newcomer& n) { return Settle(frontend, n, now); }),
                    newcomers.end());
  }
}

// Binds and listens on every address `host` resolves to (IPv6 ones dual-stack), at `port`
// (0: the first gets a free one, the rest the same); the port, or 0 with `error` set.
int Listen(Frontend* frontend, const std::string& address, bool reuse_port, std::string* error) {
  std::string host = address, service = "0";
  size_t colon = address.rfind(':');
  if (colon != std::string::npos) {
    host = address.substr(0, colon);
    service = address.substr(colon + 1);
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* found = nullptr;
  int failed = getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &found);
  if (failed != 0) {
    *error = std::string("cannot resolve ") + address + " (" + gai_strerror(failed) + ")";
    return 0;
  }
  int port = 0;
  for (addrinfo* at = found; at != nullptr; at = at->ai_next) {
    int fd = socket(at->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) continue;
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuse_port) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (at->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (port != 0) {  // the first address's port for the rest
      if (at->ai_family == AF_INET6) {
        reinterpret_cast<sockaddr_in6*>(at->ai_addr)->sin6_port = htons(port);
      } else {
        reinterpret_cast<sockaddr_in*>(at->ai_addr)->sin_port = htons(port);
      }
    }
    // An address a dual-stack socket already covers fails here with EADDRINUSE: skipped.
    if (bind(fd, at->ai_addr, at->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0) {
      close(fd);
      continue;
    }
    sockaddr_storage bound{};
    socklen_t length = sizeof bound;
    getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length);
    port = ntohs(bound.ss_family == AF_INET6
                     ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                     : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    frontend->listeners.push_back(fd);
  }
  freeaddrinfo(found);
  if (frontend->listeners.empty()) *error = std::string("cannot bind ") + address +
                                            " (port in use, or host not local)";
  return frontend->listeners.empty() ? 0 : port;
}

void SetError(char* error, int64_t error_len, const std::string& text) {
  if (error == nullptr || error_len <= 0) return;
  std::strncpy(error, text.c_str(), static_cast<size_t>(error_len - 1));
  error[error_len - 1] = '\0';
}

}  // namespace

extern "C" {

// Starts serving on `address` ("host:port"; port 0: any free one), whose bound port goes to
// *port. `int_args` are channel arguments (name \0 value as decimal \0 ...), as grpc.aio's
// options; `streaming` names the methods that stream requests (path \0 path \0 ...). TLS when
// `cert_pem` is given; client certificates required when `client_ca_pem` is.
// NULL with `error` filled on failure.
void* snapfront_start(const char* address, const char* int_args, int64_t int_args_len,
                      const char* streaming, int64_t streaming_len, int64_t max_queued,
                      const char* cert_pem, const char* key_pem, const char* client_ca_pem,
                      int* port, char* error, int64_t error_len) {
  auto frontend = std::make_unique<Frontend>();
  frontend->max_queued = static_cast<size_t>(max_queued > 0 ? max_queued : 1);
  for (int64_t at = 0; at < streaming_len;) {
    std::string method(streaming + at);
    at += static_cast<int64_t>(method.size()) + 1;
    frontend->streaming.insert(std::move(method));
  }
  frontend->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (frontend->wake_fd < 0) {
    SetError(error, error_len, "eventfd failed");
    return nullptr;
  }
  frontend->service = std::make_unique<Service>(frontend.get());
  grpc::ServerBuilder builder;
  bool reuse_port = false;
  for (int64_t at = 0; at < int_args_len;) {
    std::string name(int_args + at);
    at += static_cast<int64_t>(name.size()) + 1;
    std::string value(int_args + at);
    at += static_cast<int64_t>(value.size()) + 1;
    builder.AddChannelArgument(name, std::stoi(value));
    if (name == "grpc.max_allowed_incoming_connections") {
      frontend->max_connections = static_cast<size_t>(std::max(std::stoi(value), 0));
    } else if (name == "grpc.server_handshake_timeout_ms") {
      frontend->handshake = std::chrono::milliseconds(std::max(std::stoi(value), 1));
    } else if (name == "grpc.so_reuseport") {
      reuse_port = std::stoi(value) != 0;
    }
  }
  bool tls = cert_pem != nullptr && cert_pem[0] != '\0';
  std::shared_ptr<grpc::ServerCredentials> credentials;
  if (tls) {
    grpc::SslServerCredentialsOptions options(
        client_ca_pem != nullptr && client_ca_pem[0] != '\0'
            ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
            : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    if (client_ca_pem != nullptr) options.pem_root_certs = client_ca_pem;
    options.pem_key_cert_pairs.push_back({key_pem != nullptr ? key_pem : "", cert_pem});
    credentials = grpc::SslServerCredentials(options);
  } else {
    credentials = grpc::InsecureServerCredentials();
  }
  // TLS handshakes happen in gRPC's own listener only: a TLS port is not capped here.
  bool own_listener = !tls && frontend->max_connections > 0;
  if (own_listener) {
    std::string failure;
    *port = Listen(frontend.get(), address, reuse_port, &failure);
    if (*port == 0) {
      SetError(error, error_len, failure);
      close(frontend->wake_fd);
      return nullptr;
    }
  } else {
    builder.AddListeningPort(address, credentials, port);
  }
  builder.RegisterCallbackGenericService(frontend->service.get());
  frontend->server = builder.BuildAndStart();
  if (!frontend->server || *port == 0) {
    SetError(error, error_len, std::string("cannot bind ") + address +
                                   " (port in use, or host not local)");
    for (int fd : frontend->listeners) close(fd);
    close(frontend->wake_fd);
    return nullptr;
  }
  if (own_listener) {
    frontend->stop_fd = eventfd(0, EFD_CLOEXEC);
    frontend->acceptor = std::thread(Accepting, frontend.get());
  }
  frontend->answerer = std::thread(Answering, frontend.get());
  return frontend.release();
}

// The file descriptor that becomes readable when calls are queued.
int snapfront_wake_fd(void* handle) { return static_cast<Frontend*>(handle)->wake_fd; }

// Takes up to `max_calls` queued calls into `views` (without waiting); how many.
int snapfront_take(void* handle, CallView* views, int max_calls) {
  auto* frontend = static_cast<Frontend*>(handle);
  uint64_t counter;
  ssize_t got = read(frontend->wake_fd, &counter, sizeof counter);  // re-armed by the next call
  (void)got;
  std::vector<Call*> gone;  // cancelled while queued: finished here, never seen by Python
  int taken = 0;
  {
    std::lock_guard<std::mutex> lock(frontend->mutex);
    while (taken < max_calls && !frontend->queue.empty()) {
      Call* call = frontend->queue.front();
      frontend->queue.pop_front();
      if (call->Cancelled()) {
        gone.push_back(call);
        continue;
      }
      call->View(&views[taken]);
      frontend->taken.emplace(views[taken].id, call);
      ++taken;
    }
    if (!frontend->queue.empty() || !frontend->cancelled.empty()) Wake(frontend);  // again
  }
  for (Call* call : gone) {
    call->Keep(static_cast<int>(grpc::StatusCode::CANCELLED), nullptr, 0,
               "the client cancelled the call", nullptr, 0);
    Post(frontend, call);
  }
  return taken;
}

// Takes up to `max_ids` ids of taken calls their clients cancelled into `ids`; how many.
// Each is still answered (its answer goes nowhere).
int snapfront_cancelled(void* handle, uint64_t* ids, int max_ids) {
  auto* frontend = static_cast<Frontend*>(handle);
  std::lock_guard<std::mutex> lock(frontend->mutex);
  int count = 0;
  while (count < max_ids && !frontend->cancelled.empty()) {
    ids[count++] = frontend->cancelled.front();
    frontend->cancelled.pop_front();
  }
  return count;
}

// Answers a taken call (see Call::Keep); 0, or -1 if no such call is waiting for an answer.
int snapfront_answer(void* handle, uint64_t id, int code, const char* data, int64_t data_len,
                     const char* message, const char* trailer, int64_t trailer_len) {
  auto* frontend = static_cast<Frontend*>(handle);
  Call* call;
  bool lone;
  {
    std::lock_guard<std::mutex> lock(frontend->mutex);
    auto found = frontend->taken.find(id);
    if (found == frontend->taken.end()) return -1;
    call = found->second;
    frontend->taken.erase(found);
    lone = frontend->taken.empty() && frontend->queue.empty();
  }
  call->Keep(code, data, data_len, message, trailer, trailer_len);
  if (lone) {  // a lone answer goes out at once: no thread to wake, nothing else waits
    call->Send();
  } else {
    Post(frontend, call);
  }
  return 0;
}

// Writes one message of a taken call's streamed answer (ended later by snapfront_answer with
// no data, or a status): 0; 1 if written and its client now has kPauseWrites unread (Python
// writes no more until the call's kWritable); -1 if no such call is waiting; -2 if its client
// has kMaxPendingWrites unread (not written).
int snapfront_write(void* handle, uint64_t id, const char* data, int64_t data_len) {
  Call* call = Taken(static_cast<Frontend*>(handle), id);
  if (call == nullptr) return -1;
  int written = call->Write(data, data_len);
  return written < 0 ? -2 : written;
}

// Starts reading the next message of a taken call's stream of requests; it arrives through
// snapfront_messages. 0, -1 if no such call is waiting, -2 if a read is under way or the
// stream has ended.
int snapfront_read(void* handle, uint64_t id) {
  Call* call = Taken(static_cast<Frontend*>(handle), id);
  if (call == nullptr) return -1;
  return call->Read() ? 0 : -2;
}

// Hands up to `max_messages` of the streams' events since the last call into `views`; how
// many. Their bytes stay valid until the next call.
int snapfront_messages(void* handle, MessageView* views, int max_messages) {
  auto* frontend = static_cast<Frontend*>(handle);
  std::lock_guard<std::mutex> lock(frontend->mutex);
  frontend->handed.clear();
  while (static_cast<int>(frontend->handed.size()) < max_messages &&
         !frontend->inbound.empty()) {
    frontend->handed.push_back(std::move(frontend->inbound.front()));
    frontend->inbound.pop_front();
  }
  int count = 0;
  for (const Inbound& message : frontend->handed) {
    views[count].id = message.id;
    views[count].data = message.data.data();
    views[count].data_len = static_cast<int64_t>(message.data.size());
    views[count].event = message.event;
    ++count;
  }
  if (!frontend->inbound.empty()) Wake(frontend);  // the rest in the loop's next round
  return count;
}

// From now on new calls get UNAVAILABLE; calls already queued are still taken and answered.
void snapfront_close(void* handle) {
  auto* frontend = static_cast<Frontend*>(handle);
  std::lock_guard<std::mutex> lock(frontend->mutex);
  frontend->closed = true;
}

// Calls refused because the queue was full (which 0) or the front end closed (which 1);
// connections closed as they arrived because max_connections were open (which 2).
uint64_t snapfront_refused(void* handle, int which) {
  auto* frontend = static_cast<Frontend*>(handle);
  if (which == 2) return frontend->refused_connections.load(std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(frontend->mutex);
  return which == 0 ? frontend->refused_full : frontend->refused_closed;
}

// Stops: calls still unanswered get UNAVAILABLE, gRPC shuts down (waiting at most `grace_s`
// for answers in flight), and the handle is freed. Called off the event loop: it blocks.
void snapfront_stop(void* handle, double grace_s) {
  auto* frontend = static_cast<Frontend*>(handle);
  if (frontend->acceptor.joinable()) {  // no new connection from here on
    uint64_t one = 1;
    ssize_t written = write(frontend->stop_fd, &one, sizeof one);
    (void)written;
    frontend->acceptor.join();
    for (int fd : frontend->listeners) close(fd);
    for (const auto& newcomer : frontend->newcomers) close(newcomer.fd);
    close(frontend->stop_fd);
  }
  std::deque<Call*> unanswered;
  {
    std::lock_guard<std::mutex> lock(frontend->mutex);
    frontend->closed = true;
    unanswered.swap(frontend->queue);
    for (auto& [id, call] : frontend->taken) unanswered.push_back(call);
    frontend->taken.clear();
  }
  for (Call* call : unanswered) {
    call->Keep(static_cast<int>(grpc::StatusCode::UNAVAILABLE), nullptr, 0, kClosedMessage,
               nullptr, 0);
    Post(frontend, call);
  }
  {
    std::lock_guard<std::mutex> lock(frontend->answers_mutex);
    frontend->answering = false;  // the thread sends what is queued, then ends
  }
  frontend->answers_ready.notify_one();
  frontend->answerer.join();
  frontend->server->Shutdown(std::chrono::system_clock::now() +
                             std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000)));
  frontend->server->Wait();
  frontend->server.reset();
  close(frontend->wake_fd);
  delete frontend;
}

}  // extern "C"
