//! Benchmark (not a test): peak device memory of a whole Stable Diffusion 1.5 generation — text
//! encoder, UNet (a planning step with guidance, then a gated step) and VAE decoder — at a given
//! size and dtype, with SD 1.5's shapes and placeholder parameters (zeros made on the device: no
//! weights needed, the memory is the same).
//!
//! ```text
//! cargo run -p tgate --example bench_memory -- [--backend wgpu|cpu] [--size 512] [--dtype f16|f32]
//!     [--max-tensor-mib 128] [--generations 1]
//! ```
//! Writes SD 1.5's part configs (runwayml/stable-diffusion-v1-5: UNet, VAE, CLIP ViT-L/14 text
//! encoder) into `target/bench-memory-sd15/`, with the tiny fixture's tokenizer and scheduler
//! files, loads them with `Pipeline::placeholder` and runs one 2-step generation (DDIM, gate at
//! 1). `--max-tensor-mib N` refuses any parameter over N MiB and splits attention to fit, as on a
//! device with that binding limit (WebGPU's default is 128). Prints the device memory reserved
//! and in use after the load and after the generation, the largest parameter, the highest
//! usage a thread sampling every 5 ms saw during the generation (the pools give emptied pages
//! back as they go, so the reading after is not the peak), and a bound on the peak from the
//! pools' own counters (each pool's most pages at once, read at every step; a bound only when no
//! pool of larger pages appeared between readings, see `PoolPeaks`) with the largest allocation
//! they served. A generation sizes the pages for its largest map before its first piece of work
//! (`ActivationSize::size_device_pages`); the benchmark makes that call itself just before its
//! first reading, so the pool it makes is seen from the start. `--generations N` repeats the
//! request. Built without the `autotune` feature
//! (`--no-default-features --features flex,wgpu`)
//! it uses the kernels the browser build picks by rule, as a WebGPU laptop would: a 512×512 f16
//! run took 40 minutes on lavapipe (2 cores) that way; with autotuning, which runs candidate
//! kernels at every new shape, its UNet steps alone took 76 minutes.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use tgate::loader::DirSource;
use tgate::profile::device_memory;
use tgate::text_to_image::{GateKnobs, ModelKind, NoiseSource, Pipeline, Request};

/// SD 1.5's `unet/config.json` (the keys that shape the network).
const UNET: &str = r#"{"_class_name":"UNet2DConditionModel","block_out_channels":[320,640,1280,1280],
 "layers_per_block":2,
 "down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
 "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
 "attention_head_dim":8,"cross_attention_dim":768,"norm_num_groups":32,"sample_size":64,
 "in_channels":4,"out_channels":4}"#;
/// SD 1.5's `vae/config.json`.
const VAE: &str = r#"{"_class_name":"AutoencoderKL","act_fn":"silu","block_out_channels":[128,256,512,512],
 "down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
 "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"],
 "in_channels":3,"out_channels":3,"latent_channels":4,"layers_per_block":2,"norm_num_groups":32,
 "sample_size":512,"scaling_factor":0.18215}"#;

/// CLIP ViT-L/14's text tower (SD 1.5's `text_encoder/config.json`); the token ids are those of
/// the fixture's tokenizer.
fn text_encoder_config() -> String {
    r#"{"architectures":["CLIPTextModel"],"hidden_act":"quick_gelu","hidden_size":768,
 "intermediate_size":3072,"layer_norm_eps":1e-05,"max_position_embeddings":77,
 "model_type":"clip_text_model","num_attention_heads":12,"num_hidden_layers":12,
 "projection_dim":768,"vocab_size":49408,"bos_token_id":1512,"eos_token_id":1513,"pad_token_id":1513}"#
        .to_string()
}

struct Args {
    backend: String,
    size: usize,
    dtype: DType,
    max_tensor_mib: Option<u64>,
    generations: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        backend: "wgpu".into(),
        size: 512,
        dtype: DType::F16,
        max_tensor_mib: Some(128),
        generations: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--backend" => a.backend = val()?,
            "--size" => a.size = val()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--max-tensor-mib" => {
                a.max_tensor_mib = Some(
                    val()?
                        .parse()
                        .map_err(|e| format!("--max-tensor-mib: {e}"))?,
                )
            }
            "--dtype" => a.dtype = common::dtype(&val()?)?,
            "--generations" => {
                a.generations = val()?.parse().map_err(|e| format!("--generations: {e}"))?;
                if a.generations == 0 {
                    return Err("--generations must be at least 1".into());
                }
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

/// The configs folder: SD 1.5's parts, the fixture's tokenizer and scheduler.
fn configs(root: &Path) -> Result<PathBuf, String> {
    let fixture = root.join("tests/fixtures/sd1");
    let dir = root.join("target/bench-memory-sd15");
    let write = |rel: &str, text: &str| -> Result<(), String> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    let copy = |rel: &str| -> Result<(), String> {
        let text = std::fs::read_to_string(fixture.join(rel))
            .map_err(|e| format!("{}: {e}", fixture.join(rel).display()))?;
        write(rel, &text)
    };
    for rel in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    ] {
        copy(rel)?;
    }
    write("unet/config.json", UNET)?;
    write("vae/config.json", VAE)?;
    write("text_encoder/config.json", &text_encoder_config())?;
    Ok(dir)
}

