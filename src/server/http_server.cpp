#include "server/http_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <httplib.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <cstdio>
#include <ctime>

#include "core/check.h"
#include "server/base64.h"
#include "server/web_page.h"

namespace zi::server {

using nlohmann::json;

namespace {

const char* kJson = "application/json";

json error_json(const std::string& message, const std::string& field, const char* type) {
  json e = {{"message", message}, {"type", type}, {"param", field.empty() ? json(nullptr) : json(field)}};
  return json{{"error", e}};
}

void send_error(httplib::Response& res, int status, const std::string& message, const std::string& field = "") {
  const char* type = status == 401   ? "authentication_error"
                     : status == 429 ? "rate_limit_error"
                     : status >= 500 ? "server_error"
                                     : "invalid_request_error";
  res.status = status;
  // Invalid UTF-8 echoed from a malformed body becomes U+FFFD instead of throwing.
  res.set_content(error_json(message, field, type).dump(-1, ' ', false, json::error_handler_t::replace), kJson);
}

// Constant-time comparison of the key.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned char d = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) d |= uint8_t(a[i]) ^ uint8_t(b.empty() ? 0 : b[i % b.size()]);
  return d == 0;
}

std::string base64_decode(const std::string& s) {
  auto val = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;
    if (c == '/' || c == '_') return 63;
    return -1;
  };
  std::string out;
  int bits = 0;
  uint32_t acc = 0;
  for (char c : s) {
    const int v = val(c);
    if (v < 0) break;
    acc = acc << 6 | uint32_t(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += char((acc >> bits) & 0xFF);
    }
  }
  return out;
}

// "Authorization: Bearer KEY" (OpenAI clients), or HTTP Basic with KEY as the password (A1111
// clients' --api-auth, and browsers).
bool authorized(const httplib::Request& req, const std::string& key) {
  const std::string h = req.get_header_value("Authorization");
  if (h.rfind("Bearer ", 0) == 0) return same_secret(h.substr(7), key);
  if (h.rfind("Basic ", 0) == 0) {
    const std::string up = base64_decode(h.substr(6));
    const size_t colon = up.find(':');
    return colon != std::string::npos && same_secret(up.substr(colon + 1), key);
  }
  return false;
}

// The socket of this request's connection: the one whose peer is the request's remote
// address and port (cpp-httplib does not hand handlers its socket). -1 when not found.
int connection_fd(const httplib::Request& req) {
  DIR* d = opendir("/proc/self/fd");
  if (!d) return -1;
  int found = -1;
  while (dirent* e = readdir(d)) {
    const int fd = std::atoi(e->d_name);
    if (fd <= 2) continue;
    struct stat stt;
    if (fstat(fd, &stt) != 0 || !S_ISSOCK(stt.st_mode)) continue;
    sockaddr_storage peer{}, self{};
    socklen_t pl = sizeof peer, sl = sizeof self;
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&self), &sl) != 0) continue;
    char host[NI_MAXHOST], port[NI_MAXSERV], lport[NI_MAXSERV];
    if (getnameinfo(reinterpret_cast<sockaddr*>(&peer), pl, host, sizeof host, port, sizeof port,
                    NI_NUMERICHOST | NI_NUMERICSERV) != 0)
      continue;
    if (getnameinfo(reinterpret_cast<sockaddr*>(&self), sl, nullptr, 0, lport, sizeof lport, NI_NUMERICSERV) != 0)
      continue;
    if (req.remote_addr == host && req.remote_port == std::atoi(port) &&
        (req.local_port <= 0 || req.local_port == std::atoi(lport))) {
      found = fd;
      break;
    }
  }
  closedir(d);
  return found;
}

// The peer closed the connection (a clean close reads as end of stream).
bool peer_gone(int fd) {
  pollfd p{fd, short(POLLIN | POLLRDHUP), 0};
  if (poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) return true;
  if (p.revents & POLLIN) {
    char c;
    const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0;
  }
  return false;
}

double unix_now() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

