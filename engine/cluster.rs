//! `reel serve --queue redis://HOST:PORT/DB`: many workers behind one API, jobs on Redis
//! Streams, outputs in a shared object store.
//!
//! Roles: `api` validates and plans each request as a single server does, records it in Redis
//! and appends it to a stream; `worker` (one per device, e.g. `--device cuda:N`) consumes the
//! stream through a consumer group, runs each job on its loaded model, puts the video and
//! thumbnail into the store and only then acknowledges; `both` is one process doing both.
//! Every state change of a job is a Lua script, so each is atomic on the Redis server.
//!
//! Keys (all under `reel:`):
//!   reel:job:{id}     the request as the video object at submission (JSON; never changed)
//!   reel:state:{id}   hash: status, progress, attempts, worker, owner, error (JSON),
//!                     completed_at, output (the store key of the video, without .mp4)
//!   reel:index        sorted set of ids by creation time in µs: the list order
//!   reel:jobs         the stream of job ids; consumer group `workers`
//!   reel:cancel:{id}  DELETE's request to stop a running job
//!   reel:workers      sorted set of worker names by the second they were last seen
//!   reel:reclaimed    jobs taken over from a lost worker (a counter)
//!
//! Failure handling: a running worker heartbeats every half second (resetting its stream
//! entry's idle time and publishing progress). A worker that dies (kill -9, a lost machine)
//! stops heartbeating; after `--reclaim-after` seconds another worker takes the entry over
//! (XAUTOCLAIM) and starts the job again: attempt 2, and so on up to 1 + `--retries`
//! attempts, after which the job fails with code `worker_lost`. Each attempt has an owner
//! token (worker/attempt) in the job's state: a heartbeat or completion whose token is no
//! longer the owner does nothing (the old worker, if it was only slow, stops and removes what
//! it uploaded), so a job completes once. DELETE of a queued job fails it at once; of a
//! running one sets reel:cancel:{id}, which the worker sees at its next heartbeat. With
//! Redis persistence (appendonly yes, appendfsync always), what the API acknowledged survives
//! a Redis restart; the API keeps nothing of its own, so it may restart at any time.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use object_store::{ObjectStore, ObjectStoreExt};
use redis::aio::ConnectionManager;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::server::{api_error, failure, now, render_job, Job, Shared, Status};

/// The consumer group of the workers.
const GROUP: &str = "workers";
const STREAM: &str = "reel:jobs";
const INDEX: &str = "reel:index";
const WORKERS: &str = "reel:workers";
const RECLAIMED: &str = "reel:reclaimed";
/// A running worker's heartbeat period.
const HEARTBEAT: Duration = Duration::from_millis(500);

fn job_key(id: &str) -> String {
    format!("reel:job:{id}")
}
fn state_key(id: &str) -> String {
    format!("reel:state:{id}")
}
fn cancel_key(id: &str) -> String {
    format!("reel:cancel:{id}")
}

/// What a process of a `--queue` deployment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API: validates, records and enqueues; serves status, events and content.
    Api,
    /// Runs jobs from the queue on its device; serves /health and /metrics only.
    Worker,
    /// Both in one process.
    Both,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role> {
        match s {
            "api" => Ok(Role::Api),
            "worker" => Ok(Role::Worker),
            "both" => Ok(Role::Both),
            _ => Err(Error::invalid(format!(
                "--role {s}: expected api, worker or both"
            ))),
        }
    }
    pub fn serves_api(self) -> bool {
        self != Role::Worker
    }
    pub fn runs_jobs(self) -> bool {
        self != Role::Api
    }
}

/// `reel serve --queue ...`'s settings.
#[derive(Debug, Clone)]
pub struct ClusterArgs {
    /// redis://HOST:PORT/DB.
    pub queue: String,
    pub role: Role,
    /// file:///DIR (default: file://<data-dir>/store).
    pub store: Option<String>,
    /// Seconds without a heartbeat after which a running job is taken over (default 60).
    pub reclaim_after_secs: f64,
    /// Times a job is started again after its worker was lost (default 2).
    pub retries: u32,
    /// This worker's name (default: host name and process id).
    pub worker_name: Option<String>,
}

pub const RECLAIM_AFTER_SECS: f64 = 60.0;
pub const RETRIES: u32 = 2;

/// The shared object store of outputs.
pub(crate) struct Store {
    inner: Arc<dyn ObjectStore>,
    pub(crate) url: String,
}

