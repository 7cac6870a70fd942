//! `dpar serve`: a local web page to watch DPAR generate code by code, turn θ, and compare with
//! the baseline.
//!
//! - HTTP on axum/tokio; generation runs on blocking threads, never on the async ones.
//! - `GET /api/generate?…` streams one image as server-sent events: `start`, one `code` per code
//!   (z_k, the next-code entropy, whether it opens a patch), a `frame` (decoded PNG) at row ends
//!   (at most every 60 ms), then `done` (codes, patch lengths, timings, PNG) or `error`.
//! - `GET /api/sweep?…&thetas=a,b,…` generates the same class and seed at up to six θ.
//! - `GET /api/settings?…` gives the settings as the JSON `dpar sample --config` reads.
//! - `GET /api/info`, `GET /api/status`; `/`, `/app.js`, `/style.css` are embedded in the binary.
//!   Nothing else is served, and no part of a request reaches the filesystem.
//! - Generations at full speed join their model's running batch (continuous batching, see
//!   [`batch`]); slow-motion ones and sweeps run alone on a worker.
//! - Every parameter is validated (HTTP 400 with a message). A bounded queue admits at most
//!   `--workers` + `--batch` running and `--queue` waiting requests; more get 503 with
//!   `Retry-After`. A closed tab (a dropped stream) cancels its generation and frees its slot.

mod batch;
mod request;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use candle_core::{Device, Tensor};
use dpar::dpar::Dpar;
use dpar::gpt::Gpt;
use dpar::patching::PatchConfig;
use dpar::sample::CodeStep;
use dpar::tokenizer::train::Tokenizer;
use request::{GenRequest, ModelChoice};

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Folder of the models to serve, laid out as models/mnist: `dpar/`, `gpt/` (optional: the
    /// baseline), `entropy/`, `tokenizer/`. Only this folder is read, once, at start.
    /// Under models/, looked up in the working directory, then $DPAR_HOME, beside the executable
    /// and in the source tree the binary was built from.
    #[arg(long, default_value = "models/mnist", value_parser = crate::common::model_path)]
    models: PathBuf,
    /// Address to listen on. Loopback by default; `0.0.0.0:7860` opens the page to the network.
    #[arg(long, default_value = "127.0.0.1:7860")]
    addr: String,
    /// Generations that run alone at once (slow-motion ones and θ sweeps; each uses every core).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Images of each model decoded together: a request at full speed joins its model's running
    /// batch at the next code (continuous batching). 0 runs every request alone on a worker.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Requests that may wait beyond those; more get 503 (Retry-After).
    #[arg(long, default_value_t = 8)]
    queue: usize,
}

/// The models behind the page, loaded once.
pub struct Models {
    dpar: Dpar,
    entropy: Gpt,
    gpt: Option<Gpt>,
    tokenizer: Tokenizer,
    /// The patcher the DPAR model was trained with: the page's defaults.
    patch: PatchConfig,
    /// θ calibrated on the model's samples and stored beside it (design §9), per patcher.
    sampling_thresholds: dpar::patching::SamplingThresholds,
    class_names: Vec<String>,
    _stores: Vec<dpar::params::ParamStore>,
}

impl Models {
    /// The stored θ of self-entropy patching, if any.
    pub fn self_theta(&self) -> Option<f64> {
        self.sampling_thresholds.get(dpar::patching::EntropyFrom::Decoder).map(|c| c.threshold)
    }

