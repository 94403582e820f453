// The HTTP front of zimage serve (cpp-httplib): routes, API-key check, request limits, the
// OpenAI / A1111 / jobs endpoints, server-sent progress events, /metrics and the web page.
#pragma once
#include <chrono>
#include <memory>
#include <string>

#include "server/api.h"
#include "server/engine.h"
#include "server/scheduler.h"

namespace zi::server {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8188;             // 0: any free port
  std::string api_key;         // empty: no key required
  Limits limits;
  int threads = 0;             // connection threads; 0: 2 × max_queue + 16
  int max_queue = 32;
};

class HttpServer {
 public:
  HttpServer(HttpOptions o, Scheduler& sched, Engine& engine);
  ~HttpServer();
  // Binds the listening socket; returns the port (throws zi::Error when it cannot).
  int bind();
  // Serves until stop(); returns when every connection has finished.
  void listen();
  // Closes the listening socket (thread-safe). Open event streams get up to `grace` to send
  // their last event; synchronous requests in flight still get their reply.
  void stop(std::chrono::milliseconds grace = std::chrono::milliseconds(2000));

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace zi::server
