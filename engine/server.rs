//! `reel serve`: an HTTP backend shaped like OpenAI's video API, so existing clients work.
//!
//! One worker thread owns the model (loaded once at start-up) and runs jobs one at a time
//! from a bounded queue (429 when full). Jobs are durable: each is a JSON record under
//! `<data-dir>/jobs/` and its video and thumbnail live under `<data-dir>/videos/`. After a
//! restart, finished jobs are listed and downloadable again; jobs that were queued or
//! running are marked failed (code `server_restarted`): the client resubmits them.
//! Cancellation (DELETE) is checked between denoising steps.

// Request validation returns the ready 400 response as its error: a cold path, where the
// size of axum's Response does not matter.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Path as AxPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::generate::{load_model, parse_size, render, GenerateArgs, Render};
use crate::models::embedded;
use crate::pipeline::Pipeline;

/// `reel serve`'s settings.
#[derive(Debug, Clone)]
pub struct ServeArgs {
    pub model: Option<String>,
    pub random_weights: bool,
    pub addr: String,
    pub data_dir: PathBuf,
    pub max_queue: usize,
    pub keep_hours: Option<f64>,
    pub max_disk_gb: Option<f64>,
    pub api_key: Option<String>,
    /// The kernel device the worker runs every job on (None: the cpu).
    pub device: Option<crate::kernels::KernelDevice>,
    /// GiB of device memory each job's plan must fit (default: the GPU's free memory at
    /// start; 80 on emu).
    pub device_memory_gib: Option<f64>,
    /// Seconds a connection may go without reading or writing a byte, and the most a
    /// request body may take to arrive, before the server gives up on it (default 30).
    pub idle_timeout_secs: Option<f64>,
    /// Connections served at once; more wait in the listen backlog (default 256).
    pub max_connections: Option<usize>,
    /// Jobs on a Redis stream, outputs in a shared store (`--queue`): see crate::cluster.
    pub cluster: Option<crate::cluster::ClusterArgs>,
}

/// Defaults of [`ServeArgs::idle_timeout_secs`] and [`ServeArgs::max_connections`].
pub const IDLE_TIMEOUT_SECS: f64 = 30.0;
pub const MAX_CONNECTIONS: usize = 256;

/// The listener `reel serve` accepts on: at most `permits` connections at once (accept waits
/// for one to close), each closed after `idle` without a byte read or written (a client that
/// stops sending mid-request, or never sends one, does not hold a connection forever).
struct Bounded {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
    permits_total: usize,
    idle: Duration,
}

impl Bounded {
    async fn accept(&self) -> Conn {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    return Conn {
                        io,
                        _permit: permit,
                        idle: self.idle,
                        deadline: Box::pin(tokio::time::sleep(self.idle)),
                    };
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves HTTP/1 on `listener` until `stop`, then lets open connections finish their
/// request (at most `drain`). What axum::serve does, plus a deadline on each request's
/// headers as a whole: a client that trickles them a byte at a time, never idle long enough
/// for the idle timeout, is still cut off `headers` after its request began.
async fn serve_http(
    listener: Bounded,
    app: Router,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    headers: Duration,
    drain: Duration,
) {
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = &mut stop => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(headers);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection: {e}");
                    }
                    return;
                }
                _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
        });
    }
    let _ = closing_tx.send(true);
    // Every open connection holds a permit: all of them back means all closed.
    let all = u32::try_from(listener.permits_total).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(drain, listener.permits.acquire_many(all)).await;
}

