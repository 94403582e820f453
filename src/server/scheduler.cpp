#include "server/scheduler.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/check.h"

namespace zi::server {

namespace {

double unix_now() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}
double mono_now() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

// Images that may share one DiT batch: everything generate_batch requires to be equal.
bool same_batch(const GenerateOptions& a, const GenerateOptions& b) {
  return a.width == b.width && a.height == b.height && a.steps == b.steps && a.guidance == b.guidance &&
         a.cfg_normalization == b.cfg_normalization && a.cfg_truncation == b.cfg_truncation &&
         a.model_dir == b.model_dir && a.max_sequence_length == b.max_sequence_length;
}

}  // namespace

struct Job {
  std::string id;
  std::vector<GenerateOptions> opts;  // one per image: seeds seed, seed + 1, ...
  std::vector<JobImage> images;
  JobState state = JobState::Queued;
  int tasks_left = 0, images_done = 0, images_failed = 0;
  int step = 0, steps = 0;
  double eta = -1, created = 0, started = 0, finished = 0;
  double run_t0 = 0;
  std::string error;
  int error_status = 0;
  std::atomic<bool> cancel{false};
  uint64_t version = 1;
};

const char* job_state_name(JobState s) {
  switch (s) {
    case JobState::Queued: return "queued";
    case JobState::Running: return "running";
    case JobState::Succeeded: return "succeeded";
    case JobState::Failed: return "failed";
    case JobState::Cancelled: return "cancelled";
  }
  return "?";
}

Scheduler::Scheduler(SchedulerOptions opt, BatchRunner runner) : opt_(opt), runner_(std::move(runner)) {
  opt_.max_batch = std::max(1, opt_.max_batch);
  st_.max_batch = opt_.max_batch;
  thread_ = std::thread([this] { worker(); });
  finisher_thread_ = std::thread([this] { finisher(); });
}

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (auto& t : queue_) t.job->cancel.store(true);
    for (auto& [id, j] : jobs_) j->cancel.store(true);
  }
  work_.notify_all();
  if (thread_.joinable()) thread_.join();
  stop_finisher();
}

void Scheduler::stop_finisher() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    finisher_stop_ = true;
  }
  finish_work_.notify_all();
  if (finisher_thread_.joinable()) finisher_thread_.join();
}

void Scheduler::set_max_batch(int b) {
  std::lock_guard<std::mutex> lock(mu_);
  opt_.max_batch = std::max(1, b);
  st_.max_batch = opt_.max_batch;
}

Scheduler::Submit Scheduler::submit(const ImageRequest& req, std::string* id, int* retry_after) {
  std::unique_lock<std::mutex> lock(mu_);
  if (!accepting_) return Submit::ShuttingDown;
  if (st_.queued_jobs >= opt_.max_queue) {
    ++st_.jobs_rejected;
    const double per_batch = st_.last_batch_seconds > 0 ? st_.last_batch_seconds : 1.0;
    const double batches = std::ceil(double(st_.queued_images) / double(opt_.max_batch));
    *retry_after = std::max(1, int(std::ceil(per_batch * std::max(1.0, batches))));
    return Submit::QueueFull;
  }
  auto j = std::make_shared<Job>();
  j->id = str_cat("job-", next_id_++);
  for (int k = 0; k < req.n; ++k) {
    GenerateOptions o = req.options;
    o.seed = req.options.seed + uint64_t(k);
    j->opts.push_back(std::move(o));
  }
  j->images.resize(size_t(req.n));
  j->tasks_left = req.n;
  j->steps = req.options.steps;
  j->created = unix_now();
  jobs_[j->id] = j;
  for (int k = 0; k < req.n; ++k) queue_.push_back(Task{j, k});
  ++st_.queued_jobs;
  st_.queued_images += req.n;
  ++st_.jobs_submitted;
  *id = j->id;
  lock.unlock();
  work_.notify_all();
  return Submit::Ok;
}

JobView Scheduler::make_view(const Job& j, bool with_images) const {
  JobView v;
  v.id = j.id;
  v.state = j.state;
  v.step = j.step;
  v.steps = j.steps;
  v.images_done = j.images_done;
  v.n = int(j.opts.size());
  v.eta_seconds = j.eta;
  v.created = j.created, v.started = j.started, v.finished = j.finished;
  v.error = j.error;
  v.error_status = j.error_status;
  v.version = j.version;
  v.width = j.opts.front().width, v.height = j.opts.front().height;
  v.prompt = j.opts.front().prompt;
  if (j.state == JobState::Queued) {
    int pos = 1;
    for (const Task& t : queue_) {
      if (t.job.get() == &j) break;
      ++pos;
    }
    v.queue_position = pos;
    if (st_.last_batch_seconds > 0)
      v.eta_seconds = st_.last_batch_seconds * std::ceil(double(pos + v.n - 1) / double(opt_.max_batch));
  }
  if (with_images && j.state == JobState::Succeeded) v.images = j.images;
  return v;
}

