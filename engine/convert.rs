//! `reel convert`: a Wan DiT checkpoint in Wan's original key layout (the layout of the
//! Wan2.1 release and of Self-Forcing / LongLive, `blocks.N.self_attn.q.weight`, ...) to the
//! diffusers layout reel loads (`blocks.N.attn1.to_q.weight`, ...), merging a LoRA (peft's
//! `lora_A` / `lora_B`) with its scale. The output is a transformer folder: config.json
//! (inferred from the shapes), the weights in one safetensors file written tensor by tensor
//! (memory: one tensor), and with `--causal` the causal_config.json of a published
//! block-causal model.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::models::wan_dit::{CausalConfig, WanDit, WanDitConfig, CLASS_NAME};
use crate::weights::{Dtype, TensorEntry, WeightStore};

/// What `reel convert` takes.
#[derive(Debug, Clone)]
pub struct ConvertArgs {
    /// A .safetensors file or a folder of them (shards).
    pub input: PathBuf,
    /// A LoRA in peft's layout (.safetensors), merged as W + scale·B·A.
    pub lora: Option<PathBuf>,
    /// peft merges with alpha / rank: give that (LongLive: 256 / 256 = 1).
    pub lora_scale: f32,
    /// Attention heads (the shapes do not say; Wan's heads are 128 wide).
    pub heads: Option<usize>,
    /// Output dtype: None keeps each tensor's.
    pub dtype: Option<Dtype>,
    /// Write the causal_config.json of a published block-causal model.
    pub causal: Option<CausalPreset>,
    /// The transformer folder to write.
    pub out: PathBuf,
}

/// The published block-causal fine-tunes of Wan2.1-T2V-1.3B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CausalPreset {
    /// Self-Forcing (DMD): chunks of 3, no sink, 21 frames attended.
    SelfForcing,
    /// LongLive: chunks of 3, a sink of 3, 12 frames attended.
    Longlive,
}

impl CausalPreset {
    pub fn config(self) -> CausalConfig {
        let (sink, local) = match self {
            CausalPreset::SelfForcing => (0, 21),
            CausalPreset::Longlive => (3, 12),
        };
        CausalConfig {
            chunk_frames: 3,
            sink_frames: sink,
            local_attn_frames: local,
            denoising_steps: vec![1000.0, 750.0, 500.0, 250.0],
            timestep_shift: 5.0,
            context_timestep: 0.0,
            sampler: Default::default(),
            guidance: 1.0,
            guidance_steps: Vec::new(),
            previous_frame_sigma: None,
        }
    }
}

/// Where a checkpoint's keys start: prefixes before these (`model.`, `generator.`, FSDP's)
/// are dropped.
const ROOTS: [&str; 6] = [
    "patch_embedding.",
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "blocks.",
    "head.",
];

/// The key without what comes before its root, or None when it has no root.
fn strip_prefix(key: &str) -> Option<(&str, &str)> {
    ROOTS
        .iter()
        .filter_map(|r| {
            let at = if key.starts_with(r) {
                Some(0)
            } else {
                key.find(&format!(".{r}")).map(|i| i + 1)
            };
            at.map(|i| (&key[..i], &key[i..]))
        })
        .min_by_key(|(p, _)| p.len())
}