impl Store {
    pub(crate) fn open(url: &str) -> Result<Store> {
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(Error::invalid(format!(
                    "--store {url}: a file store takes an absolute path (file:///DIR)"
                )));
            }
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.into(),
                source,
            })?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| Error::invalid(format!("--store {url}: {e}")))?;
            return Ok(Store {
                inner: Arc::new(fs),
                url: url.to_string(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::invalid(format!(
                    "--store {url}: s3://BUCKET/PREFIX names a bucket"
                )));
            }
            // Credentials, region and endpoint (an S3-compatible service) from the
            // environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
            // AWS_ENDPOINT, AWS_ALLOW_HTTP=true for a plain-HTTP endpoint.
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| Error::invalid(format!("--store {url}: {e}")))?;
            let inner: Arc<dyn ObjectStore> = if prefix.trim_matches('/').is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(
                    s3,
                    prefix.trim_matches('/'),
                ))
            };
            return Ok(Store {
                inner,
                url: url.to_string(),
            });
        }
        Err(Error::invalid(format!(
            "--store {url}: expected file:///DIR (a directory every API and worker mounts) or s3://BUCKET/PREFIX"
        )))
    }

    fn path(key: &str) -> object_store::path::Path {
        object_store::path::Path::from(key)
    }

    async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.inner
            .put(&Self::path(key), bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| Error::invalid(format!("store {}: put {key}: {e}", self.url)))
    }

    async fn get(&self, key: &str) -> Result<Option<axum::body::Bytes>> {
        match self.inner.get(&Self::path(key)).await {
            Ok(r) => r
                .bytes()
                .await
                .map(Some)
                .map_err(|e| Error::invalid(format!("store {}: get {key}: {e}", self.url))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::invalid(format!(
                "store {}: get {key}: {e}",
                self.url
            ))),
        }
    }

    async fn delete(&self, key: &str) {
        match self.inner.delete(&Self::path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!("store {}: delete {key}: {e}", self.url),
        }
    }

    /// Bytes stored under `videos/` per job id.
    async fn sizes(&self) -> Result<std::collections::HashMap<String, u64>> {
        use futures_util::StreamExt;
        let mut out = std::collections::HashMap::new();
        let mut list = self.inner.list(Some(&Self::path("videos")));
        while let Some(m) = list.next().await {
            let m = m.map_err(|e| Error::invalid(format!("store {}: list: {e}", self.url)))?;
            let name = m.location.filename().unwrap_or("").to_string();
            let id = name.split('.').next().unwrap_or("").to_string();
            *out.entry(id).or_insert(0) += m.size;
        }
        Ok(out)
    }
}

/// A connection to the queue and the store.
pub(crate) struct Cluster {
    client: redis::Client,
    conn: ConnectionManager,
    pub(crate) store: Store,
    reclaim_after: Duration,
    max_attempts: u32,
    pub(crate) name: String,
    pub(crate) role: Role,
    url: String,
}

fn redis_err(url: &str, e: redis::RedisError) -> Error {
    Error::invalid(format!("redis {url}: {e}"))
}