/// The highest pool usage seen by a thread that asks the device every few milliseconds while
/// the generation runs. The pools give pages back as they empty (a growth to larger pages
/// leaves the old ones to drain), so the reading after the generation is not its peak; this is
/// a lower bound of the peak, exact for anything held longer than the sampling interval where
/// the device answers between kernels (a GPU). On lavapipe, whose kernels run on the host's
/// cores, the device answers rarely: a 256² run got 46 samples in 508 s.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<Peak>>,
}

struct Peak {
    reserved: u64,
    reserved_at: f64,
    in_use: u64,
    samples: usize,
}

impl Sampler {
    const INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

    fn start(device: &burn::tensor::Device) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, device) = (stop.clone(), device.clone());
        let thread = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let mut peak: Option<Peak> = None;
            while !flag.load(Ordering::Relaxed) {
                let (reserved, in_use) = device_memory(&device)?;
                let p = peak.get_or_insert(Peak {
                    reserved,
                    reserved_at: 0.0,
                    in_use,
                    samples: 0,
                });
                if reserved > p.reserved {
                    p.reserved = reserved;
                    p.reserved_at = t0.elapsed().as_secs_f64();
                }
                p.in_use = p.in_use.max(in_use);
                p.samples += 1;
                std::thread::sleep(Self::INTERVAL);
            }
            peak
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Option<Peak> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

/// The pools' own high-water marks, read before a generation, at every step and after it: each
/// dynamic pool counts the most pages it ever held at once and the largest allocation it served,
/// so these need no sampling. Pools are keyed by their page size (the device's arena keeps one
/// pool per page size; an allocation larger than its pages makes a pool of larger pages take
/// over, and the old pool gives its pages back as they empty).
///
/// `bound` adds up, over the pools seen during the generation, each one's most pages × its page
/// size, plus the most seen outside the pools (the parameters' exact-size buffers, staging and
/// uniform buffers). When no pool of a new page size took over between the readings, those were
/// every pool alive during the generation, and the sum bounds its peak from above (pools that
/// peaked at different times are added up). When one did, a pool made and emptied between two
/// readings is not seen, so the sum is not a bound. Before generations sized their pages first,
/// the first one at a new size grew them that way (at 512², a 65 MiB pool inside the decode,
/// which cubecl's memory log shows: `[memory.logger] level = "basic"` in a `cubecl.toml`).
#[derive(Default)]
struct PoolPeaks {
    /// page size -> (most pages at once, largest allocation served), over this generation's
    /// readings.
    pools: std::collections::BTreeMap<u64, (u64, u64)>,
    /// Bytes reserved outside the dynamic pools, the most seen at this generation's readings.
    rest: u64,
    /// The page sizes of the pools present at the previous reading (`None` before the first).
    present: Option<std::collections::BTreeSet<u64>>,
    readings: usize,
    growths: usize,
}

impl PoolPeaks {
    /// Starts a generation's account; the page sizes present carry over (to see growths).
    fn begin(&mut self, device: &burn::tensor::Device) {
        *self = PoolPeaks {
            present: self.present.take(),
            ..PoolPeaks::default()
        };
        self.observe(device);
    }

    fn observe(&mut self, device: &burn::tensor::Device) {
        let (Some(report), Some((reserved, _))) =
            (device.memory_pool_report(), device_memory(device))
        else {
            return;
        };
        let mut held = 0;
        for pool in &report {
            let slot = self.pools.entry(pool.page_size).or_default();
            slot.0 = slot.0.max(pool.pages_peak);
            slot.1 = slot.1.max(pool.largest_alloc);
            held += pool.pages * pool.page_size;
        }
        self.rest = self.rest.max(reserved.saturating_sub(held));
        // Pools are only made when larger pages take over: a page size not present at the
        // previous reading is a growth in between.
        let present: std::collections::BTreeSet<u64> = report.iter().map(|p| p.page_size).collect();
        if let Some(previous) = &self.present {
            self.growths += present.difference(previous).count();
        }
        self.present = Some(present);
        self.readings += 1;
    }

    fn bound(&self) -> u64 {
        self.rest
            + self
                .pools
                .iter()
                .map(|(page, (peak, _))| page * peak)
                .sum::<u64>()
    }

