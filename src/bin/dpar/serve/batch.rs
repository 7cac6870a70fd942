//! Continuous batching for `dpar serve`: one batcher thread per model runs a decode loop
//! ([`dpar::stream::GptStreams`] for the baseline, [`dpar::dpar::streams::DparStreams`] for
//! DPAR). A request joins the running batch at its next step as new rows, and leaves it with its
//! last code, or at once when its page closes. Each stream gets exactly the codes it gets alone
//! with the same seed and settings; rows of different models run in separate batches.
//!
//! A model's batch is split into lanes, one per core: each lane is a thread with its own loop
//! and kernels that stay on its core (a step of a few rows gains nothing from waking the thread
//! pool), and a request joins the lane with the fewest streams.
//!
//! The batcher only decodes codes. The request's own task turns them into page events, draws
//! the frames and the final PNG, so that no client's pictures hold up the batch.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use anyhow::Result;
use dpar::nn::KvPrecision;
use dpar::stream::StreamEvent;

use super::request::{GenRequest, ModelChoice};
use super::{Models, Queue};

/// What the batcher tells a request's task.
pub enum Update {
    Code {
        k: usize,
        code: u32,
        entropy: f32,
        opens: bool,
    },
    /// The last code: the codes, patch lengths, the stream's time in the batch (from joining
    /// to its last code) and to its first code, and its wait before joining.
    Done {
        codes: Vec<u32>,
        lengths: Vec<usize>,
        wall_ms: f64,
        first_code_ms: f64,
        queue_ms: f64,
        batch: usize,
    },
    Error(String),
}

/// A request handed to a batcher. Its task holds the receiving end of `updates`; dropping it
/// (a closed page) takes the stream out of the batch at the next step.
pub struct Join {
    pub req: GenRequest,
    pub updates: tokio::sync::mpsc::Sender<Update>,
    pub queued: Instant,
}

/// The handle of a model's batcher: its lanes.
pub struct Batcher {
    lanes: Vec<Lane>,
}

struct Lane {
    tx: mpsc::Sender<Join>,
    /// Streams running or waiting in this lane.
    load: Arc<AtomicUsize>,
}

/// The decode loops, behind one face.
trait Engine {
    fn has_room(&self, req: &GenRequest) -> bool;
    fn join(&mut self, id: u64, req: &GenRequest) -> Result<()>;
    fn cancel(&mut self, id: u64);
    fn is_empty(&self) -> bool;
    fn step(&mut self, on: &mut dyn FnMut(StreamEvent) -> bool) -> Result<()>;
}

impl Engine for dpar::stream::GptStreams {
    fn has_room(&self, req: &GenRequest) -> bool {
        self.free_rows() >= if req.sampling.uses_guidance() { 2 } else { 1 }
    }
    fn join(&mut self, id: u64, req: &GenRequest) -> Result<()> {
        Ok(dpar::stream::GptStreams::join(self, id, req.class, &req.sampling)?)
    }
    fn cancel(&mut self, id: u64) {
        dpar::stream::GptStreams::cancel(self, id);
    }
    fn is_empty(&self) -> bool {
        dpar::stream::GptStreams::is_empty(self)
    }
    fn step(&mut self, on: &mut dyn FnMut(StreamEvent) -> bool) -> Result<()> {
        Ok(dpar::stream::GptStreams::step(self, on)?)
    }
}

impl Engine for dpar::dpar::streams::DparStreams<'_> {
    fn has_room(&self, _: &GenRequest) -> bool {
        self.free_slots() > 0
    }
    fn join(&mut self, id: u64, req: &GenRequest) -> Result<()> {
        Ok(dpar::dpar::streams::DparStreams::join(self, id, req.class, &req.sampling, &req.patch)?)
    }
    fn cancel(&mut self, id: u64) {
        dpar::dpar::streams::DparStreams::cancel(self, id);
    }
    fn is_empty(&self) -> bool {
        dpar::dpar::streams::DparStreams::is_empty(self)
    }
    fn step(&mut self, on: &mut dyn FnMut(StreamEvent) -> bool) -> Result<()> {
        Ok(dpar::dpar::streams::DparStreams::step(self, on)?)
    }
}

