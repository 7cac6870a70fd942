//! `dpar serve` over HTTP on an ephemeral loopback port: a stream ends with a PNG, a
//! fixed seed gives the codes of `dpar sample`, bad parameters get 400, paths outside the page
//! get 404, concurrent streams share a batch and keep their own codes, a stream cancelled
//! midway leaves its neighbour alone, a burst gets only 200 or 503, a closed stream frees its
//! slot; and a real browser
//! (headless Chromium) draws a generation.
#![cfg(feature = "serve")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A `dpar serve` child process on a free port; killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(workers: usize, queue: usize) -> Server {
        Self::start_with(&["--workers", &workers.to_string(), "--queue", &queue.to_string()], &[])
    }

    /// A server with these arguments (after `serve --addr`) and environment variables.
    fn start_with(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = common::dpar()
            .args(["serve", "--addr", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no URL in the first line: {line}"))
            .to_string();
        Server { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, headers (lower-case names), body (de-chunked).
struct Reply {
    status: u16,
    headers: String,
    body: String,
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
    out
}

fn get(addr: &str, path: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") {
        dechunk(&raw[split + 4..])
    } else {
        raw[split + 4..].to_vec()
    };
    Reply { status, headers, body: String::from_utf8_lossy(&body).to_string() }
}

/// The data of the first SSE event called `name`.
fn event(body: &str, name: &str) -> Option<serde_json::Value> {
    let marker = format!("event: {name}\ndata: ");
    let at = body.find(&marker)? + marker.len();
    serde_json::from_str(body[at..].lines().next()?).ok()
}

fn status_of(addr: &str) -> serde_json::Value {
    serde_json::from_str(&get(addr, "/api/status").body).unwrap()
}

fn sample_codes(args: &[&str]) -> Vec<u32> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let mut all = vec!["sample", "--per-class", "1", "--batch-size", "1", "--out", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, text) = common::run_dpar(&all);
    assert!(ok, "{text}");
    dpar::data::shards::read_shard(&out.join("codes.safetensors")).unwrap().codes
}

#[test]
fn a_stream_ends_with_a_png_and_a_fixed_seed_gives_the_codes_of_dpar_sample() {
    let server = Server::start(1, 4);
    for (model, ckpt) in [("dpar", "models/mnist/dpar"), ("gpt", "models/mnist/gpt")] {
        let start = Instant::now();
        let reply = get(&server.addr, &format!("/api/generate?model={model}&class=3&seed=7&cfg=2"));
        let seconds = start.elapsed().as_secs_f64();
        assert_eq!(reply.status, 200);
        assert!(reply.headers.contains("content-type: text/event-stream"), "{}", reply.headers);
        let codes_seen = reply.body.matches("event: code\n").count();
        assert_eq!(codes_seen, 256, "one code event per code");
        let done = event(&reply.body, "done").expect("a done event");
        assert!(done["png"].as_str().unwrap().starts_with("data:image/png;base64,iVBORw0KGgo"));
        let codes: Vec<u32> = serde_json::from_value(done["codes"].clone()).unwrap();
        let root = env!("CARGO_MANIFEST_DIR");
        let want = sample_codes(&["--ckpt", &format!("{root}/{ckpt}"), "--classes", "3", "--seed", "7", "--cfg", "2"]);
        assert_eq!(codes, want, "{model}: the page's codes differ from dpar sample's");
        eprintln!(
            "{model}: stream of one image in {:.0} ms (server: first code after {:.1} ms, finished in {:.0} ms, {} steps)",
            seconds * 1e3,
            done["first_code_ms"].as_f64().unwrap(),
            done["wall_ms"].as_f64().unwrap(),
            done["steps"]
        );
        // The settings the page downloads reproduce the image through `dpar sample --config`.
        let settings = get(&server.addr, &format!("/api/settings?model={model}&class=3&seed=7&cfg=2"));
        assert_eq!(settings.status, 200);
        assert!(settings.headers.contains("attachment"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("settings.json");
        std::fs::write(&file, &settings.body).unwrap();
        let from_config = sample_codes(&["--config", file.to_str().unwrap()]);
        assert_eq!(from_config, want, "{model}: dpar sample --config differs");
    }
    // Slow motion: the same codes, frames (decoded rows) on the way, pauses left out of the time.
    let reply = get(&server.addr, "/api/generate?class=3&seed=7&cfg=2&pace=5");
    assert!(reply.body.matches("event: frame").count() >= 3, "frames while the image fills");
    let done = event(&reply.body, "done").unwrap();
    assert!(done["paused_ms"].as_f64().unwrap() >= 5.0 * 256.0 - 1.0);
    let first = get(&server.addr, "/api/generate?class=3&seed=7&cfg=2");
    assert_eq!(done["codes"], event(&first.body, "done").unwrap()["codes"]);
    // The θ sweep: the same draws at several θ; higher θ, fewer steps.
    let reply = get(&server.addr, "/api/sweep?class=1&seed=2&thetas=1.0,2.0,3.0");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let sweep: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    let steps: Vec<u64> = sweep["rows"].as_array().unwrap().iter().map(|r| r["steps"].as_u64().unwrap()).collect();
    assert_eq!(steps.len(), 3);
    assert!(steps[0] >= steps[1] && steps[1] >= steps[2], "{steps:?}");
}

#[test]
fn bad_parameters_get_400_and_paths_outside_the_page_get_404() {
    let server = Server::start(1, 2);
    for (query, says) in [
        ("class=3&theta=NaN", "theta"),
        ("class=3&theta=inf", "theta"),
        ("class=3&max_patch_len=0", "max_patch_len"),
        ("class=3&max_patch_len=17", "max_patch_len"),
        ("class=10", "unknown class 10"),
        ("class=-1", "class"),
        ("class=x", "class"),
        ("seed=1", "class: missing"),
        ("class=3&cfg=1e9", "cfg"),
        ("class=3&temperature=0", "temperature"),
        ("class=3&top_p=0", "top_p"),
        ("class=3&top_k=100000", "top_k"),
        ("class=3&model=vae", "model"),
        ("class=3&class=4", "more than once"),
        ("class=3&bogus=1", "unknown parameter `bogus`"),
        ("class=3&entropy_gate=maybe", "entropy_gate"),
        ("class=3&thetas=1,2", "thetas"),
        ("class=3&pace=1000", "pace"),
        ("class=3&patcher=oracle", "patcher"),
    ] {
        let reply = get(&server.addr, &format!("/api/generate?{query}"));
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        assert!(reply.body.contains(says), "{query}: {}", reply.body);
    }
    for (query, says) in [
        ("class=3&thetas=1", "give 2 to 6"),
        ("class=3&thetas=1,2,3,4,5,6,7", "give 2 to 6"),
        ("class=3&thetas=1,NaN", "NaN"),
    ] {
        let reply = get(&server.addr, &format!("/api/sweep?{query}"));
        assert_eq!(reply.status, 400, "{query}: {}", reply.body);
        assert!(reply.body.contains(says), "{query}: {}", reply.body);
    }
    for path in [
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/..%2fCargo.toml",
        "/api/../../etc/passwd",
        "/static/..%2f..%2fCargo.toml",
        "/models/mnist/dpar/config.json",
        "/src/bin/dpar/serve/app.js",
        "/app.js/../Cargo.toml",
        "//etc/passwd",
    ] {
        let reply = get(&server.addr, path);
        assert_eq!(reply.status, 404, "{path}: {}", reply.body);
        assert!(!reply.body.contains("[package]") && !reply.body.contains("root:"), "{path} leaked a file");
    }
    for path in ["/", "/app.js", "/style.css", "/api/info", "/api/status"] {
        assert_eq!(get(&server.addr, path).status, 200, "{path}");
    }
}

/// Peak resident memory of a process (VmHWM), in MiB.
/// A server whose batches run in one lane (one thread): concurrent streams of a model share it.
fn one_lane_server() -> Server {
    Server::start_with(&["--batch", "4", "--queue", "4"], &[("RAYON_NUM_THREADS", "1")])
}

/// Continuous batching: requests that arrive together share their model's running batch
/// (the done records say how many streams it held), and each still gets exactly the codes of
/// `dpar sample` with its own class, seed and guidance.
#[test]
fn concurrent_streams_share_a_batch_and_each_gets_the_codes_it_gets_alone() {
    let server = one_lane_server();
    let root = env!("CARGO_MANIFEST_DIR");
    for (model, ckpt) in [("dpar", "models/mnist/dpar"), ("gpt", "models/mnist/gpt")] {
        let asks: Vec<(u32, u64, f64)> = vec![(1, 11, 2.0), (7, 12, 1.0), (4, 13, 3.0), (7, 14, 2.0)];
        let dones: Vec<serde_json::Value> = std::thread::scope(|scope| {
            let handles: Vec<_> = asks
                .iter()
                .map(|&(class, seed, cfg)| {
                    let addr = server.addr.clone();
                    scope.spawn(move || {
                        let reply =
                            get(&addr, &format!("/api/generate?model={model}&class={class}&seed={seed}&cfg={cfg}"));
                        assert_eq!(reply.status, 200);
                        event(&reply.body, "done").unwrap_or_else(|| panic!("no done event: {}", reply.body))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let most = dones.iter().map(|d| d["batch"].as_u64().unwrap()).max().unwrap();
        assert!(most >= 2, "{model}: four requests at once never shared a batch");
        for (done, &(class, seed, cfg)) in dones.iter().zip(&asks) {
            let codes: Vec<u32> = serde_json::from_value(done["codes"].clone()).unwrap();
            let (class, seed, cfg) = (class.to_string(), seed.to_string(), cfg.to_string());
            let want = sample_codes(&[
                "--ckpt",
                &format!("{root}/{ckpt}"),
                "--classes",
                &class,
                "--seed",
                &seed,
                "--cfg",
                &cfg,
            ]);
            assert_eq!(
                codes, want,
                "{model} class {class} seed {seed} cfg {cfg}: batched codes differ from dpar sample's"
            );
        }
        eprintln!("{model}: 4 requests at once, batches of up to {most} streams");
    }
    assert_eq!(status_of(&server.addr)["admitted"], 0);
}

/// A stream whose page closes midway leaves the batch; the stream beside it gets its own codes.
#[test]
fn a_stream_cancelled_midway_leaves_its_neighbour_alone() {
    let server = one_lane_server();
    let root = env!("CARGO_MANIFEST_DIR");
    for (model, ckpt) in [("dpar", "models/mnist/dpar"), ("gpt", "models/mnist/gpt")] {
        let cancelled = status_of(&server.addr)["cancelled"].as_u64().unwrap();
        let addr = server.addr.clone();
        let neighbour =
            std::thread::spawn(move || get(&addr, &format!("/api/generate?model={model}&class=5&seed=21&cfg=2")));
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        write!(stream, "GET /api/generate?model={model}&class=8&seed=22&cfg=2 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        // Read until a few codes have come, then close the page.
        let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
        while String::from_utf8_lossy(&seen).matches("event: code").count() < 5 {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        drop(stream);
        let reply = neighbour.join().unwrap();
        assert_eq!(reply.status, 200);
        let done = event(&reply.body, "done").expect("the neighbour finishes");
        let codes: Vec<u32> = serde_json::from_value(done["codes"].clone()).unwrap();
        let want = sample_codes(&["--ckpt", &format!("{root}/{ckpt}"), "--classes", "5", "--seed", "21", "--cfg", "2"]);
        assert_eq!(codes, want, "{model}: the neighbour's codes changed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while status_of(&server.addr)["cancelled"].as_u64().unwrap() <= cancelled {
            assert!(Instant::now() < deadline, "{model}: the closed stream was never cancelled");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(status_of(&server.addr)["running"], 0);
}

/// `patcher=self`: the DPAR decoder's own entropy opens the patches (no entropy model); the
/// stream gives the codes of `dpar sample --patcher self` and the settings say so.
#[test]
fn a_self_entropy_stream_gives_the_codes_of_dpar_sample() {
    let server = Server::start(1, 2);
    let reply = get(&server.addr, "/api/generate?class=6&seed=4&cfg=2&patcher=self&theta=1.81");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let done = event(&reply.body, "done").expect("a done event");
    let codes: Vec<u32> = serde_json::from_value(done["codes"].clone()).unwrap();
    let want =
        sample_codes(&["--classes", "6", "--seed", "4", "--cfg", "2", "--patcher", "self", "--threshold", "1.81"]);
    assert_eq!(codes, want);
    assert_eq!(done["settings"]["patch"]["entropy_from"], "decoder", "{}", done["settings"]);
    // Without θ, both take the self-entropy θ stored beside the model, which the page offers.
    let info: serde_json::Value = serde_json::from_str(&get(&server.addr, "/api/info").body).unwrap();
    let stored = info["defaults"]["self_theta"].as_f64().expect("the shipped DPAR stores a self-entropy θ");
    assert!((stored - info["defaults"]["theta"].as_f64().unwrap()).abs() > 0.1, "{info}");
    let reply = get(&server.addr, "/api/generate?class=6&seed=4&cfg=2&patcher=self");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let done = event(&reply.body, "done").expect("a done event");
    assert_eq!(done["settings"]["patch"]["threshold"].as_f64().unwrap(), stored, "{}", done["settings"]);
    let codes: Vec<u32> = serde_json::from_value(done["codes"].clone()).unwrap();
    assert_eq!(codes, sample_codes(&["--classes", "6", "--seed", "4", "--cfg", "2", "--patcher", "self"]));
}

fn peak_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

#[test]
fn a_burst_of_fifty_requests_gets_only_200_or_503_and_the_server_lives_on() {
    let server = Server::start(1, 4);
    let before = peak_mib(server.pid());
    let start = Instant::now();
    let replies: Vec<(u16, bool, bool)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let addr = server.addr.clone();
                scope.spawn(move || {
                    let reply = get(&addr, &format!("/api/generate?class={}&seed={i}", i % 10));
                    (reply.status, reply.body.contains("event: done"), reply.headers.contains("retry-after: 2"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.0 == 200).count();
    let busy = replies.iter().filter(|r| r.0 == 503).count();
    eprintln!(
        "burst of 50 (1 worker, batch 16, queue 4): {ok} × 200, {busy} × 503 in {:.1} s; server peak memory {:.0} MiB (idle {:.0} MiB)",
        start.elapsed().as_secs_f64(),
        peak_mib(server.pid()),
        before
    );
    assert_eq!(ok + busy, 50, "only 200 and 503: {:?}", replies.iter().map(|r| r.0).collect::<Vec<_>>());
    assert!(ok >= 1 && busy >= 1, "{ok} × 200, {busy} × 503");
    assert!(replies.iter().filter(|r| r.0 == 200).all(|r| r.1), "every admitted stream finishes");
    assert!(replies.iter().filter(|r| r.0 == 503).all(|r| r.2), "every 503 says Retry-After");
    assert_eq!(get(&server.addr, "/api/info").status, 200, "the server lives on");
    assert_eq!(status_of(&server.addr)["admitted"], 0);
}

#[test]
fn a_closed_stream_frees_its_slot() {
    // One worker and one queue place: a sweep holds the worker, a stream waits, its page closes.
    let server = Server::start(1, 1);
    let addr = server.addr.clone();
    let sweep = std::thread::spawn(move || get(&addr, "/api/sweep?class=2&seed=1&thetas=0.5,1,1.5,2,2.5,3").status);
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_of(&server.addr)["running"] != 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    // Slow motion (20 ms a code): the stream is surely still going when its page closes.
    write!(stream, "GET /api/generate?class=4&seed=3&pace=20 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 64];
    let n = stream.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);
    // The closed stream's slot comes back (whether it was waiting or already running).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_of(&server.addr);
        if s["cancelled"].as_u64().unwrap() >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the closed stream was never cancelled: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sweep.join().unwrap(), 200);
    let reply = get(&server.addr, "/api/generate?class=4&seed=3");
    assert_eq!(reply.status, 200);
    assert!(reply.body.contains("event: done"));
    assert_eq!(status_of(&server.addr)["admitted"], 0);
}

/// The browser the test drives: `DPAR_CHROMIUM`, else `chromium` or `chromium-browser`.
fn chromium() -> Option<String> {
    let candidates =
        std::env::var("DPAR_CHROMIUM").ok().into_iter().chain(["chromium".into(), "chromium-browser".into()]);
    candidates
        .into_iter()
        .find(|c| std::process::Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[test]
fn headless_chromium_draws_a_generation_with_patch_outlines() {
    let Some(browser) = chromium() else {
        panic!(
            "this test drives a real browser: install Chromium (Debian: apt-get install chromium) or set DPAR_CHROMIUM"
        )
    };
    let server = Server::start(1, 4);
    let dir = tempfile::Builder::new().prefix("dpar-serve-screenshot").tempdir().unwrap().keep();
    let shot = dir.join("serve.png");
    let url = format!("http://{}/?autostart=side&class=3&seed=7", server.addr);
    let out = std::process::Command::new(&browser)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,860"])
        .args(["--virtual-time-budget=30000", &format!("--screenshot={}", shot.display()), &url])
        .output()
        .unwrap();
    assert!(shot.is_file(), "no screenshot: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("screenshot kept at {}", shot.display());
    let image = image::open(&shot).unwrap().to_rgb8();
    // Patch outlines: the outline colour (#ff2d95) appears nowhere else on the page.
    let outline: Vec<(u32, u32)> =
        image.enumerate_pixels().filter(|(_, _, p)| p.0 == [255, 45, 149]).map(|(x, y, _)| (x, y)).collect();
    assert!(outline.len() > 1000, "only {} outline pixels: no patches drawn", outline.len());
    // Inside the outlined canvas, the decoded digit: bright pixels that are not outline.
    let (x0, x1) = (outline.iter().map(|p| p.0).min().unwrap(), outline.iter().map(|p| p.0).max().unwrap());
    let (y0, y1) = (outline.iter().map(|p| p.1).min().unwrap(), outline.iter().map(|p| p.1).max().unwrap());
    let bright = (y0..=y1)
        .flat_map(|y| (x0..=x1).map(move |x| (x, y)))
        .filter(|&(x, y)| {
            let p = image.get_pixel(x, y).0;
            p != [255, 45, 149] && p.iter().all(|&c| c > 200)
        })
        .count();
    assert!(bright > 500, "the canvas is blank: {bright} bright pixels in {}×{}", x1 - x0, y1 - y0);
    eprintln!("outline pixels {}, bright pixels {bright}, canvas {}×{}", outline.len(), x1 - x0, y1 - y0);
}