/// A connection that holds one of the listener's permits and times out when idle.
struct Conn {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl Conn {
    fn touch(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// Pending I/O: an error once the connection has been idle too long.
    fn check_idle<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        match std::future::Future::poll(self.deadline.as_mut(), cx) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection was idle too long",
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let me = &mut *self;
        match std::pin::Pin::new(&mut me.io).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                me.touch();
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => me.check_idle(cx),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = &mut *self;
        match std::pin::Pin::new(&mut me.io).poll_write(cx, buf) {
            std::task::Poll::Ready(r) => {
                me.touch();
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => me.check_idle(cx),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
}

impl Status {
    fn finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

/// A job: the OpenAI video object's fields, plus what reel needs to run it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub model: String,
    pub status: Status,
    pub progress: u32,
    pub created_at: u64,
    /// Creation time in nanoseconds: the list order (created_at has one-second resolution).
    #[serde(default)]
    pub created_ns: u128,
    pub completed_at: Option<u64>,
    pub size: String,
    pub seconds: String,
    pub error: Option<Value>,
    pub prompt: String,
    pub negative_prompt: String,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub fps: u32,
    /// Said before the first step when the run is unlikely to draw well (the demo model at a
    /// size it was not trained at); a reel field of the video object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// With `--queue`: the worker that ran (or runs) the job, and how many times a worker
    /// started it (more than 1 after a worker was lost); reel fields of the video object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// A block-causal model's job: chunks written so far and in all (a reel field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<[u32; 2]>,
}

impl Job {
    /// A job whose record on disk could not be read: failed with code `record_unreadable`.
    pub(crate) fn unreadable(id: &str, model: &str, at: u64, at_ns: u128, message: String) -> Job {
        Job {
            id: id.to_string(),
            model: model.to_string(),
            status: Status::Failed,
            progress: 0,
            created_at: at,
            created_ns: at_ns,
            completed_at: Some(at),
            size: String::new(),
            seconds: String::new(),
            error: Some(json!({"code": "record_unreadable", "message": message})),
            prompt: String::new(),
            negative_prompt: String::new(),
            frames: 0,
            steps: 0,
            guidance: 0.0,
            seed: 0,
            fps: 0,
            warning: None,
            worker: None,
            attempts: None,
            chunks: None,
        }
    }

    /// The video object as the API returns it.
    pub(crate) fn object(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "video",
            "model": self.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "size": self.size,
            "seconds": self.seconds,
            "error": self.error,
            "prompt": self.prompt,
            "frames": self.frames,
            "fps": self.fps,
            "seed": self.seed,
        });
        if let Some(w) = &self.warning {
            v["warning"] = json!(w);
        }
        if let Some(w) = &self.worker {
            v["worker"] = json!(w);
        }
        if let Some(a) = self.attempts {
            v["attempts"] = json!(a);
        }
        if let Some([done, total]) = self.chunks {
            v["chunks"] = json!({"done": done, "total": total});
        }
        v
    }
}

struct Entry {
    job: Job,
    cancel: Arc<AtomicBool>,
}

pub(crate) struct Shared {
    jobs: Mutex<BTreeMap<String, Entry>>,
    tx: SyncSender<String>,
    pub(crate) data: PathBuf,
    /// With `--queue`: the queue and store every API handler and the worker go through.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    pub(crate) max_queue: usize,
    /// The idle timeout of connections, and the most a request body may take.
    idle: Duration,
    /// On the cpu: the memory estimate every request is checked with at submission.
    cpu_estimate: Option<crate::generate::CpuEstimate>,
    model_name: String,
    embedded: bool,
    api_key: Option<String>,
    queued: AtomicUsize,
    step_nanos: AtomicU64,
    steps: AtomicU64,
    keep_hours: Option<f64>,
    max_disk_gb: Option<f64>,
    pub(crate) shutdown: AtomicBool,
    /// On a kernel device: its description, the pipeline root (for each request's plan) and
    /// the device memory the plans must fit (free memory when the server started, before
    /// its weights went up).
    device: Option<DeviceInfo>,
}

struct DeviceInfo {
    dev: crate::kernels::KernelDevice,
    root: String,
    budget_bytes: u64,
}

impl DeviceInfo {
    /// The plan of a request (size, frames) on this device: Ok(the plan) or a 400 naming
    /// the field to change.
    fn admit(
        &self,
        size: &str,
        frames: usize,
        seconds_given: bool,
    ) -> std::result::Result<crate::plan::PlanReport, Response> {
        let field = if seconds_given { "seconds" } else { "size" };
        let r = crate::plan::plan(&crate::plan::PlanArgs {
            model: Some(self.root.clone()),
            size: Some(size.to_string()),
            frames: Some(frames),
            device_memory_gib: Some(self.budget_bytes as f64 / (1u64 << 30) as f64),
            arch: None,
            causal: None,
        })
        .map_err(|e| bad(field, e.to_string()))?;
        if !r.fits {
            return Err(bad(
                field,
                format!(
                    "{size} x {frames} frames needs {:.2} GiB on {} and it has {:.2} GiB: use a smaller `size` or fewer `seconds`",
                    r.peak_bytes as f64 / (1u64 << 30) as f64,
                    self.dev.describe(),
                    self.budget_bytes as f64 / (1u64 << 30) as f64
                ),
            ));
        }
        Ok(r)
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Opaque ids: `video_` and 32 hex digits of Philox output keyed by time and a counter.
fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let w = crate::rng::philox4x32_10(
        [c as u32, (c >> 32) as u32, std::process::id(), 0],
        [t as u32, (t >> 32) as u32],
    );
    format!("video_{:08x}{:08x}{:08x}{:08x}", w[0], w[1], w[2], w[3])
}

/// Only ids of our own shape ever reach the filesystem.
pub(crate) fn valid_id(id: &str) -> bool {
    id.len() == 38
        && id.starts_with("video_")
        && id[6..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

pub(crate) fn api_error(
    status: StatusCode,
    message: impl Into<String>,
    param: Option<&str>,
    code: Option<&str>,
) -> Response {
    let kind = match status {
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::NOT_FOUND => "not_found_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}

fn bad(param: &str, message: impl Into<String>) -> Response {
    api_error(StatusCode::BAD_REQUEST, message, Some(param), None)
}

impl Shared {
    fn job_path(&self, id: &str) -> PathBuf {
        self.data.join("jobs").join(format!("{id}.json"))
    }
    fn video_path(&self, id: &str) -> PathBuf {
        self.data.join("videos").join(format!("{id}.mp4"))
    }
    fn thumb_path(&self, id: &str) -> PathBuf {
        self.data.join("videos").join(format!("{id}.png"))
    }

    /// Writes the job record durably (temporary file, every write checked, synced, then
    /// renamed); false (and a log line naming the file and the OS error) when it could not.
    fn persist(&self, job: &Job) -> bool {
        let path = self.job_path(&job.id);
        let written = serde_json::to_vec_pretty(job)
            .map_err(|e| Error::invalid(e.to_string()))
            .and_then(|b| crate::io::write_atomic(&path, &b));
        match written {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("could not write the job record: {e}");
                false
            }
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
        self.update_persisted(id, f).map(|(job, _)| job)
    }

    /// As `update`, also saying whether the record reached the disk.
    fn update_persisted(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<(Job, bool)> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let e = jobs.get_mut(id)?;
        f(&mut e.job);
        let job = e.job.clone();
        drop(jobs);
        let saved = self.persist(&job);
        Some((job, saved))
    }

    /// Marks a job failed with `code` (kept in memory even if its record cannot be written)
    /// and removes every file it made, so nothing partial is ever served.
    /// The files go first: a client that sees `failed` finds none of them left.
    fn fail(&self, id: &str, code: &str, message: String) {
        tracing::warn!("job {id} failed ({code}): {message}");
        self.remove_outputs(id);
        self.update(id, |j| {
            j.status = Status::Failed;
            j.completed_at = Some(now());
            j.error = Some(json!({"code": code, "message": message}));
        });
    }

    /// Removes the job's video, thumbnail and sidecar (not its record).
    fn remove_outputs(&self, id: &str) {
        for p in [self.video_path(id), self.thumb_path(id), self.sidecar(id)] {
            let _ = std::fs::remove_file(p);
        }
    }

    fn remove_files(&self, id: &str) {
        let _ = std::fs::remove_file(self.job_path(id));
        self.remove_outputs(id);
    }

    /// Removes what no job owns under videos/: files of jobs without a record (a record
    /// deleted by hand, a crash between the files and the record) and temporary files of
    /// writes a crash interrupted. Each removal is logged.
    fn remove_orphans(&self) {
        let dir = self.data.join("videos");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().unwrap_or("");
            let partial = name.contains(".partial-");
            if partial || !valid_id(id) || !jobs.contains_key(id) {
                let what = if partial {
                    "an interrupted write"
                } else {
                    "no job owns it"
                };
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::warn!("removed {} ({what})", entry.path().display()),
                    Err(e) => tracing::warn!("{} ({what}): {e}", entry.path().display()),
                }
            }
        }
    }

    fn sidecar(&self, id: &str) -> PathBuf {
        self.data.join("videos").join(format!("{id}.mp4.json"))
    }

    /// Evicts finished jobs older than keep_hours, then the oldest finished ones while the
    /// videos take more than max_disk_gb.
    fn retention(&self) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let size = |id: &str| {
            [self.video_path(id), self.thumb_path(id)]
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum::<u64>()
        };
        let evict = retention_plan(
            jobs.values().map(|e| &e.job),
            self.keep_hours,
            self.max_disk_gb,
            jobs.keys().map(|id| size(id)).sum(),
            &size,
        );
        for id in evict {
            jobs.remove(&id);
            self.remove_files(&id);
            tracing::info!("retention: evicted {id}");
        }
    }
}

/// The finished jobs retention evicts: those completed more than `keep_hours` ago, then the
/// oldest while the outputs (`total` bytes, `size` per job) take more than `max_disk_gb`.
pub(crate) fn retention_plan<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    keep_hours: Option<f64>,
    max_disk_gb: Option<f64>,
    mut total: u64,
    size: &dyn Fn(&str) -> u64,
) -> Vec<String> {
    let mut finished: Vec<(u64, String)> = jobs
        .filter(|j| j.status.finished())
        .map(|j| (j.completed_at.unwrap_or(j.created_at), j.id.clone()))
        .collect();
    finished.sort();
    let mut evict = Vec::new();
    if let Some(h) = keep_hours {
        let cutoff = now().saturating_sub((h * 3600.0) as u64);
        evict.extend(
            finished
                .iter()
                .filter(|(t, _)| *t < cutoff)
                .map(|(_, id)| id.clone()),
        );
    }
    if let Some(gb) = max_disk_gb {
        let limit = (gb * 1e9) as u64;
        for (_, id) in &finished {
            if total <= limit {
                break;
            }
            if !evict.contains(id) {
                total = total.saturating_sub(size(id));
                evict.push(id.clone());
            }
        }
    }
    evict
}

/// Runs jobs one at a time on the thread that owns the model.
fn worker(shared: Arc<Shared>, pipe: Pipeline, rx: Receiver<String>) {
    loop {
        let id = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(id) => id,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if shared.shutdown.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        shared.queued.fetch_sub(1, Ordering::SeqCst);
        let (job, cancel) = {
            let jobs = shared.jobs.lock().unwrap_or_else(|p| p.into_inner());
            match jobs.get(&id) {
                Some(e) if e.job.status == Status::Queued => (e.job.clone(), e.cancel.clone()),
                _ => continue, // cancelled or deleted while queued
            }
        };
        shared.update(&id, |j| j.status = Status::InProgress);
        let flag: crate::cancel::Flag = {
            let (c, sh) = (cancel.clone(), shared.clone());
            Arc::new(move || c.load(Ordering::SeqCst) || sh.shutdown.load(Ordering::SeqCst))
        };
        let result = render_job(
            &shared,
            &pipe,
            &job,
            &shared.video_path(&id),
            &shared.thumb_path(&id),
            flag.clone(),
            &mut |step, steps| {
                // Denoising is 90% of the progress bar; the decode the rest. A block-causal
                // model reports chunks (each decoded and written when reported).
                let streaming = pipe.causal.is_some();
                shared.update(&id, |j| {
                    j.progress = (90 * step / steps.max(1)) as u32;
                    if streaming {
                        j.chunks = Some([step as u32, steps as u32]);
                    }
                });
                if flag() {
                    Err(Error::Interrupted)
                } else {
                    Ok(())
                }
            },
        );
        match result {
            Ok(_) => {
                let saved = shared.update_persisted(&id, |j| {
                    j.status = Status::Completed;
                    j.progress = 100;
                    j.completed_at = Some(now());
                });
                if let Some((_, false)) = saved {
                    // A completion that could not be recorded would not survive a restart:
                    // the job fails now, and its files go.
                    shared.fail(
                        &id,
                        "write_failed",
                        format!(
                            "the job record {} could not be written",
                            shared.job_path(&id).display()
                        ),
                    );
                }
            }
            Err(e) => {
                let (code, message) = failure(e);
                shared.fail(&id, code, message);
            }
        }
        shared.retention();
    }
}

/// The error code and message a failed job records.
pub(crate) fn failure(e: Error) -> (&'static str, String) {
    match e {
        Error::Interrupted => ("cancelled", "the job was cancelled".to_string()),
        e @ Error::Io { .. } => ("write_failed", e.to_string()),
        e @ Error::OutOfMemory { .. } => ("out_of_memory", e.to_string()),
        other => ("generation_failed", other.to_string()),
    }
}

/// Renders `job` on the worker's model into `video` and `thumb` (its plan checked again on
/// a device: admitted at submission, it decides whether the text encoder stays resident).
/// `on_step(step, steps)` runs after each denoising step; an error there, or `cancel`,
/// stops the render. Step times go to the server's metrics.
pub(crate) fn render_job(
    shared: &Shared,
    pipe: &Pipeline,
    job: &Job,
    video: &Path,
    thumb: &Path,
    cancel: crate::cancel::Flag,
    on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<()> {
    if let Some(w) = &job.warning {
        tracing::warn!("job {}: {w}", job.id);
    }
    let size = parse_size(&job.size).unwrap_or(embedded::DEFAULT_SIZE);
    let planned = match &shared.device {
        Some(d) => match d.admit(&job.size, job.frames, false) {
            Ok(r) => {
                pipe.set_text_resident(r.text_encoder_resident);
                Some(r.peak_bytes as u64)
            }
            Err(_) => {
                return Err(Error::invalid(format!(
                    "{} x {} frames no longer fits the device",
                    job.size, job.frames
                )))
            }
        },
        None => None,
    };
    let render_job = Render {
        prompt: Some(job.prompt.clone()),
        negative_prompt: job.negative_prompt.clone(),
        seed: job.seed,
        size,
        frames: job.frames,
        steps: job.steps,
        guidance: job.guidance,
        shift: None,
        sampler: None,
        fps: job.fps,
        output: video.to_string_lossy().into_owned(),
        cond: None,
        init_latents: None,
        thumbnail: Some(thumb.to_path_buf()),
        plan_peak_bytes: planned,
        cancel: Some(cancel),
    };
    let progress = indicatif::ProgressBar::hidden();
    let mut last = std::time::Instant::now();
    render(
        pipe,
        &shared.model_name,
        &render_job,
        0.0,
        &progress,
        &mut |step, steps| {
            shared
                .step_nanos
                .fetch_add(last.elapsed().as_nanos() as u64, Ordering::Relaxed);
            shared.steps.fetch_add(1, Ordering::Relaxed);
            last = std::time::Instant::now();
            on_step(step, steps)
        },
    )
    .map(|_| ())
}

/// Integer fields that may arrive as JSON numbers or strings (multipart, OpenAI's "4").
fn int_field(
    map: &Map<String, Value>,
    name: &str,
    range: std::ops::RangeInclusive<u64>,
) -> std::result::Result<Option<u64>, Response> {
    let v = match map.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if range.contains(&n) => Ok(Some(n)),
        _ => Err(bad(
            name,
            format!(
                "`{name}` must be a whole number from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

fn float_field(map: &Map<String, Value>, name: &str) -> std::result::Result<Option<f64>, Response> {
    let v = match map.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(v) => v,
    };
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    match n {
        Some(x) if x.is_finite() => Ok(Some(x)),
        _ => Err(bad(name, format!("`{name}` must be a finite number"))),
    }
}

fn str_field<'a>(
    map: &'a Map<String, Value>,
    name: &str,
) -> std::result::Result<Option<&'a str>, Response> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(name, format!("`{name}` must be a string"))),
    }
}

/// Validates a create request into a job (400 naming the field on bad input).
fn job_from_request(
    shared: &Shared,
    map: &Map<String, Value>,
) -> std::result::Result<Job, Response> {
    let prompt = str_field(map, "prompt")?.ok_or_else(|| bad("prompt", "`prompt` is required"))?;
    if prompt.trim().is_empty() {
        return Err(bad("prompt", "`prompt` must not be empty"));
    }
    if prompt.chars().count() > 32_000 {
        return Err(bad("prompt", "`prompt` is longer than 32,000 characters"));
    }
    let model = str_field(map, "model")?
        .unwrap_or(&shared.model_name)
        .to_string();
    let default_size = if shared.embedded { "64x64" } else { "832x480" };
    let size = str_field(map, "size")?.unwrap_or(default_size);
    parse_size(size).map_err(|e| bad("size", e.to_string().replace("--size", "size")))?;
    let seconds_given = int_field(map, "seconds", 1..=60)?;
    let seconds = seconds_given.unwrap_or(4);
    let frames = match int_field(map, "frames", 1..=16 * 60 + 1)? {
        Some(f) if (f - 1) % 4 != 0 => {
            return Err(bad("frames", "`frames` must be 1 + 4k (1, 5, 9, ..., 81)"))
        }
        Some(f) => f as usize,
        // The demo model knows 17-frame clips: its default unless a length was asked for.
        None if shared.embedded && seconds_given.is_none() => embedded::DEFAULT_FRAMES,
        None => 16 * seconds as usize + 1,
    };
    let default_steps = if shared.embedded {
        embedded::DEFAULT_STEPS
    } else {
        50
    };
    let steps = int_field(map, "steps", 1..=1000)?
        .map(|s| s as usize)
        .unwrap_or(default_steps);
    let guidance_given = float_field(map, "guidance")?;
    let seed = int_field(map, "seed", 0..=u64::MAX)?.unwrap_or(0);
    let fps = int_field(map, "fps", 1..=240)?.unwrap_or(16) as u32;
    // The same ranges as the CLI's (a value accepted here is one the record can hold).
    crate::generate::check_ranges(guidance_given, None, Some(steps), Some(fps))
        .map_err(|(name, reason)| bad(name, format!("`{name}`: {reason}")))?;
    let guidance = match guidance_given {
        Some(g) => g as f32,
        None if shared.embedded => embedded::default_guidance(),
        None => 5.0,
    };
    let negative_prompt = str_field(map, "negative_prompt")?.unwrap_or("").to_string();
    if negative_prompt.chars().count() > 32_000 {
        return Err(bad(
            "negative_prompt",
            "`negative_prompt` is longer than 32,000 characters",
        ));
    }
    if let Some(d) = &shared.device {
        d.admit(size, frames, seconds_given.is_some())?;
    }
    if let Some(est) = &shared.cpu_estimate {
        // The CLI's own estimate, against what the machine has now (the model is loaded).
        let (w, h) = parse_size(size).map_err(|e| bad("size", e.to_string()))?;
        if let Err(why) = est.check(w, h, frames, guidance) {
            let field = if seconds_given.is_some() {
                "seconds"
            } else if map.get("frames").is_some_and(|v| !v.is_null()) {
                "frames"
            } else {
                "size"
            };
            return Err(bad(
                field,
                format!("{why}: use a smaller `size` or fewer `seconds`/`frames`"),
            ));
        }
    }
    Ok(Job {
        id: new_id(),
        model,
        status: Status::Queued,
        progress: 0,
        created_at: now(),
        created_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        completed_at: None,
        size: size.to_string(),
        seconds: seconds.to_string(),
        error: None,
        prompt: prompt.to_string(),
        negative_prompt,
        frames,
        steps,
        guidance,
        seed,
        fps,
        warning: if shared.embedded {
            let (w, h) = parse_size(size).unwrap_or(embedded::DEFAULT_SIZE);
            embedded::size_note_meta(&embedded::demo_meta(), w, h, frames)
        } else {
            None
        },
        worker: None,
        attempts: None,
        chunks: None,
    })
}

async fn create(State(s): State<Arc<Shared>>, headers: HeaderMap, req: Request) -> Response {
    // The whole body within the idle timeout: a client that trickles it, or announces more
    // than it sends, gets a 408 instead of holding the connection.
    let limit = s.idle;
    match tokio::time::timeout(limit, read_fields(&headers, req)).await {
        Ok(Ok(map)) => match &s.cluster {
            Some(c) => match job_from_request(&s, &map) {
                Ok(job) => crate::cluster::api::create(&s, c, job).await,
                Err(r) => r,
            },
            None => create_from(&s, map),
        },
        Ok(Err(r)) => r,
        Err(_) => api_error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
            Some("body"),
            Some("body_timeout"),
        ),
    }
}

/// The request's fields, from a JSON object or a multipart form.
async fn read_fields(
    headers: &HeaderMap,
    req: Request,
) -> std::result::Result<Map<String, Value>, Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let map: Map<String, Value> = if content_type.starts_with("multipart/form-data") {
        let mut mp = match Multipart::from_request(req, &()).await {
            Ok(m) => m,
            Err(e) => return Err(bad("body", format!("malformed multipart body: {e}"))),
        };
        let mut map = Map::new();
        loop {
            match mp.next_field().await {
                Ok(Some(field)) => {
                    let name = field.name().unwrap_or("").to_string();
                    if field.file_name().is_some() {
                        continue; // input_reference and other files: not used by text-to-video
                    }
                    match field.text().await {
                        Ok(t) => {
                            map.insert(name, Value::String(t));
                        }
                        Err(e) => return Err(bad(&name, format!("unreadable field: {e}"))),
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(bad("body", format!("malformed multipart body: {e}"))),
            }
        }
        map
    } else {
        let bytes = match Bytes::from_request(req, &()).await {
            Ok(b) => b,
            Err(e) => return Err(bad("body", format!("unreadable body: {e}"))),
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("body", "the body must be a JSON object")),
            Err(e) => return Err(bad("body", format!("malformed JSON: {e}"))),
        }
    };
    Ok(map)
}

fn create_from(s: &Arc<Shared>, map: Map<String, Value>) -> Response {
    let job = match job_from_request(s, &map) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let id = job.id.clone();
    {
        let mut jobs = s.jobs.lock().unwrap_or_else(|p| p.into_inner());
        s.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = s.tx.try_send(id.clone()) {
            s.queued.fetch_sub(1, Ordering::SeqCst);
            return match e {
                TrySendError::Full(_) => api_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the queue is full; retry later",
                    None,
                    Some("queue_full"),
                ),
                TrySendError::Disconnected(_) => api_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the worker has stopped",
                    None,
                    None,
                ),
            };
        }
        jobs.insert(
            id.clone(),
            Entry {
                job: job.clone(),
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
    }
    if !s.persist(&job) {
        // Not on disk, so not accepted: a job the server cannot record would not survive a
        // restart. The worker finds no entry and skips it.
        s.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the job could not be recorded under {}; retry later",
                s.data.join("jobs").display()
            ),
            None,
            Some("write_failed"),
        );
    }
    (StatusCode::OK, Json(job.object())).into_response()
}

fn find(s: &Shared, id: &str) -> std::result::Result<Job, Response> {
    if !valid_id(id) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            format!("no video `{id}`"),
            Some("video_id"),
            None,
        ));
    }
    let jobs = s.jobs.lock().unwrap_or_else(|p| p.into_inner());
    jobs.get(id).map(|e| e.job.clone()).ok_or_else(|| {
        api_error(
            StatusCode::NOT_FOUND,
            format!("no video `{id}`"),
            Some("video_id"),
            None,
        )
    })
}

