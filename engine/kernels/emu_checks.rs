//! Launchers of kernels/emu_checks.cu: kernels that break a rule on purpose, run on emu
//! only, each showing that the emulator rejects what hardware would get wrong (the kernel
//! tests assert the error and its message), and the emulator's micro-benchmark.

use super::{kernels, Buf, DevPtr, DevSlice, KernelDevice, Launch};
use crate::error::{Error, Result};

kernels! {
    module "emu_checks";
    STALE_SHARED = stale_shared_check(StaleArgs { out: DevPtr });
    DYN_SHARED = dyn_shared_check(DynSharedArgs { out: DevPtr, n: i32 });
    LDMATRIX = ldmatrix_check(LdmatrixArgs { input: DevPtr, out: DevPtr, bad: i32 });
    CP_ASYNC = cp_async_check(CpAsyncCheckArgs { src: DevPtr, out: DevPtr, bad: i32 });
    DEADLOCK = deadlock_check(DeadlockArgs { out: DevPtr, mode: i32 });
    MICROBENCH = emu_microbench(MicrobenchArgs { out: DevPtr, op: i32, iters: i32 });
    BLOCK_ORDER = block_order_check(BlockOrderArgs { counter: DevPtr, ticket: DevPtr });
    CRASH = crash_check(CrashArgs { bad: DevPtr, out: DevPtr, mode: i32 });
}

fn emu_only(dev: &KernelDevice, k: &str) -> Result<()> {
    if dev.is_cuda() {
        return Err(Error::invalid(format!(
            "{k}: breaks a rule on purpose; it runs on emu only"
        )));
    }
    Ok(())
}

/// Block 0 of `blocks` (256 threads each) fills a static shared array; every block copies
/// it to out (256 floats per block). Blocks after the first read what they never wrote.
pub fn stale_shared<'a>(
    dev: &KernelDevice,
    out: impl Into<DevSlice<'a, f32>>,
    blocks: u32,
) -> Result<()> {
    let out = out.into();
    const K: &str = "stale_shared_check";
    emu_only(dev, K)?;
    if out.len() != 256 * blocks as usize {
        return Err(Error::invalid(format!(
            "{K}: out holds 256 floats per block"
        )));
    }
    let mut a = StaleArgs {
        out: out.addr(dev, K)?,
    };
    // SAFETY: block b writes out[256b..256b+256].
    unsafe { dev.launch(&STALE_SHARED, Launch::x(blocks, 256), &mut a) }
}

/// out = [n−1, …, 0] through `n` floats of dynamic shared memory (beside 4 KiB of static),
/// launched with `shared` bytes of dynamic shared memory under an opt-in of `opt_in` bytes
/// (0: none). A legal kernel: the launch checks decide.
pub fn dyn_shared<'a>(
    dev: &KernelDevice,
    out: impl Into<DevSlice<'a, f32>>,
    shared: u32,
    opt_in: u32,
) -> Result<()> {
    let out = out.into();
    const K: &str = "dyn_shared_check";
    let n = out.len();
    if n == 0 || (n * 4) as u64 > shared as u64 {
        return Err(Error::invalid(format!(
            "{K}: {n} floats need {} bytes of shared memory",
            n * 4
        )));
    }
    let mut a = DynSharedArgs {
        out: out.addr(dev, K)?,
        n: n as i32,
    };
    let kernel = DYN_SHARED.with_opt_in(opt_in);
    let l = Launch {
        shared,
        ..Launch::x(1, 256)
    };
    // SAFETY: one block writes out[..n] and its dynamic shared memory [..n] (n·4 ≤ shared).
    unsafe { dev.launch(&kernel, l, &mut a) }
}

/// ldmatrix x4 of a 16×16 bf16 tile (input: 256 values) into out (32 × 4 registers);
/// `bad` = 1 misaligns one lane's row address, 2 gives one a global address.
pub fn ldmatrix<'a>(
    dev: &KernelDevice,
    input: impl Into<DevSlice<'a, half::bf16>>,
    out: impl Into<DevSlice<'a, u32>>,
    bad: i32,
) -> Result<()> {
    let input = input.into();
    let out = out.into();
    const K: &str = "ldmatrix_check";
    emu_only(dev, K)?;
    if input.len() != 256 || out.len() != 128 {
        return Err(Error::invalid(format!("{K}: input 256 bf16, out 128 u32")));
    }
    let mut a = LdmatrixArgs {
        input: input.addr(dev, K)?,
        out: out.addr(dev, K)?,
        bad,
    };
    // SAFETY: one warp reads 256 bf16 and writes 128 u32 (and with bad = 2, ldmatrix reads
    // 16 bytes of input, which is rejected before any access).
    unsafe { dev.launch(&LDMATRIX, Launch::x(1, 32), &mut a) }
}

