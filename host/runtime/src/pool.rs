//! The evaluation pool: the threads every policy call runs on, so the async workers that read
//! requests, answer health checks and serve other routes never wait behind a policy.
//!
//! - A fixed number of threads take jobs from one queue in arrival order, except that a job
//!   whose policy already runs on its cap of threads waits while later jobs of other policies
//!   go first: one route's slow or looping policy cannot take every thread.
//! - Every job has a deadline (its check's queue timeout). A job still queued at its deadline
//!   is answered `overloaded` (a deny) by the caller, and the thread that finds it skips it.
//! - How many jobs may be queued or running at once is bounded by the caller (the runtime's
//!   permits), so the queue never grows without bound.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const ABANDONED: u8 = 2;

/// A job's state, shared with the caller waiting for it.
#[derive(Clone, Default)]
pub(crate) struct Ticket(Arc<AtomicU8>);

impl Ticket {
    /// Give up on a job that has not started: `true` if it never will, `false` if it is
    /// already running or done (its result will come, or has).
    pub(crate) fn abandon(&self) -> bool {
        self.0.compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    fn start(&self) -> bool {
        self.0.compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// How many threads one policy occupies now; shared by every job of that policy.
#[derive(Clone, Default)]
pub(crate) struct PolicyLoad(Arc<AtomicUsize>);

struct Job {
    load: PolicyLoad,
    ticket: Ticket,
    deadline: Instant,
    run: Box<dyn FnOnce() + Send>,
}

struct Queue {
    jobs: VecDeque<Job>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    work: Condvar,
    per_policy: usize,
}

/// The pool; dropping it lets the threads finish what is queued, then joins them.
pub(crate) struct EvalPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl EvalPool {
    /// `threads` threads; one policy runs on at most `per_policy` of them at once.
    pub(crate) fn start(threads: usize, per_policy: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closing: false }),
            work: Condvar::new(),
            per_policy: per_policy.max(1),
        });
        let threads = (0..threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new().name(format!("sandgate-eval-{i}")).spawn(move || work(&shared))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(EvalPool { shared, threads })
    }

    /// Queue `run` for a policy with `load`; it starts no later than `deadline` or not at all.
    pub(crate) fn submit(&self, load: &PolicyLoad, deadline: Instant, run: impl FnOnce() + Send + 'static) -> Ticket {
        let ticket = Ticket::default();
        let job = Job { load: load.clone(), ticket: ticket.clone(), deadline, run: Box::new(run) };
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).jobs.push_back(job);
        self.shared.work.notify_one();
        ticket
    }
}