/// The diffusers name of a Wan original name (the module trees of wan/modules/model.py and
/// diffusers' WanTransformer3DModel).
pub fn diffusers_name(wan: &str) -> Option<String> {
    const TOP: [(&str, &str); 7] = [
        (
            "time_embedding.0.",
            "condition_embedder.time_embedder.linear_1.",
        ),
        (
            "time_embedding.2.",
            "condition_embedder.time_embedder.linear_2.",
        ),
        (
            "text_embedding.0.",
            "condition_embedder.text_embedder.linear_1.",
        ),
        (
            "text_embedding.2.",
            "condition_embedder.text_embedder.linear_2.",
        ),
        ("time_projection.1.", "condition_embedder.time_proj."),
        ("head.head.", "proj_out."),
        ("patch_embedding.", "patch_embedding."),
    ];
    if wan == "head.modulation" {
        return Some("scale_shift_table".into());
    }
    for (a, b) in TOP {
        if let Some(rest) = wan.strip_prefix(a) {
            return Some(format!("{b}{rest}"));
        }
    }
    let rest = wan.strip_prefix("blocks.")?;
    let (n, rest) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    const BLOCK: [(&str, &str); 16] = [
        ("self_attn.q.", "attn1.to_q."),
        ("self_attn.k.", "attn1.to_k."),
        ("self_attn.v.", "attn1.to_v."),
        ("self_attn.o.", "attn1.to_out.0."),
        ("self_attn.norm_q.", "attn1.norm_q."),
        ("self_attn.norm_k.", "attn1.norm_k."),
        ("cross_attn.q.", "attn2.to_q."),
        ("cross_attn.k.", "attn2.to_k."),
        ("cross_attn.v.", "attn2.to_v."),
        ("cross_attn.o.", "attn2.to_out.0."),
        ("cross_attn.norm_q.", "attn2.norm_q."),
        ("cross_attn.norm_k.", "attn2.norm_k."),
        // Wan's norm3 is the affine norm before cross-attention, diffusers' norm2.
        ("norm3.", "norm2."),
        ("ffn.0.", "ffn.net.0.proj."),
        ("ffn.2.", "ffn.net.2."),
        ("modulation", "scale_shift_table"),
    ];
    for (a, b) in BLOCK {
        if rest == a || (a.ends_with('.') && rest.starts_with(a)) {
            return Some(format!("blocks.{n}.{b}{}", &rest[a.len()..]));
        }
    }
    None
}

/// One LoRA pair: A [r, in], B [out, r].
struct LoraPair {
    a: TensorEntry,
    b: TensorEntry,
}

/// The LoRA's pairs by the Wan name of the weight they change.
fn lora_pairs(store: &WeightStore, path: &Path) -> Result<BTreeMap<String, LoraPair>> {
    let bad = |reason: String| Error::Config {
        path: path.to_path_buf(),
        reason,
    };
    let mut a = BTreeMap::new();
    let mut b = BTreeMap::new();
    for e in store.entries() {
        let (_, key) = strip_prefix(&e.name)
            .ok_or_else(|| bad(format!("`{}` is not a LoRA tensor of a Wan block", e.name)))?;
        // peft: <module>.lora_A.weight, or with the adapter's name <module>.lora_A.<name>.weight.
        let (module, kind) = ["lora_A", "lora_B"]
            .iter()
            .find_map(|k| key.split_once(&format!(".{k}.")).map(|(m, _)| (m, *k)))
            .ok_or_else(|| {
                bad(format!(
                    "`{}` is neither a lora_A nor a lora_B weight",
                    e.name
                ))
            })?;
        let target = format!("{module}.weight");
        let map = if kind == "lora_A" { &mut a } else { &mut b };
        if map.insert(target.clone(), e.clone()).is_some() {
            return Err(bad(format!("two {kind} tensors for `{target}`")));
        }
    }
    let mut pairs = BTreeMap::new();
    for (target, ea) in a {
        let eb = b
            .remove(&target)
            .ok_or_else(|| bad(format!("`{target}` has a lora_A but no lora_B")))?;
        pairs.insert(target, LoraPair { a: ea, b: eb });
    }
    if let Some(t) = b.keys().next() {
        return Err(bad(format!("`{t}` has a lora_B but no lora_A")));
    }
    Ok(pairs)
}