/// [`find`] through the queue when there is one.
async fn find_any(s: &Shared, id: &str) -> std::result::Result<Job, Response> {
    match &s.cluster {
        Some(c) => crate::cluster::api::find(c, id).await,
        None => find(s, id),
    }
}

async fn retrieve(State(s): State<Arc<Shared>>, AxPath(id): AxPath<String>) -> Response {
    match find_any(&s, &id).await {
        Ok(j) => Json(j.object()).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
    order: Option<String>,
}

async fn list(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    let limit = match q.limit.as_deref().map(str::parse::<usize>) {
        None => 20,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        _ => return bad("limit", "`limit` must be a whole number from 1 to 100"),
    };
    let desc = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        _ => return bad("order", "`order` must be `asc` or `desc`"),
    };
    let mut all: Vec<Job> = match &s.cluster {
        Some(c) => match crate::cluster::api::all(c).await {
            Ok(j) => j,
            Err(r) => return r,
        },
        None => {
            let jobs = s.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.values().map(|e| e.job.clone()).collect()
        }
    };
    all.sort_by(|a, b| (a.created_ns, &a.id).cmp(&(b.created_ns, &b.id)));
    if desc {
        all.reverse();
    }
    let start = match &q.after {
        Some(after) => match all.iter().position(|j| &j.id == after) {
            Some(i) => i + 1,
            None => return bad("after", format!("no video `{after}`")),
        },
        None => 0,
    };
    let page: Vec<&Job> = all.iter().skip(start).take(limit).collect();
    let has_more = start + page.len() < all.len();
    Json(json!({
        "object": "list",
        "data": page.iter().map(|j| j.object()).collect::<Vec<_>>(),
        "first_id": page.first().map(|j| j.id.clone()),
        "last_id": page.last().map(|j| j.id.clone()),
        "has_more": has_more,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ContentQuery {
    variant: Option<String>,
}

async fn content(
    State(s): State<Arc<Shared>>,
    AxPath(id): AxPath<String>,
    Query(q): Query<ContentQuery>,
) -> Response {
    let job = match find_any(&s, &id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    if job.status != Status::Completed {
        return api_error(
            StatusCode::CONFLICT,
            format!("video `{id}` is {:?}, not completed", job.status),
            Some("video_id"),
            Some("video_not_ready"),
        );
    }
    let (path, mime, ext) = match q.variant.as_deref() {
        None | Some("video") => (s.video_path(&id), "video/mp4", "mp4"),
        Some("thumbnail") => (s.thumb_path(&id), "image/png", "png"),
        Some(other) => {
            return bad(
                "variant",
                format!("unknown variant `{other}`; use video or thumbnail"),
            )
        }
    };
    if let Some(c) = &s.cluster {
        return crate::cluster::api::content(c, &id, ext, mime).await;
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, mime)], bytes).into_response(),
        Err(_) => api_error(
            StatusCode::NOT_FOUND,
            format!("the file of `{id}` is gone"),
            None,
            None,
        ),
    }
}

async fn delete(State(s): State<Arc<Shared>>, AxPath(id): AxPath<String>) -> Response {
    let job = match find_any(&s, &id).await {
        Ok(j) => j,
        Err(r) => return r,
    };
    if let Some(c) = &s.cluster {
        return crate::cluster::api::delete(c, job).await;
    }
    if job.status.finished() {
        s.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        s.remove_files(&id);
        return Json(json!({"id": id, "object": "video", "deleted": true})).into_response();
    }
    // Queued or running: cancel. A queued job is failed at once; a running one stops at its
    // next step and the worker marks it.
    if let Some(e) = s.jobs.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
        e.cancel.store(true, Ordering::SeqCst);
    }
    let updated = if job.status == Status::Queued {
        s.update(&id, |j| {
            j.status = Status::Failed;
            j.completed_at = Some(now());
            j.error = Some(json!({"code": "cancelled", "message": "the job was cancelled"}));
        })
    } else {
        Some(job)
    };
    match updated {
        Some(j) => Json(j.object()).into_response(),
        None => api_error(
            StatusCode::NOT_FOUND,
            format!("no video `{id}`"),
            None,
            None,
        ),
    }
}

async fn events(State(s): State<Arc<Shared>>, AxPath(id): AxPath<String>) -> Response {
    if let Err(r) = find_any(&s, &id).await {
        return r;
    }
    // Comments at half the idle timeout (15 s at most) keep a quiet stream (a long step)
    // from being closed as idle.
    let every = (s.idle / 2).min(Duration::from_secs(15));
    // Polls the job and emits an event whenever its progress or status changes, ending
    // after the terminal status.
    let stream = futures_util::stream::unfold(
        (s, id, None::<(Status, u32)>, false, 0u32),
        |(s, id, last, done, mut chunks_sent)| async move {
            if done {
                return None;
            }
            loop {
                let job = match &s.cluster {
                    Some(c) => match c.job(&id).await {
                        Ok(j) => j,
                        Err(e) => {
                            // The queue unreachable for a moment: no news, not a deletion.
                            tracing::warn!("events of {id}: {e}");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    },
                    None => {
                        let jobs = s.jobs.lock().unwrap_or_else(|p| p.into_inner());
                        jobs.get(&id).map(|e| e.job.clone())
                    }
                };
                let Some(job) = job else {
                    let ev = Event::default()
                        .event("deleted")
                        .data(json!({"id": id}).to_string());
                    return Some((
                        Ok::<Event, std::convert::Infallible>(ev),
                        (s, id, last, true, chunks_sent),
                    ));
                };
                // A block-causal job: one `chunk` event per chunk written, in order, even
                // when several were written between two polls.
                if let Some([written, total]) = job.chunks {
                    if chunks_sent < written {
                        chunks_sent += 1;
                        let ev = Event::default().event("chunk").data(
                            json!({"id": id, "chunk": chunks_sent, "chunks": total}).to_string(),
                        );
                        return Some((Ok(ev), (s, id, last, false, chunks_sent)));
                    }
                }
                let key = (job.status, job.progress);
                if last != Some(key) {
                    let name = if job.status.finished() {
                        "done"
                    } else {
                        "progress"
                    };
                    let ev = Event::default().event(name).data(job.object().to_string());
                    return Some((
                        Ok(ev),
                        (s, id, Some(key), job.status.finished(), chunks_sent),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(every))
        .into_response()
}

/// (free, total) bytes of the server's cuda device, when it has one.
fn device_memory(s: &Shared) -> Option<(usize, usize)> {
    match &s.device.as_ref()?.dev {
        crate::kernels::KernelDevice::Cuda(c) => c.memory_info().ok(),
        _ => None,
    }
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    let mut v = json!({"status": "ok", "model": s.model_name});
    v["device"] = match &s.device {
        Some(d) => json!(d.dev.describe()),
        None => json!("cpu"),
    };
    if let Some(d) = &s.device {
        v["device_budget_bytes"] = json!(d.budget_bytes);
    }
    if let Some(c) = &s.cluster {
        v["cluster"] = c.describe();
    }
    if let Some((free, total)) = device_memory(&s) {
        v["device_memory"] = json!({"free_bytes": free, "total_bytes": total});
    }
    Json(v).into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut by_status: BTreeMap<&str, usize> = [
        ("queued", 0),
        ("in_progress", 0),
        ("completed", 0),
        ("failed", 0),
    ]
    .into();
    let statuses: Vec<Status> = match &s.cluster {
        Some(c) if c.role.serves_api() => crate::cluster::api::all(c)
            .await
            .map(|j| j.iter().map(|j| j.status).collect())
            .unwrap_or_default(),
        Some(_) => Vec::new(),
        None => s
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.job.status)
            .collect(),
    };
    for status in statuses {
        let k = match status {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        };
        *by_status.entry(k).or_insert(0) += 1;
    }
    let mut t = String::new();
    t += "# HELP reel_queue_depth Jobs waiting for the worker.\n# TYPE reel_queue_depth gauge\n";
    // Jobs still queued: one cancelled while queued leaves the queue's slot to the worker,
    // which skips it, but waits for nothing.
    t += &format!("reel_queue_depth {}\n", by_status["queued"]);
    t += "# HELP reel_jobs Jobs known to the server by status.\n# TYPE reel_jobs gauge\n";
    for (k, v) in by_status {
        t += &format!("reel_jobs{{status=\"{k}\"}} {v}\n");
    }
    t += "# HELP reel_step_seconds Wall time of denoising steps.\n# TYPE reel_step_seconds summary\n";
    t += &format!(
        "reel_step_seconds_sum {:.6}\n",
        s.step_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    );
    t += &format!(
        "reel_step_seconds_count {}\n",
        s.steps.load(Ordering::Relaxed)
    );
    t += "# HELP reel_device_info The device the worker runs on.\n# TYPE reel_device_info gauge\n";
    let name = match &s.device {
        Some(d) => d.dev.describe(),
        None => "cpu".into(),
    };
    t += &format!(
        "reel_device_info{{device=\"{}\"}} 1\n",
        name.replace('\\', "\\\\").replace('"', "\\\"")
    );
    if let Some(d) = &s.device {
        t += "# HELP reel_device_budget_bytes Device memory a job's plan must fit.\n# TYPE reel_device_budget_bytes gauge\n";
        t += &format!("reel_device_budget_bytes {}\n", d.budget_bytes);
    }
    if let Some(c) = &s.cluster {
        t += &crate::cluster::api::metrics(c).await;
    }
    if let Some((free, total)) = device_memory(&s) {
        t += "# HELP reel_device_memory_bytes Device memory (cuda).\n# TYPE reel_device_memory_bytes gauge\n";
        t += &format!("reel_device_memory_bytes{{kind=\"free\"}} {free}\n");
        t += &format!("reel_device_memory_bytes{{kind=\"total\"}} {total}\n");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], t).into_response()
}

async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v == key)
            .unwrap_or(false);
        if !ok {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer KEY)",
                None,
                Some("invalid_api_key"),
            );
        }
    }
    next.run(req).await
}

