//! Data-parallel training past one process: a small [`Collective`] interface and its backends.
//!
//! - [`Single`]: one process, every operation a no-op (the default; the training loop keeps its
//!   fast path and never touches these calls);
//! - [`ThreadGroup`]: ranks as threads of one process, for fast tests and for using several
//!   sockets of one machine; operations time out (a dead rank makes the others fail with a clear
//!   error instead of hanging);
//! - `MpiCollective` (feature `mpi`): OpenMPI through the `mpi` crate, ranks launched by
//!   `mpirun`, all-reduce of gradient buckets on the host;
//! - `NcclCollective` (feature `nccl`): NCCL through cudarc, one process per GPU, the NCCL id
//!   exchanged through a file every rank sees; gradients are averaged in GPU memory, on candle's
//!   own stream.
//!
//! The loop hands over one flat f32 gradient tensor per step ([`all_reduce_mean_tensor`]). A
//! backend that can reduce device buffers does so in place of the host path
//! ([`Collective::all_reduce_mean_device`]); the host path splits the values into buckets of at
//! most [`BUCKET_FLOATS`] so large models reduce in bounded messages.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Errors of collective operations.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A peer did not arrive in time or left the group.
    #[error("rank {rank}: {reason}")]
    Peer { rank: usize, reason: String },
    /// Misuse (wrong sizes, bad setup).
    #[error("collective: {0}")]
    Bad(String),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// Values per all-reduce message.
pub const BUCKET_FLOATS: usize = 1 << 22;

/// The operations data-parallel training needs.
///
/// Not `Send` or `Sync` by requirement: the training loop uses a collective on the thread that
/// made it (the MPI and NCCL handles are single-thread objects). A backend that ranks move into
/// threads, like [`ThreadGroup`], is `Send` by its own fields.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces every buffer by its mean over the ranks (all ranks pass equally long buffers).
    fn all_reduce_mean(&self, buffer: &mut [f32]) -> Result<()>;
    /// Copies `root`'s buffer into every rank's.
    fn broadcast(&self, buffer: &mut [f32], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Backend name for logs.
    fn name(&self) -> &'static str;
    /// The mean of `t` over the ranks computed where `t` lives, or `None` when this backend
    /// reduces host buffers only (then [`all_reduce_mean_tensor`] goes through host memory).
    fn all_reduce_mean_device(&self, _t: &candle_core::Tensor) -> Option<Result<candle_core::Tensor>> {
        None
    }
}

/// The mean of the f32 tensor `t` over the ranks, on `t`'s device: in device memory when the
/// backend can (NCCL on a GPU), else through a host buffer reduced bucket by bucket (threads,
/// MPI, and every backend on the CPU).
pub fn all_reduce_mean_tensor(c: &dyn Collective, t: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    if let Some(out) = c.all_reduce_mean_device(t) {
        return out;
    }
    let bad = |e: candle_core::Error| DistError::Bad(format!("gradient buffer: {e}"));
    let mut host = t.flatten_all().and_then(|f| f.to_vec1::<f32>()).map_err(bad)?;
    all_reduce_mean_bucketed(c, &mut host)?;
    candle_core::Tensor::from_vec(host, t.shape(), t.device()).map_err(bad)
}

/// All-reduces a buffer bucket by bucket.
pub fn all_reduce_mean_bucketed(c: &dyn Collective, buffer: &mut [f32]) -> Result<()> {
    for chunk in buffer.chunks_mut(BUCKET_FLOATS) {
        c.all_reduce_mean(chunk)?;
    }
    Ok(())
}

/// One process.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _buffer: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buffer: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn name(&self) -> &'static str {
        "single"
    }
}

#[derive(Default)]
struct Round {
    /// Increments when a round completes.
    generation: u64,
    arrived: usize,
    sum: Vec<f32>,
    result: Arc<Vec<f32>>,
    /// A rank that left (dropped its handle) while others may still wait.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    state: Mutex<Round>,
    cv: Condvar,
}

/// Ranks as threads of one process.
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
    timeout: Duration,
}

