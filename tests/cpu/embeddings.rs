//! RoPE tables and timestep embeddings against diffusers' own modules.

use reel::cpu::{timestep_embedding, wan_rope_tables};
use reel::io::TensorFile;

use crate::data;

fn file() -> TensorFile {
    TensorFile::open(&data("embeddings").join("embeddings.safetensors")).unwrap()
}

#[test]
fn rope_tables_match_diffusers() {
    let f = file();
    for hd in [128usize, 24, 16] {
        let grid = f.tensor(&format!("rope_grid_{hd}")).unwrap();
        let g: Vec<usize> = grid.data().iter().map(|&v| v as usize).collect();
        let ours = wan_rope_tables(hd, g[0], g[1], g[2], 10000.0);
        for (which, table) in [("cos", &ours.cos), ("sin", &ours.sin)] {
            let theirs = f.tensor(&format!("rope_{which}_{hd}")).unwrap();
            assert_eq!(theirs.shape(), &[ours.tokens, hd]);
            // diffusers repeat-interleaves each pair's value; the rotation reads [..., 0::2].
            let mut worst = 0.0f32;
            for tok in 0..ours.tokens {
                for p in 0..hd / 2 {
                    let a = table[tok * hd / 2 + p];
                    let b0 = theirs.data()[tok * hd + 2 * p];
                    let b1 = theirs.data()[tok * hd + 2 * p + 1];
                    assert_eq!(b0, b1);
                    worst = worst.max((a - b0).abs());
                }
            }
            // Both round the same f64 value to f32: equal up to an ulp of f64 pow.
            assert!(worst <= 1.2e-7, "head_dim {hd} {which}: max |diff| {worst}");
        }
    }
}

#[test]
fn timestep_embedding_matches_diffusers() {
    let f = file();
    let t = f.tensor("timesteps").unwrap();
    for dim in [256usize, 32] {
        let theirs = f.tensor(&format!("timestep_embedding_{dim}")).unwrap();
        let ours = timestep_embedding(t.data(), dim, true, 0.0, 10000.0);
        assert_eq!(theirs.shape(), &[t.numel(), dim]);
        // torch's f32 exp is not correctly rounded (2 of 128 frequencies differ from the
        // correctly rounded value by an ulp here), and the angle t·ω magnifies an ulp of ω
        // (≤ 1.2e-7 relative) by t. So the bound per element is 1e-6 + 2 ulp·|t|.
        for (row, &tv) in t.data().iter().enumerate() {
            let bound = 1e-6 + 2.4e-7 * tv.abs();
            for i in 0..dim {
                let (a, b) = (ours[row * dim + i], theirs.data()[row * dim + i]);
                assert!(
                    (a - b).abs() <= bound,
                    "dim {dim}, t = {tv}, element {i}: {a} vs {b}"
                );
            }
        }
    }
}
