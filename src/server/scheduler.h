// The job queue of zimage serve: a bounded queue of image requests and one worker thread
// that runs them, batching the images of queued requests that share size, steps and guidance
// settings into one generate_batch() (one DiT batch per step) of at most max_batch images.
// Every job's state is readable while it runs (step, ETA) and changes wake waiters, which
// the HTTP layer uses for synchronous replies and server-sent events.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "server/api.h"

namespace zi::server {

enum class JobState { Queued, Running, Succeeded, Failed, Cancelled };
const char* job_state_name(JobState s);
inline bool terminal(JobState s) { return s == JobState::Succeeded || s == JobState::Failed || s == JobState::Cancelled; }

struct JobImage {
  uint64_t seed = 0;
  std::string png;          // PNG bytes, with the parameters chunk
  std::string parameters;   // that chunk's text
};

// A snapshot of a job (copied under the scheduler's lock).
struct JobView {
  std::string id;
  JobState state = JobState::Queued;
  int step = 0, steps = 0;
  int images_done = 0, n = 0;
  int queue_position = 0;  // 1-based while queued
  double eta_seconds = -1;
  double created = 0, started = 0, finished = 0;  // unix seconds; 0 when not yet
  int error_status = 0;     // 500 (failure) or 503 (shut down) when failed
  std::string error;
  std::vector<JobImage> images;  // filled when succeeded (only when asked for)
  uint64_t version = 0;           // grows on every change
  int width = 0, height = 0;
  std::string prompt;
};

struct Job;

// Runs one batch. Called on the worker thread; `progress` reports steps to the scheduler.
struct BatchWork {
  std::vector<const GenerateOptions*> options;  // one per image
  std::vector<const std::atomic<bool>*> cancel;
};
struct BatchOutcome {
  bool ok = false, cancelled = false;
  std::string error;  // when !ok && !cancelled
  JobImage image;
  // When set (ok only), the image is finished (PNG-encoded) by this call on the scheduler's
  // finisher thread, so the worker starts the next batch meanwhile; it may throw (→ failed).
  std::function<JobImage()> finish;
};
using BatchRunner = std::function<std::vector<BatchOutcome>(
    const BatchWork&, const std::function<void(const std::string& phase, int step, int steps, double elapsed)>&)>;

struct SchedulerOptions {
  int max_queue = 32;          // queued requests (jobs) before 429
  int max_batch = 1;           // images per DiT batch (chosen from free memory by the engine)
  int batch_wait_ms = 10;      // after the first image is taken, wait this long for partners
  int keep_finished = 64;      // finished jobs kept for GET /v1/jobs/{id}
  double keep_finished_seconds = 900;
  // One line per finished batch (size, phase times, PNG time), e.g. to stderr; none when empty.
  std::function<void(const std::string&)> log;
};

struct SchedulerStats {
  int queued_jobs = 0, running_jobs = 0, queued_images = 0;
  uint64_t jobs_submitted = 0, jobs_rejected = 0, jobs_succeeded = 0, jobs_failed = 0, jobs_cancelled = 0;
  uint64_t images_generated = 0, batches = 0, batch_images = 0;
  std::map<int, uint64_t> batch_sizes;                 // batch size → batches
  double step_seconds_sum = 0; uint64_t step_count = 0;  // per DiT step (whole batch)
  std::map<std::string, std::pair<double, uint64_t>> phase_seconds;  // phase → (sum, count)
  double last_batch_seconds = 0;
  int max_batch = 1;
  bool accepting = true;
};

class Scheduler {
 public:
  Scheduler(SchedulerOptions opt, BatchRunner runner);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  enum class Submit { Ok, QueueFull, ShuttingDown };
  // On Ok returns the job id; `retry_after` (seconds) is set on QueueFull.
  Submit submit(const ImageRequest& req, std::string* id, int* retry_after);
  // false when the id is unknown.
  bool view(const std::string& id, JobView* out, bool with_images = true) const;
  // Waits until the job changed past `seen_version` or became terminal, or the timeout passed.
  bool wait_change(const std::string& id, uint64_t seen_version, std::chrono::milliseconds timeout, JobView* out,
                   bool with_images) const;
  // Cancels a queued or running job: 1 done, 0 already finished, -1 unknown.
  int cancel(const std::string& id);
  // Forgets a finished job now (synchronous endpoints after replying).
  void forget(const std::string& id);

  SchedulerStats stats() const;
  void set_max_batch(int b);

  // Shutdown: stop accepting; wait until idle or the deadline; cancel the rest; stop the worker.
  void stop_accepting();
  void drain(std::chrono::steady_clock::time_point deadline);

 private:
  struct Task {
    std::shared_ptr<Job> job;
    int index;
  };
  struct Finished {  // a batch the worker ran, waiting for its images to be finished
    std::vector<Task> batch;
    std::vector<BatchOutcome> out;
    double t0 = 0;
    std::string summary;  // "11 × 512×512, 8 steps: encode 0.21 s, denoise 1.62 s, decode 0.15 s"
  };
  void worker();
  void finisher();
  void complete(Finished& f);  // finishes the images, then records them (takes mu_)
  void stop_finisher();
  void finish_if_done(Job& j);  // under mu_
  void prune();                 // under mu_
  void touch(Job& j);           // under mu_
  JobView make_view(const Job& j, bool with_images) const;  // under mu_

  SchedulerOptions opt_;
  BatchRunner runner_;
  mutable std::mutex mu_;
  mutable std::condition_variable changed_;  // any job changed
  std::condition_variable work_;             // the worker has something to do
  std::deque<Task> queue_;
  std::map<std::string, std::shared_ptr<Job>> jobs_;
  std::deque<std::string> finished_order_;
  SchedulerStats st_;
  std::deque<Finished> finishing_;           // handed from the worker to the finisher
  std::condition_variable finish_work_;
  int busy_ = 0;  // batches taken from the queue and not yet recorded (running or finishing)
  bool accepting_ = true, stop_ = false, finisher_stop_ = false;
  uint64_t next_id_ = 1;
  std::thread thread_, finisher_thread_;
};

}  // namespace zi::server