impl ThreadGroup {
    /// Handles for `world` ranks; operations fail after `timeout` without all peers.
    pub fn new(world: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared { world, state: Mutex::new(Round::default()), cv: Condvar::new() });
        (0..world).map(|rank| ThreadGroup { shared: shared.clone(), rank, timeout }).collect()
    }

    /// One rendezvous: every rank contributes `data` (summed), gets the sum back.
    fn exchange(&self, data: &[f32], contribute: bool) -> Result<Arc<Vec<f32>>> {
        let peer = |reason: String| DistError::Peer { rank: self.rank, reason };
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = st.left {
            return Err(peer(format!("rank {r} left the group; stopping")));
        }
        if st.arrived == 0 {
            st.sum = vec![0.0; data.len()];
        } else if st.sum.len() != data.len() {
            return Err(DistError::Bad(format!(
                "rank {} sent {} values, peers {}",
                self.rank,
                data.len(),
                st.sum.len()
            )));
        }
        if contribute {
            st.sum.iter_mut().zip(data).for_each(|(a, b)| *a += b);
        }
        st.arrived += 1;
        let generation = st.generation;
        if st.arrived == self.shared.world {
            st.result = Arc::new(std::mem::take(&mut st.sum));
            st.arrived = 0;
            st.generation += 1;
            self.shared.cv.notify_all();
            return Ok(st.result.clone());
        }
        let (st, wait) = self
            .shared
            .cv
            .wait_timeout_while(st, self.timeout, |s| s.generation == generation && s.left.is_none())
            .unwrap_or_else(|e| e.into_inner());
        if st.generation != generation {
            return Ok(st.result.clone());
        }
        if let Some(r) = st.left {
            return Err(peer(format!("rank {r} left the group; stopping")));
        }
        debug_assert!(wait.timed_out());
        Err(peer(format!("peers did not reach the collective within {:?}; a rank may have died", self.timeout)))
    }
}

impl Drop for ThreadGroup {
    /// A rank that goes away (finished, failed or panicked) releases the ranks waiting for it.
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.left.is_none() {
            st.left = Some(self.rank);
        }
        self.shared.cv.notify_all();
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_mean(&self, buffer: &mut [f32]) -> Result<()> {
        let sum = self.exchange(buffer, true)?;
        let inv = 1.0 / self.shared.world as f32;
        buffer.iter_mut().zip(sum.iter()).for_each(|(b, s)| *b = s * inv);
        Ok(())
    }
    fn broadcast(&self, buffer: &mut [f32], root: usize) -> Result<()> {
        let sum = self.exchange(buffer, self.rank == root)?;
        buffer.copy_from_slice(&sum);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.exchange(&[], false).map(|_| ())
    }
    fn name(&self) -> &'static str {
        "threads"
    }
}

#[cfg(feature = "mpi")]
mod mpi_backend {
    use mpi::collective::SystemOperation;
    use mpi::topology::Communicator;
    use mpi::traits::*;

    use super::{Collective, DistError, Result};

    /// OpenMPI ranks launched by `mpirun`. A rank that dies makes `mpirun` abort the job
    /// (MPI's default error handler), so the others do not hang. Used on the thread that
    /// initialised MPI (the default threading level), so it is neither `Send` nor `Sync`.
    pub struct MpiCollective {
        _universe: mpi::environment::Universe,
        world: mpi::topology::SimpleCommunicator,
    }

    impl MpiCollective {
        /// Initialises MPI (once per process).
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize().ok_or_else(|| DistError::Bad("MPI was already initialised".into()))?;
            let world = universe.world();
            Ok(Self { _universe: universe, world })
        }
    }

    impl Collective for MpiCollective {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world_size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_mean(&self, buffer: &mut [f32]) -> Result<()> {
            let mut out = vec![0f32; buffer.len()];
            self.world.all_reduce_into(&buffer[..], &mut out[..], SystemOperation::sum());
            let inv = 1.0 / self.world_size() as f32;
            buffer.iter_mut().zip(out).for_each(|(b, s)| *b = s * inv);
            Ok(())
        }
        fn broadcast(&self, buffer: &mut [f32], root: usize) -> Result<()> {
            self.world.process_at_rank(root as i32).broadcast_into(buffer);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }
        fn name(&self) -> &'static str {
            "mpi"
        }
    }
}

#[cfg(feature = "mpi")]
pub use mpi_backend::MpiCollective;