    fn load(dir: &Path, device: &Device) -> Result<Self> {
        let dpar_dir = dir.join("dpar");
        let (dpar, dpar_store, _) =
            dpar::models::dpar(&dpar_dir, device).with_context(|| format!("--models {}", dir.display()))?;
        let recorded = dpar::parts::Recorded::of(&dpar_dir);
        let owner = format!("the model {}", dpar_dir.display());
        let resolve = |part, sub: &str| -> Result<PathBuf> {
            Ok(dpar::parts::resolve(
                part,
                Some(&dir.join(sub)),
                recorded.id(part),
                &dpar_dir,
                &owner,
                crate::common::allow_mismatch(),
            )?)
        };
        let entropy_path = resolve(dpar::parts::Part::EntropyModel, "entropy")?;
        let (entropy, entropy_store) = dpar::models::gpt(&entropy_path, None, device)?;
        let tokenizer = dpar::models::tokenizer(&resolve(dpar::parts::Part::Tokenizer, "tokenizer")?, None, device)?;
        let mut stores = vec![dpar_store, entropy_store];
        let gpt = match dir.join("gpt").exists() {
            true => {
                let (gpt, store) = dpar::models::gpt(&dir.join("gpt"), None, device)?;
                stores.push(store);
                Some(gpt)
            }
            false => None,
        };
        let c = dpar.config();
        if let Some(g) = &gpt {
            let gc = g.config();
            if gc.grid_size != c.grid_size || gc.num_classes != c.num_classes {
                anyhow::bail!("--models {}: the baseline in gpt/ does not fit the DPAR model", dir.display());
            }
        }
        let class_names = (0..c.num_classes as u32).map(|i| c.class_name(i)).collect();
        let sampling_thresholds = dpar::patching::SamplingThresholds::read(&dpar_dir)?;
        Ok(Models { patch: c.patch, sampling_thresholds, dpar, entropy, gpt, tokenizer, class_names, _stores: stores })
    }

    fn grid(&self) -> usize {
        self.dpar.config().grid_size
    }
}

/// Admission: at most `capacity` requests hold a ticket (running or waiting for a worker).
pub struct Queue {
    workers: Arc<tokio::sync::Semaphore>,
    capacity: usize,
    admitted: AtomicUsize,
    running: AtomicUsize,
    served: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
}

struct Ticket(Arc<Queue>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Queue {
    fn admit(self: &Arc<Self>) -> Option<Ticket> {
        let ok = self
            .admitted
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.capacity).then_some(n + 1))
            .is_ok();
        if !ok {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
        ok.then(|| Ticket(self.clone()))
    }
}

#[derive(Clone)]
struct AppState {
    models: Arc<Models>,
    queue: Arc<Queue>,
    /// Each model's batcher (none with `--batch 0`, or for a model it cannot batch).
    batchers: Arc<[Option<batch::Batcher>; 2]>,
}

impl AppState {
    fn batcher(&self, model: ModelChoice) -> Option<&batch::Batcher> {
        self.batchers[model as usize].as_ref()
    }
}

pub fn serve(args: ServeArgs) -> Result<()> {
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    let addr: SocketAddr =
        args.addr.parse().with_context(|| format!("--addr {}: not an address such as 127.0.0.1:7860", args.addr))?;
    let models = Arc::new(Models::load(&args.models, &Device::Cpu)?);
    let queue = Arc::new(Queue {
        workers: Arc::new(tokio::sync::Semaphore::new(args.workers)),
        capacity: args.workers + args.batch + args.queue,
        admitted: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        served: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
    });
    let batchers = [ModelChoice::Dpar, ModelChoice::Gpt].map(|model| {
        if args.batch == 0 || (model == ModelChoice::Gpt && models.gpt.is_none()) {
            return None;
        }
        batch::Batcher::start(models.clone(), model, args.batch, queue.clone())
            .map_err(|e| tracing::warn!("{}: no continuous batching ({e:#}); its requests run alone", model.name()))
            .ok()
    });
    let state = AppState { models, queue, batchers: Arc::new(batchers) };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--addr {addr}: cannot listen"))?;
        let bound = listener.local_addr()?;
        println!("dpar serve: open http://{bound}/ (models from {}; Ctrl-C stops)", args.models.display());
        use std::io::Write;
        std::io::stdout().flush().ok();
        axum::serve(listener, router(state)).with_graceful_shutdown(shutdown()).await?;
        println!("dpar serve: stopped");
        Ok(())
    })
}

