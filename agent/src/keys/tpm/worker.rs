//! The thread that owns the TPM connection. `tss_esapi::Context` is `!Send`, and
//! a TPM runs one command at a time anyway, so one thread holds it and everyone
//! else sends it jobs over a channel and waits for the answer. A caller is
//! blocked only for its own job (and any job queued before it), never by a lock
//! held across TPM calls. The thread ends when the last handle is dropped.
//!
//! The connection is closed after [`IDLE_CLOSE`] without jobs and opened again
//! for the next one: a long-running daemon then does not hold an exclusive TPM
//! (`/dev/tpm0`, swtpm's single client slot) between renewals, and a TPM
//! simulator or resource manager that was restarted meanwhile is simply
//! reconnected.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use super::errors::TpmError;
use super::ops::Tpm;

/// How long an unused connection stays open.
pub const IDLE_CLOSE: Duration = Duration::from_secs(2);

type Job = Box<dyn FnOnce(Result<&mut Tpm, TpmError>) + Send>;

/// A handle to the worker thread; cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread and opens the TCTI on it; fails if the TPM cannot be
    /// reached (so configuration mistakes show up at once).
    pub fn start(tcti: &str) -> Result<Worker, TpmError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(), TpmError>>(1);
        let tcti = tcti.to_string();
        thread::Builder::new()
            .name("tpm-worker".into())
            .spawn(move || {
                let first = match Tpm::connect(&tcti) {
                    Ok(t) => {
                        let _ = ready_tx.send(Ok(()));
                        t
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                serve(&tcti, first, &queue);
                log::debug!("TPM worker stopping: no users left");
            })
            .map_err(TpmError::Spawn)?;
        ready_rx.recv().map_err(|_| TpmError::WorkerGone)??;
        Ok(Worker { jobs })
    }

    /// Runs `job` on the worker thread and waits for its result.
    pub fn call<T, F>(&self, job: F) -> Result<T, TpmError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tpm) -> Result<T, TpmError> + Send + 'static,
    {
        let (reply_tx, reply_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |tpm| {
            let _ = reply_tx.send(tpm.and_then(job));
        });
        self.jobs.send(job).map_err(|_| TpmError::WorkerGone)?;
        reply_rx.recv().map_err(|_| TpmError::WorkerGone)?
    }
}

/// The worker loop: runs jobs in order, closing the connection when idle.
fn serve(tcti: &str, first: Tpm, queue: &mpsc::Receiver<Job>) {
    let mut tpm = Some(first);
    loop {
        let job = match tpm {
            Some(_) => match queue.recv_timeout(IDLE_CLOSE) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    tpm = None; // drops the Context: the TCTI is closed
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        if tpm.is_none() {
            match Tpm::connect(tcti) {
                Ok(t) => tpm = Some(t),
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            }
        }
        if let Some(t) = tpm.as_mut() {
            // A bug in one job must not take the TPM away from the others; the
            // job's caller sees its reply channel close (WorkerGone).
            if panic::catch_unwind(AssertUnwindSafe(|| job(Ok(t)))).is_err() {
                log::error!("a TPM job panicked; reconnecting for the next one");
                tpm = None;
            } else if t.reconnect {
                tpm = None;
            }
        }
    }
}
