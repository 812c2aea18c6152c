//! `reel serve` on an ephemeral loopback port with the embedded tiny model, through a plain
//! HTTP/1.1 client over TcpStream.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use reel::server::{ServeArgs, Server};
use serde_json::{json, Value};

use crate::{parse_mp4, scratch};

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut i = 0;
        while let Some(p) = body[i..].windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(String::from_utf8_lossy(&body[i..i + p]).trim(), 16)
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&body[i + p + 2..i + p + 2 + n]);
            i += p + 2 + n + 2;
        }
        body = out;
    }
    Reply { status, body }
}

pub(crate) fn post_json(addr: SocketAddr, v: &Value) -> Reply {
    http(
        addr,
        "POST",
        "/v1/videos",
        &[("Content-Type", "application/json")],
        v.to_string().as_bytes(),
    )
}

/// The arguments of a server on the embedded model on a loopback port, all defaults.
fn serve_args(dir: &Path, max_queue: usize) -> ServeArgs {
    ServeArgs {
        model: None,
        random_weights: false,
        addr: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        max_queue,
        keep_hours: None,
        max_disk_gb: None,
        api_key: None,
        device: None,
        device_memory_gib: None,
        idle_timeout_secs: None,
        max_connections: None,
        cluster: None,
    }
}

fn start(dir: &Path, max_queue: usize, api_key: Option<&str>) -> Server {
    Server::start(&ServeArgs {
        api_key: api_key.map(str::to_string),
        ..serve_args(dir, max_queue)
    })
    .unwrap()
}

pub(crate) fn wait_for(addr: SocketAddr, id: &str, status: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = http(addr, "GET", &format!("/v1/videos/{id}"), &[], b"").json();
        if v["status"] == status {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{id} never became {status}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_create_poll_download_list_delete_and_restart() {
    let dir = scratch("serve-main");
    let server = start(&dir, 4, None);
    let addr = server.addr;
    assert_eq!(
        http(addr, "GET", "/health", &[], b"").json()["status"],
        "ok"
    );

    // Unknown fields are ignored; seconds as a string, as OpenAI clients send it.
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "seconds": "1", "size": "64x48",
                                    "model": "anything", "unknown_field": [1, 2]}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(
        (v["object"].as_str(), v["status"].as_str()),
        (Some("video"), Some("queued"))
    );
    assert_eq!(v["frames"], 17); // 16 * 1 + 1

    // Server-sent events until done.
    let ev = http(addr, "GET", &format!("/v1/videos/{id}/events"), &[], b"");
    let text = String::from_utf8_lossy(&ev.body);
    assert!(
        text.contains("event: done") && text.contains("\"completed\""),
        "{text}"
    );
    let v = wait_for(addr, &id, "completed");
    assert_eq!(v["progress"], 100);
    assert!(v["completed_at"].as_u64().unwrap() >= v["created_at"].as_u64().unwrap());

    let mp4 = http(addr, "GET", &format!("/v1/videos/{id}/content"), &[], b"");
    assert_eq!(mp4.status, 200);
    let info = parse_mp4(&mp4.body);
    assert_eq!((info.samples, info.width, info.height), (17, 64, 48));
    let png = http(
        addr,
        "GET",
        &format!("/v1/videos/{id}/content?variant=thumbnail"),
        &[],
        b"",
    );
    assert!(png.body.starts_with(b"\x89PNG"));

    // Multipart, as the OpenAI SDK sends it.
    let boundary = "reelboundary";
    let form = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na green square\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"seconds\"\r\n\r\n1\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"steps\"\r\n\r\n2\r\n--{boundary}--\r\n"
    );
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = http(
        addr,
        "POST",
        "/v1/videos",
        &[("Content-Type", &ct)],
        form.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id2 = r.json()["id"].as_str().unwrap().to_string();
    wait_for(addr, &id2, "completed");

    // List: newest first, pagination with after/limit.
    let l = http(addr, "GET", "/v1/videos?limit=1", &[], b"").json();
    assert_eq!(
        (l["object"].as_str(), l["has_more"].as_bool()),
        (Some("list"), Some(true))
    );
    assert_eq!(l["first_id"], id2.as_str());
    let l = http(
        addr,
        "GET",
        &format!("/v1/videos?limit=5&after={id2}"),
        &[],
        b"",
    )
    .json();
    assert_eq!(l["data"][0]["id"], id.as_str());
    assert_eq!(l["has_more"], false);
    let l = http(addr, "GET", "/v1/videos?order=asc", &[], b"").json();
    assert_eq!(l["first_id"], id.as_str());

    server.stop();

    // Restart: finished jobs come back and download; a job that was running when the
    // process died is failed with server_restarted.
    let mut crashed: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("jobs/{id}.json"))).unwrap())
            .unwrap();
    let ghost = "video_0123456789abcdef0123456789abcdef";
    crashed["id"] = ghost.into();
    crashed["status"] = "in_progress".into();
    std::fs::write(dir.join(format!("jobs/{ghost}.json")), crashed.to_string()).unwrap();
    let server = start(&dir, 4, None);
    let addr = server.addr;
    assert_eq!(
        http(addr, "GET", &format!("/v1/videos/{id}"), &[], b"").json()["status"],
        "completed"
    );
    assert_eq!(
        http(addr, "GET", &format!("/v1/videos/{id}/content"), &[], b"").body,
        mp4.body
    );
    let g = http(addr, "GET", &format!("/v1/videos/{ghost}"), &[], b"").json();
    assert_eq!(
        (g["status"].as_str(), g["error"]["code"].as_str()),
        (Some("failed"), Some("server_restarted"))
    );

    // Delete a finished job: its files go.
    let d = http(addr, "DELETE", &format!("/v1/videos/{id}"), &[], b"").json();
    assert_eq!(d["deleted"], true);
    assert_eq!(
        http(addr, "GET", &format!("/v1/videos/{id}"), &[], b"").status,
        404
    );
    assert!(!dir.join(format!("videos/{id}.mp4")).exists());
    server.stop();
}