/// One 16-byte cp.async per lane from src (128 floats, 16-byte aligned) to out through
/// shared memory; `bad` 1..=4 breaks one lane's copy (see kernels/emu_checks.cu).
pub fn cp_async<'a>(
    dev: &KernelDevice,
    src: impl Into<DevSlice<'a, f32>>,
    out: impl Into<DevSlice<'a, f32>>,
    bad: i32,
) -> Result<()> {
    let src = src.into();
    let out = out.into();
    const K: &str = "cp_async_check";
    emu_only(dev, K)?;
    if src.len() != 132 || out.len() != 128 {
        return Err(Error::invalid(format!("{K}: src 132 floats, out 128")));
    }
    let mut a = CpAsyncCheckArgs {
        src: src.addr(dev, K)?,
        out: out.addr(dev, K)?,
        bad,
    };
    if a.src.0 % 16 != 0 {
        return Err(Error::invalid(format!("{K}: src must be 16-byte aligned")));
    }
    // SAFETY: one warp reads src[..132] and writes out[..128].
    unsafe { dev.launch(&CP_ASYNC, Launch::x(1, 32), &mut a) }
}

/// A block of 64 threads that deadlocks or breaks a warp rule in `mode` 0..=4 (see
/// kernels/emu_checks.cu); out: 64 ints.
pub fn deadlock<'a>(
    dev: &KernelDevice,
    out: impl Into<DevSlice<'a, i32>>,
    mode: i32,
) -> Result<()> {
    let out = out.into();
    const K: &str = "deadlock_check";
    emu_only(dev, K)?;
    if out.len() != 64 {
        return Err(Error::invalid(format!("{K}: out holds 64 ints")));
    }
    let mut a = DeadlockArgs {
        out: out.addr(dev, K)?,
        mode,
    };
    // SAFETY: thread t writes out[t].
    unsafe { dev.launch(&DEADLOCK, Launch::x(1, 64), &mut a) }
}

/// What [`microbench`] repeats.
#[derive(Debug, Clone, Copy)]
pub enum MicroOp {
    /// __syncthreads().
    Barrier = 0,
    /// A warp shuffle.
    Shuffle = 1,
    /// An m16n8k16 bf16 mma.
    Mma = 2,
}

/// `iters` rounds of `op` in one block of out.len() threads (bench/emu.rs).
pub fn microbench<'a>(
    dev: &KernelDevice,
    out: impl Into<DevSlice<'a, f32>>,
    op: MicroOp,
    iters: u32,
) -> Result<()> {
    let out = out.into();
    const K: &str = "emu_microbench";
    let threads = out.len();
    if threads == 0 || threads % 32 != 0 || threads > 1024 {
        return Err(Error::invalid(format!(
            "{K}: a block of a multiple of 32 threads, at most 1024"
        )));
    }
    let mut a = MicrobenchArgs {
        out: out.addr(dev, K)?,
        op: op as i32,
        iters: iters.min(i32::MAX as u32) as i32,
    };
    // SAFETY: thread t writes out[t].
    unsafe { dev.launch(&MICROBENCH, Launch::x(1, threads as u32), &mut a) }
}

/// The order in which `blocks` blocks ran: ticket[b] = how many blocks ran before block b.
pub fn block_order(dev: &KernelDevice, blocks: u32) -> Result<Vec<i32>> {
    const K: &str = "block_order_check";
    let counter = Buf::filled(dev, 1, 0i32)?;
    let ticket = Buf::filled(dev, blocks as usize, -1i32)?;
    let mut a = BlockOrderArgs {
        counter: counter.addr(dev, K)?,
        ticket: ticket.addr(dev, K)?,
    };
    // SAFETY: thread 0 of block b updates counter[0] and writes ticket[b].
    unsafe { dev.launch(&BLOCK_ORDER, Launch::x(blocks, 32), &mut a)? };
    ticket.download()
}

/// Crashes the process on purpose: `mode` 0 reads address 16 in thread 7 of block 1, 1
/// overflows thread 3's fiber stack (see kernels/emu_checks.cu). For a test that runs it
/// in a child process.
pub fn crash(dev: &KernelDevice, mode: i32) -> Result<()> {
    const K: &str = "crash_check";
    emu_only(dev, K)?;
    let out = Buf::filled(dev, 64, 0.0f32)?;
    let mut a = CrashArgs {
        bad: DevPtr(0),
        out: out.addr(dev, K)?,
        mode,
    };
    // SAFETY: none: this launch faults on purpose (the process dies with a message).
    unsafe { dev.launch(&CRASH, Launch::x(2, 32), &mut a) }
}