json job_json(const JobView& v) {
  json j = {{"id", v.id},
            {"object", "job"},
            {"state", job_state_name(v.state)},
            {"step", v.step},
            {"steps", v.steps},
            {"progress", v.steps > 0 ? (terminal(v.state) && v.state == JobState::Succeeded
                                            ? 1.0
                                            : double(v.step) / double(v.steps) * 0.999)
                                     : 0.0},
            {"eta_seconds", v.eta_seconds >= 0 ? json(v.eta_seconds) : json(nullptr)},
            {"queue_position", v.state == JobState::Queued ? json(v.queue_position) : json(nullptr)},
            {"n", v.n},
            {"images_done", v.images_done},
            {"width", v.width},
            {"height", v.height},
            {"created", v.created},
            {"started", v.started > 0 ? json(v.started) : json(nullptr)},
            {"finished", v.finished > 0 ? json(v.finished) : json(nullptr)}};
  if (!v.error.empty()) j["error"] = {{"message", v.error}, {"status", v.error_status}};
  if (v.state == JobState::Succeeded && !v.images.empty()) {
    json data = json::array();
    for (const JobImage& im : v.images)
      data.push_back({{"b64_json", base64_encode(im.png)}, {"seed", im.seed}, {"parameters", im.parameters}});
    j["result"] = {{"created", int64_t(v.finished)}, {"data", data}};
  }
  return j;
}

}  // namespace

struct HttpServer::Impl {
  HttpOptions o;
  Scheduler& sched;
  Engine& engine;
  httplib::Server svr;
  int port = 0;
  std::atomic<int> streams{0};  // event streams open (stop() lets them send their last event)

  Impl(HttpOptions opt, Scheduler& s, Engine& e) : o(std::move(opt)), sched(s), engine(e) { routes(); }

  // Submits and waits for the job on this connection; a client that disconnects cancels it.
  // Returns false (after filling res with the error) unless the job succeeded.
  bool run_sync(const httplib::Request& req, httplib::Response& res, const ImageRequest& ir, JobView* out) {
    std::string id;
    int retry = 1;
    switch (sched.submit(ir, &id, &retry)) {
      case Scheduler::Submit::QueueFull:
        res.set_header("Retry-After", std::to_string(retry));
        send_error(res, 429, str_cat("the queue is full (", o.max_queue, " requests); retry in ", retry, " s"));
        return false;
      case Scheduler::Submit::ShuttingDown:
        send_error(res, 503, "the server is shutting down");
        return false;
      case Scheduler::Submit::Ok: break;
    }
    const int fd = connection_fd(req);
    JobView v;
    uint64_t seen = 0;
    for (;;) {
      if (!sched.wait_change(id, seen, std::chrono::milliseconds(200), &v, false)) {
        send_error(res, 500, "the job was lost");
        return false;
      }
      seen = v.version;
      if (terminal(v.state)) break;
      if (fd >= 0 && peer_gone(fd)) {
        sched.cancel(id);
        sched.forget(id);
        send_error(res, 499, "client closed the connection; the job was cancelled");
        return false;
      }
    }
    sched.view(id, &v, true);
    sched.forget(id);
    if (v.state == JobState::Succeeded) {
      *out = std::move(v);
      return true;
    }
    if (v.state == JobState::Failed)
      send_error(res, v.error_status ? v.error_status : 500, "generation failed: " + v.error);
    else
      send_error(res, v.error_status == 503 ? 503 : 409,
                 v.error_status == 503 ? "the server is shutting down; the job was cancelled" : "the job was cancelled");
    return false;
  }

  template <class F>
  void guarded(httplib::Response& res, F&& f) {
    try {
      f();
    } catch (const ApiError& e) {
      send_error(res, e.status, e.what(), e.field);
    } catch (const UsageError& e) {
      send_error(res, 422, e.what());
    } catch (const std::exception& e) {
      send_error(res, 500, e.what());
    }
  }