#[test]
fn serve_queue_full_429_and_cancel() {
    let dir = scratch("serve-queue");
    let server = start(&dir, 1, None);
    let addr = server.addr;
    let long = json!({"prompt": "x", "seconds": 1, "steps": 1000, "size": "64x64"});
    let a = post_json(addr, &long).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(addr, &a, "in_progress");
    let b = post_json(addr, &long); // fills the queue of one
    assert_eq!(b.status, 200);
    let b = b.json()["id"].as_str().unwrap().to_string();
    let c = post_json(addr, &long);
    assert_eq!(c.status, 429, "{}", String::from_utf8_lossy(&c.body));
    assert_eq!(c.json()["error"]["code"], "queue_full");
    // Cancel the queued one (failed at once) and the running one (stops between steps).
    let vb = http(addr, "DELETE", &format!("/v1/videos/{b}"), &[], b"").json();
    assert_eq!(
        (vb["status"].as_str(), vb["error"]["code"].as_str()),
        (Some("failed"), Some("cancelled"))
    );
    http(addr, "DELETE", &format!("/v1/videos/{a}"), &[], b"");
    let va = wait_for(addr, &a, "failed");
    assert_eq!(va["error"]["code"], "cancelled");
    assert!(va["progress"].as_u64().unwrap() < 90);
    let m = String::from_utf8(http(addr, "GET", "/metrics", &[], b"").body).unwrap();
    assert!(
        m.contains("reel_jobs{status=\"failed\"} 2") && m.contains("reel_queue_depth 0"),
        "{m}"
    );
    server.stop();
}