impl Cluster {
    /// Connects (within the running tokio runtime, whose tasks keep the connection) and
    /// creates the stream and group if they are not there.
    pub(crate) async fn connect(a: &ClusterArgs, data_dir: &std::path::Path) -> Result<Cluster> {
        let url = a.queue.clone();
        if !url.starts_with("redis://") {
            return Err(Error::invalid(format!(
                "--queue {url}: expected redis://HOST:PORT/DB"
            )));
        }
        if !(a.reclaim_after_secs.is_finite() && (1.0..=86_400.0).contains(&a.reclaim_after_secs)) {
            return Err(Error::invalid(format!(
                "--reclaim-after {}: seconds from 1 to 86400",
                a.reclaim_after_secs
            )));
        }
        if a.store.is_none() && a.role != Role::Both {
            return Err(Error::invalid(format!(
                "--role {}: give --store (file:///DIR every API and worker mounts, or s3://BUCKET/PREFIX); the default under --data-dir is this machine's alone",
                format!("{:?}", a.role).to_lowercase()
            )));
        }
        let client = redis::Client::open(url.as_str())
            .map_err(|e| Error::invalid(format!("--queue {url}: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(2));
        let mut conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| redis_err(&url, e))?;
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created {
            if e.code() != Some("BUSYGROUP") {
                return Err(redis_err(&url, e));
            }
        }
        let store = Store::open(&match &a.store {
            Some(s) => s.clone(),
            None => {
                let dir =
                    std::path::absolute(data_dir.join("store")).map_err(|source| Error::Io {
                        path: data_dir.into(),
                        source,
                    })?;
                format!("file://{}", dir.display())
            }
        })?;
        let name = a.worker_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "worker".into());
            format!("{host}-{}", std::process::id())
        });
        if name.is_empty() || name.len() > 100 || name.contains(char::is_whitespace) {
            return Err(Error::invalid(format!(
                "--worker-name `{name}`: 1 to 100 characters without spaces"
            )));
        }
        Ok(Cluster {
            client,
            conn,
            store,
            reclaim_after: Duration::from_secs_f64(a.reclaim_after_secs),
            max_attempts: a.retries.saturating_add(1),
            name,
            role: a.role,
            url,
        })
    }

    fn err(&self, e: redis::RedisError) -> Error {
        redis_err(&self.url, e)
    }

    /// A second connection, for a worker's blocking reads (a blocked XREADGROUP holds its
    /// connection for up to a second).
    pub(crate) async fn reader(&self) -> Result<ConnectionManager> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_max_delay(Duration::from_secs(2));
        self.client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|e| self.err(e))
    }

    /// What /health says of the queue.
    pub(crate) fn describe(&self) -> Value {
        json!({"queue": self.url, "store": self.store.url, "role": format!("{:?}", self.role).to_lowercase(), "worker": self.name})
    }

    /// The job and its state, or None if there is no such job. A record that cannot be read
    /// is the job failed with code `record_unreadable` (listed, never dropped silently).
    pub(crate) async fn job(&self, id: &str) -> Result<Option<Job>> {
        Ok(self.job_checked(id).await?.map(|j| unreadable(id, j)))
    }

    /// [`Cluster::job`], an unreadable record as Err(why).
    async fn job_checked(&self, id: &str) -> Result<Option<std::result::Result<Job, String>>> {
        Ok(self.jobs_of(&[id.to_string()]).await?.pop().flatten())
    }

    /// The jobs of `ids`, in one round trip per 500.
    async fn jobs_of(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<std::result::Result<Job, String>>>> {
        let mut c = self.conn.clone();
        let mut out = Vec::with_capacity(ids.len());
        let parse = |e: redis::ParsingError| Error::invalid(format!("redis {}: {e}", self.url));
        for chunk in ids.chunks(500) {
            let mut p = redis::pipe();
            for id in chunk {
                p.get(job_key(id)).hgetall(state_key(id));
            }
            let replies: Vec<redis::Value> =
                p.query_async(&mut c).await.map_err(|e| self.err(e))?;
            for (id, pair) in chunk.iter().zip(replies.chunks(2)) {
                let raw: Option<String> = redis::from_redis_value_ref(&pair[0]).map_err(parse)?;
                let state: std::collections::HashMap<String, String> =
                    redis::from_redis_value_ref(&pair[1]).map_err(parse)?;
                out.push(raw.map(|raw| assemble(id, &raw, &state)));
            }
        }
        Ok(out)
    }

    /// Every job id, oldest first.
    async fn ids(&self) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        redis::cmd("ZRANGE")
            .arg(INDEX)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// Every job, oldest first.
    pub(crate) async fn jobs(&self) -> Result<Vec<Job>> {
        let ids = self.ids().await?;
        let jobs = self.jobs_of(&ids).await?;
        Ok(ids
            .iter()
            .zip(jobs)
            .filter_map(|(id, j)| j.map(|j| unreadable(id, j)))
            .collect())
    }

    /// (jobs waiting, jobs delivered to a worker and not yet acknowledged).
    async fn queue_counts(&self) -> Result<(u64, u64)> {
        let mut c = self.conn.clone();
        let (len, pending): (u64, redis::Value) = redis::pipe()
            .cmd("XLEN")
            .arg(STREAM)
            .cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let pending = match pending {
            redis::Value::Array(v) => match v.first() {
                Some(redis::Value::Int(n)) => *n as u64,
                _ => 0,
            },
            _ => 0,
        };
        Ok((len.saturating_sub(pending), pending))
    }

    /// Records `job` and appends it to the stream, atomically, unless `max_queue` jobs wait.
    pub(crate) async fn submit(&self, job: &Job, max_queue: usize) -> Result<bool> {
        let (waiting, _) = self.queue_counts().await?;
        if waiting >= max_queue as u64 {
            return Ok(false);
        }
        let raw = serde_json::to_string(job).map_err(|e| Error::invalid(e.to_string()))?;
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .set(job_key(&job.id), raw)
            .ignore()
            .hset_multiple(
                state_key(&job.id),
                &[("status", "queued"), ("progress", "0"), ("attempts", "0")],
            )
            .ignore()
            .zadd(INDEX, &job.id, (job.created_ns / 1000) as u64)
            .ignore()
            .cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("id")
            .arg(&job.id)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        Ok(true)
    }

    /// DELETE: a queued job fails at once (code `cancelled`), a running one is asked to stop;
    /// returns the job's status before.
    pub(crate) async fn cancel(&self, id: &str) -> Result<Option<String>> {
        const SCRIPT: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'completed_at', ARGV[1], 'error', ARGV[2])
  redis.call('SET', KEYS[2], '1', 'EX', 86400)
elseif st == 'in_progress' then
  redis.call('SET', KEYS[2], '1', 'EX', 86400)
end
return st
"#;
        let mut c = self.conn.clone();
        redis::Script::new(SCRIPT)
            .key(state_key(id))
            .key(cancel_key(id))
            .arg(now())
            .arg(json!({"code": "cancelled", "message": "the job was cancelled"}).to_string())
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// The store key of a completed job's outputs (without .mp4 / .png).
    async fn output_of(&self, id: &str) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        redis::cmd("HGET")
            .arg(state_key(id))
            .arg("output")
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))
    }

    /// Removes a finished job: its keys and its outputs.
    pub(crate) async fn remove(&self, id: &str) -> Result<()> {
        let output = self.output_of(id).await?;
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .del(job_key(id))
            .ignore()
            .del(state_key(id))
            .ignore()
            .del(cancel_key(id))
            .ignore()
            .zrem(INDEX, id)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        if let Some(o) = output {
            self.store.delete(&format!("{o}.mp4")).await;
            self.store.delete(&format!("{o}.png")).await;
        }
        Ok(())
    }

    /// The bytes of a completed job's video or thumbnail.
    pub(crate) async fn content(&self, id: &str, ext: &str) -> Result<Option<axum::body::Bytes>> {
        match self.output_of(id).await? {
            Some(o) => self.store.get(&format!("{o}.{ext}")).await,
            None => Ok(None),
        }
    }

    /// The queue's lines of /metrics.
    pub(crate) async fn metrics(&self) -> Result<String> {
        let (waiting, pending) = self.queue_counts().await?;
        let mut c = self.conn.clone();
        let t = now();
        let (reclaimed, seen): (Option<u64>, u64) = redis::pipe()
            .get(RECLAIMED)
            .zcount(WORKERS, t.saturating_sub(60), "+inf")
            .query_async(&mut c)
            .await
            .map_err(|e| self.err(e))?;
        let mut s = String::new();
        s += "# HELP reel_queue_length Jobs in the queue no worker has taken yet.\n# TYPE reel_queue_length gauge\n";
        s += &format!("reel_queue_length {waiting}\n");
        s += "# HELP reel_pending_jobs Jobs a worker has taken and not yet finished.\n# TYPE reel_pending_jobs gauge\n";
        s += &format!("reel_pending_jobs {pending}\n");
        s += "# HELP reel_reclaimed_jobs_total Jobs taken over from a lost worker.\n# TYPE reel_reclaimed_jobs_total counter\n";
        s += &format!("reel_reclaimed_jobs_total {}\n", reclaimed.unwrap_or(0));
        s += "# HELP reel_workers_seen Workers seen in the last minute.\n# TYPE reel_workers_seen gauge\n";
        s += &format!("reel_workers_seen {seen}\n");
        Ok(s)
    }

    /// Evicts finished jobs older than `keep_hours`, then the oldest finished ones while the
    /// store's videos take more than `max_disk_gb`.
    pub(crate) async fn retention(&self, keep_hours: Option<f64>, max_disk_gb: Option<f64>) {
        if keep_hours.is_none() && max_disk_gb.is_none() {
            return;
        }
        let jobs = match self.jobs().await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!("retention: {e}");
                return;
            }
        };
        let sizes = if max_disk_gb.is_some() {
            match self.store.sizes().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("retention: {e}");
                    return;
                }
            }
        } else {
            Default::default()
        };
        let evict = crate::server::retention_plan(
            jobs.iter(),
            keep_hours,
            max_disk_gb,
            sizes.values().sum(),
            &|id| sizes.get(id).copied().unwrap_or(0),
        );
        for id in evict {
            match self.remove(&id).await {
                Ok(()) => tracing::info!("retention: evicted {id}"),
                Err(e) => tracing::warn!("retention: {id}: {e}"),
            }
        }
    }
}

