//! The emulator's own rules (kernels/emu, kernels/emu_checks.cu): each rule that makes it
//! fail where hardware would, shown rejecting the bad case for the right reason. These run
//! on emu whatever REEL_TEST_DEVICE says.

use reel::kernels::{self as k, emu_checks as chk, Buf, KernelDevice};
use reel::Error;

use crate::kernels::{bf16s, down, small_ints, up, vals};
use crate::wrappers::MmaCase;

const EMU: KernelDevice = KernelDevice::Emu;

/// The message of a launch that must fail on emu.
fn emu_error(r: reel::Result<()>) -> String {
    match r {
        Err(Error::Device(m)) => m,
        Err(e) => panic!("expected an emulator fault, got another error: {e}"),
        Ok(()) => panic!("expected an emulator fault, the launch succeeded"),
    }
}

#[test]
fn emu_shuffle_catches_a_missing_syncthreads() {
    let d = KernelDevice::Emu; // the shuffle mode is the emulator's
    let shift = |x: &[f32], sync: bool| {
        let mut y = Buf::filled(&d, x.len(), f32::NAN).unwrap();
        k::shift_shared(&d, &up(&d, x), &mut y, sync).unwrap();
        down(&y)
    };
    let n = 200;
    let expect =
        |x: &[f32]| -> Vec<f32> { (0..n).map(|t| x[if t == 0 { 0 } else { t - 1 }]).collect() };
    // In thread order the racy kernel happens to pass: that is why the shuffle mode exists.
    k::set_emu_shuffle(Some(None));
    let x = vals(n, 1);
    assert_eq!(shift(&x, false), expect(&x));
    // With the barrier, every shuffled order is right.
    for seed in 0..8 {
        k::set_emu_shuffle(Some(Some(seed)));
        let x = vals(n, 100 + seed);
        assert_eq!(shift(&x, true), expect(&x), "seed {seed}");
    }
    // Without it, shuffled orders read neighbours that have not written yet.
    let mut caught = 0;
    for seed in 0..8 {
        k::set_emu_shuffle(Some(Some(seed)));
        let x = vals(n, 200 + seed);
        if shift(&x, false) != expect(&x) {
            caught += 1;
        }
    }
    k::set_emu_shuffle(None);
    assert_eq!(
        caught,
        8,
        "the shuffle mode missed the race in {} of 8 runs",
        8 - caught
    );
}

#[test]
fn emu_poisons_shared_memory_for_every_block() {
    // Block 0 fills a static shared array; the others read it without writing. On hardware
    // they would read whatever the SM held (often block 0's data, on a GPU that runs the
    // blocks on one SM in order); here they read the poison pattern.
    for shuffle in [None, Some(3u64)] {
        k::set_emu_shuffle(Some(shuffle));
        let mut out = Buf::filled(&EMU, 3 * 256, 0.0f32).unwrap();
        chk::stale_shared(&EMU, &mut out, 3).unwrap();
        let got = down(&out);
        for t in 0..256 {
            assert_eq!(got[t], t as f32, "block 0 reads what it wrote");
            for b in 1..3 {
                assert_eq!(
                    got[256 * b + t].to_bits(),
                    0xffff_ffff,
                    "block {b} read stale shared memory at {t} (shuffle {shuffle:?})"
                );
            }
        }
    }
    k::set_emu_shuffle(None);
}

#[test]
fn emu_runs_blocks_in_order_or_shuffled() {
    k::set_emu_shuffle(Some(None));
    let order = chk::block_order(&EMU, 64).unwrap();
    assert_eq!(order, (0..64).collect::<Vec<i32>>());
    for seed in 0..4 {
        k::set_emu_shuffle(Some(Some(seed)));
        let mut order = chk::block_order(&EMU, 64).unwrap();
        assert_ne!(order, (0..64).collect::<Vec<i32>>(), "seed {seed}");
        order.sort();
        assert_eq!(order, (0..64).collect::<Vec<i32>>(), "a permutation");
    }
    k::set_emu_shuffle(None);
}