async fn shutdown() {
    tokio::signal::ctrl_c().await.ok();
    tracing::info!("Ctrl-C: finishing open requests, then stopping");
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/style.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE_CSS) }))
        .route("/api/info", get(info))
        .route("/api/status", get(status))
        .route("/api/settings", get(settings))
        .route("/api/generate", get(generate))
        .route("/api/sweep", get(sweep))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state)
}

async fn log_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let start = Instant::now();
    let response = next.run(req).await;
    tracing::info!("{method} {path} → {} ({:.1} ms)", response.status().as_u16(), start.elapsed().as_secs_f64() * 1e3);
    response
}

type Pairs = Query<Vec<(String, String)>>;

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message + "\n").into_response()
}

fn busy() -> Response {
    let mut response =
        (StatusCode::SERVICE_UNAVAILABLE, "busy: every worker and queue slot is taken; retry soon\n").into_response();
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    response
}

async fn info(State(state): State<AppState>) -> Response {
    let m = &state.models;
    let c = m.dpar.config();
    axum::Json(serde_json::json!({
        "models": { "dpar": true, "gpt": m.gpt.is_some() },
        "classes": m.class_names,
        "grid": c.grid_size,
        "codes": c.seq_len(),
        "image_size": m.tokenizer.config.image_size,
        "vocab": c.vocab_size,
        "defaults": {
            "theta": m.patch.threshold, "max_patch_len": m.patch.max_patch_len,
            "self_theta": m.self_theta(),
            "entropy_gate": m.patch.entropy_gate, "max_len": m.patch.max_len_rule, "row_reset": m.patch.row_reset,
            "cfg": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
        },
        "limits": request::limits(c.grid_size, c.vocab_size),
    }))
    .into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    let q = &state.queue;
    axum::Json(serde_json::json!({
        "admitted": q.admitted.load(Ordering::SeqCst),
        "running": q.running.load(Ordering::SeqCst),
        "capacity": q.capacity,
        "served": q.served.load(Ordering::Relaxed),
        "rejected": q.rejected.load(Ordering::Relaxed),
        "cancelled": q.cancelled.load(Ordering::Relaxed),
    }))
    .into_response()
}

async fn settings(State(state): State<AppState>, Query(pairs): Pairs) -> Response {
    match request::parse(&pairs, &state.models, false) {
        Ok(req) => {
            let mut response = axum::Json(req.settings()).into_response();
            response.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"dpar-settings.json\""),
            );
            response
        }
        Err(message) => bad_request(message),
    }
}

/// One generation's events, produced on a blocking thread.
enum Progress {
    Code { k: usize, code: u32, entropy: f32, opens: bool },
    Frame { k: usize, png: String },
    Done(serde_json::Value),
    Error(String),
}

async fn generate(State(state): State<AppState>, Query(pairs): Pairs) -> Response {
    let req = match request::parse(&pairs, &state.models, false) {
        Ok(req) => req,
        Err(message) => return bad_request(message),
    };
    let Some(ticket) = state.queue.admit() else { return busy() };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Progress>(64);
    let queued = Instant::now();
    // Slow motion and self-entropy patching run alone (the batch takes the entropy model's
    // patches at full speed).
    let batchable = req.pace_ms == 0 && req.patch.entropy_from == dpar::patching::EntropyFrom::Model;
    match state.batcher(req.model).filter(|_| batchable) {
        Some(batcher) => {
            let l = state.models.grid() * state.models.grid();
            let (updates, from_batch) = tokio::sync::mpsc::channel(l + 2);
            if let Err(e) = batcher.submit(batch::Join { req: req.clone(), updates, queued }) {
                return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response();
            }
            tokio::spawn(forward(state.models.clone(), req, from_batch, tx, ticket));
        }
        None => spawn_alone(&state, req, ticket, tx, queued),
    }
    let grid = state.models.grid();
    let start = serde_json::json!({ "grid": grid, "codes": grid * grid });
    let first = futures_util::stream::once(async move { Ok(Event::default().event("start").data(start.to_string())) });
    let rest = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(|progress| {
        Ok::<_, std::convert::Infallible>(match progress {
            Progress::Code { k, code, entropy, opens } => {
                let h = if entropy.is_finite() { serde_json::json!(entropy) } else { serde_json::Value::Null };
                Event::default()
                    .event("code")
                    .data(serde_json::json!({"k": k, "z": code, "h": h, "open": opens}).to_string())
            }
            Progress::Frame { k, png } => {
                Event::default().event("frame").data(serde_json::json!({"k": k, "png": png}).to_string())
            }
            Progress::Done(done) => Event::default().event("done").data(done.to_string()),
            Progress::Error(message) => {
                Event::default().event("error").data(serde_json::json!({"message": message}).to_string())
            }
        })
    });
    // A keep-alive comment every second also finds a closed tab quickly (the write fails), which
    // drops the stream, which cancels the generation or frees the queue slot.
    Sse::new(first.chain(rest)).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(1))).into_response()
}