bool Scheduler::view(const std::string& id, JobView* out, bool with_images) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return false;
  *out = make_view(*it->second, with_images);
  return true;
}

bool Scheduler::wait_change(const std::string& id, uint64_t seen, std::chrono::milliseconds timeout, JobView* out,
                            bool with_images) const {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return false;
  std::shared_ptr<Job> j = it->second;
  changed_.wait_for(lock, timeout, [&] { return j->version > seen || terminal(j->state); });
  *out = make_view(*j, with_images);
  return true;
}

void Scheduler::touch(Job& j) { ++j.version; }

void Scheduler::finish_if_done(Job& j) {
  if (j.tasks_left > 0 || terminal(j.state)) return;
  if (j.state == JobState::Queued) --st_.queued_jobs;
  if (j.state == JobState::Running) --st_.running_jobs;
  if (j.images_failed > 0) {
    j.state = JobState::Failed;
    if (!j.error_status) j.error_status = 500;
    ++st_.jobs_failed;
  } else if (j.cancel.load() || j.images_done < int(j.opts.size())) {
    j.state = JobState::Cancelled;
    ++st_.jobs_cancelled;
  } else {
    j.state = JobState::Succeeded;
    ++st_.jobs_succeeded;
  }
  j.finished = unix_now();
  j.eta = 0;
  touch(j);
  finished_order_.push_back(j.id);
  prune();
}

void Scheduler::prune() {
  const double now = unix_now();
  while (!finished_order_.empty()) {
    auto it = jobs_.find(finished_order_.front());
    if (it == jobs_.end()) {
      finished_order_.pop_front();
      continue;
    }
    const bool too_many = int(finished_order_.size()) > opt_.keep_finished;
    const bool too_old = now - it->second->finished > opt_.keep_finished_seconds;
    if (!too_many && !too_old) break;
    jobs_.erase(it);
    finished_order_.pop_front();
  }
}

void Scheduler::forget(const std::string& id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it != jobs_.end() && terminal(it->second->state)) jobs_.erase(it);
}

int Scheduler::cancel(const std::string& id) {
  std::unique_lock<std::mutex> lock(mu_);
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return -1;
  std::shared_ptr<Job> j = it->second;
  if (terminal(j->state)) return 0;
  j->cancel.store(true);
  const size_t before = queue_.size();
  queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [&](const Task& t) { return t.job == j; }), queue_.end());
  const int removed = int(before - queue_.size());
  j->tasks_left -= removed;
  st_.queued_images -= removed;
  touch(*j);
  finish_if_done(*j);
  lock.unlock();
  changed_.notify_all();
  return 1;
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SchedulerStats s = st_;
  s.accepting = accepting_;
  return s;
}

void Scheduler::stop_accepting() {
  std::lock_guard<std::mutex> lock(mu_);
  accepting_ = false;
}

void Scheduler::drain(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  accepting_ = false;
  changed_.wait_until(lock, deadline, [&] { return queue_.empty() && busy_ == 0; });
  // Past the deadline: cancel what is left (queued jobs at once, the running batch at its next step).
  for (auto& [id, j] : jobs_) {
    if (terminal(j->state)) continue;
    j->cancel.store(true);
    j->error = "the server is shutting down";
    j->error_status = 503;
  }
  for (const Task& t : queue_) {
    --t.job->tasks_left;
    --st_.queued_images;
  }
  std::vector<std::shared_ptr<Job>> affected;
  for (const Task& t : queue_) affected.push_back(t.job);
  queue_.clear();
  for (auto& j : affected) finish_if_done(*j);
  changed_.notify_all();
  changed_.wait(lock, [&] { return busy_ == 0; });
  stop_ = true;
  lock.unlock();
  work_.notify_all();
  if (thread_.joinable()) thread_.join();
  stop_finisher();
}

