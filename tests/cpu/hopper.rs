//! The Hopper wrappers (kernels/hopper.sm90.cu) on the device REEL_TEST_DEVICE names (emu in
//! CI; an H100/H200 in tools/gpu-check.sh, where agreeing with the same models proves the
//! emulator's layouts): TMA boxes of rank 1 to 5 with every swizzle and out-of-bounds boxes
//! on every side, against a model of the PTX ISA's layout; m64n64k16 wgmmas for every
//! operand layout (K- and MN-major, each swizzle, A from registers) against a plain matrix
//! product, bit-exact on integer inputs; the mbarrier phase sequence; the same under
//! shuffled emulator schedules; and each rule the emulator enforces (emu only).

use half::bf16;
use reel::kernels::hopper::{self as h, OperandLayout, Swizzle, TmaDesc, TmaType, WgmmaLayout};
use reel::kernels::{Buf, KernelDevice};

use crate::kernels::dev;

const EMU: KernelDevice = KernelDevice::Emu;

/// The test device, or None on a GPU that is not a Hopper (the module has no code for it:
/// wrappers::an_sm90a_only_module_runs_on_hopper_and_is_refused_elsewhere checks that).
fn hopper() -> Option<KernelDevice> {
    let d = dev();
    if let KernelDevice::Cuda(c) = &d {
        if c.compute_capability() != (9, 0) {
            eprintln!("not a Hopper GPU: the sm_90a checks do not apply");
            return None;
        }
    }
    Some(d)
}

/// Small integers as bf16 (exact products and sums in f32).
fn ints(n: usize, seed: u32) -> Vec<bf16> {
    (0..n)
        .map(|i| {
            let x = (i as u32)
                .wrapping_mul(2654435761)
                .wrapping_add(seed.wrapping_mul(40503))
                >> 27;
            bf16::from_f32(x as f32 - 15.0)
        })
        .collect()
}