/// A job from its request record and its state hash; Err(why) if the record cannot be read.
fn assemble(
    id: &str,
    raw: &str,
    state: &std::collections::HashMap<String, String>,
) -> std::result::Result<Job, String> {
    let mut job: Job =
        serde_json::from_str(raw).map_err(|e| format!("the record reel:job:{id}: {e}"))?;
    if job.id != id {
        return Err(format!(
            "the record reel:job:{id} names the job `{}`",
            job.id
        ));
    }
    job.status = match state.get("status").map(String::as_str) {
        Some("in_progress") => Status::InProgress,
        Some("completed") => Status::Completed,
        Some("failed") => Status::Failed,
        _ => Status::Queued,
    };
    job.progress = state
        .get("progress")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    job.completed_at = state.get("completed_at").and_then(|t| t.parse().ok());
    job.error = state
        .get("error")
        .and_then(|e| serde_json::from_str(e).ok());
    job.worker = state.get("worker").cloned();
    job.attempts = state.get("attempts").and_then(|a| a.parse().ok());
    Ok(job)
}

/// An unreadable record as the job failed with code `record_unreadable`.
fn unreadable(id: &str, j: std::result::Result<Job, String>) -> Job {
    j.unwrap_or_else(|why| {
        Job::unreadable(
            id,
            "",
            0,
            0,
            format!("the job record could not be read: {why}"),
        )
    })
}

