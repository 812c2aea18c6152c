//! `reel serve --queue`: an API and workers as separate processes on the embedded demo model,
//! over a real Redis (redis-server on a loopback port with its own data directory and the
//! append-only file on), outputs in a file store. .ci/run installs redis-server and sets
//! REEL_REQUIRE_REDIS=1; elsewhere these tests are skipped when it is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::scratch;
use crate::serve::{free_port, http, listening, post_json, wait_for};

/// A child process killed (SIGKILL) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

impl Proc {
    fn kill9(mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

/// A program: `$override_var`'s path, else `name` on PATH; None (the test skipped) where
/// neither is there, unless `$require_var` is 1 (.ci/run), which makes it a failure.
fn tool(name: &str, override_var: &str, require_var: &str) -> Option<PathBuf> {
    let found = std::env::var_os(override_var)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|f| f.is_file())
            })
        });
    if found.is_none() {
        assert!(
            std::env::var(require_var).as_deref() != Ok("1"),
            "{require_var}=1 but there is no {name} ({override_var} or PATH)"
        );
        eprintln!("no {name}: test skipped");
    }
    found
}

/// redis-server (.ci/run installs Debian's package).
fn redis_server() -> Option<PathBuf> {
    tool("redis-server", "REEL_REDIS_SERVER", "REEL_REQUIRE_REDIS")
}

/// What every test here starts from: the demo model unpacked, a scratch folder `dir`, a
/// Redis on `rport` keeping its data in `rdir` (returned running), and a free port for the
/// API.
struct Setup {
    bin: PathBuf,
    dir: PathBuf,
    rport: u16,
    rdir: PathBuf,
    aport: u16,
    api_addr: SocketAddr,
}

/// [`Setup`] in the scratch folder `name`, or None (skipped) without redis-server.
fn setup(name: &str) -> Option<(Setup, Proc)> {
    let bin = redis_server()?;
    reel::models::embedded::ensure().unwrap();
    let dir = scratch(name);
    let rport = free_port();
    let rdir = dir.join("redis");
    std::fs::create_dir_all(&rdir).unwrap();
    let db = redis(&bin, rport, &rdir);
    let aport = free_port();
    let api_addr = format!("127.0.0.1:{aport}").parse().unwrap();
    Some((
        Setup {
            bin,
            dir,
            rport,
            rdir,
            aport,
            api_addr,
        },
        db,
    ))
}