use futures_util::StreamExt as _;

/// Runs a generation alone on a worker (slow motion, or no batcher for its model).
fn spawn_alone(
    state: &AppState,
    req: GenRequest,
    ticket: Ticket,
    tx: tokio::sync::mpsc::Sender<Progress>,
    queued: Instant,
) {
    let models = state.models.clone();
    let queue = state.queue.clone();
    tokio::spawn(async move {
        // Wait for a worker, unless the page goes away first.
        let permit = tokio::select! {
            permit = queue.workers.clone().acquire_owned() => permit,
            _ = tx.closed() => { queue.cancelled.fetch_add(1, Ordering::Relaxed); return; }
        };
        let Ok(permit) = permit else { return };
        let waited_ms = queued.elapsed().as_secs_f64() * 1e3;
        tokio::task::spawn_blocking(move || {
            let _slot = (permit, ticket);
            queue.running.fetch_add(1, Ordering::SeqCst);
            let outcome = run_one(&models, &req, waited_ms, &tx);
            queue.running.fetch_sub(1, Ordering::SeqCst);
            match outcome {
                Ok(done) => {
                    queue.served.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.blocking_send(Progress::Done(done));
                }
                Err(e) if is_cancelled(&e) => {
                    queue.cancelled.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("generation cancelled: the page closed its stream");
                }
                Err(e) => {
                    let _ = tx.blocking_send(Progress::Error(format!("{e:#}")));
                }
            }
        });
    });
}

/// A batched request's task: turns the batcher's codes into page events, with a frame at row
/// ends (at most every 60 ms) and the final PNG drawn off the batcher's thread. Ends when the
/// page closes, which drops `from_batch` and so takes the stream out of the batch.
async fn forward(
    models: Arc<Models>,
    req: GenRequest,
    mut from_batch: tokio::sync::mpsc::Receiver<batch::Update>,
    tx: tokio::sync::mpsc::Sender<Progress>,
    _ticket: Ticket,
) {
    let grid = models.grid();
    let l = grid * grid;
    let mut partial = vec![0u32; l];
    let started = Instant::now();
    let mut last_frame = Instant::now();
    let mut framing = std::time::Duration::ZERO;
    let png = |codes: Vec<u32>| {
        let models = models.clone();
        async move {
            tokio::task::spawn_blocking(move || png_of(&models.tokenizer, &codes))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|png| png)
        }
    };
    loop {
        let update = tokio::select! {
            update = from_batch.recv() => update,
            _ = tx.closed() => return,
        };
        let progress = match update {
            None => Progress::Error("the batcher stopped".into()),
            Some(batch::Update::Code { k, code, entropy, opens }) => {
                partial[k] = code;
                if tx.send(Progress::Code { k, code, entropy, opens }).await.is_err() {
                    return;
                }
                // A frame costs as much as ~40 codes of the MNIST models, and a batched stream
                // takes longer than a lone one: frames at row ends, at most every 60 ms, and
                // only while they have taken under a tenth of the stream's time.
                let due = (k + 1).is_multiple_of(grid) && k + 1 < l && last_frame.elapsed().as_millis() >= 60;
                if !due || framing.as_secs_f64() > 0.1 * started.elapsed().as_secs_f64() {
                    continue;
                }
                let drawn = Instant::now();
                let frame = png(partial.clone()).await;
                framing += drawn.elapsed();
                last_frame = Instant::now();
                match frame {
                    Ok(png) => Progress::Frame { k, png },
                    Err(e) => Progress::Error(format!("{e:#}")),
                }
            }
            Some(batch::Update::Done { codes, lengths, wall_ms, first_code_ms, queue_ms, batch }) => {
                let drawn = Instant::now();
                let image = png(codes.clone()).await;
                let png_ms = drawn.elapsed().as_secs_f64() * 1e3;
                match image {
                    Ok(png) => Progress::Done(serde_json::json!({
                        "model": req.model.name(),
                        "codes": codes,
                        "lengths": lengths,
                        "steps": lengths.len(),
                        "mean_patch_len": l as f64 / lengths.len() as f64,
                        "wall_ms": wall_ms,
                        "first_code_ms": first_code_ms,
                        "queue_ms": queue_ms,
                        "paused_ms": 0.0,
                        "frames_ms": framing.as_secs_f64() * 1e3,
                        "png_ms": png_ms,
                        "images_per_s": 1e3 / wall_ms,
                        "batch": batch,
                        "png": png,
                        "settings": req.settings(),
                    })),
                    Err(e) => Progress::Error(format!("{e:#}")),
                }
            }
            Some(batch::Update::Error(message)) => Progress::Error(message),
        };
        let last = !matches!(progress, Progress::Frame { .. });
        if tx.send(progress).await.is_err() || last {
            return;
        }
    }
}