void Scheduler::worker() {
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (stop_) return;
    if (opt_.batch_wait_ms > 0 && int(queue_.size()) < opt_.max_batch) {
      // Requests that arrive together: give partners a moment to join this batch.
      work_.wait_for(lock, std::chrono::milliseconds(opt_.batch_wait_ms),
                     [&] { return stop_ || int(queue_.size()) >= opt_.max_batch; });
      if (stop_) return;
      if (queue_.empty()) continue;
    }
    // The oldest image and the queued images that can share its batch, in arrival order.
    std::vector<Task> batch;
    const GenerateOptions& key = queue_.front().job->opts[size_t(queue_.front().index)];
    for (auto it = queue_.begin(); it != queue_.end() && int(batch.size()) < opt_.max_batch;) {
      if (same_batch(key, it->job->opts[size_t(it->index)])) {
        batch.push_back(*it);
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    BatchWork work;
    for (const Task& t : batch) {
      Job& j = *t.job;
      --st_.queued_images;
      if (j.state == JobState::Queued) {
        j.state = JobState::Running;
        j.started = unix_now();
        j.run_t0 = mono_now();
        --st_.queued_jobs;
        ++st_.running_jobs;
      }
      touch(j);
      work.options.push_back(&j.opts[size_t(t.index)]);
      work.cancel.push_back(&j.cancel);
    }
    ++busy_;
    ++st_.batches;
    st_.batch_images += batch.size();
    ++st_.batch_sizes[int(batch.size())];
    lock.unlock();
    changed_.notify_all();

    const double t0 = mono_now();
    std::string phase;
    double phase_t0 = t0, last_step_elapsed = 0;
    std::string summary;
    {
      const GenerateOptions& o = *work.options[0];
      char buf[96];
      std::snprintf(buf, sizeof buf, "%zu × %d×%d, %d steps:", batch.size(), o.width, o.height, o.steps);
      summary = buf;
    }
    auto close_phase = [&](double now) {
      if (phase.empty()) return;
      char buf[96];
      std::snprintf(buf, sizeof buf, " %s %.3f s,", phase.c_str(), now - phase_t0);
      summary += buf;
      auto& ps = st_.phase_seconds[phase];
      ps.first += now - phase_t0;
      ps.second += 1;
    };
    auto progress = [&](const std::string& ph, int step, int steps, double elapsed) {
      std::lock_guard<std::mutex> g(mu_);
      const double now = mono_now();
      if (ph != phase) {
        close_phase(now);
        phase = ph;
        phase_t0 = now;
        last_step_elapsed = 0;
      }
      if (step > 0) {
        st_.step_seconds_sum += elapsed - last_step_elapsed;
        ++st_.step_count;
        last_step_elapsed = elapsed;
      }
      for (const Task& t : batch) {
        Job& j = *t.job;
        if (ph == "denoise" && step > 0) {
          j.step = step;
          j.steps = steps;
          const double per_step = elapsed / step;
          j.eta = per_step * (steps - step) + (st_.phase_seconds.count("decode")
                                                   ? st_.phase_seconds["decode"].first /
                                                         double(std::max<uint64_t>(1, st_.phase_seconds["decode"].second))
                                                   : 0.0);
        }
        touch(j);
      }
      changed_.notify_all();
    };
    std::vector<BatchOutcome> out;
    std::string batch_error;
    try {
      out = runner_(work, progress);
    } catch (const std::exception& e) {
      batch_error = e.what();
    } catch (...) {
      batch_error = "unknown failure";
    }
    if (out.size() != batch.size()) {
      out.assign(batch.size(), BatchOutcome{});
      for (auto& o : out) o.error = batch_error.empty() ? "internal error: batch result count" : batch_error;
    }

    lock.lock();
    close_phase(mono_now());
    finishing_.push_back(Finished{std::move(batch), std::move(out), t0, std::move(summary)});
    lock.unlock();
    finish_work_.notify_one();
  }
}

// Image finishing (PNG encoding, on the CPU) runs here, beside the worker's next batch on the
// device; a batch's images are encoded in parallel. Records the results as the worker used to.
void Scheduler::finisher() {
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    finish_work_.wait(lock, [&] { return finisher_stop_ || !finishing_.empty(); });
    if (finishing_.empty()) return;  // stopping, nothing left
    Finished f = std::move(finishing_.front());
    finishing_.pop_front();
    lock.unlock();
    complete(f);
  }
}

void Scheduler::complete(Finished& f) {
  const double f0 = mono_now();
  std::vector<std::thread> threads;
  for (BatchOutcome& o : f.out) {
    if (!o.ok || !o.finish) continue;
    threads.emplace_back([&o] {
      try {
        o.image = o.finish();
      } catch (const std::exception& e) {
        o.ok = false;
        o.error = e.what();
      } catch (...) {
        o.ok = false;
        o.error = "unknown failure while encoding the image";
      }
      o.finish = nullptr;
    });
  }
  for (std::thread& t : threads) t.join();

  std::lock_guard<std::mutex> lock(mu_);
  const double now = mono_now();
  if (!threads.empty()) {
    auto& ps = st_.phase_seconds["png"];
    ps.first += now - f0;
    ps.second += 1;
  }
  st_.last_batch_seconds = now - f.t0;
  for (size_t k = 0; k < f.batch.size(); ++k) {
    Job& j = *f.batch[k].job;
    BatchOutcome& o = f.out[k];
    if (o.ok) {
      j.images[size_t(f.batch[k].index)] = std::move(o.image);
      ++j.images_done;
      ++st_.images_generated;
    } else if (!o.cancelled) {
      ++j.images_failed;
      if (j.error.empty()) j.error = o.error;
    }
    --j.tasks_left;
    touch(j);
    finish_if_done(j);
  }
  --busy_;
  changed_.notify_all();
  if (opt_.log) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " png %.3f s; batch done %.3f s after it started", now - f0, now - f.t0);
    opt_.log("batch " + f.summary + buf);
  }
}

}  // namespace zi::server