#[cfg(feature = "nccl")]
mod nccl_backend {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use candle_core::cuda_backend::cudarc::driver::CudaStream;
    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CpuStorage, Layout, Shape, Tensor};

    use super::{Collective, DistError, Result};

    /// NCCL between GPUs, one process per GPU (launched by `mpirun`, `torchrun`-style launchers
    /// or Slurm; see [`super::launcher_rank`]). Rank 0 creates the NCCL id and hands it to the
    /// others through a file on a filesystem every rank sees; it removes the file once every rank
    /// has joined (a file left by a crashed launch must be deleted before the next one). The
    /// communicator runs on the stream of this rank's candle device, so the all-reduce of the
    /// step's gradient tensor (`ncclAllReduce(avg)` from one GPU buffer into a new one) is
    /// ordered after the backward kernels that wrote it and before the optimiser's, with no copy
    /// to the host. Used on the thread that made it; `Send`/`Sync` only as far as cudarc's types
    /// are.
    pub struct NcclCollective {
        comm: Comm,
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
    }

    fn err(rank: usize) -> impl Fn(String) -> DistError {
        move |reason| DistError::Peer { rank, reason }
    }

    impl NcclCollective {
        /// Joins the group as `rank` of `world_size` on the CUDA `device` (its stream carries
        /// the collectives), exchanging the NCCL id through `id_file`; other ranks wait for the
        /// file at most `timeout`.
        pub fn init(
            rank: usize,
            world_size: usize,
            device: &candle_core::Device,
            id_file: &Path,
            timeout: Duration,
        ) -> Result<Self> {
            let e = err(rank);
            let candle_core::Device::Cuda(cuda) = device else {
                return Err(DistError::Bad(format!("NCCL needs a CUDA device, got {device:?}")));
            };
            let stream = cuda.cuda_stream();
            let id = if rank == 0 {
                let id = Id::new().map_err(|x| e(format!("creating the NCCL id: {x:?}")))?;
                let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
                if let Some(dir) = id_file.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|x| e(format!("{}: {x}", dir.display())))?;
                }
                crate::util::write_atomic(id_file, &bytes).map_err(|x| e(format!("{}: {x}", id_file.display())))?;
                id
            } else {
                let start = Instant::now();
                loop {
                    match std::fs::read(id_file) {
                        Ok(bytes) if bytes.len() == 128 => {
                            let mut internal = [0 as std::ffi::c_char; 128];
                            for (d, s) in internal.iter_mut().zip(&bytes) {
                                *d = *s as std::ffi::c_char;
                            }
                            break Id::uninit(internal);
                        }
                        _ if start.elapsed() > timeout => {
                            return Err(e(format!(
                                "no NCCL id from rank 0 in {} after {:?}",
                                id_file.display(),
                                timeout
                            )));
                        }
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            };
            let comm = Comm::from_rank(stream.clone(), rank, world_size, id)
                .map_err(|x| e(format!("ncclCommInitRank: {x:?}")))?;
            if rank == 0 {
                // Every rank has joined, so nobody needs the id any more.
                let _ = std::fs::remove_file(id_file);
            }
            Ok(Self { comm, stream, rank, world_size })
        }

        /// The default place for the id file: beside the run's outputs.
        pub fn default_id_file(out_dir: &Path) -> PathBuf {
            out_dir.join(".nccl-id")
        }
    }

    impl Collective for NcclCollective {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world_size
        }

        fn all_reduce_mean(&self, buffer: &mut [f32]) -> Result<()> {
            let e = err(self.rank);
            let mut dev = self.stream.clone_htod(buffer).map_err(|x| e(format!("{x:?}")))?;
            self.comm.all_reduce_in_place(&mut dev, &ReduceOp::Avg).map_err(|x| e(format!("ncclAllReduce: {x:?}")))?;
            self.stream.memcpy_dtoh(&dev, buffer).map_err(|x| e(format!("{x:?}")))?;
            self.stream.synchronize().map_err(|x| e(format!("{x:?}")))
        }

        fn broadcast(&self, buffer: &mut [f32], root: usize) -> Result<()> {
            let e = err(self.rank);
            let mut dev = self.stream.clone_htod(buffer).map_err(|x| e(format!("{x:?}")))?;
            self.comm.broadcast_in_place(&mut dev, root as i32).map_err(|x| e(format!("ncclBroadcast: {x:?}")))?;
            self.stream.memcpy_dtoh(&dev, buffer).map_err(|x| e(format!("{x:?}")))?;
            self.stream.synchronize().map_err(|x| e(format!("{x:?}")))
        }

        fn barrier(&self) -> Result<()> {
            self.all_reduce_mean(&mut [0.0])
        }

        fn name(&self) -> &'static str {
            "nccl"
        }

        fn all_reduce_mean_device(&self, t: &Tensor) -> Option<Result<Tensor>> {
            if !t.device().is_cuda() {
                return None;
            }
            let e = err(self.rank);
            Some(
                t.contiguous()
                    .and_then(|t| t.apply_op1_no_bwd(&AvgOp { comm: &self.comm }))
                    .map_err(|x| e(format!("ncclAllReduce on the GPU: {x}"))),
            )
        }
    }

    /// `ncclAllReduce(avg)` of an f32 CUDA tensor into a new buffer, as a candle op (so the
    /// result is an ordinary tensor on the same device and stream).
    struct AvgOp<'a> {
        comm: &'a Comm,
    }

    impl candle_core::CustomOp1 for AvgOp<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-avg"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("the NCCL all-reduce takes CUDA tensors only")
        }

        fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
            let (start, end) =
                l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("non-contiguous gradients".into()))?;
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let mut dst = s.device.alloc_zeros::<f32>(end - start)?;
            self.comm
                .all_reduce(&src, &mut dst, &ReduceOp::Avg)
                .map_err(|x| candle_core::Error::Msg(format!("ncclAllReduce: {x:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, s.device.clone()), l.shape().clone()))
        }
    }
}