  void routes() {
    svr.set_payload_max_length(o.limits.max_body_bytes);
    // SO_REUSEADDR only: the library's default adds SO_REUSEPORT, which would let a second
    // server bind the same port and silently take half of its connections.
    svr.set_socket_options([](socket_t sock) {
      int yes = 1;
      setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    });
    const int threads = o.threads > 0 ? o.threads : 2 * o.max_queue + 16;
    svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
    svr.set_keep_alive_timeout(5);
    svr.set_keep_alive_max_count(100);

    svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      if (o.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      if (authorized(req, o.api_key)) return httplib::Server::HandlerResponse::Unhandled;
      res.set_header("WWW-Authenticate", "Basic realm=\"zimage\", charset=\"UTF-8\"");
      send_error(res, 401, "missing or wrong API key (Authorization: Bearer KEY, or Basic with KEY as the password)");
      return httplib::Server::HandlerResponse::Handled;
    });
    // Statuses the library sets itself (413 for an oversized body, 404, 400) get a JSON body too.
    svr.set_error_handler([this](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (res.status == 413)
        send_error(res, 413, str_cat("the request body is larger than ", o.limits.max_body_bytes, " bytes"), "body");
      else if (res.status == 404)
        send_error(res, 404, "no such endpoint");
      else if (res.status == 400)
        send_error(res, 400, "malformed HTTP request");
      else
        send_error(res, res.status, "request failed");
    });

    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const SchedulerStats s = sched.stats();
      json j = {{"status", s.accepting ? "ok" : "shutting_down"},
                {"model", engine.model_name()},
                {"queue", s.queued_jobs},
                {"running", s.running_jobs}};
      res.status = s.accepting ? 200 : 503;
      res.set_content(j.dump(), kJson);
    });

    svr.Get("/", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(kWebPage, "text/html; charset=utf-8");
    });

    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) { res.set_content(metrics(), "text/plain; version=0.0.4"); });

    // ---- OpenAI ----
    svr.Post("/v1/images/generations", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(res, [&] {
        const ImageRequest ir = parse_openai_request(parse_body(req.body), engine.options().defaults, o.limits);
        JobView v;
        if (!run_sync(req, res, ir, &v)) return;
        json data = json::array();
        for (const JobImage& im : v.images)
          data.push_back({{"b64_json", base64_encode(im.png)}, {"seed", im.seed}, {"revised_prompt", nullptr}});
        res.set_content(json{{"created", int64_t(unix_now())}, {"data", data}}.dump(), kJson);
      });
    });
    svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json m = {{"id", engine.model_name()}, {"object", "model"}, {"owned_by", "zimage"}, {"created", 0}};
      res.set_content(json{{"object", "list"}, {"data", json::array({m})}}.dump(), kJson);
    });

    // ---- A1111 ----
    svr.Post("/sdapi/v1/txt2img", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(res, [&] {
        const json body = parse_body(req.body);
        const ImageRequest ir = parse_a1111_request(body, engine.options().defaults, o.limits);
        JobView v;
        if (!run_sync(req, res, ir, &v)) return;
        const GenerateOptions& g = ir.options;
        json images = json::array(), seeds = json::array(), infotexts = json::array();
        for (const JobImage& im : v.images) {
          images.push_back(base64_encode(im.png));
          seeds.push_back(im.seed);
          infotexts.push_back(im.parameters);
        }
        json params = body;
        params["prompt"] = g.prompt;
        params["negative_prompt"] = g.negative_prompt;
        params["steps"] = g.steps;
        params["cfg_scale"] = g.guidance + 1.0;
        params["width"] = g.width;
        params["height"] = g.height;
        params["seed"] = g.seed;
        json info = {{"prompt", g.prompt},
                     {"negative_prompt", g.negative_prompt},
                     {"seed", g.seed},
                     {"all_seeds", seeds},
                     {"all_prompts", json::array()},
                     {"width", g.width},
                     {"height", g.height},
                     {"steps", g.steps},
                     {"cfg_scale", g.guidance + 1.0},
                     {"sampler_name", "Euler"},
                     {"sd_model_name", engine.model_name()},
                     {"infotexts", infotexts}};
        for (size_t k = 0; k < v.images.size(); ++k) info["all_prompts"].push_back(g.prompt);
        res.set_content(json{{"images", images}, {"parameters", params}, {"info", info.dump()}}.dump(), kJson);
      });
    });
    svr.Get("/sdapi/v1/options", [this](const httplib::Request&, httplib::Response& res) {
      const GenerateOptions& d = engine.options().defaults;
      res.set_content(json{{"sd_model_checkpoint", engine.model_name()},
                           {"samples_format", "png"},
                           {"sd_checkpoint_hash", nullptr},
                           {"CLIP_stop_at_last_layers", 1},
                           {"zimage_default_steps", d.steps},
                           {"zimage_default_size", str_cat(d.width, "x", d.height)}}
                          .dump(),
                      kJson);
    });
    svr.Get("/sdapi/v1/sd-models", [this](const httplib::Request&, httplib::Response& res) {
      const std::string n = engine.model_name();
      res.set_content(json::array({json{{"title", n},
                                        {"model_name", n},
                                        {"hash", nullptr},
                                        {"sha256", nullptr},
                                        {"filename", engine.options().defaults.model_dir},
                                        {"config", nullptr}}})
                          .dump(),
                      kJson);
    });
    svr.Get("/sdapi/v1/samplers", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(json::array({json{{"name", "Euler"}, {"aliases", {"euler", "flow_match_euler"}}, {"options", json::object()}}})
                          .dump(),
                      kJson);
    });

    // ---- jobs ----
    svr.Post("/v1/jobs", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(res, [&] {
        const ImageRequest ir = parse_openai_request(parse_body(req.body), engine.options().defaults, o.limits);
        std::string id;
        int retry = 1;
        switch (sched.submit(ir, &id, &retry)) {
          case Scheduler::Submit::QueueFull:
            res.set_header("Retry-After", std::to_string(retry));
            send_error(res, 429, str_cat("the queue is full (", o.max_queue, " requests); retry in ", retry, " s"));
            return;
          case Scheduler::Submit::ShuttingDown: send_error(res, 503, "the server is shutting down"); return;
          case Scheduler::Submit::Ok: break;
        }
        JobView v;
        sched.view(id, &v, false);
        json j = job_json(v);
        j["seed"] = ir.options.seed;
        res.status = 202;
        res.set_header("Location", "/v1/jobs/" + id);
        res.set_content(j.dump(), kJson);
      });
    });
    svr.Get(R"(/v1/jobs/([A-Za-z0-9-]+))", [this](const httplib::Request& req, httplib::Response& res) {
      JobView v;
      if (!sched.view(req.matches[1], &v, true)) return send_error(res, 404, "no job '" + std::string(req.matches[1]) + "'", "id");
      res.set_content(job_json(v).dump(), kJson);
    });
    svr.Delete(R"(/v1/jobs/([A-Za-z0-9-]+))", [this](const httplib::Request& req, httplib::Response& res) {
      const std::string id = req.matches[1];
      const int r = sched.cancel(id);
      if (r < 0) return send_error(res, 404, "no job '" + id + "'", "id");
      JobView v;
      sched.view(id, &v, false);
      if (r == 0) return send_error(res, 409, str_cat("job '", id, "' already finished (", job_state_name(v.state), ")"), "id");
      res.set_content(job_json(v).dump(), kJson);
    });
    svr.Get(R"(/v1/jobs/([A-Za-z0-9-]+)/events)", [this](const httplib::Request& req, httplib::Response& res) {
      const std::string id = req.matches[1];
      JobView v;
      if (!sched.view(id, &v, false)) return send_error(res, 404, "no job '" + id + "'", "id");
      res.set_header("Cache-Control", "no-cache");
      res.set_header("X-Accel-Buffering", "no");
      auto seen = std::make_shared<uint64_t>(0);
      ++streams;
      res.set_chunked_content_provider("text/event-stream", [this, id, seen](size_t, httplib::DataSink& sink) {
        JobView v;
        if (!sched.wait_change(id, *seen, std::chrono::seconds(10), &v, false)) {
          sink.done();  // forgotten (finished long ago)
          return true;
        }
        std::string msg;
        if (v.version == *seen && !terminal(v.state)) {
          msg = ": keep-alive\n\n";
        } else if (terminal(v.state)) {
          sched.view(id, &v, true);
          msg = "event: done\ndata: " + job_json(v).dump() + "\n\n";
        } else {
          msg = "event: progress\ndata: " + job_json(v).dump() + "\n\n";
        }
        *seen = v.version;
        if (!sink.write(msg.data(), msg.size())) return false;
        if (terminal(v.state)) sink.done();
        return true;
      }, [this](bool) { --streams; });
    });
  }

  std::string metrics() {
    const SchedulerStats s = sched.stats();
    const MemoryFigures m = memory_figures(engine.uses_gpu());
    std::string out;
    auto metric = [&](const char* name, const char* type, const char* help) {
      out += str_cat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
    };
    auto line = [&](const std::string& name, double v) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.17g", v);
      out += name + " " + buf + "\n";
    };
    metric("zimage_queue_depth", "gauge", "Requests waiting in the queue");
    line("zimage_queue_depth", s.queued_jobs);
    metric("zimage_queue_images", "gauge", "Images waiting in the queue");
    line("zimage_queue_images", s.queued_images);
    metric("zimage_running_jobs", "gauge", "Requests being generated");
    line("zimage_running_jobs", s.running_jobs);
    metric("zimage_max_queue", "gauge", "Queue bound (--max-queue)");
    line("zimage_max_queue", o.max_queue);
    metric("zimage_max_batch", "gauge", "Images per DiT batch at most");
    line("zimage_max_batch", s.max_batch);
    metric("zimage_jobs_total", "counter", "Finished requests by result");
    line("zimage_jobs_total{result=\"succeeded\"}", double(s.jobs_succeeded));
    line("zimage_jobs_total{result=\"failed\"}", double(s.jobs_failed));
    line("zimage_jobs_total{result=\"cancelled\"}", double(s.jobs_cancelled));
    metric("zimage_jobs_submitted_total", "counter", "Requests accepted into the queue");
    line("zimage_jobs_submitted_total", double(s.jobs_submitted));
    metric("zimage_jobs_rejected_total", "counter", "Requests refused with 429 (queue full)");
    line("zimage_jobs_rejected_total", double(s.jobs_rejected));
    metric("zimage_images_total", "counter", "Images generated");
    line("zimage_images_total", double(s.images_generated));
    metric("zimage_batches_total", "counter", "DiT batches run");
    line("zimage_batches_total", double(s.batches));
    metric("zimage_batch_size_total", "counter", "Batches by size (images)");
    for (const auto& [size, count] : s.batch_sizes) line(str_cat("zimage_batch_size_total{size=\"", size, "\"}"), double(count));
    metric("zimage_step_seconds", "summary", "Denoising step time (a whole batch)");
    line("zimage_step_seconds_sum", s.step_seconds_sum);
    line("zimage_step_seconds_count", double(s.step_count));
    metric("zimage_phase_seconds", "summary", "Time per phase (a whole batch)");
    for (const auto& [ph, sc] : s.phase_seconds) {
      line(str_cat("zimage_phase_seconds_sum{phase=\"", ph, "\"}"), sc.first);
      line(str_cat("zimage_phase_seconds_count{phase=\"", ph, "\"}"), double(sc.second));
    }
    metric("zimage_host_rss_bytes", "gauge", "Resident set size of the server");
    line("zimage_host_rss_bytes", double(m.host_rss));
    metric("zimage_host_peak_rss_bytes", "gauge", "Peak resident set size");
    line("zimage_host_peak_rss_bytes", double(m.host_peak_rss));
    metric("zimage_host_available_bytes", "gauge", "Host memory available (MemAvailable)");
    line("zimage_host_available_bytes", double(m.host_available));
    metric("zimage_host_accounted_bytes", "gauge", "Host bytes held by zimage's allocator (weights and activations)");
    line("zimage_host_accounted_bytes", double(m.host_accounted));
    const auto peaks = engine.peaks_by_batch_size();
    metric("zimage_batch_peak_host_bytes", "gauge", "Most host bytes held by zimage's allocator during a batch of this size");
    for (const auto& [b, p] : peaks) line(str_cat("zimage_batch_peak_host_bytes{size=\"", b, "\"}"), double(p.first));
    if (m.has_device) {
      metric("zimage_batch_peak_device_bytes", "gauge", "Most GPU bytes held during a batch of this size");
      for (const auto& [b, p] : peaks) line(str_cat("zimage_batch_peak_device_bytes{size=\"", b, "\"}"), double(p.second));
      metric("zimage_device_free_bytes", "gauge", "Free GPU memory (driver free plus the pool's cache)");
      line("zimage_device_free_bytes", double(m.device_free));
      metric("zimage_device_accounted_bytes", "gauge", "GPU bytes held by zimage's allocator");
      line("zimage_device_accounted_bytes", double(m.device_accounted));
      metric("zimage_device_accounted_peak_bytes", "gauge", "Most GPU bytes held at once");
      line("zimage_device_accounted_peak_bytes", double(m.device_accounted_peak));
      metric("zimage_device_reserved_bytes", "gauge", "GPU bytes the pool holds from the driver");
      line("zimage_device_reserved_bytes", double(m.device_reserved));
    }
    return out;
  }
};

HttpServer::HttpServer(HttpOptions o, Scheduler& sched, Engine& engine)
    : impl_(std::make_unique<Impl>(std::move(o), sched, engine)) {}
HttpServer::~HttpServer() = default;

int HttpServer::bind() {
  Impl& m = *impl_;
  if (m.o.port == 0) {
    m.port = m.svr.bind_to_any_port(m.o.host);
    if (m.port <= 0) throw Error(str_cat("serve: cannot listen on ", m.o.host, " (any port)"));
  } else {
    if (!m.svr.bind_to_port(m.o.host, m.o.port))
      throw Error(str_cat("serve: cannot listen on ", m.o.host, ":", m.o.port, " (in use, or not an address of this machine)"));
    m.port = m.o.port;
  }
  return m.port;
}

void HttpServer::listen() { impl_->svr.listen_after_bind(); }
void HttpServer::stop(std::chrono::milliseconds grace) {
  // The library ends chunked responses as soon as it stops: give open event streams a moment
  // to deliver their jobs' last event first.
  const auto until = std::chrono::steady_clock::now() + grace;
  while (impl_->streams.load() > 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  impl_->svr.stop();
}

}  // namespace zi::server