/// A running server (in this process).
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Loads the model, restores the jobs of `data_dir`, binds `addr` (port 0: any free
    /// port) and serves on background threads.
    pub fn start(args: &ServeArgs) -> Result<Server> {
        if args.max_queue == 0 {
            return Err(Error::invalid("--max-queue must be at least 1"));
        }
        let idle = match args.idle_timeout_secs.unwrap_or(IDLE_TIMEOUT_SECS) {
            t if t.is_finite() && (0.1..=86_400.0).contains(&t) => Duration::from_secs_f64(t),
            t => {
                return Err(Error::invalid(format!(
                    "--idle-timeout {t}: seconds from 0.1 to 86400"
                )))
            }
        };
        let max_connections = match args.max_connections.unwrap_or(MAX_CONNECTIONS) {
            n @ 1..=65_536 => n,
            n => {
                return Err(Error::invalid(format!(
                    "--max-connections {n}: from 1 to 65536"
                )))
            }
        };
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::Io { path: p, source }
        };
        for sub in ["jobs", "videos"] {
            let d = args.data_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| Error::invalid(format!("tokio: {e}")))?;
        // With --queue: the queue first (a wrong URL fails before the model loads).
        let cluster = match &args.cluster {
            Some(a) => Some(Arc::new(
                runtime.block_on(crate::cluster::Cluster::connect(a, &args.data_dir))?,
            )),
            None => None,
        };
        let role = cluster
            .as_ref()
            .map_or(crate::cluster::Role::Both, |c| c.role);
        let (mut pipe, model_name, embedded_model) = load_model(&GenerateArgs {
            model: args.model.clone(),
            random_weights: args.random_weights,
            ..Default::default()
        })?;
        // On a kernel device: the memory every job's plan must fit is what was free before
        // the weights went up (cuda), or the plan's default (emu: 80 GiB assumed).
        let device = match &args.device {
            Some(dev) => {
                let budget = match (args.device_memory_gib, dev) {
                    (Some(g), _) if g.is_finite() && g > 0.0 => (g * (1u64 << 30) as f64) as u64,
                    (Some(g), _) => {
                        return Err(Error::invalid(format!(
                            "--device-memory {g}: a positive number of GiB"
                        )))
                    }
                    (None, crate::kernels::KernelDevice::Cuda(c)) => c
                        .memory_info()
                        .map(|(free, _)| free as u64)
                        .map_err(|e| Error::Device(e.to_string()))?,
                    (None, _) => 80u64 << 30,
                };
                let root = pipe.root.display().to_string();
                // Weights up for the default video's plan; each job sets its own residency.
                let (w, h) = if embedded_model {
                    embedded::DEFAULT_SIZE
                } else {
                    (832, 480)
                };
                let first = crate::plan::plan(&crate::plan::PlanArgs {
                    model: Some(root.clone()),
                    size: Some(format!("{w}x{h}")),
                    frames: Some(if embedded_model {
                        embedded::DEFAULT_FRAMES
                    } else {
                        81
                    }),
                    device_memory_gib: Some(budget as f64 / (1u64 << 30) as f64),
                    arch: None,
                    causal: None,
                })?;
                // An API alone only plans on the device; its workers hold the weights.
                if role.runs_jobs() {
                    pipe.to_device(dev.clone(), first.text_encoder_resident)?;
                }
                tracing::info!(
                    "serving on {} ({:.2} GiB for each job's plan)",
                    dev.describe(),
                    budget as f64 / (1u64 << 30) as f64
                );
                Some(DeviceInfo {
                    dev: dev.clone(),
                    root,
                    budget_bytes: budget,
                })
            }
            None => None,
        };
        // A block-causal model streams in memory that does not grow with the length.
        let cpu_estimate = (device.is_none() && pipe.causal.is_none())
            .then(|| crate::generate::CpuEstimate::of(&pipe));
        let (tx, rx) = sync_channel(args.max_queue);
        let shared = Arc::new(Shared {
            jobs: Mutex::new(BTreeMap::new()),
            tx,
            data: args.data_dir.clone(),
            cluster: cluster.clone(),
            max_queue: args.max_queue,
            idle,
            cpu_estimate,
            model_name,
            embedded: embedded_model,
            api_key: args.api_key.clone(),
            queued: AtomicUsize::new(0),
            step_nanos: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            keep_hours: args.keep_hours,
            max_disk_gb: args.max_disk_gb,
            shutdown: AtomicBool::new(false),
            device,
        });
        // Restore: finished jobs as they were; unfinished ones failed (resubmit them). With
        // --queue every job lives in Redis and nothing is restored from here.
        let jobs_dir = args.data_dir.join("jobs");
        let local_records = if cluster.is_none() {
            std::fs::read_dir(&jobs_dir)
                .map_err(io(&jobs_dir))?
                .flatten()
                .collect()
        } else {
            Vec::new()
        };
        for entry in local_records {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".partial-") {
                // A record being written when the process died: its last good version (if
                // any) is the one renamed into place.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".json").filter(|s| valid_id(s)) else {
                tracing::warn!("{}: not a job record; left alone", path.display());
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Job>(&b).map_err(|e| e.to_string()))
                .and_then(|j| {
                    if j.id == stem {
                        Ok(j)
                    } else {
                        Err(format!("it names the job `{}`", j.id))
                    }
                });
            let mut job = match parsed {
                Ok(j) => j,
                Err(reason) => {
                    // Never dropped silently: listed as failed, the file kept as it is for
                    // whoever wants to look at it, the job's outputs (unservable) removed.
                    tracing::error!(
                        "{}: unreadable job record ({reason}); listed as failed",
                        path.display()
                    );
                    let mtime = entry
                        .metadata()
                        .ok()
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                    shared.remove_outputs(stem);
                    Job::unreadable(
                        stem,
                        &shared.model_name,
                        mtime.map(|d| d.as_secs()).unwrap_or_else(now),
                        mtime.map(|d| d.as_nanos()).unwrap_or(0),
                        format!("the job record could not be read: {reason}"),
                    )
                }
            };
            if !job.status.finished() {
                job.status = Status::Failed;
                job.completed_at = Some(now());
                job.error = Some(json!({"code": "server_restarted",
                    "message": "the server restarted before this job finished; submit it again"}));
                shared.persist(&job);
            }
            shared
                .jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    job.id.clone(),
                    Entry {
                        job,
                        cancel: Arc::new(AtomicBool::new(false)),
                    },
                );
        }
        if cluster.is_none() {
            shared.remove_orphans();
            shared.retention();
        }

        let app = if role.serves_api() {
            Router::new()
                .route("/v1/videos", get(list).post(create))
                .route("/v1/videos/{id}", get(retrieve).delete(delete))
                .route("/v1/videos/{id}/content", get(content))
                .route("/v1/videos/{id}/events", get(events))
                .route_layer(middleware::from_fn_with_state(shared.clone(), auth))
        } else {
            // A worker alone: its health and metrics only.
            Router::new()
        }
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(&args.addr))
            .map_err(|e| Error::invalid(format!("--addr {}: {e}", args.addr)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::invalid(e.to_string()))?;
        let listener = Bounded {
            inner: listener,
            permits: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            permits_total: max_connections,
            // A second's grace: a request whose body stalls gets its 408 from the handler's
            // deadline before the connection itself times out.
            idle: idle + Duration::from_secs(1),
        };
        if let (Some(c), true) = (&cluster, role.serves_api()) {
            // Retention over the store, at start and every minute.
            let (c, keep, disk) = (c.clone(), args.keep_hours, args.max_disk_gb);
            runtime.spawn(async move {
                loop {
                    c.retention(keep, disk).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
            });
        }
        let handle = runtime.handle().clone();
        let reader = match (&cluster, role.runs_jobs()) {
            (Some(c), true) => Some(runtime.block_on(c.reader())?),
            _ => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let http = std::thread::spawn(move || {
            runtime.block_on(serve_http(
                listener,
                app,
                stop_rx,
                idle,
                Duration::from_secs(10),
            ));
        });
        let ws = shared.clone();
        let mut threads = vec![http];
        match (cluster, reader) {
            (None, _) => threads.push(std::thread::spawn(move || worker(ws, pipe, rx))),
            (Some(c), Some(read)) => threads.push(std::thread::spawn(move || {
                crate::cluster::worker(ws, c, pipe, handle, read)
            })),
            (Some(_), None) => drop(pipe),
        }
        tracing::info!("reel serve listening on http://{addr}");
        Ok(Server {
            addr,
            shared,
            stop: Some(stop_tx),
            threads,
        })
    }

    /// Stops the worker at its next step and waits for it, then stops accepting requests
    /// and lets open ones finish (a queue worker needs the runtime until it is done).
    pub fn stop(mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for t in self.threads.drain(1..) {
            let _ = t.join();
        }
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `reel serve`: runs until Ctrl-C.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let server = Server::start(args)?;
    // Not eprintln!: a server whose stderr cannot be written (a full disk) keeps serving.
    let _ = writeln!(
        std::io::stderr(),
        "reel serve: listening on http://{} (model {})",
        server.addr,
        server.shared.model_name
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let _ = ctrlc::set_handler(move || {
        let _ = tx.send(());
    });
    let _ = rx.recv();
    server.stop();
    Ok(())
}