/// What a worker got from the stream: the entry and the job it names.
struct Delivery {
    entry: String,
    id: String,
}

/// The (entry id, job id) pairs of an XREADGROUP or XAUTOCLAIM reply.
fn deliveries(v: &redis::Value, out: &mut Vec<Delivery>) {
    use redis::Value as V;
    let text = |v: &V| match v {
        V::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        V::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    // An entry id is MS-SEQ; its fields a non-empty list of strings, in pairs.
    let is_id = |s: &str| {
        s.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
    };
    let is_entry = |a: &[V]| {
        a.len() == 2
            && text(&a[0]).is_some_and(|s| is_id(&s))
            && matches!(&a[1], V::Array(f)
                if !f.is_empty() && f.len() % 2 == 0 && f.iter().all(|x| text(x).is_some()))
    };
    match v {
        // An entry: [entry id, [field, value, ...]] (a stream's reply nests these in
        // [stream, [entries]]).
        V::Array(a) if is_entry(a) => {
            let V::Array(fields) = &a[1] else { return };
            let entry = text(&a[0]).unwrap_or_default();
            // An entry without a job id has nothing to run: the caller acknowledges it.
            let id = fields
                .chunks(2)
                .find(|kv| kv.len() == 2 && text(&kv[0]).as_deref() == Some("id"))
                .and_then(|kv| text(&kv[1]))
                .unwrap_or_default();
            out.push(Delivery { entry, id });
        }
        V::Array(a) => a.iter().for_each(|x| deliveries(x, out)),
        V::Map(m) => m.iter().for_each(|(_, x)| deliveries(x, out)),
        _ => {}
    }
}

/// XREADGROUP of one entry for consumer `name`: from `from` (`>`: new entries; `0`: those
/// delivered to it and not acknowledged), waiting up to `block_ms` for a new one.
async fn read_group(
    c: &mut ConnectionManager,
    name: &str,
    from: &str,
    block_ms: Option<u64>,
) -> redis::RedisResult<redis::Value> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP").arg(GROUP).arg(name).arg("COUNT").arg(1);
    if let Some(ms) = block_ms {
        cmd.arg("BLOCK").arg(ms);
    }
    cmd.arg("STREAMS")
        .arg(STREAM)
        .arg(from)
        .query_async(c)
        .await
}

/// How a worker's start of a job went.
enum Start {
    /// Run it: the owner token and the attempt number.
    Run(String, u32),
    /// Nothing to run (finished, deleted, cancelled while queued, or out of attempts).
    Skip(&'static str),
}

/// A worker's view of the queue (its own blocking connection for reads).
struct WorkerConn {
    c: Arc<Cluster>,
    read: ConnectionManager,
}

impl WorkerConn {
    async fn seen(&self) {
        let mut c = self.c.conn.clone();
        let _: redis::RedisResult<()> = redis::cmd("ZADD")
            .arg(WORKERS)
            .arg(now())
            .arg(&self.c.name)
            .query_async(&mut c)
            .await;
    }

    /// The next job: one already delivered to this worker and not acknowledged (a delivery
    /// whose reply a dropped connection lost, or a previous process under the same name:
    /// between jobs, nothing of this worker's own is legitimately pending); else one whose
    /// worker stopped heartbeating, taken over; else a new one (waiting up to a second).
    async fn next(&self) -> Result<Option<(Delivery, bool)>> {
        let mut c = self.c.conn.clone();
        let own = read_group(&mut c, &self.c.name, "0", None)
            .await
            .map_err(|e| self.c.err(e))?;
        let mut got = Vec::new();
        deliveries(&own, &mut got);
        if let Some(d) = got.pop() {
            tracing::warn!(
                "worker {}: resuming job {} (entry {}), delivered to it and never acknowledged",
                self.c.name,
                d.id,
                d.entry
            );
            return Ok(Some((d, false)));
        }
        let v: redis::Value = redis::cmd("XAUTOCLAIM")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&self.c.name)
            .arg(self.c.reclaim_after.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .map_err(|e| self.c.err(e))?;
        let mut got = Vec::new();
        if let redis::Value::Array(parts) = &v {
            if let Some(entries) = parts.get(1) {
                deliveries(entries, &mut got);
            }
        }
        if let Some(d) = got.pop() {
            let _: redis::RedisResult<()> =
                redis::cmd("INCR").arg(RECLAIMED).query_async(&mut c).await;
            return Ok(Some((d, true)));
        }
        let mut r = self.read.clone();
        let v = read_group(&mut r, &self.c.name, ">", Some(1000))
            .await
            .map_err(|e| self.c.err(e))?;
        let mut got = Vec::new();
        deliveries(&v, &mut got);
        Ok(got.pop().map(|d| (d, false)))
    }