/// The diffusers config of a checkpoint, from its shapes.
fn infer_config(
    shapes: &BTreeMap<String, Vec<usize>>,
    heads: Option<usize>,
    input: &Path,
) -> Result<WanDitConfig> {
    let bad = |reason: String| Error::Config {
        path: input.to_path_buf(),
        reason,
    };
    let shape = |name: &str| {
        shapes
            .get(name)
            .ok_or_else(|| bad(format!("the checkpoint has no `{name}`")))
    };
    let patch = shape("patch_embedding.weight")?;
    if patch.len() != 5 {
        return Err(bad(format!("patch_embedding.weight is {patch:?}, not 5-D")));
    }
    let d = patch[0];
    let heads = heads.unwrap_or(d / 128);
    if heads == 0 || d % heads != 0 {
        return Err(bad(format!(
            "inner dim {d} does not split into {heads} heads: give --heads"
        )));
    }
    let layers = (0..)
        .take_while(|n| shapes.contains_key(&format!("blocks.{n}.self_attn.q.weight")))
        .count();
    let head = shape("head.head.weight")?;
    let pv = patch[2] * patch[3] * patch[4];
    if head.is_empty() || head[0] % pv != 0 {
        return Err(bad(format!(
            "head.head.weight {head:?} is not a multiple of the patch volume {pv}"
        )));
    }
    Ok(WanDitConfig {
        patch_size: [patch[2], patch[3], patch[4]],
        num_attention_heads: heads,
        attention_head_dim: d / heads,
        in_channels: patch[1],
        out_channels: Some(head[0] / pv),
        text_dim: shape("text_embedding.0.weight")?
            .get(1)
            .copied()
            .unwrap_or(0),
        freq_dim: shape("time_embedding.0.weight")?
            .get(1)
            .copied()
            .unwrap_or(0),
        ffn_dim: shape("blocks.0.ffn.0.weight")?[0],
        num_layers: layers,
        cross_attn_norm: shapes.contains_key("blocks.0.norm3.weight"),
        ..WanDitConfig::default()
    })
}