#[test]
fn serve_bad_inputs_are_400_naming_the_field_and_auth() {
    let dir = scratch("serve-bad");
    let server = start(&dir, 4, Some("sekrit"));
    let addr = server.addr;
    let auth = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sekrit"),
    ];
    let post = |v: &Value| http(addr, "POST", "/v1/videos", &auth, v.to_string().as_bytes());
    let param = |r: Reply| {
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        r.json()["error"]["param"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(param(post(&json!({"prompt": "x", "size": "big"}))), "size");
    assert_eq!(
        param(post(&json!({"prompt": "x", "size": "65x64"}))),
        "size"
    );
    assert_eq!(
        param(post(&json!({"prompt": "x", "size": "4000x2000"}))),
        "size"
    );
    assert_eq!(
        param(post(&json!({"prompt": "x", "seconds": "0"}))),
        "seconds"
    );
    assert_eq!(
        param(post(&json!({"prompt": "x", "seconds": 61}))),
        "seconds"
    );
    assert_eq!(
        param(post(&json!({"prompt": "x", "seconds": "four"}))),
        "seconds"
    );
    assert_eq!(
        param(post(&json!({"prompt": "x".repeat(32_001)}))),
        "prompt"
    );
    assert_eq!(param(post(&json!({"seconds": 1}))), "prompt");
    assert_eq!(param(post(&json!({"prompt": "x", "frames": 6}))), "frames");
    assert_eq!(
        param(http(addr, "POST", "/v1/videos", &auth, b"{not json")),
        "body"
    );
    // Ids never reach the filesystem unchecked.
    let r = http(
        addr,
        "GET",
        "/v1/videos/..%2F..%2Fjobs/content",
        &auth[1..],
        b"",
    );
    assert_eq!(r.status, 404);
    let r = http(addr, "GET", "/v1/videos/video_zz/content", &auth[1..], b"");
    assert_eq!(r.status, 404);
    // Every /v1 route needs the key; /health does not.
    assert_eq!(http(addr, "GET", "/v1/videos", &[], b"").status, 401);
    assert_eq!(
        http(
            addr,
            "GET",
            "/v1/videos",
            &[("Authorization", "Bearer wrong")],
            b""
        )
        .status,
        401
    );
    assert_eq!(http(addr, "GET", "/v1/videos", &auth[1..], b"").status, 200);
    assert_eq!(http(addr, "GET", "/health", &[], b"").status, 200);
    server.stop();
}

#[test]
fn serve_retention_evicts_finished_jobs_over_the_disk_budget() {
    let dir = scratch("serve-retention");
    let server = Server::start(&ServeArgs {
        keep_hours: Some(24.0),
        max_disk_gb: Some(1e-12), // no room: every finished job is evicted
        ..serve_args(&dir, 4)
    })
    .unwrap();
    let addr = server.addr;
    let id = post_json(addr, &json!({"prompt": "x", "seconds": 1, "steps": 1})).json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = Instant::now();
    while http(addr, "GET", &format!("/v1/videos/{id}"), &[], b"").status != 404 {
        assert!(t.elapsed() < Duration::from_secs(60), "never evicted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !dir.join(format!("videos/{id}.mp4")).exists()
            && !dir.join(format!("jobs/{id}.json")).exists()
    );
    server.stop();
}

#[test]
fn serve_warns_when_the_demo_model_runs_at_a_size_it_never_saw() {
    let dir = scratch("serve-warning");
    let server = start(&dir, 4, None);
    let addr = server.addr;
    // An OpenAI client's usual size: the demo was trained on 64x64 only.
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "size": "720x1280", "steps": 1}),
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    let id = v["id"].as_str().unwrap().to_string();
    let w = v["warning"].as_str().unwrap_or_default();
    assert!(w.contains("64x64") && w.contains("720x1280"), "{v}");
    http(addr, "DELETE", &format!("/v1/videos/{id}"), &[], b"");
    // At the trained size: no warning field.
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "steps": 1}),
    );
    let v = r.json();
    assert!(v.get("warning").is_none(), "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for(addr, &id, "completed");
    server.stop();
}