    fn largest_alloc(&self) -> u64 {
        self.pools
            .values()
            .map(|(_, largest)| *largest)
            .max()
            .unwrap_or(0)
    }

    fn print(&self) {
        if self.readings == 0 {
            println!("  this backend reports no pools");
            return;
        }
        for (page, (peak, largest)) in &self.pools {
            println!(
                "  pool of {:>7.1} MiB pages: at most {peak} pages held at once ({:.1} MiB), largest allocation {:.1} MiB",
                mib(*page),
                mib(page * peak),
                mib(*largest)
            );
        }
        let what = if self.growths == 0 {
            "peak bound from the pools' counters"
        } else {
            "pools' peaks seen, added up"
        };
        println!(
            "  {what:<34}: {:>8.1} MiB reserved (each pool's most pages, {:.1} MiB outside the pools; {} readings)",
            mib(self.bound()),
            mib(self.rest),
            self.readings,
        );
        if self.growths > 0 {
            println!(
                "  not a bound: pools of larger pages took over {} times between readings, and a pool made and emptied in between is not seen",
                self.growths
            );
        }
        println!(
            "  {:<34}: {:>8.1} MiB",
            "largest allocation the pools served",
            mib(self.largest_alloc())
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

fn main() {
    let result = parse_args().and_then(|a| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = configs(&root)?;
        let device = common::device(&a.backend)?;
        let limit = a.max_tensor_mib.map(|m| m << 20);
        let cap = limit.map_or("the device's limit".to_string(), |l| {
            format!("{} MiB", l >> 20)
        });
        println!(
            "backend {} ({device:?}), SD 1.5 shapes at {}x{}, {:?}, tensors capped at {cap}",
            a.backend, a.size, a.size, a.dtype
        );
        let src = DirSource::new(&dir).with_max_tensor_bytes(limit);
        let t0 = std::time::Instant::now();
        let model = Pipeline::placeholder(
            &src,
            None,
            Some(ModelKind::StableDiffusion),
            a.dtype,
            &device,
        )
        .map_err(|e| e.to_string())?;
        let memory = |label: &str| match device_memory(&device) {
            Some((reserved, in_use)) => println!(
                "  {label:<34}: {:>8.1} MiB reserved, {:>8.1} MiB in use",
                mib(reserved),
                mib(in_use)
            ),
            None => println!("  {label:<34}: this backend reports no pool usage"),
        };
        println!("  loaded in {:.1} s", t0.elapsed().as_secs_f64());
        memory("after the load (parameters)");
        let mut peaks = PoolPeaks::default();
        peaks.observe(&device);
        let mut request = Request::new(
            "a photograph of an astronaut riding a horse",
            NoiseSource::Seed(0),
        );
        request.steps = Some(2);
        request.scheduler = Some("ddim".into());
        request.width = Some(a.size);
        request.height = Some(a.size);
        request.gate = Some(GateKnobs {
            step: Some(1),
            ..GateKnobs::default()
        });
        for generation in 1..=a.generations {
            println!("generation {generation} of {}", a.generations);
            let plan = model.plan(&request).map_err(|e| e.to_string())?;
            // A generation's first act sizes the pools' pages for its largest map, which makes a
            // pool of that page size at a new size. Done here first (the generation's own call
            // then finds the pages sized), so the readings see that pool from the start: a
            // pool made between two readings could hide another, made and emptied unseen.
            let largest = model.largest_activation(&plan);
            largest
                .size_device_pages(&device)
                .map_err(|e| e.to_string())?;
            println!(
                "  pages sized for {} ({:.1} MiB)",
                largest.what,
                mib(largest.bytes)
            );
            peaks.begin(&device);
            let t0 = std::time::Instant::now();
            let sampler = Sampler::start(&device);
            let out = model
                .start(plan)
                .run(&mut |s| {
                    println!(
                        "  step {} ({}): {:.1} s",
                        s.index,
                        s.phase.name(),
                        s.seconds
                    );
                    peaks.observe(&device);
                    ControlFlow::Continue(())
                })
                .map_err(|e| e.to_string())?;
            println!(
                "  generated a {:?} image in {:.1} s",
                out.image.dims(),
                t0.elapsed().as_secs_f64()
            );
            drop(out);
            memory("after the generation");
            peaks.observe(&device);
            peaks.print();
            if let Some(peak) = sampler.stop() {
                println!(
                    "  {:<34}: {:>8.1} MiB reserved at most (at {:.1} s), {:>8.1} MiB in use at most ({} samples)",
                    "sampled during the generation",
                    mib(peak.reserved),
                    peak.reserved_at,
                    mib(peak.in_use),
                    peak.samples
                );
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