impl Batcher {
    /// Starts the batcher of `model` with room for `images` images (split over one lane per
    /// core), or says why it cannot (a model with stock kernels, no baseline): its requests
    /// then run alone on a worker.
    pub fn start(models: Arc<Models>, model: ModelChoice, images: usize, queue: Arc<Queue>) -> Result<Batcher> {
        let count = dpar::kernels::threads().clamp(1, images.max(1));
        let mut lanes = Vec::with_capacity(count);
        for lane in 0..count {
            // Lane `lane` takes its share of the images: they differ by at most one.
            let room = images / count + usize::from(lane < images % count);
            let (tx, rx) = mpsc::channel::<Join>();
            let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
            let load = Arc::new(AtomicUsize::new(0));
            let (models, queue, lane_load) = (models.clone(), queue.clone(), load.clone());
            std::thread::Builder::new().name(format!("batch-{}-{lane}", model.name())).spawn(move || {
                dpar::kernels::serial(|| {
                    let kv = KvPrecision::F32;
                    let built: Result<Box<dyn Engine + '_>> = match model {
                        ModelChoice::Dpar => {
                            dpar::dpar::streams::DparStreams::new(&models.dpar, &models.entropy, room, kv)
                                .map(|e| Box::new(e) as Box<dyn Engine>)
                                .map_err(Into::into)
                        }
                        ModelChoice::Gpt => match &models.gpt {
                            Some(gpt) => dpar::stream::GptStreams::new(gpt, 2 * room, kv)
                                .map(|e| Box::new(e) as Box<dyn Engine>)
                                .map_err(Into::into),
                            None => Err(anyhow::anyhow!("no baseline")),
                        },
                    };
                    match built {
                        Ok(mut engine) => {
                            let _ = ready_tx.send(Ok(()));
                            run(engine.as_mut(), &rx, &queue, &lane_load);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
            })?;
            ready_rx.recv()??;
            lanes.push(Lane { tx, load });
        }
        Ok(Batcher { lanes })
    }

    /// Hands `join` to the lane with the fewest streams (it waits there until it has room).
    pub fn submit(&self, join: Join) -> Result<()> {
        let lane = self.lanes.iter().min_by_key(|l| l.load.load(Ordering::SeqCst)).expect("at least one lane");
        lane.load.fetch_add(1, Ordering::SeqCst);
        lane.tx.send(join).map_err(|_| {
            lane.load.fetch_sub(1, Ordering::SeqCst);
            anyhow::anyhow!("the batcher has stopped")
        })
    }
}

struct Running {
    updates: tokio::sync::mpsc::Sender<Update>,
    joined: Instant,
    queue_ms: f64,
    first_code_ms: Option<f64>,
}

/// The batcher's loop: admit waiting requests while there is room, step, hand out codes.
fn run(engine: &mut dyn Engine, rx: &mpsc::Receiver<Join>, queue: &Queue, load: &AtomicUsize) {
    let leave = || load.fetch_sub(1, Ordering::SeqCst);
    let mut waiting: VecDeque<Join> = VecDeque::new();
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut next_id = 0u64;
    loop {
        if engine.is_empty() && waiting.is_empty() {
            match rx.recv() {
                Ok(j) => waiting.push_back(j),
                Err(_) => return, // the server stopped
            }
        }
        waiting.extend(rx.try_iter());
        waiting.retain(|j| {
            let open = !j.updates.is_closed();
            if !open {
                leave();
                queue.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!("a waiting request left: its page closed");
            }
            open
        });
        while waiting.front().is_some_and(|j| engine.has_room(&j.req)) {
            let j = waiting.pop_front().expect("checked");
            let id = next_id;
            next_id += 1;
            match engine.join(id, &j.req) {
                Ok(()) => {
                    queue.running.fetch_add(1, Ordering::SeqCst);
                    let queue_ms = j.queued.elapsed().as_secs_f64() * 1e3;
                    running.insert(
                        id,
                        Running { updates: j.updates, joined: Instant::now(), queue_ms, first_code_ms: None },
                    );
                }
                Err(e) => {
                    leave();
                    let _ = j.updates.try_send(Update::Error(format!("{e:#}")));
                }
            }
        }
        if engine.is_empty() {
            continue;
        }
        let batch = running.len();
        let mut left = Vec::new();
        let stepped = engine.step(&mut |event| match event {
            StreamEvent::Code { id, k, code, entropy, opens } => {
                let Some(r) = running.get_mut(&id) else { return false };
                r.first_code_ms.get_or_insert_with(|| r.joined.elapsed().as_secs_f64() * 1e3);
                // The channel holds a whole image's updates: it is never full, only closed.
                let sent = r.updates.try_send(Update::Code { k, code, entropy, opens }).is_ok();
                if !sent {
                    left.push(id);
                }
                sent
            }
            StreamEvent::Done { id, codes, lengths } => {
                if let Some(r) = running.remove(&id) {
                    leave();
                    queue.running.fetch_sub(1, Ordering::SeqCst);
                    let wall_ms = r.joined.elapsed().as_secs_f64() * 1e3;
                    let first_code_ms = r.first_code_ms.unwrap_or(wall_ms);
                    let done = Update::Done { codes, lengths, wall_ms, first_code_ms, queue_ms: r.queue_ms, batch };
                    if r.updates.try_send(done).is_ok() {
                        queue.served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        queue.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
                true
            }
        });
        for id in left {
            if running.remove(&id).is_some() {
                leave();
                queue.running.fetch_sub(1, Ordering::SeqCst);
                queue.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::info!("generation cancelled: the page closed its stream");
            }
        }
        if let Err(e) = stepped {
            tracing::error!("decode step failed: {e:#}");
            for (id, r) in running.drain() {
                engine.cancel(id);
                leave();
                queue.running.fetch_sub(1, Ordering::SeqCst);
                let _ = r.updates.try_send(Update::Error(format!("{e:#}")));
            }
        }
    }
}