/// What a TMA load of `d`'s box at `c` leaves in shared memory (at a 1024-aligned address):
/// element i of the box in row-major order at swizzle(2i), or zero out of bounds.
fn tma_model(d: &TmaDesc, src: &[bf16], c: &[i32]) -> Vec<u8> {
    let n: usize = d.box_dims.iter().map(|&b| b as usize).product();
    let mut out = vec![0u8; 2 * n];
    for i in 0..n {
        let mut rem = i;
        let mut idx = 0usize;
        let mut inb = true;
        let mut stride = 1usize;
        for (dim, &b) in d.box_dims.iter().enumerate() {
            let e = rem % b as usize;
            rem /= b as usize;
            let g = c[dim] as i64 + e as i64;
            if g < 0 || g >= d.dims[dim] as i64 {
                inb = false;
            } else {
                idx += g as usize * stride;
            }
            stride *= d.dims[dim] as usize;
        }
        let v = if inb { src[idx].to_bits() } else { 0 };
        let at = d.swizzle.apply(2 * i as u32) as usize;
        out[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    out
}

fn tma_case(d0: &KernelDevice, dims: &[u64], box_dims: &[u32], sw: Swizzle, c: &[i32]) {
    let n: usize = dims.iter().map(|&d| d as usize).product();
    let src = ints(n, dims.len() as u32 + box_dims[0]);
    let d = TmaDesc::dense(TmaType::Bf16, dims, box_dims, sw);
    let g = Buf::upload(d0, &src).unwrap();
    let out = Buf::filled(d0, n, bf16::from_f32(-99.0)).unwrap();
    let map = d.map(d0, g.slice()).unwrap();
    let out_map = d.map(d0, out.slice()).unwrap();
    let raw = h::tma_check(d0, &map, &out_map, &d, c, 0).unwrap();
    assert_eq!(
        raw,
        tma_model(&d, &src, c),
        "{dims:?} box {box_dims:?} {sw:?} at {c:?}"
    );
    // The store wrote the box's in-bounds elements back, nothing else.
    let back = out.download().unwrap();
    let mut stored = 0;
    for (i, (&o, &s)) in back.iter().zip(&src).enumerate() {
        let mut rem = i;
        let inside = dims.iter().enumerate().all(|(k, &dk)| {
            let x = (rem % dk as usize) as i64;
            rem /= dk as usize;
            x >= c[k] as i64 && x < c[k] as i64 + box_dims[k] as i64
        });
        if inside {
            assert_eq!(o, s, "element {i} not stored");
            stored += 1;
        } else {
            assert_eq!(o.to_f32(), -99.0, "element {i} written outside the box");
        }
    }
    assert!(
        stored > 0,
        "{dims:?} box {box_dims:?} {sw:?} at {c:?}: nothing stored"
    );
}

#[test]
fn tma_boxes_land_swizzled_with_zero_fill_on_every_side() {
    if let Some(d) = hopper() {
        tma_cases(&d);
    }
}

fn tma_cases(d: &KernelDevice) {
    for (sw, inner) in [
        (Swizzle::None, 8u32),
        (Swizzle::None, 24),
        (Swizzle::B32, 16),
        (Swizzle::B64, 32),
        (Swizzle::B128, 64),
    ] {
        let dims = [inner as u64 * 2 + 8, 40];
        for c in [
            [0, 0],
            [inner as i32 + 8, 20],
            [-3 - inner as i32 / 2, -5],
            [5, 33],
        ] {
            tma_case(d, &dims, &[inner, 16], sw, &c);
        }
    }
    tma_case(d, &[40], &[32], Swizzle::None, &[16]);
    tma_case(d, &[16, 5, 7], &[8, 4, 3], Swizzle::None, &[4, 3, -1]);
    tma_case(
        d,
        &[8, 3, 4, 5],
        &[8, 2, 2, 2],
        Swizzle::None,
        &[0, 2, -1, 4],
    );
    tma_case(
        d,
        &[64, 3, 2, 2, 3],
        &[64, 2, 2, 1, 2],
        Swizzle::B128,
        &[0, 1, 1, 1, 2],
    );
}

/// A·B in f32, row-major 64×64 each.
fn matmul(a: &[bf16], b: &[bf16]) -> Vec<f32> {
    let mut d = vec![0.0f32; 64 * 64];
    for m in 0..64 {
        for n in 0..64 {
            d[m * 64 + n] = (0..64)
                .map(|k| a[m * 64 + k].to_f32() * b[k * 64 + n].to_f32())
                .sum();
        }
    }
    d
}

#[test]
fn wgmma_matches_a_matrix_product_for_every_operand_layout() {
    if let Some(d) = hopper() {
        wgmma_cases(&d);
    }
}

fn wgmma_cases(d: &KernelDevice) {
    let a = ints(64 * 64, 1);
    let b = ints(64 * 64, 2);
    let want = matmul(&a, &b);
    let k = |swizzle| {
        Some(OperandLayout {
            swizzle,
            mn_major: false,
        })
    };
    let kb = |swizzle| OperandLayout {
        swizzle,
        mn_major: false,
    };
    let mn = |swizzle| OperandLayout {
        swizzle,
        mn_major: true,
    };
    let cases = [
        WgmmaLayout {
            a: k(Swizzle::B128),
            b: kb(Swizzle::B128),
        },
        WgmmaLayout {
            a: k(Swizzle::B64),
            b: kb(Swizzle::B32),
        },
        WgmmaLayout {
            a: k(Swizzle::B32),
            b: kb(Swizzle::B64),
        },
        WgmmaLayout {
            a: k(Swizzle::None),
            b: kb(Swizzle::None),
        },
        WgmmaLayout {
            a: k(Swizzle::B128),
            b: mn(Swizzle::B128),
        },
        WgmmaLayout {
            a: k(Swizzle::B64),
            b: mn(Swizzle::B64),
        },
        WgmmaLayout {
            a: k(Swizzle::None),
            b: mn(Swizzle::B32),
        },
        WgmmaLayout {
            a: k(Swizzle::B128),
            b: mn(Swizzle::None),
        },
        WgmmaLayout {
            a: None,
            b: mn(Swizzle::B128),
        },
        WgmmaLayout {
            a: None,
            b: kb(Swizzle::B128),
        },
    ];
    for layout in cases {
        let regs = h::wgmma_check(d, layout, &a, &b, 0).unwrap();
        for i in 0..128 {
            for r in 0..32 {
                let (row, col) = h::accumulator_at(i, r);
                assert_eq!(
                    regs[i * 32 + r],
                    want[row * 64 + col],
                    "{layout:?}: thread {i} register {r} = D[{row}][{col}]"
                );
            }
        }
    }
}

#[test]
fn mbarrier_phases_follow_the_ptx_parity_rules() {
    if let Some(d) = hopper() {
        mbarrier_case(&d);
    }
}

fn mbarrier_case(d: &KernelDevice) {
    let out = h::mbarrier_check(d, 0).unwrap();
    assert_eq!(&out[..8], &[0, 1, 0, 1, 0, 0, 1, 0]);
    assert_eq!(out[8], 0x01 | (0x20 << 8), "the TMA load landed");
}

/// The same checks with the emulator's fibers (and blocks) run in shuffled orders: a missing
/// barrier or wait would show as a wrong value or a fault.
#[test]
fn hopper_checks_under_shuffled_schedules() {
    for seed in 0..2u64 {
        reel::kernels::set_emu_shuffle(Some(Some(seed)));
        tma_cases(&EMU);
        wgmma_cases(&EMU);
        mbarrier_case(&EMU);
    }
    reel::kernels::set_emu_shuffle(None);
}

fn fault<T: std::fmt::Debug>(r: reel::Result<T>) -> String {
    match r {
        Err(reel::Error::Device(m)) => m,
        other => panic!("expected an emulator fault, got {other:?}"),
    }
}

#[test]
fn the_emulator_rejects_what_hopper_gets_wrong() {
    let a = ints(64 * 64, 1);
    let layout = WgmmaLayout {
        a: Some(OperandLayout {
            swizzle: Swizzle::B128,
            mn_major: false,
        }),
        b: OperandLayout {
            swizzle: Swizzle::B128,
            mn_major: false,
        },
    };
    let m = fault(h::wgmma_check(&EMU, layout, &a, &a, 1));
    assert!(
        m.contains("wgmma (B)") && m.contains("fence.proxy.async"),
        "{m}"
    );
    let m = fault(h::wgmma_check(&EMU, layout, &a, &a, 2));
    assert!(m.contains("without a wgmma.fence"), "{m}");
    // Accumulators read before the wait hold poison.
    let early = h::wgmma_check(&EMU, layout, &a, &a, 3).unwrap();
    assert!(early.iter().all(|x| x.is_nan()));
    let m = fault(h::mbarrier_check(&EMU, 1));
    assert!(
        m.contains("deadlock") && m.contains("mbarrier at shared offset"),
        "{m}"
    );
    let m = fault(h::mbarrier_check(&EMU, 2));
    assert!(m.contains("setmaxnreg: the warpgroup disagrees"), "{m}");
    let m = fault(h::mbarrier_check(&EMU, 3));
    assert!(m.contains("setmaxnreg.dec 100"), "{m}");
    let m = fault(h::mbarrier_check(&EMU, 4));
    assert!(m.contains("arrivals on the mbarrier"), "{m}");
    let d = TmaDesc::dense(TmaType::Bf16, &[64, 64], &[64, 8], Swizzle::B128);
    let src = ints(64 * 64, 3);
    let g = Buf::upload(&EMU, &src).unwrap();
    let map = d.map(&EMU, g.slice()).unwrap();
    let m = fault(h::tma_check(&EMU, &map, &map, &d, &[0, 0], 1));
    assert!(
        m.contains("cp.async.bulk.tensor (store)") && m.contains("fence.proxy.async"),
        "{m}"
    );
    let m = fault(h::tma_check(&EMU, &map, &map, &d, &[0, 0], 2));
    assert!(m.contains("not 128-byte aligned"), "{m}");
    // Tensor maps the driver would refuse, named by field.
    let bad = TmaDesc::dense(TmaType::Bf16, &[64, 64], &[32, 8], Swizzle::B128);
    let e = bad.map(&EMU, g.slice()).unwrap_err().to_string();
    assert!(e.contains("128-byte swizzle"), "{e}");
    let bad = TmaDesc::dense(TmaType::Bf16, &[64, 64], &[64, 300], Swizzle::B128);
    let e = bad.map(&EMU, g.slice()).unwrap_err().to_string();
    assert!(e.contains("box_dims[1] = 300"), "{e}");
}