/// Writes safetensors from (name, dtype, shape) headers and a function producing each
/// tensor's bytes in order, one at a time.
fn write_streamed(
    path: &Path,
    tensors: &[(String, Dtype, Vec<usize>)],
    mut bytes_of: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    let width = |d: Dtype| match d {
        Dtype::F32 => 4,
        _ => 2,
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<usize>() * width(*dtype);
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.to_string(),
                "shape": shape,
                "data_offsets": [offset, offset + n],
            }),
        );
        offset += n;
    }
    let mut head = serde_json::to_string(&header).map_err(|e| Error::invalid(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(' ');
    }
    let tmp = crate::io::temp_name(path);
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let result = (|| {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, &file);
        w.write_all(&(head.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(head.as_bytes()).map_err(io)?;
        for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
            let b = bytes_of(i)?;
            let n = shape.iter().product::<usize>() * width(*dtype);
            if b.len() != n {
                return Err(Error::invalid(format!(
                    "`{name}`: {} bytes, expected {n}",
                    b.len()
                )));
            }
            w.write_all(&b).map_err(io)?;
        }
        w.flush().map_err(io)
    })();
    match result {
        Ok(()) => crate::io::publish(file, &tmp, path),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => bytemuck::cast_slice(values).to_vec(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        _ => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// What a conversion did, for the command's report.
#[derive(Debug)]
pub struct Converted {
    pub tensors: usize,
    pub lora_merged: usize,
    pub config: WanDitConfig,
}

/// Converts `args.input` into a transformer folder `args.out`.
pub fn convert(args: &ConvertArgs) -> Result<Converted> {
    let store = if args.input.is_dir() {
        WeightStore::open_component(&args.input)?
    } else {
        WeightStore::open_file(&args.input)?
    };
    let bad = |reason: String| Error::Config {
        path: args.input.clone(),
        reason,
    };
    if let Some(d) = args.dtype {
        if !matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(Error::invalid(format!("--dtype {d}: f32, bf16 or f16")));
        }
    }
    if let Some(e) = store
        .entries()
        .find(|e| e.name.contains("condition_embedder.") || e.name.contains(".attn1."))
    {
        return Err(bad(format!(
            "`{}`: the checkpoint is already in diffusers' layout; reel loads it as it is",
            e.name
        )));
    }
    if let Some(e) = store
        .entries()
        .find(|e| e.name.contains(".lora_A.") || e.name.contains(".lora_B."))
    {
        return Err(bad(format!(
            "`{}` is a LoRA tensor: give the base checkpoint, and this file as --lora",
            e.name
        )));
    }
    // LongLive 2.0 exports a materialized NVFP4 generator (FourOverSix's packed 4-bit
    // weights and their scales in place of each linear's weight): not weights reel can read.
    if let Some(e) = store
        .entries()
        .find(|e| e.name.contains(".quantized_weight"))
    {
        return Err(bad(format!(
            "`{}`: a materialized NVFP4 checkpoint (LongLive 2.0's FourOverSix export); \
             reel converts f32, bf16 or f16 weights: give the unquantized generator checkpoint",
            e.name
        )));
    }
    // Wan name → (entry, diffusers name).
    let mut prefix: Option<String> = None;
    let mut by_wan: BTreeMap<String, (TensorEntry, String)> = BTreeMap::new();
    for e in store.entries() {
        let (p, key) = strip_prefix(&e.name)
            .ok_or_else(|| bad(format!("`{}` is not a tensor of a Wan DiT", e.name)))?;
        match &prefix {
            Some(q) if q != p => {
                return Err(bad(format!(
                "keys with two prefixes, `{q}` and `{p}` (`{}`): convert one state dict at a time",
                e.name
            )))
            }
            _ => prefix = Some(p.to_string()),
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(bad(format!(
                "`{}` is {}: expected F32, BF16 or F16",
                e.name, e.dtype
            )));
        }
        let name = diffusers_name(key).ok_or_else(|| {
            bad(format!(
                "`{}`: not a weight of Wan's DiT (an I2V or VACE model?)",
                e.name
            ))
        })?;
        by_wan.insert(key.to_string(), (e.clone(), name));
    }
    let shapes: BTreeMap<String, Vec<usize>> = by_wan
        .iter()
        .map(|(k, (e, _))| (k.clone(), e.shape.clone()))
        .collect();
    let config = infer_config(&shapes, args.heads, &args.input)?;
    config.validate(&args.input)?;
    if let Some(preset) = args.causal {
        let inner = config.num_attention_heads * config.attention_head_dim;
        if (config.in_channels, inner, config.num_layers) != (16, 1536, 30) {
            tracing::warn!(
                "--causal {}: the preset holds the values of the published fine-tunes of Wan2.1-T2V-1.3B (16 latent \
                 channels, width 1536, 30 blocks); this checkpoint has {} latent channels, width {inner} \
                 and {} blocks. LongLive 2.0 is Wan2.2-TI2V-5B (48 channels; chunks of 8, a sink of 8, \
                 32 frames), whose VAE reel does not serve. Check causal_config.json.",
                clap::ValueEnum::to_possible_value(&preset).map_or_else(String::new, |v| v.get_name().to_string()),
                config.in_channels,
                config.num_layers
            );
        }
    }

    let (lora_store, pairs) = match &args.lora {
        Some(p) => {
            let s = WeightStore::open_file(p)?;
            let pairs = lora_pairs(&s, p)?;
            (Some(s), pairs)
        }
        None => (None, BTreeMap::new()),
    };
    if !(args.lora_scale.is_finite()) {
        return Err(Error::invalid("--lora-scale must be a finite number"));
    }
    for (target, pair) in &pairs {
        let lp = args.lora.as_deref().unwrap_or(Path::new(""));
        let w = by_wan.get(target).ok_or_else(|| Error::Config {
            path: lp.to_path_buf(),
            reason: format!("the LoRA changes `{target}`, which the checkpoint does not have"),
        })?;
        let (ws, sa, sb) = (&w.0.shape, &pair.a.shape, &pair.b.shape);
        if ws.len() != 2
            || sa.len() != 2
            || sb.len() != 2
            || sa[1] != ws[1]
            || sb[0] != ws[0]
            || sa[0] != sb[1]
        {
            return Err(Error::Config {
                path: lp.to_path_buf(),
                reason: format!(
                    "`{target}` is {ws:?}, its LoRA A {sa:?} and B {sb:?}: expected A [r, {}] and B [{}, r]",
                    ws.get(1).copied().unwrap_or(0),
                    ws.first().copied().unwrap_or(0)
                ),
            });
        }
    }

    // Every tensor the diffusers model needs must be there, and nothing else.
    let expected: BTreeMap<String, Vec<usize>> =
        WanDit::weight_specs(&config).into_iter().collect();
    let mut plan: Vec<(String, Dtype, Vec<usize>)> = Vec::new();
    let mut sources: Vec<(TensorEntry, Option<&LoraPair>)> = Vec::new();
    for (wan, (e, name)) in &by_wan {
        let want = expected
            .get(name)
            .ok_or_else(|| bad(format!("`{wan}` ({name}) is not in a model of this config")))?;
        if want != &e.shape {
            return Err(bad(format!(
                "`{wan}` is {:?}; the inferred config needs {want:?} for {name}",
                e.shape
            )));
        }
        plan.push((name.clone(), args.dtype.unwrap_or(e.dtype), e.shape.clone()));
        sources.push((e.clone(), pairs.get(wan)));
    }
    if let Some(missing) = expected
        .keys()
        .find(|k| !plan.iter().any(|(n, _, _)| n == *k))
    {
        return Err(bad(format!("the checkpoint has no tensor for `{missing}`")));
    }

    std::fs::create_dir_all(&args.out).map_err(|source| Error::Io {
        path: args.out.clone(),
        source,
    })?;
    let mut merged = 0;
    write_streamed(
        &args.out.join("diffusion_pytorch_model.safetensors"),
        &plan,
        |i| {
            let (e, lora) = &sources[i];
            let dtype = plan[i].1;
            match lora {
                None if dtype == e.dtype => Ok(store.bytes(e).to_vec()),
                None => Ok(encode(&store.f32(e)?, dtype)),
                Some(pair) => {
                    let ls = lora_store.as_ref().expect("a LoRA store");
                    let mut w = store.f32(e)?.into_owned();
                    let (a, b) = (ls.f32(&pair.a)?, ls.f32(&pair.b)?);
                    let (r, n_in, n_out) = (pair.a.shape[0], pair.a.shape[1], pair.b.shape[0]);
                    // W += scale·B·A, accumulated in f64 per element.
                    let (a, b) = (a.as_ref(), b.as_ref());
                    for o in 0..n_out {
                        let brow = &b[o * r..(o + 1) * r];
                        for j in 0..n_in {
                            let mut acc = 0.0f64;
                            for (k, &bk) in brow.iter().enumerate() {
                                acc += bk as f64 * a[k * n_in + j] as f64;
                            }
                            let wv = &mut w[o * n_in + j];
                            *wv = (*wv as f64 + args.lora_scale as f64 * acc) as f32;
                        }
                    }
                    merged += 1;
                    Ok(encode(&w, dtype))
                }
            }
        },
    )?;
    let mut json = serde_json::to_value(&config).map_err(|e| Error::invalid(e.to_string()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("_class_name".into(), CLASS_NAME.into());
        obj.insert("_diffusers_version".into(), "0.42.1".into());
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::invalid(e.to_string()))?;
    crate::io::write_atomic(&args.out.join("config.json"), text.as_bytes())?;
    if let Some(preset) = args.causal {
        let text = serde_json::to_string_pretty(&preset.config())
            .map_err(|e| Error::invalid(e.to_string()))?;
        crate::io::write_atomic(&args.out.join(CausalConfig::FILE), text.as_bytes())?;
    }
    Ok(Converted {
        tensors: plan.len(),
        lora_merged: merged,
        config,
    })
}
