//! The one thread that compiles hot-loaded modules, at a lower scheduling priority than the
//! threads answering checks: compiling a module takes a core for tens of milliseconds, and on
//! a small machine that core is better spent on checks (p99 during continuous reloads). It is
//! owned by the [`State`](crate::State): dropping it closes the queue and joins the thread.

use std::sync::Mutex;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// The compiler thread.
pub(crate) struct Compiler {
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Option<JoinHandle<()>>,
}

impl Compiler {
    /// Start the thread.
    pub(crate) fn start() -> std::io::Result<Self> {
        let (send, jobs) = std::sync::mpsc::channel::<Job>();
        let thread = std::thread::Builder::new().name("sandgate-compile".into()).spawn(move || {
            // SAFETY: setpriority with PRIO_PROCESS and id 0 only changes this thread's nice
            // value on Linux; failure leaves the default priority, which is harmless.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            for job in jobs {
                job();
            }
        })?;
        Ok(Compiler { jobs: Mutex::new(Some(send)), thread: Some(thread) })
    }

    /// Queue `job`; `false` if the thread is gone.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.as_ref().is_some_and(|jobs| jobs.send(Box::new(job)).is_ok())
    }
}

impl Drop for Compiler {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop once the job in hand is done.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