/// `reel serve --device emu`: the worker runs jobs on the device (the video object completes,
/// /health and /metrics name the device), and a request whose plan does not fit the device
/// memory is refused at submission with a 400 naming `seconds` (or `size`).
#[test]
fn serve_on_a_device_plans_each_request_at_submission() {
    let dir = scratch("serve-device");
    let server = Server::start(&ServeArgs {
        device: Some(reel::kernels::KernelDevice::Emu),
        device_memory_gib: Some(0.05),
        ..serve_args(&dir, 4)
    })
    .unwrap();
    let addr = server.addr;
    let r = post_json(
        addr,
        &json!({"prompt": "x", "size": "1920x1080", "seconds": 60}),
    );
    assert_eq!(r.status, 400, "{:?}", r.json());
    let e = r.json();
    assert_eq!(e["error"]["param"], "seconds", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("GiB"),
        "{e}"
    );
    let r = post_json(
        addr,
        &json!({"prompt": "x", "size": "1920x1080", "frames": 5}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "size");
    let id = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "size": "32x32", "frames": 1, "steps": 1}),
    )
    .json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(addr, &id, "completed");
    let h = http(addr, "GET", "/health", &[], b"").json();
    assert!(h["device"].as_str().unwrap().starts_with("emu"), "{h}");
    let m = String::from_utf8(http(addr, "GET", "/metrics", &[], b"").body).unwrap();
    assert!(m.contains("reel_device_info{device=\"emu"), "{m}");
    assert!(m.contains("reel_device_budget_bytes"), "{m}");
    server.stop();
}