impl Drop for EvalPool {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        self.shared.work.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut queue = shared.queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let now = Instant::now();
                // Jobs whose deadline passed, or that nobody waits for any more, are dropped.
                queue.jobs.retain(|job| {
                    if job.deadline <= now {
                        job.ticket.abandon();
                    }
                    job.ticket.0.load(Ordering::Acquire) == QUEUED
                });
                let next = queue.jobs.iter().position(|job| job.load.0.load(Ordering::Acquire) < shared.per_policy);
                if let Some(job) = next.and_then(|i| queue.jobs.remove(i)) {
                    // Counted under the lock, so two threads cannot both pass the cap.
                    job.load.0.fetch_add(1, Ordering::AcqRel);
                    break job;
                }
                if queue.closing && queue.jobs.is_empty() {
                    return;
                }
                // Wake for new work, a policy's thread coming free, or the next deadline.
                let wait = queue.jobs.iter().map(|job| job.deadline.saturating_duration_since(now)).min();
                queue = match wait {
                    Some(wait) => shared.work.wait_timeout(queue, wait).unwrap_or_else(|e| e.into_inner()).0,
                    None => shared.work.wait(queue).unwrap_or_else(|e| e.into_inner()),
                };
            }
        };
        if job.ticket.start() {
            // A panic (a host bug; guest faults are traps, not panics) must not take the thread
            // or the policy's share with it: the caller's answer channel is dropped, which it
            // answers as a deny.
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job.run)).is_err() {
                tracing::error!("a policy evaluation panicked; answered as a deny");
            }
        }
        job.load.0.fetch_sub(1, Ordering::AcqRel);
        // A job of this policy held back by its cap may run now. With nothing queued there is
        // nobody to wake: waking a thread anyway costs an idle machine two thread switches a
        // check.
        if !shared.queue.lock().unwrap_or_else(|e| e.into_inner()).jobs.is_empty() {
            shared.work.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A job held back by its policy's cap waits while the policy's thread is busy, although
    /// another thread is free, and runs once that thread frees (not at its deadline).
    #[test]
    fn a_job_held_back_by_its_cap_runs_when_the_policy_frees_a_thread() {
        let pool = EvalPool::start(2, 1).unwrap();
        let load = PolicyLoad::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (release, hold) = mpsc::channel::<()>();
        let (started, first_running) = mpsc::channel();
        pool.submit(&load, deadline, move || {
            started.send(()).unwrap();
            hold.recv().unwrap();
        });
        first_running.recv_timeout(Duration::from_secs(5)).expect("the first job runs");
        let (done, second_done) = mpsc::channel();
        pool.submit(&load, deadline, move || done.send(()).unwrap());
        // The second job is queued behind the cap while the first holds the policy's thread.
        assert!(second_done.recv_timeout(Duration::from_millis(100)).is_err(), "the cap was not enforced");
        release.send(()).unwrap();
        // A liveness bound, far below the job's 30 s deadline.
        second_done.recv_timeout(Duration::from_secs(5)).expect("the held-back job ran once the policy's thread freed");
    }

    /// With nothing queued, a finished job wakes no other thread: a check on an idle pool costs
    /// one evaluation thread one wake-up. (Waking another thread after every job cost an idle
    /// machine two more thread switches a check.)
    #[test]
    fn a_finished_job_wakes_no_thread_when_nothing_is_queued() {
        let pool = EvalPool::start(2, 2).unwrap();
        let load = PolicyLoad::default();
        let deadline = || Instant::now() + Duration::from_secs(30);
        // Learn both threads' ids: two jobs that wait for each other run on both threads.
        let barrier = Arc::new(std::sync::Barrier::new(3));
        let (tid, tids) = mpsc::channel();
        for _ in 0..2 {
            let (barrier, tid) = (barrier.clone(), tid.clone());
            pool.submit(&load, deadline(), move || {
                tid.send(std::fs::read_link("/proc/thread-self").unwrap()).unwrap();
                barrier.wait();
            });
        }
        barrier.wait();
        let tasks: Vec<_> = (0..2).map(|_| tids.recv().unwrap()).collect();
        let switches = || -> u64 {
            tasks
                .iter()
                .map(|task| {
                    let status = std::fs::read_to_string(Path::new("/proc").join(task).join("status")).unwrap();
                    let line = status.lines().find(|l| l.starts_with("voluntary_ctxt_switches:")).unwrap();
                    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
                })
                .sum()
        };
        // Let both threads go back to waiting.
        std::thread::sleep(Duration::from_millis(50));
        let before = switches();
        const JOBS: u64 = 200;
        for _ in 0..JOBS {
            let (done, finished) = mpsc::channel();
            pool.submit(&load, deadline(), move || done.send(()).unwrap());
            finished.recv_timeout(Duration::from_secs(5)).unwrap();
            // Checks arriving apart, as on an idle sidecar: both threads are waiting again.
            std::thread::sleep(Duration::from_millis(1));
        }
        // The thread that ran a job goes back to waiting: one switch a job. A wake-up of the
        // other thread after each job would add one more.
        let per_job = (switches() - before) as f64 / JOBS as f64;
        assert!(per_job < 1.5, "{per_job:.2} thread switches a job");
    }
}