    async fn start(&self, d: &Delivery) -> Result<Start> {
        const SCRIPT: &str = r#"
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'gone'} end
if st == 'completed' or st == 'failed' then return {'finished'} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'completed_at', ARGV[3], 'error', ARGV[4])
  return {'cancelled'}
end
local a = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if a > tonumber(ARGV[2]) then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
  redis.call('HSET', KEYS[1], 'status', 'failed', 'completed_at', ARGV[3], 'error', ARGV[5])
  return {'lost'}
end
local token = ARGV[1] .. '/' .. a
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'worker', ARGV[1], 'owner', token, 'progress', '0')
return {'run', token, a}
"#;
        if d.id.is_empty() || !crate::server::valid_id(&d.id) {
            return Ok(Start::Skip("not a job"));
        }
        let lost = json!({"code": "worker_lost", "message": format!(
            "the worker running this job was lost {} times; submit it again", self.c.max_attempts)})
        .to_string();
        let mut c = self.c.conn.clone();
        let r: Vec<redis::Value> = redis::Script::new(SCRIPT)
            .key(state_key(&d.id))
            .key(cancel_key(&d.id))
            .arg(&self.c.name)
            .arg(self.c.max_attempts)
            .arg(now())
            .arg(json!({"code": "cancelled", "message": "the job was cancelled"}).to_string())
            .arg(lost)
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.c.err(e))?;
        let s = |i: usize| match r.get(i) {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(redis::Value::Int(n)) => n.to_string(),
            _ => String::new(),
        };
        Ok(match s(0).as_str() {
            "run" => Start::Run(s(1), s(2).parse().unwrap_or(1)),
            "gone" => Start::Skip("deleted"),
            "finished" => Start::Skip("already finished"),
            "cancelled" => Start::Skip("cancelled while queued"),
            "lost" => Start::Skip("out of attempts: failed with worker_lost"),
            other => {
                return Err(Error::invalid(format!(
                    "redis: unexpected start reply `{other}`"
                )))
            }
        })
    }

    /// Acknowledges and drops a stream entry.
    async fn ack(&self, entry: &str) -> Result<()> {
        let mut c = self.c.conn.clone();
        redis::pipe()
            .cmd("XACK")
            .arg(STREAM)
            .arg(GROUP)
            .arg(entry)
            .ignore()
            .cmd("XDEL")
            .arg(STREAM)
            .arg(entry)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| self.c.err(e))
    }

    /// 1: still the owner (idle time reset, progress published); 2: the same and a cancel
    /// was asked for; 0: another worker owns the job now.
    async fn heartbeat(&self, d: &Delivery, token: &str, progress: u32) -> Result<i64> {
        const SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
local p = redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[3], ARGV[3], 1, ARGV[4])
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[4], 0, ARGV[3], 'JUSTID')
redis.call('HSET', KEYS[1], 'progress', ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
"#;
        let mut c = self.c.conn.clone();
        redis::Script::new(SCRIPT)
            .key(state_key(&d.id))
            .key(STREAM)
            .key(cancel_key(&d.id))
            .key(WORKERS)
            .arg(token)
            .arg(GROUP)
            .arg(&d.entry)
            .arg(&self.c.name)
            .arg(progress)
            .arg(now())
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.c.err(e))
    }

    /// Ends the attempt (completed with `output`, or failed with `error`) if `token` still
    /// owns the job, and acknowledges its entry; false if another worker owns it now.
    async fn finish(
        &self,
        d: &Delivery,
        token: &str,
        output: Option<&str>,
        error: Option<Value>,
    ) -> Result<bool> {
        const SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'status', 'completed', 'progress', '100', 'completed_at', ARGV[4], 'output', ARGV[5])
else
  redis.call('HSET', KEYS[1], 'status', 'failed', 'completed_at', ARGV[4], 'error', ARGV[6])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])
redis.call('XDEL', KEYS[2], ARGV[3])
return 1
"#;
        let mut c = self.c.conn.clone();
        let done: i64 = redis::Script::new(SCRIPT)
            .key(state_key(&d.id))
            .key(STREAM)
            .arg(token)
            .arg(GROUP)
            .arg(&d.entry)
            .arg(now())
            .arg(output.unwrap_or(""))
            .arg(error.map(|e| e.to_string()).unwrap_or_default())
            .invoke_async(&mut c)
            .await
            .map_err(|e| self.c.err(e))?;
        Ok(done == 1)
    }
}