#[test]
fn emu_rejects_misaligned_or_non_shared_ldmatrix() {
    let tile: Vec<f32> = (0..256).map(|i| (i % 97) as f32).collect();
    let input = up(&EMU, &bf16s(&tile));
    let mut out = Buf::filled(&EMU, 128, 0u32).unwrap();
    chk::ldmatrix(&EMU, &input, &mut out, 0).unwrap();
    // Lane l gets elements (l/4, 2(l%4)) and (l/4, 2(l%4)+1) of each 8x8 matrix; matrix m
    // covers rows 8(m%2).., columns 8(m/2)..
    let got = down(&out);
    let bits = bf16s(&tile);
    for lane in 0..32 {
        for m in 0..4 {
            let (r, c) = (8 * (m % 2) + lane / 4, 8 * (m / 2) + 2 * (lane % 4));
            let want =
                bits[16 * r + c].to_bits() as u32 | (bits[16 * r + c + 1].to_bits() as u32) << 16;
            assert_eq!(got[4 * lane + m], want, "lane {lane} matrix {m}");
        }
    }
    let e = emu_error(chk::ldmatrix(&EMU, &input, &mut out, 1));
    assert!(
        e.contains("ldmatrix_check")
            && e.contains("thread (3,0,0)")
            && e.contains("not 16-byte aligned"),
        "{e}"
    );
    let e = emu_error(chk::ldmatrix(&EMU, &input, &mut out, 2));
    assert!(
        e.contains("thread (5,0,0)") && e.contains("not in the block's shared memory"),
        "{e}"
    );
}

#[test]
fn emu_rejects_misaligned_or_misplaced_cp_async() {
    let src = up(&EMU, &vals(132, 4));
    let mut out = Buf::filled(&EMU, 128, 0.0f32).unwrap();
    chk::cp_async(&EMU, &src, &mut out, 0).unwrap();
    assert_eq!(down(&out), down(&src)[..128]);
    for (bad, what) in [
        (1, "destination"),
        (2, "source"),
        (3, "not in the block's shared memory"),
        (4, "is in shared memory, not global"),
    ] {
        let e = emu_error(chk::cp_async(&EMU, &src, &mut out, bad));
        assert!(
            e.contains("cp_async_check") && e.contains("thread (2,0,0)") && e.contains(what),
            "bad {bad}: {e}"
        );
    }
}

#[test]
fn emu_reports_deadlocks_and_broken_warp_rules() {
    let mut out = Buf::filled(&EMU, 64, 0i32).unwrap();
    // In thread order, the exact report; shuffled, another thread may be the one to notice,
    // and the report's kind must hold.
    let cases: [(i32, &str, &[&str]); 5] = [
        (
            0,
            "thread (16,0,0): exited while lanes 0000ffff of its warp wait for it at a warp \
             operation with mask ffffffff",
            &["exited while lanes", "which has exited"],
        ),
        (
            1,
            "deadlock: thread (32,0,0) (warp 1, lane 0) waits at a warp operation with mask \
             ffffffff, arrived 0000ffff; lane 16 (thread (48,0,0)) waits at a block barrier",
            &["waits at a block barrier"],
        ),
        (
            2,
            "deadlock: thread (0,0,0) waits at barrier 1 (named, with a thread count) with 32 of \
             64 threads arrived",
            &["barrier 1 (named, with a thread count) with 32 of 64 threads arrived"],
        ),
        (
            3,
            "thread (16,0,0): warp operations with overlapping but different masks (0001ffff and \
             ffff0000) in one warp",
            &["overlapping but different masks", "which has exited"],
        ),
        (
            4,
            "thread (0,0,0): a warp operation's mask 00000002 leaves out the calling lane 0",
            &["leaves out the calling lane"],
        ),
    ];
    for (mode, exact, kinds) in cases {
        k::set_emu_shuffle(Some(None));
        let e = emu_error(chk::deadlock(&EMU, &mut out, mode));
        assert!(
            e.contains("kernel deadlock_check, block (0,0,0)") && e.contains(exact),
            "mode {mode}: {e}"
        );
        for seed in 0..4 {
            k::set_emu_shuffle(Some(Some(seed)));
            let e = emu_error(chk::deadlock(&EMU, &mut out, mode));
            assert!(
                kinds.iter().any(|k| e.contains(k)),
                "mode {mode}, seed {seed}: {e}"
            );
        }
    }
    k::set_emu_shuffle(None);
    // The emulator keeps working after a fault.
    let x = small_ints(32, 1, -5, 5);
    let mut o = Buf::filled(&EMU, k::WARP_OPS_OUTPUTS * 32, 0).unwrap();
    k::warp_ops_selftest(&EMU, &up(&EMU, &x), &mut o, 32).unwrap();
    assert_eq!(down(&o)[0], x.iter().sum::<i32>());
}