/// A Redis on `port` keeping its data (append-only, fsync on every write) in `dir`.
fn redis(bin: &Path, port: u16, dir: &Path) -> Proc {
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "redis never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

/// One command to the Redis on `port` (RESP over a socket); its reply's first line.
fn redis_cmd(port: u16, args: &[&str]) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req += &format!("${}\r\n{a}\r\n", a.len());
    }
    s.write_all(req.as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// `reel serve --queue` as `role` (extra flags after) with the file store under `dir`,
/// logging to `dir/ROLE-PORT.log`.
fn reel(role: &str, redis_port: u16, dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let store = format!("file://{}", dir.join("store").display());
    reel_with(role, redis_port, dir, port, extra, &store, &[])
}

/// [`reel`] with another store and environment.
fn reel_with(
    role: &str,
    redis_port: u16,
    dir: &Path,
    port: u16,
    extra: &[&str],
    store: &str,
    env: &[(&str, String)],
) -> Proc {
    let log = std::fs::File::create(dir.join(format!("{role}-{port}.log"))).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reel"));
    cmd.args(["serve", "--queue"])
        .arg(format!("redis://127.0.0.1:{redis_port}/0"))
        .args(["--role", role, "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.join(format!("data-{role}-{port}")))
        .arg("--store")
        .arg(store)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log);
    Proc(listening(&mut cmd, port))
}

fn submit(api: SocketAddr, body: Value) -> String {
    let r = post_json(api, &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

fn get(api: SocketAddr, id: &str) -> Value {
    http(api, "GET", &format!("/v1/videos/{id}"), &[], b"").json()
}

fn metric(api: SocketAddr, name: &str) -> f64 {
    let m = String::from_utf8(http(api, "GET", "/metrics", &[], b"").body).unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {m}"))
        .trim()
        .parse()
        .unwrap()
}

/// Waits until `id` runs with progress (the worker named in it is mid-job).
fn running(api: SocketAddr, id: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = get(api, id);
        if v["status"] == "in_progress" && v["progress"].as_u64().unwrap_or(0) > 0 {
            return v;
        }
        assert!(
            v["status"] == "queued" || v["status"] == "in_progress",
            "{id} is not running: {v}"
        );
        assert!(t.elapsed() < Duration::from_secs(60), "{id} never ran: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A job long enough on the demo model (several seconds on two cores) to act on mid-run.
fn long_job() -> Value {
    json!({"prompt": "a red circle moving right", "steps": 400, "seconds": 4})
}

/// An API and two workers: 12 jobs complete and both workers ran some, each video in the
/// store and served; an API restart (kill -9) and a Redis restart (kill -9, append-only file
/// on) lose no accepted job, and the workers go on after Redis is back; DELETE of a running
/// job reaches its worker; /metrics on the API reports the queue and the workers.
#[test]
fn queue_spreads_jobs_over_workers_and_survives_api_and_redis_restarts() {
    let Some((
        Setup {
            bin,
            dir,
            rport,
            rdir,
            aport,
            api_addr,
        },
        db,
    )) = setup("cluster-restarts")
    else {
        return;
    };
    let mut db = Some(db);
    let mut api = Some(reel("api", rport, &dir, aport, &[]));
    let _w1 = reel("worker", rport, &dir, free_port(), &["--worker-name", "w1"]);
    let _w2 = reel("worker", rport, &dir, free_port(), &["--worker-name", "w2"]);

    let ids: Vec<String> = (0..12)
        .map(|i| {
            submit(
                api_addr,
                json!({"prompt": "a red circle moving right", "steps": 3, "seed": i}),
            )
        })
        .collect();
    let mut ran = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let v = wait_for(api_addr, id, "completed");
        assert_eq!(v["attempts"], 1, "{v}");
        *ran.entry(v["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(ran.len(), 2, "both workers ran jobs: {ran:?}");
    let video = http(
        api_addr,
        "GET",
        &format!("/v1/videos/{}/content", ids[0]),
        &[],
        b"",
    );
    assert_eq!(video.status, 200);
    assert_eq!(crate::parse_mp4(&video.body).samples, 17);
    let thumb = http(
        api_addr,
        "GET",
        &format!("/v1/videos/{}/content?variant=thumbnail", ids[0]),
        &[],
        b"",
    );
    assert_eq!(thumb.status, 200);
    assert!(thumb.body.starts_with(b"\x89PNG"));
    assert_eq!(metric(api_addr, "reel_workers_seen"), 2.0);
    assert_eq!(metric(api_addr, "reel_queue_length"), 0.0);
    assert_eq!(metric(api_addr, "reel_pending_jobs"), 0.0);

    // The API killed and started again: every job is still there, as it was.
    api.take().unwrap().kill9();
    api = Some(reel("api", rport, &dir, aport, &[]));
    let list = http(api_addr, "GET", "/v1/videos?limit=100", &[], b"").json();
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 12, "{list}");
    assert!(ids.iter().all(|id| listed.contains(&id.as_str())));
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["status"] == "completed"));

    // Two more accepted, then Redis killed before they can run to the end... and started
    // again on its append-only file: nothing acknowledged is lost, and they complete.
    let later: Vec<String> = (0..2)
        .map(|i| {
            submit(
                api_addr,
                json!({"prompt": "a blue square moving up", "steps": 60, "seconds": 2, "seed": 100 + i}),
            )
        })
        .collect();
    db.take().unwrap().kill9();
    std::thread::sleep(Duration::from_millis(300));
    db = Some(redis(&bin, rport, &rdir));
    for id in ids.iter().chain(&later) {
        let t = Instant::now();
        let v = loop {
            let r = http(api_addr, "GET", &format!("/v1/videos/{id}"), &[], b"");
            if r.status == 200 {
                break r.json();
            }
            // The API's connection comes back within a few seconds.
            assert!(t.elapsed() < Duration::from_secs(30), "{id}: {}", r.status);
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_ne!(v["status"], "failed", "{v}");
    }
    for id in &later {
        wait_for(api_addr, id, "completed");
    }

    // DELETE of a running job reaches the worker running it.
    let id = submit(api_addr, long_job());
    running(api_addr, &id);
    let t = Instant::now();
    let r = http(api_addr, "DELETE", &format!("/v1/videos/{id}"), &[], b"");
    assert_eq!(r.status, 200);
    let v = wait_for(api_addr, &id, "failed");
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // DELETE of a finished job removes it and its files from the store.
    let store = dir.join("store").join("videos");
    let files = || {
        std::fs::read_dir(&store)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&ids[0])
            })
            .count()
    };
    assert_eq!(files(), 2);
    let r = http(
        api_addr,
        "DELETE",
        &format!("/v1/videos/{}", ids[0]),
        &[],
        b"",
    );
    assert_eq!(r.json()["deleted"], true);
    assert_eq!(files(), 0);
    assert_eq!(
        http(api_addr, "GET", &format!("/v1/videos/{}", ids[0]), &[], b"").status,
        404
    );
    // Events of a finished job through the queue: its `done` event, then the end.
    let ev = http(
        api_addr,
        "GET",
        &format!("/v1/videos/{}/events", ids[1]),
        &[],
        b"",
    );
    let ev = String::from_utf8(ev.body).unwrap();
    assert!(
        ev.contains("event: done") && ev.contains("\"completed\""),
        "{ev}"
    );

    // A record that cannot be read (hand-edited) is listed as failed, not dropped, and the
    // list still answers.
    redis_cmd(
        rport,
        &["SET", &format!("reel:job:{}", ids[2]), "{not json"],
    );
    let v = get(api_addr, &ids[2]);
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "record_unreadable", "{v}");
    let list = http(api_addr, "GET", "/v1/videos?limit=100", &[], b"");
    assert_eq!(list.status, 200);

    // Retention over the store (at the API's start, then every minute): under a 12 KB budget
    // the oldest finished jobs go until the rest fit, records and files both.
    api.take().unwrap().kill9();
    api = Some(reel(
        "api",
        rport,
        &dir,
        aport,
        &["--max-disk-gb", "0.000012"],
    ));
    let stored = || -> u64 {
        std::fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    let t = Instant::now();
    while stored() > 12_000 {
        assert!(t.elapsed() < Duration::from_secs(20), "{} bytes", stored());
        std::thread::sleep(Duration::from_millis(100));
    }
    let list = http(api_addr, "GET", "/v1/videos?limit=100&order=asc", &[], b"").json();
    let left: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert!(left.len() < 14 && !left.is_empty(), "{list}");
    assert!(
        !left.contains(&ids[1].as_str()),
        "the oldest went first: {left:?}"
    );
    drop(api);
    drop(db);
}

/// A worker killed (kill -9) mid-job: another takes the job over after --reclaim-after and
/// completes it with attempts 2; a job whose workers are lost more often than --retries
/// allows fails with code worker_lost.
#[test]
fn queue_takes_over_the_job_of_a_killed_worker() {
    let Some((
        Setup {
            dir,
            rport,
            aport,
            api_addr,
            ..
        },
        _db,
    )) = setup("cluster-kill")
    else {
        return;
    };
    let _api = reel("api", rport, &dir, aport, &[]);
    let fast = ["--reclaim-after", "2"];
    let worker = |name: &str, retries: &str| {
        let mut args = fast.to_vec();
        args.extend(["--worker-name", name, "--retries", retries]);
        reel("worker", rport, &dir, free_port(), &args)
    };
    let mut workers = vec![
        (String::from("a"), worker("a", "2")),
        (String::from("b"), worker("b", "2")),
    ];
    let id = submit(api_addr, long_job());
    let v = running(api_addr, &id);
    let victim = v["worker"].as_str().unwrap().to_string();
    let i = workers.iter().position(|(n, _)| *n == victim).unwrap();
    workers.remove(i).1.kill9();
    let v = wait_for(api_addr, &id, "completed");
    assert_eq!(v["attempts"], 2, "{v}");
    assert_ne!(v["worker"], victim.as_str(), "{v}");
    assert!(metric(api_addr, "reel_reclaimed_jobs_total") >= 1.0);
    let video = http(
        api_addr,
        "GET",
        &format!("/v1/videos/{id}/content"),
        &[],
        b"",
    );
    assert_eq!(crate::parse_mp4(&video.body).samples, 65);
    // Only the completed attempt's files are in the store.
    let left: Vec<String> = std::fs::read_dir(dir.join("store").join("videos"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|f| f.contains(".a2.")), "{left:?}");

    // The survivor runs the next job; a worker that allows no retry takes it over when the
    // survivor is killed: the job fails with worker_lost.
    let id = submit(api_addr, long_job());
    let v = running(api_addr, &id);
    let (name, survivor) = workers.remove(0);
    assert_eq!(v["worker"], name.as_str(), "{v}");
    let _strict = worker("c", "0");
    survivor.kill9();
    let v = wait_for(api_addr, &id, "failed");
    assert_eq!(v["error"]["code"], "worker_lost", "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
}

/// moto's S3-compatible server (.ci/run installs it from PyPI into a venv under /tmp and
/// names it in REEL_MOTO_SERVER).
fn moto_server() -> Option<PathBuf> {
    tool("moto_server", "REEL_MOTO_SERVER", "REEL_REQUIRE_S3")
}

/// Outputs in an S3-compatible store (moto's server on a loopback port): an API and a worker
/// with `--store s3://BUCKET/PREFIX`, the endpoint and credentials from AWS_* variables; the
/// videos land under the prefix, are served by the API, and go with DELETE.
#[test]
fn queue_outputs_go_to_an_s3_compatible_store() {
    let Some(moto) = moto_server() else { return };
    let Some((
        Setup {
            dir,
            rport,
            aport,
            api_addr,
            ..
        },
        _db,
    )) = setup("cluster-s3")
    else {
        return;
    };
    let mport = free_port();
    let _s3 = Proc(listening(
        Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &mport.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        mport,
    ));
    let s3: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    assert_eq!(http(s3, "PUT", "/reel-test", &[], b"").status, 200);
    let env = [
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{mport}")),
        ("AWS_ALLOW_HTTP", "true".to_string()),
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let store = "s3://reel-test/outputs";
    let _api = reel_with("api", rport, &dir, aport, &[], store, &env);
    let _w = reel_with("worker", rport, &dir, free_port(), &[], store, &env);
    let ids: Vec<String> = (0..2)
        .map(|i| {
            submit(
                api_addr,
                json!({"prompt": "a green triangle moving down", "steps": 3, "seed": i}),
            )
        })
        .collect();
    for id in &ids {
        wait_for(api_addr, id, "completed");
        let video = http(
            api_addr,
            "GET",
            &format!("/v1/videos/{id}/content"),
            &[],
            b"",
        );
        assert_eq!(video.status, 200);
        assert_eq!(crate::parse_mp4(&video.body).samples, 17);
    }
    let objects =
        || String::from_utf8(http(s3, "GET", "/reel-test?list-type=2", &[], b"").body).unwrap();
    let listing = objects();
    for id in &ids {
        for ext in ["mp4", "png"] {
            let key = format!("<Key>outputs/videos/{id}.a1.{ext}</Key>");
            assert!(listing.contains(&key), "{key} not in {listing}");
        }
    }
    let r = http(
        api_addr,
        "DELETE",
        &format!("/v1/videos/{}", ids[0]),
        &[],
        b"",
    );
    assert_eq!(r.json()["deleted"], true);
    let listing = objects();
    assert!(!listing.contains(&ids[0]), "{listing}");
    assert!(listing.contains(&ids[1]), "{listing}");
}

/// Settings that cannot work are refused at start, naming the flag: a split role without a
/// shared store, a queue URL that is not Redis's, a reclaim time out of range.
#[test]
fn queue_refuses_settings_that_cannot_work() {
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_reel"))
            .args(["-q", "serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let e = run(&["--queue", "redis://127.0.0.1:1/0", "--role", "worker"]);
    assert!(e.contains("--store"), "{e}");
    let e = run(&["--queue", "http://127.0.0.1:1/0"]);
    assert!(e.contains("redis://HOST:PORT/DB"), "{e}");
    let e = run(&["--queue", "redis://127.0.0.1:1/0", "--reclaim-after", "0"]);
    assert!(e.contains("--reclaim-after"), "{e}");
    let e = run(&["--queue", "redis://127.0.0.1:1/0", "--role", "boss"]);
    assert!(e.contains("api, worker or both"), "{e}");
    let e = run(&["--role", "api"]);
    assert!(e.contains("--queue"), "{e}");
}