/// A free loopback port (bound, read, released), never one this process handed out
/// before: a port taken for a server that has not bound it yet must not be given to a
/// second server (the first would then fail to bind, and its test would talk to the
/// second).
pub(crate) fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The server on a disk that fills up (`reel serve` in a child under a 4 KiB file-size
/// limit: the job records fit, the video (about 10 KB) does not): the job fails with `write_failed`, its
/// content is never served and nothing of it stays under videos/.
#[test]
fn serve_marks_a_job_whose_video_cannot_be_written_write_failed() {
    let dir = scratch("serve-full-disk");
    // The demo model unpacked first: under the child's file-size limit it could not be.
    reel::models::embedded::ensure().unwrap();
    let port = free_port();
    let mut child = listening(
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "trap '' XFSZ; ulimit -f 4; exec '{}' -q serve --addr 127.0.0.1:{port} --data-dir '{}'",
                env!("CARGO_BIN_EXE_reel"),
                dir.display()
            ))
            // Not the test's own stdout and stderr: they may be files already past the child's
            // file-size limit (a CI log), and a failed write to them would end the child.
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
        port,
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "steps": 2, "seconds": 2}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let v = wait_for(addr, &id, "failed");
    assert_eq!(v["error"]["code"], "write_failed", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("File too large"),
        "{v}"
    );
    let c = http(addr, "GET", &format!("/v1/videos/{id}/content"), &[], b"");
    assert_ne!(c.status, 200);
    let left: Vec<_> = std::fs::read_dir(dir.join("videos"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    child.kill().ok();
    child.wait().ok();
}

/// Spawns `cmd` (a `reel serve` on `port`) and waits until it listens; one that exits or
/// never listens is reported with its stderr.
pub(crate) fn listening(cmd: &mut std::process::Command, port: u16) -> std::process::Child {
    let mut child = cmd.spawn().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if t.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
            child.kill().ok();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the server never listened ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Something answers on the port: make sure it is this child, not a process that had
    // the port first (the child would then exit, unable to bind).
    std::thread::sleep(Duration::from_millis(200));
    if let Some(status) = child.try_wait().unwrap() {
        let out = child.wait_with_output().unwrap();
        panic!(
            "the server exited ({status}) although something listens on port {port}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    child
}

/// A server whose stderr cannot be written (its reader gone: every log line fails with
/// EPIPE, as on a full disk) goes on serving: a log line is lost, not a panic.
#[test]
fn serve_keeps_serving_when_its_log_cannot_be_written() {
    let dir = scratch("serve-broken-stderr");
    reel::models::embedded::ensure().unwrap();
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_reel"));
    cmd.args(["-vv", "serve", "--addr", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stderr.take()); // the reader gone before the first line
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        let ended = child.try_wait().unwrap();
        assert!(ended.is_none(), "the server ended: {ended:?}");
        assert!(t.elapsed() < Duration::from_secs(60), "never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "steps": 1, "seconds": 1}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_for(addr, &id, "completed");
    let c = http(addr, "GET", &format!("/v1/videos/{id}/content"), &[], b"");
    assert_eq!(c.status, 200);
    assert!(child.try_wait().unwrap().is_none());
    child.kill().ok();
    child.wait().ok();
}

/// Records the server cannot read are listed as failed (`record_unreadable`), never dropped;
/// files no job owns and interrupted writes are removed at start; out-of-range parameters
/// are a 400 naming the field (a guidance of 1e308 once became an unreadable record).
#[test]
fn serve_lists_unreadable_records_removes_orphans_and_checks_ranges() {
    let dir = scratch("serve-records");
    std::fs::create_dir_all(dir.join("jobs")).unwrap();
    std::fs::create_dir_all(dir.join("videos")).unwrap();
    let bad = "video_0123456789abcdef0123456789abcdef";
    let orphan = "video_fedcba9876543210fedcba9876543210";
    std::fs::write(
        dir.join("jobs").join(format!("{bad}.json")),
        b"{\"id\": 12,",
    )
    .unwrap();
    std::fs::write(dir.join("videos").join(format!("{bad}.mp4")), b"x").unwrap();
    std::fs::write(dir.join("videos").join(format!("{orphan}.mp4")), b"x").unwrap();
    std::fs::write(
        dir.join("videos").join(format!("{orphan}.mp4.partial-1-0")),
        b"x",
    )
    .unwrap();
    std::fs::write(
        dir.join("jobs").join(format!("{orphan}.json.partial-1-0")),
        b"{",
    )
    .unwrap();
    let server = start(&dir, 4, None);
    let addr = server.addr;
    let v = http(addr, "GET", &format!("/v1/videos/{bad}"), &[], b"").json();
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error"]["code"], "record_unreadable", "{v}");
    let list = http(addr, "GET", "/v1/videos", &[], b"").json();
    assert!(list.to_string().contains(bad), "{list}");
    let videos: Vec<_> = std::fs::read_dir(dir.join("videos"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(videos.is_empty(), "{videos:?}");
    let jobs: Vec<_> = std::fs::read_dir(dir.join("jobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        jobs,
        vec![format!("{bad}.json")],
        "the unreadable record is kept as it is"
    );
    for (field, value) in [
        ("guidance", json!(1e308)),
        ("guidance", json!(-0.5)),
        ("steps", json!(5000)),
        ("fps", json!(0)),
    ] {
        let r = post_json(addr, &json!({"prompt": "x", field: value}));
        assert_eq!(r.status, 400, "{field}: {value}");
        assert_eq!(r.json()["error"]["param"], field, "{field}: {value}");
    }
    drop(server);
}

/// Connections are bounded in number and in silence: a body announced but not sent is a 408
/// within the idle timeout, a connection that sends nothing is closed, and past
/// max_connections a new connection waits until one closes.
#[test]
fn serve_times_out_stalled_bodies_and_idle_connections_and_bounds_them() {
    let dir = scratch("serve-timeouts");
    let server = Server::start(&ServeArgs {
        idle_timeout_secs: Some(1.0),
        max_connections: Some(2),
        ..serve_args(&dir, 4)
    })
    .unwrap();
    let addr = server.addr;
    let read_all = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    };
    // A body that never arrives: 10 of the 1000 bytes announced.
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    let reply = read_all(&mut s);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("body_timeout"), "{reply}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // A connection that never sends a request is closed.
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let reply = read_all(&mut s);
    assert!(reply.is_empty(), "{reply}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Headers trickled a byte every 200 ms, never idle for the 1 s timeout: cut off when the
    // request's headers as a whole take longer than it, while bytes still arrive.
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut w = s.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        let head = b"GET /health HTTP/1.1\r\nHost: x\r\n";
        let mut sent = 0usize;
        for &b in head.iter().chain(std::iter::repeat(&b'a')) {
            if w.write_all(&[b]).is_err() || sent > 100 {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        sent
    });
    let reply = read_all(&mut s);
    let cut = t.elapsed();
    assert!(!reply.contains("200 OK"), "{reply}");
    assert!(cut < Duration::from_secs(8), "headers trickled for {cut:?}");
    drop(s);
    let sent = trickle.join().unwrap();
    assert!(sent <= 100, "the trickle was never cut off");
    // Two silent connections hold both permits: a third is served only once they time out.
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let r = http(addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 200);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "served after {waited:?} with both permits held"
    );
    drop(held);
    // And once free, at once.
    let t = Instant::now();
    assert_eq!(http(addr, "GET", "/health", &[], b"").status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    drop(server);
}

/// DELETE reaches inside a step: a job whose single step takes minutes on the cpu (the demo
/// model at 1280x720 x 81 frames: 75,600 tokens) stops within seconds of the DELETE, is
/// `failed` with code `cancelled`, leaves no file, and the worker takes the next job.
#[test]
fn serve_delete_stops_a_running_job_inside_its_step() {
    let dir = scratch("serve-cancel-in-step");
    let server = start(&dir, 4, None);
    let addr = server.addr;
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "size": "1280x720", "frames": 81, "steps": 2}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_for(addr, &id, "in_progress");
    std::thread::sleep(Duration::from_millis(1500)); // well inside the first step
    let t = Instant::now();
    let d = http(addr, "DELETE", &format!("/v1/videos/{id}"), &[], b"");
    assert_eq!(d.status, 200);
    let v = wait_for(addr, &id, "failed");
    let stopped = t.elapsed();
    assert_eq!(v["error"]["code"], "cancelled", "{v}");
    assert!(
        stopped < Duration::from_secs(10),
        "stopped {stopped:?} after the DELETE"
    );
    eprintln!("a running step stopped {stopped:?} after the DELETE");
    let left: Vec<_> = std::fs::read_dir(dir.join("videos"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // The worker is free again.
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "steps": 1, "seconds": 1}),
    );
    let next = r.json()["id"].as_str().unwrap().to_string();
    wait_for(addr, &next, "completed");
    drop(server);
}

/// Admission on the cpu: every request is checked at submission with the CLI's memory
/// estimate against what the machine has (here REEL_AVAILABLE_GB=1 for a child server): a
/// 1920x1080 minute is a 400 naming `seconds` (or `frames`; a 1920x1080 clip of the default
/// 17 frames, `size`), a small video is accepted and made.
#[test]
fn serve_refuses_at_submission_what_the_memory_cannot_hold() {
    let dir = scratch("serve-admission");
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_reel"))
        .args([
            "-q",
            "serve",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(&dir)
        .env("REEL_AVAILABLE_GB", "1")
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the server never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (body, field) in [
        (
            json!({"prompt": "x", "size": "1920x1080", "seconds": 60}),
            "seconds",
        ),
        (
            json!({"prompt": "x", "size": "1920x1080", "frames": 961}),
            "frames",
        ),
        (json!({"prompt": "x", "size": "1920x1080"}), "size"),
    ] {
        let r = post_json(addr, &body);
        assert_eq!(
            r.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let e = r.json();
        assert_eq!(e["error"]["param"], field, "{e}");
    }
    let r = post_json(
        addr,
        &json!({"prompt": "x", "size": "1920x1080", "seconds": 60}),
    );
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("GB"),
        "{}",
        r.json()
    );
    let r = post_json(
        addr,
        &json!({"prompt": "a red circle moving right", "steps": 1}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    wait_for(addr, &id, "completed");
    child.kill().ok();
    child.wait().ok();
}

/// A small load test: 8 clients submit 3 jobs each at once against a queue of 4. Every
/// request is answered (200 or 429, nothing else), every accepted job completes, and its
/// content is a valid mp4 of its frames.
#[test]
fn serve_under_concurrent_clients_completes_every_accepted_job() {
    let dir = scratch("serve-load");
    let server = start(&dir, 4, None);
    let addr = server.addr;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            std::thread::spawn(move || {
                let mut accepted = Vec::new();
                let mut refused = 0;
                for j in 0..3 {
                    let r = post_json(
                        addr,
                        &json!({"prompt": "a red circle moving right", "steps": 1,
                                "size": "32x32", "frames": 5, "seed": c * 10 + j}),
                    );
                    match r.status {
                        200 => accepted.push(r.json()["id"].as_str().unwrap().to_string()),
                        429 => refused += 1,
                        s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
                    }
                }
                (accepted, refused)
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for c in clients {
        let (a, r) = c.join().unwrap();
        accepted.extend(a);
        refused += r;
    }
    assert_eq!(accepted.len() + refused, 24);
    assert!(!accepted.is_empty());
    eprintln!("{} accepted, {refused} refused (429)", accepted.len());
    for id in &accepted {
        wait_for(addr, id, "completed");
        let c = http(addr, "GET", &format!("/v1/videos/{id}/content"), &[], b"");
        assert_eq!(c.status, 200, "{id}");
        let info = parse_mp4(&c.body);
        assert_eq!(info.samples, 5, "{id}: {info:?}");
    }
    server.stop();
}

/// A block-causal model behind `reel serve`: the job streams chunk by chunk, the events
/// stream says `chunk` once per chunk written (1..=n, in order, before `done`), and the video
/// object carries the chunk count.
#[test]
fn serve_streams_a_block_causal_model_with_an_event_per_chunk() {
    let dir = scratch("serve-causal");
    let root = crate::causal_demo::causal_demo(&dir);
    let server = Server::start(&ServeArgs {
        model: Some(root.display().to_string()),
        ..serve_args(&dir.join("data"), 4)
    })
    .unwrap();
    let addr = server.addr;
    // 3 seconds: 49 frames, 13 latent frames, 7 chunks of 2.
    let r = post_json(
        addr,
        &serde_json::json!({"prompt": "a red circle moving right", "size": "64x64", "seconds": 3}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_string();
    let ev = http(addr, "GET", &format!("/v1/videos/{id}/events"), &[], b"");
    let text = String::from_utf8_lossy(&ev.body).to_string();
    let chunks: Vec<u64> = text
        .split("\n\n")
        .filter(|e| e.contains("event: chunk"))
        .map(|e| {
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["chunks"], 7, "{v}");
            v["chunk"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(chunks, (1..=7).collect::<Vec<u64>>(), "{text}");
    let done_at = text.find("event: done").expect("a done event");
    assert!(text.rfind("event: chunk").unwrap() < done_at, "{text}");
    let v = wait_for(addr, &id, "completed");
    assert_eq!(v["chunks"], serde_json::json!({"done": 7, "total": 7}));
    assert_eq!(v["frames"], 49);
    let mp4 = http(addr, "GET", &format!("/v1/videos/{id}/content"), &[], b"");
    assert_eq!(crate::parse_mp4(&mp4.body).samples, 49);
    server.stop();
}