#[test]
fn emu_catches_a_read_before_the_cp_async_wait() {
    // mma_selftest mode 4 stages A and B with cp.async and never waits: the destinations
    // are poisoned at issue, so every product is NaN whatever shared memory held before
    // (here: the same tile, left by an earlier correct launch of mode 1).
    let case = MmaCase::integers(9);
    let good = case.run(&EMU, 1);
    assert!(good.iter().all(|v| v.is_finite()));
    let bad = case.run(&EMU, 4);
    assert!(
        bad.iter().all(|v| v.is_nan()),
        "a missing cp.async wait went unnoticed: {bad:?}"
    );
}

#[test]
fn emu_ucontext_switch_gives_the_same_results() {
    // The swapcontext path stays for bench/emu.rs's comparison: keep it correct.
    let x = small_ints(256, 9, -40, 40);
    let run = |s| {
        k::set_emu_switch(s);
        let mut out = Buf::filled(&EMU, k::WARP_OPS_OUTPUTS * 256, 0).unwrap();
        k::warp_ops_selftest(&EMU, &up(&EMU, &x), &mut out, 256).unwrap();
        let mut b = Buf::filled(&EMU, k::BARRIER_OUTPUTS * 256, 0).unwrap();
        k::barrier_selftest(&EMU, &up(&EMU, &x), &mut b).unwrap();
        (down(&out), down(&b))
    };
    let own = run(k::EmuSwitch::Own);
    let uc = run(k::EmuSwitch::Ucontext);
    k::set_emu_switch(k::EmuSwitch::Env);
    assert_eq!(own, uc);
    let mut out = Buf::filled(&EMU, 64, 0i32).unwrap();
    k::set_emu_switch(k::EmuSwitch::Ucontext);
    let e = emu_error(chk::deadlock(&EMU, &mut out, 1));
    k::set_emu_switch(k::EmuSwitch::Env);
    assert!(e.contains("deadlock"), "{e}");
}

/// Runs the ignored test `emu::crash_child` in a child process with REEL_CRASH_MODE set.
fn crash_in_child(mode: i32) -> (bool, String) {
    let o = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "emu::crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("REEL_CRASH_MODE", mode.to_string())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
#[ignore = "run by emu_names_the_kernel_block_and_thread_of_a_crash in a child process"]
fn crash_child() {
    if let Ok(mode) = std::env::var("REEL_CRASH_MODE") {
        let _ = chk::crash(&EMU, mode.parse().unwrap());
    }
}

#[test]
fn emu_names_the_kernel_block_and_thread_of_a_crash() {
    let (ok, err) = crash_in_child(0);
    assert!(!ok, "the child survived a wild read: {err}");
    assert!(
        err.contains(
            "reel emulator: kernel crash_check, block (1,0,0), thread (7,0,0): segmentation fault"
        ),
        "{err}"
    );
    let (ok, err) = crash_in_child(1);
    assert!(!ok, "the child survived a stack overflow: {err}");
    assert!(
        err.contains("kernel crash_check, block (0,0,0), thread (3,0,0)")
            && err.contains("stack overflowed"),
        "{err}"
    );
}