fn is_cancelled(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.to_string() == "generation cancelled")
}

/// Runs one generation, sending its progress; returns the `done` record.
fn run_one(
    models: &Models,
    req: &GenRequest,
    waited_ms: f64,
    tx: &tokio::sync::mpsc::Sender<Progress>,
) -> Result<serde_json::Value> {
    let grid = models.grid();
    let l = grid * grid;
    let start = Instant::now();
    let mut first_code_ms = None;
    let mut partial = vec![0u32; l];
    let mut frame_error = None;
    // Decoding a frame costs about as much as generating 40 codes of the MNIST models, so frames
    // come at row ends at most every 60 ms: smooth for big models, cheap for small ones.
    let mut last_frame = Instant::now();
    let mut paused = std::time::Duration::ZERO;
    let mut framing = std::time::Duration::ZERO;
    let mut watch = |step: &CodeStep| {
        if req.pace_ms > 0 {
            let pause = std::time::Duration::from_millis(req.pace_ms);
            std::thread::sleep(pause);
            paused += pause;
        }
        first_code_ms.get_or_insert_with(|| (start.elapsed() - paused - framing).as_secs_f64() * 1e3);
        partial[step.k] = step.codes[0];
        let code =
            Progress::Code { k: step.k, code: step.codes[0], entropy: step.entropies[0], opens: step.opens_patch[0] };
        if tx.blocking_send(code).is_err() {
            return false;
        }
        if (step.k + 1).is_multiple_of(grid) && step.k + 1 < l && last_frame.elapsed().as_millis() >= 60 {
            last_frame = Instant::now();
            let png = png_of(&models.tokenizer, &partial);
            framing += last_frame.elapsed();
            match png {
                Ok(png) => return tx.blocking_send(Progress::Frame { k: step.k, png }).is_ok(),
                Err(e) => frame_error = Some(e),
            }
        }
        true
    };
    let labels = [req.class];
    let (codes, lengths) = match req.model {
        ModelChoice::Dpar => {
            let out = dpar::dpar::generate::generate_observed(
                &models.dpar,
                &models.entropy,
                &labels,
                &req.sampling,
                &req.patch,
                &Device::Cpu,
                Some(&mut watch),
            )?;
            (out.codes.into_iter().next(), out.lengths.into_iter().next())
        }
        ModelChoice::Gpt => {
            let gpt = models.gpt.as_ref().context("this server has no baseline (no gpt/ in --models)")?;
            let codes =
                dpar::sample::generate_gpt_observed(gpt, &labels, &req.sampling, &Device::Cpu, Some(&mut watch))?;
            (codes.into_iter().next(), Some(vec![1; l]))
        }
    };
    if let Some(e) = frame_error {
        return Err(e);
    }
    let (codes, lengths) = (codes.context("no codes")?, lengths.context("no patches")?);
    // The model's time: without the slow-motion pauses and the frames drawn for the page.
    let seconds = (start.elapsed() - paused - framing).as_secs_f64();
    Ok(serde_json::json!({
        "model": req.model.name(),
        "codes": codes,
        "lengths": lengths,
        "steps": lengths.len(),
        "mean_patch_len": l as f64 / lengths.len() as f64,
        "wall_ms": seconds * 1e3,
        "first_code_ms": first_code_ms,
        "queue_ms": waited_ms,
        "paused_ms": paused.as_secs_f64() * 1e3,
        "frames_ms": framing.as_secs_f64() * 1e3,
        "images_per_s": 1.0 / seconds,
        "png": png_of(&models.tokenizer, &codes)?,
        "settings": req.settings(),
    }))
}