#[cfg(feature = "nccl")]
pub use nccl_backend::NcclCollective;

/// This process's `(rank, world size, local rank)` as set by its launcher: OpenMPI's `mpirun`,
/// `torchrun`-style `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, or Slurm's `srun`; `None` when not launched
/// as one of several processes.
pub fn launcher_rank() -> Option<(usize, usize, usize)> {
    launcher_rank_from(|k| std::env::var(k).ok())
}

/// [`launcher_rank`] over any variable lookup.
pub fn launcher_rank_from(var: impl Fn(&str) -> Option<String>) -> Option<(usize, usize, usize)> {
    let get = |k: &str| var(k).and_then(|v| v.parse::<usize>().ok());
    for (r, w, l) in [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ] {
        if let (Some(rank), Some(world)) = (get(r), get(w)) {
            if world > 1 && rank < world {
                return Some((rank, world, get(l).unwrap_or(0)));
            }
        }
    }
    None
}

/// Whether this process was started by `mpirun` (OpenMPI, MPICH or Slurm's PMI).
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|v| std::env::var_os(v).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_ranks_come_from_mpirun_torchrun_or_slurm_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(
            launcher_rank_from(env(&[
                ("OMPI_COMM_WORLD_RANK", "3"),
                ("OMPI_COMM_WORLD_SIZE", "8"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "1")
            ])),
            Some((3, 8, 1))
        );
        assert_eq!(launcher_rank_from(env(&[("RANK", "1"), ("WORLD_SIZE", "2")])), Some((1, 2, 0)));
        assert_eq!(
            launcher_rank_from(env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6"), ("SLURM_LOCALID", "1")])),
            Some((5, 6, 1))
        );
        // One process, a rank outside the world, or garbage: not a multi-process launch.
        assert_eq!(launcher_rank_from(env(&[("RANK", "0"), ("WORLD_SIZE", "1")])), None);
        assert_eq!(launcher_rank_from(env(&[("RANK", "4"), ("WORLD_SIZE", "2")])), None);
        assert_eq!(launcher_rank_from(env(&[("RANK", "x"), ("WORLD_SIZE", "2")])), None);
        assert_eq!(launcher_rank_from(env(&[])), None);
    }

    /// Thread ranks are moved into their threads (`run_ranks`, the tests): `Send` by their
    /// own fields, with no `unsafe impl`.
    #[test]
    fn thread_ranks_are_send_by_their_types() {
        fn moves_between_threads<T: Send>() {}
        moves_between_threads::<ThreadGroup>();
        moves_between_threads::<Single>();
    }

    #[test]
    fn thread_group_averages_and_broadcasts() {
        let group = ThreadGroup::new(3, Duration::from_secs(10));
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let r = g.rank() as f32;
                    let mut buf = vec![r, 10.0 * r];
                    g.all_reduce_mean(&mut buf).unwrap();
                    let mut b = vec![r; 2];
                    g.broadcast(&mut b, 2).unwrap();
                    g.barrier().unwrap();
                    (buf, b)
                })
            })
            .collect();
        for h in handles {
            let (mean, b) = h.join().unwrap();
            assert_eq!(mean, vec![1.0, 10.0]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }

    /// A rank that dies makes the others stop with a clear error instead of hanging.
    #[test]
    fn a_dead_rank_stops_the_others_with_a_clear_error() {
        let mut group = ThreadGroup::new(2, Duration::from_secs(30));
        let survivor = group.pop().unwrap();
        let dying = group.pop().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = vec![1.0f32];
            survivor.all_reduce_mean(&mut buf)
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(dying); // rank 0 dies before its all-reduce
        let err = t.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank 1: rank 0 left the group"), "{err}");

        // Without a departure notice (a hung peer), the bounded timeout applies.
        let mut group = ThreadGroup::new(2, Duration::from_millis(200));
        let lonely = group.pop().unwrap();
        let stuck = group.pop().unwrap();
        let err = lonely.all_reduce_mean(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("did not reach the collective"), "{err}");
        drop(stuck);
    }
}