/// Retries `f` (a queue operation) while Redis is unreachable, up to `limit`, unless the
/// server is stopping.
async fn patiently<T, F, Fut>(shared: &Shared, what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let t = std::time::Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if t.elapsed() < limit && !shared.shutdown.load(Ordering::SeqCst) => {
                tracing::warn!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The worker role: takes jobs from the stream one at a time and runs them on `pipe`.
pub(crate) fn worker(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    pipe: crate::pipeline::Pipeline,
    rt: tokio::runtime::Handle,
    read: ConnectionManager,
) {
    let w = Arc::new(WorkerConn {
        c: cluster.clone(),
        read,
    });
    let scratch = shared.data.join("videos");
    tracing::info!(
        "worker {} consuming {STREAM} (group {GROUP}) on {}",
        cluster.name,
        cluster.url
    );
    while !shared.shutdown.load(Ordering::SeqCst) {
        rt.block_on(w.seen());
        let (d, reclaimed) = match rt.block_on(w.next()) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("worker {}: {e}", cluster.name);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if reclaimed {
            tracing::warn!(
                "worker {}: took over job {} (entry {}) from a lost worker",
                cluster.name,
                d.id,
                d.entry
            );
        }
        let (token, attempt) = match rt.block_on(w.start(&d)) {
            Ok(Start::Run(t, a)) => (t, a),
            Ok(Start::Skip(why)) => {
                tracing::info!(
                    "worker {}: entry {} ({}): {why}",
                    cluster.name,
                    d.entry,
                    d.id
                );
                if let Err(e) = rt.block_on(w.ack(&d.entry)) {
                    tracing::warn!("worker {}: {e}", cluster.name);
                }
                continue;
            }
            Err(e) => {
                // Left pending: reclaimed once the queue answers again.
                tracing::warn!("worker {}: {e}", cluster.name);
                continue;
            }
        };
        let job = match rt.block_on(patiently(
            &shared,
            "reading the job",
            Duration::from_secs(30),
            || cluster.job_checked(&d.id),
        )) {
            Ok(Some(Ok(j))) => j,
            Ok(Some(Err(why))) => {
                let error = json!({"code": "record_unreadable", "message": why});
                let _ = rt.block_on(w.finish(&d, &token, None, Some(error)));
                continue;
            }
            Ok(None) => {
                // Deleted since it started: nothing to run.
                let _ = rt.block_on(w.ack(&d.entry));
                continue;
            }
            Err(e) => {
                // Left pending: taken over (by any worker, this one too) once the queue
                // answers again.
                tracing::warn!("worker {}: job {}: {e}", cluster.name, d.id);
                continue;
            }
        };
        tracing::info!("worker {}: job {} attempt {attempt}", cluster.name, d.id);
        run_one(&shared, &w, &pipe, &rt, &d, &token, attempt, &job, &scratch);
    }
}

/// Runs one attempt of `job` with a heartbeat beside it, then stores and records the result.
#[allow(clippy::too_many_arguments)]
fn run_one(
    shared: &Arc<Shared>,
    w: &Arc<WorkerConn>,
    pipe: &crate::pipeline::Pipeline,
    rt: &tokio::runtime::Handle,
    d: &Delivery,
    token: &str,
    attempt: u32,
    job: &Job,
    scratch: &std::path::Path,
) {
    let name = &w.c.name;
    let progress = Arc::new(AtomicU32::new(0));
    let cancel = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let beat = {
        let (w, progress, cancel, lost, running) = (
            w.clone(),
            progress.clone(),
            cancel.clone(),
            lost.clone(),
            running.clone(),
        );
        let (entry, id, token) = (d.entry.clone(), d.id.clone(), token.to_string());
        rt.spawn(async move {
            let d = Delivery { entry, id };
            while running.load(Ordering::SeqCst) {
                match w
                    .heartbeat(&d, &token, progress.load(Ordering::SeqCst))
                    .await
                {
                    Ok(0) => {
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Ok(2) => cancel.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("heartbeat of {}: {e}", d.id),
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
        })
    };
    let video = scratch.join(format!("{}.a{attempt}.mp4", d.id));
    let thumb = scratch.join(format!("{}.a{attempt}.png", d.id));
    let flag: crate::cancel::Flag = {
        let (c, l, sh) = (cancel.clone(), lost.clone(), shared.clone());
        Arc::new(move || {
            c.load(Ordering::SeqCst)
                || l.load(Ordering::SeqCst)
                || sh.shutdown.load(Ordering::SeqCst)
        })
    };
    let result = render_job(
        shared,
        pipe,
        job,
        &video,
        &thumb,
        flag.clone(),
        &mut |step, steps| {
            progress.store((90 * step / steps.max(1)) as u32, Ordering::SeqCst);
            if flag() {
                Err(Error::Interrupted)
            } else {
                Ok(())
            }
        },
    );
    // The heartbeat goes on through the upload and the recording (an upload to a slow store
    // must not look like a lost worker), and stops on every way out.
    let mut beat = Some(beat);
    let mut stop_beat = || {
        running.store(false, Ordering::SeqCst);
        if let Some(b) = beat.take() {
            let _ = rt.block_on(b);
        }
    };
    let out_key = format!("videos/{}.a{attempt}", d.id);
    let outcome: Result<(Option<String>, Option<Value>)> = if lost.load(Ordering::SeqCst) {
        Err(Error::invalid("another worker owns the job now"))
    } else if shared.shutdown.load(Ordering::SeqCst) && !cancel.load(Ordering::SeqCst) {
        // Stopping: the entry stays pending and another worker takes it over.
        Err(Error::invalid("the worker is stopping"))
    } else {
        match result {
            Ok(()) => {
                let put = |path: &std::path::Path, key: String| {
                    let bytes = std::fs::read(path).map_err(|source| Error::Io {
                        path: path.into(),
                        source,
                    })?;
                    rt.block_on(w.c.store.put(&key, bytes))
                };
                match put(&video, format!("{out_key}.mp4"))
                    .and_then(|_| put(&thumb, format!("{out_key}.png")))
                {
                    Ok(()) => Ok((Some(out_key.clone()), None)),
                    Err(e) => Ok((
                        None,
                        Some(json!({"code": "write_failed", "message": e.to_string()})),
                    )),
                }
            }
            Err(e) => {
                let (code, message) = failure(e);
                Ok((None, Some(json!({"code": code, "message": message}))))
            }
        }
    };
    for p in [&video, &thumb] {
        let _ = std::fs::remove_file(p);
    }
    let (output, error) = match outcome {
        Ok(x) => x,
        Err(e) => {
            stop_beat();
            tracing::warn!(
                "worker {name}: job {} attempt {attempt} abandoned: {e}",
                d.id
            );
            return;
        }
    };
    let finished = rt.block_on(patiently(
        shared,
        "recording the result",
        Duration::from_secs(30),
        || w.finish(d, token, output.as_deref(), error.clone()),
    ));
    stop_beat();
    match finished {
        Ok(true) => tracing::info!(
            "worker {name}: job {} {}",
            d.id,
            if output.is_some() {
                "completed"
            } else {
                "failed"
            }
        ),
        Ok(false) | Err(_) => {
            // Not ours any more (or the queue is unreachable): the upload goes.
            if let Err(e) = &finished {
                tracing::warn!("worker {name}: job {}: {e}", d.id);
            }
            if output.is_some() {
                rt.block_on(w.c.store.delete(&format!("{out_key}.mp4")));
                rt.block_on(w.c.store.delete(&format!("{out_key}.png")));
            }
        }
    }
}

/// The API's handlers for a `--queue` deployment (server.rs dispatches to them).
pub(crate) mod api {
    use super::*;

    fn unavailable(e: Error) -> Response {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the job queue is unavailable: {e}"),
            None,
            Some("queue_unavailable"),
        )
    }

    pub(crate) async fn create(s: &Shared, c: &Cluster, job: Job) -> Response {
        match c.submit(&job, s.max_queue).await {
            Ok(true) => (StatusCode::OK, Json(job.object())).into_response(),
            Ok(false) => api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "the queue is full; retry later",
                None,
                Some("queue_full"),
            ),
            Err(e) => unavailable(e),
        }
    }

    /// The job, a 404 naming it, or a 503 when the queue cannot be read.
    pub(crate) async fn find(c: &Cluster, id: &str) -> std::result::Result<Job, Response> {
        let missing = || {
            api_error(
                StatusCode::NOT_FOUND,
                format!("no video `{id}`"),
                Some("video_id"),
                None,
            )
        };
        if !crate::server::valid_id(id) {
            return Err(missing());
        }
        match c.job(id).await {
            Ok(Some(j)) => Ok(j),
            Ok(None) => Err(missing()),
            Err(e) => Err(unavailable(e)),
        }
    }

    pub(crate) async fn all(c: &Cluster) -> std::result::Result<Vec<Job>, Response> {
        c.jobs().await.map_err(unavailable)
    }

    pub(crate) async fn content(c: &Cluster, id: &str, ext: &str, mime: &str) -> Response {
        match c.content(id, ext).await {
            Ok(Some(bytes)) => ([(header::CONTENT_TYPE, mime.to_string())], bytes).into_response(),
            Ok(None) => api_error(
                StatusCode::NOT_FOUND,
                format!("the file of `{id}` is gone"),
                None,
                None,
            ),
            Err(e) => unavailable(e),
        }
    }

    pub(crate) async fn delete(c: &Cluster, job: Job) -> Response {
        let id = job.id.clone();
        if matches!(job.status, Status::Completed | Status::Failed) {
            return match c.remove(&id).await {
                Ok(()) => {
                    Json(json!({"id": id, "object": "video", "deleted": true})).into_response()
                }
                Err(e) => unavailable(e),
            };
        }
        match c.cancel(&id).await {
            Ok(_) => match find(c, &id).await {
                Ok(j) => Json(j.object()).into_response(),
                Err(r) => r,
            },
            Err(e) => unavailable(e),
        }
    }

    pub(crate) async fn metrics(c: &Cluster) -> String {
        match c.metrics().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("metrics: {e}");
                "# the job queue is unavailable\nreel_queue_up 0\n".into()
            }
        }
    }
}