/// The image of a code sequence as a PNG data URL.
fn png_of(tokenizer: &Tokenizer, codes: &[u32]) -> Result<String> {
    let codes = Tensor::from_slice(codes, (1, codes.len()), &Device::Cpu)?;
    let image = dpar::viz::tensor_to_images(&tokenizer.decode(&codes)?)?.remove(0);
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(image).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    Ok(format!("data:image/png;base64,{}", base64(&bytes)))
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Sets a flag when dropped: the handler's future going away (a closed tab) stops a sweep.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn sweep(State(state): State<AppState>, Query(pairs): Pairs) -> Response {
    let (req, thetas) = match request::parse(&pairs, &state.models, true).and_then(|r| {
        let thetas = request::thetas(&pairs)?;
        Ok((r, thetas))
    }) {
        Ok(parsed) => parsed,
        Err(message) => return bad_request(message),
    };
    let Some(ticket) = state.queue.admit() else { return busy() };
    let cancelled = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancelled.clone());
    let Ok(permit) = state.queue.workers.clone().acquire_owned().await else { return busy() };
    let (models, queue) = (state.models.clone(), state.queue.clone());
    let (class, seed) = (req.class, req.sampling.seed);
    let result = tokio::task::spawn_blocking(move || {
        let _slot = (permit, ticket);
        queue.running.fetch_add(1, Ordering::SeqCst);
        let mut rows = Vec::new();
        let mut outcome = Ok(());
        for theta in thetas {
            let patch = PatchConfig { threshold: theta, ..req.patch };
            let start = Instant::now();
            let mut stop = |_: &CodeStep| !cancelled.load(Ordering::SeqCst);
            match dpar::dpar::generate::generate_observed(
                &models.dpar,
                &models.entropy,
                &[req.class],
                &req.sampling,
                &patch,
                &Device::Cpu,
                Some(&mut stop),
            ) {
                Ok(out) => {
                    let steps = out.lengths[0].len();
                    let png = png_of(&models.tokenizer, &out.codes[0]);
                    rows.push(serde_json::json!({
                        "theta": theta, "steps": steps, "codes": out.codes[0].len(),
                        "mean_patch_len": out.codes[0].len() as f64 / steps as f64,
                        "lengths": out.lengths[0], "wall_ms": start.elapsed().as_secs_f64() * 1e3,
                        "png": png.unwrap_or_default(),
                    }));
                }
                Err(e) => {
                    outcome = Err(anyhow::Error::from(e));
                    break;
                }
            }
        }
        queue.running.fetch_sub(1, Ordering::SeqCst);
        queue.served.fetch_add(1, Ordering::Relaxed);
        outcome.map(|()| rows)
    })
    .await;
    match result {
        Ok(Ok(rows)) => axum::Json(serde_json::json!({ "class": class, "seed": seed, "rows": rows })).into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_rfc_4648_examples() {
        for (input, want) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(super::base64(input.as_bytes()), want);
        }
    }
}
