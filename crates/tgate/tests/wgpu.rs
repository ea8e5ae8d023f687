//! The pipeline on burn-wgpu (Mesa's software Vulkan on CI) against the same references.
#![cfg(feature = "wgpu")]

mod common;

use std::ops::ControlFlow;

use burn::tensor::{DType, Device};
use common::*;
use tgate::loader::{ModelSource, Variant};
use tgate::pipeline::{GenerateParams, Noise, StableDiffusion};
use tgate::pipeline_wuerstchen::{Wuerstchen, WuerstchenParams};
use tgate::tgate::GateConfig;

/// The wgpu runtime can be initialised once per process: share one device.
fn gpu() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            Device::wgpu_options()
                .init()
                .expect("a wgpu adapter (install mesa-vulkan-drivers)")
        })
        .clone()
}

fn check(name: &str, sched: &str, run: &str, dtype: DType) {
    let device = gpu();
    let src: Box<dyn ModelSource> = if name.starts_with("bk-") {
        Box::new(small_model(name))
    } else {
        Box::new(source(name))
    };
    let model = StableDiffusion::load_as(src.as_ref(), Variant::Auto, dtype, &device)
        .expect("loads on wgpu");
    let json = reference_json(name);
    let r = reference(name);
    let gate = (run != "full").then(|| {
        let g = &json["gate_runs"][run];
        let n = |k: &str| g[k].as_u64().unwrap() as usize;
        GateConfig {
            gate_step: n("gate_step"),
            sp_interval: n("sp_interval"),
            fi_interval: n("fi_interval"),
            warm_up: n("warm_up"),
        }
    });
    let p = GenerateParams {
        prompt: json["prompt"].as_str().unwrap().into(),
        negative_prompt: json["negative_prompt"].as_str().unwrap().into(),
        steps: json["steps"].as_u64().unwrap() as usize,
        guidance: json["guidance"].as_f64().unwrap(),
        scheduler: Some(sched.parse().unwrap()),
        width: 64,
        height: 64,
        gate,
        deep_cache: None,
        noise: Noise::Tensors {
            noise: host(&r, "pipe.noise").data,
            step_noise: Some(host(&r, "pipe.step_noise").data),
        },
        clip_skip: 0,
    };
    let out = model
        .generate_latents(&p, &mut |_| ControlFlow::Continue(()))
        .expect("generates");
    let rel = if dtype == DType::F16 { HALF_GPU } else { 1e-3 };
    assert_close(out.latents, &r, &format!("pipe.{sched}.{run}"), rel);
}

/// Würstchen on wgpu: the gated prior, the decoder (grouped and transposed convolutions, pixel
/// (un)shuffle, the resize matmuls) and Stage A.
fn check_wuerstchen(dtype: DType) {
    let device = gpu();
    let model = Wuerstchen::load_as(&source("wuerstchen"), None, Variant::Auto, dtype, &device)
        .expect("loads on wgpu");
    let rel = if dtype == DType::F16 { HALF_GPU } else { 1e-3 };
    let json = reference_json("wuerstchen");
    let r = reference("wuerstchen");
    let mut p = WuerstchenParams::new(json["prompt"].as_str().unwrap(), wuerstchen_noise());
    p.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
    p.width = 128;
    p.height = 256;
    p.prior_steps = 6;
    p.decoder_steps = 4;
    p.gate_step = Some(2);
    let go = &mut |_: &tgate::pipeline::StepInfo| ControlFlow::Continue(());
    let prior = model.generate_prior(&p, go).expect("prior");
    assert_close(prior.latents.clone(), &r, "gate2.prior_latents", rel);
    let dec = model
        .generate_decoder(prior.latents, &p, go)
        .expect("decoder");
    assert_close(dec.latents.clone(), &r, "gate2.decoder_latents", rel);
    let image = model.decode(tensor(&r, "pipe.decoder_latents", &device));
    let image_rel = if dtype == DType::F16 {
        HALF_IMAGE
    } else {
        1e-3
    };
    assert_close(image, &r, "pipe.image", image_rel);
}

/// An LCM-distilled UNet (guidance embedding, `LCMScheduler`, one batch) under the no-guidance
/// gate, with the folder's defaults (4 steps, guidance 8.5, gate step 2).
fn check_lcm() {
    use tgate::text_to_image::{GateKnobs, NoiseSource, Request};
    let model = load_pipeline(&small_model("lcm"), &gpu());
    let r = reference("lcm");
    let (n, s) = (host(&r, "pipe.noise"), host(&r, "pipe.step_noise"));
    let bytes = tgate::safetensors::write_f32(&[
        ("noise", &n.shape, &n.data),
        ("step_noise", &s.shape, &s.data),
    ]);
    let mut req = Request::new(
        reference_json("lcm")["prompt"].as_str().unwrap(),
        NoiseSource::File {
            name: "noise".into(),
            bytes,
        },
    );
    req.gate = Some(GateKnobs::default());
    let out = model
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .expect("generates");
    assert_close(out.latents[0].1.clone(), &r, "pipe.lcm.gated", 1e-3);
}

/// T-GATE + DeepCache (tgate's `TgateSDDeepCacheLoader`; PNDM, interval 2, branch 4: a down
/// block cut part-way) on sd1.
fn check_deepcache() {
    use tgate::deepcache::DeepCacheConfig;
    use tgate::text_to_image::{GateKnobs, NoiseSource, Request};
    let model = load_pipeline(&source("sd1"), &gpu());
    let r = reference("sd1");
    let json = reference_json("sd1");
    let (n, s) = (host(&r, "pipe.noise"), host(&r, "pipe.step_noise"));
    let bytes = tgate::safetensors::write_f32(&[
        ("noise", &n.shape, &n.data),
        ("step_noise", &s.shape, &s.data),
    ]);
    let mut req = Request::new(
        json["prompt"].as_str().unwrap(),
        NoiseSource::File {
            name: "noise".into(),
            bytes,
        },
    );
    req.negative_prompt = json["negative_prompt"].as_str().unwrap().into();
    req.steps = json["steps"].as_u64().map(|v| v as usize);
    req.scheduler = Some("pndm".into());
    req.gate = Some(GateKnobs {
        step: Some(3),
        ..GateKnobs::default()
    });
    req.deep_cache = Some(DeepCacheConfig {
        interval: 2,
        branch: 4,
    });
    let out = model
        .generate(&req, &mut |_| ControlFlow::Continue(()))
        .expect("generates");
    assert_close(
        out.latents[0].1.clone(),
        &reference("deepcache"),
        "pipe.tgate_deepcache.pndm.i2b4",
        1e-3,
    );
}

/// Attention split by query rows (to fit the binding limit) on wgpu's attention kernels.
fn check_split_attention() {
    use burn::tensor::{Distribution, Tensor};
    let device = gpu();
    let t = |n: usize| Tensor::<3>::random([2, n, 16], Distribution::Normal(0.0, 1.0), &device);
    let (q, k, v) = (t(256), t(256), t(256));
    // The split belongs to burn's attention; tgate's own kernel builds no score matrix.
    tgate::nn::set_custom_kernels(false);
    let attend = |limit| {
        tgate::nn::multi_head_attention(q.clone(), k.clone(), v.clone(), 4, None, false, limit)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(
        tgate::nn::attention_row_block(8, 256, 256, Some(100_000)),
        Some(12)
    );
    let (err, scale) = compare(&attend(Some(100_000)), &attend(None));
    eprintln!("wgpu split attention: max abs err {err:.3e} (scale {scale:.3})");
    assert!(err <= 1e-5 * scale, "split attention differs: {err}");
    tgate::nn::set_custom_kernels(true);
}

/// tgate's attention kernel (`shaders/`) against burn's attention on random inputs: SD's head
/// dims and odd ones, query counts that leave a cube partly empty, key counts below, at and
/// past a shared-memory tile, f32 and (where the adapter has it) f16. It runs inside the
/// launch-counter test (the launch observer is one per process).
fn check_attention_kernel() {
    use burn::tensor::{Distribution, Tensor};
    let device = gpu();
    let cases = [
        // (batch, n_q, n_k, heads, head_dim)
        (2, 64, 77, 8, 40),
        (1, 33, 77, 2, 80),
        (2, 16, 16, 1, 160),
        (1, 100, 130, 3, 64),
        (2, 5, 1, 2, 8),
        (1, 1, 200, 1, 3),
        (1, 70, 45, 4, 16),
    ];
    for dtype in kernel_dtypes(&device) {
        for (b, n_q, n_k, heads, d) in cases {
            let t = |n: usize| {
                Tensor::<3>::random([b, n, heads * d], Distribution::Normal(0.0, 1.5), &device)
                    .cast(dtype)
            };
            let (q, k, v) = (t(n_q), t(n_k), t(n_k));
            let attend = || {
                let out = tgate::nn::multi_head_attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    heads,
                    None,
                    false,
                    None,
                );
                assert_eq!(out.dims(), [b, n_q, heads * d]);
                assert_eq!(out.dtype(), dtype);
                host_f32(out)
            };
            let tol = if dtype == DType::F16 { 2e-3 } else { 4e-6 };
            let label = format!("attention kernel {dtype:?} b{b} q{n_q} k{n_k} h{heads} d{d}");
            custom_kernel_matches_burn(&label, "TgateAttention", tol, &attend);
        }
    }
    // Two sets of keys and values walked one after the other (Würstchen's image tokens, as
    // views of the joined q/k/v projection, then the text's) against burn's attention over
    // their concatenation.
    let joined = [
        // (batch, n_q, n_k, n_k2, heads, head_dim)
        (2, 64, 64, 77, 4, 32),
        (1, 37, 37, 5, 3, 24),
        (2, 9, 1, 13, 2, 16),
        (1, 70, 130, 1, 1, 40),
    ];
    for dtype in kernel_dtypes(&device) {
        for (b, n_q, n_k, n_k2, heads, d) in joined {
            let inner = heads * d;
            let t = |n: usize, width: usize| {
                Tensor::<3>::random([b, n, width], Distribution::Normal(0.0, 1.5), &device)
                    .cast(dtype)
            };
            let kv = t(n_k, 2 * inner);
            let (k, v) = (kv.clone().narrow(2, 0, inner), kv.narrow(2, inner, inner));
            let (q, k2, v2) = (t(n_q, inner), t(n_k2, inner), t(n_k2, inner));
            let attend = || {
                let out = tgate::nn::multi_head_attention_joined(
                    q.clone(),
                    (k.clone(), v.clone()),
                    (k2.clone(), v2.clone()),
                    heads,
                    None,
                );
                assert_eq!(out.dims(), [b, n_q, inner]);
                assert_eq!(out.dtype(), dtype);
                host_f32(out)
            };
            let tol = if dtype == DType::F16 { 2e-3 } else { 4e-6 };
            let label =
                format!("joined attention {dtype:?} b{b} q{n_q} k{n_k}+{n_k2} h{heads} d{d}");
            custom_kernel_matches_burn(&label, "TgateAttention", tol, &attend);
        }
    }
}

/// The dtypes the kernel checks run in: f32, and f16 where the adapter has `shader-f16`.
fn kernel_dtypes(device: &Device) -> Vec<DType> {
    if device.supports_dtype(DType::F16) {
        vec![DType::F32, DType::F16]
    } else {
        eprintln!("no shader-f16 on this adapter: tgate's kernels are checked in f32 only");
        vec![DType::F32]
    }
}

fn host_f32<const D: usize>(t: burn::tensor::Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap()
}

/// Runs `run` with tgate's kernels (observed: `kernel` must launch; other tests of the process
/// may add launches, so counts are lower bounds) and with burn's ops only; the two agree within
/// `tol` × the values' scale.
fn custom_kernel_matches_burn(label: &str, kernel: &str, tol: f32, run: &dyn Fn() -> Vec<f32>) {
    use tgate::profile::{observe, Timing};
    tgate::nn::set_custom_kernels(true);
    let (ours, launches) = observe(Timing::Off, run);
    tgate::nn::set_custom_kernels(false);
    let theirs = run();
    tgate::nn::set_custom_kernels(true);
    let launched: usize = launches
        .kernels
        .iter()
        .filter(|(name, _)| name.starts_with(kernel))
        .map(|(_, s)| s.launches)
        .sum();
    assert!(launched >= 1, "{label}: {:?}", launches.kernels.keys());
    let (err, scale) = compare(&ours, &theirs);
    eprintln!("{label}: max abs err {err:.2e} (scale {scale:.2})");
    assert!(err <= tol * scale.max(1.0), "{label}: {err}");
}

/// The VAE's largest map as the binding-limit check counts it: in f16 on wgpu tgate's norm
/// kernel keeps it in f16 (2 bytes an element; SD 1.5's 256×512×512 map at 512² is then exactly
/// WebGPU's default 128 MiB), where burn's ops (the CPU) copy it to f32.
fn check_f16_map_size() {
    let load = |device: &Device| {
        StableDiffusion::load_as(&source("sd1"), Variant::Auto, DType::F16, device)
            .expect("loads in f16")
    };
    // The fixture's VAE: 16 channels at full size.
    let side = 256;
    let on_gpu = load(&gpu()).vae.largest_activation(side / 8, side / 8);
    assert_eq!(on_gpu.bytes, 16 * 256 * 256 * 2, "{}", on_gpu.what);
    let on_cpu = load(&cpu()).vae.largest_activation(side / 8, side / 8);
    assert_eq!(on_cpu.bytes, 16 * 256 * 256 * 4, "{}", on_cpu.what);
}

/// One test, so kernels compiled for the first case serve the others.
#[test]
fn wgpu_pipelines_match_references() {
    check("sd1", "pndm", "full", DType::F32);
    check("sd1", "pndm", "tgate", DType::F32);
    check("sd2", "ddim", "tgate_sp", DType::F32);
    check("sd2", "euler-a", "tgate", DType::F32);
    // BK-SDM-Tiny's shape: no mid block, two levels, one layer per block.
    check("bk-sdm-tiny", "ddim", "tgate", DType::F32);
    check_lcm();
    check_deepcache();
    check_wuerstchen(DType::F32);
    check_split_attention();
    // The f16 kernels, where the adapter has `shader-f16` (lavapipe does on CPUs with F16C).
    if gpu().supports_dtype(DType::F16) {
        check("sd1", "pndm", "tgate", DType::F16);
        check_wuerstchen(DType::F16);
        check_f16_map_size();
    } else {
        eprintln!("this adapter has no shader-f16: the f16 path is checked on the CPU only");
    }
}

/// The launch counter behind the benchmark's and the browser's launch counts sees wgpu's kernels
/// (other tests of this process may add to the counts: lower bounds only).
#[test]
fn launch_counter_sees_wgpu_kernels() {
    use burn::tensor::Tensor;
    use tgate::profile::{observe, Timing};
    let device = gpu();
    let a = Tensor::<2>::ones([64, 64], &device);
    let ((), l) = observe(Timing::Off, || {
        let _ = a.clone().matmul(a.clone()).into_data();
    });
    assert!(l.total() >= 1 && l.distinct >= 1, "{l:?}");
    let matmuls = l
        .by_class()
        .into_iter()
        .find(|(c, _)| *c == "matmul")
        .unwrap()
        .1;
    assert!(matmuls.launches >= 1, "{:?}", l.kernels.keys());
    check_attention_kernel();
    check_norm_kernel();
}

/// tgate's norm kernel (`shaders/`) against burn's composition: GroupNorm with and without
/// SiLU, LayerNorm and Würstchen's channel norm, f32 and (where the adapter has it) f16; groups of 1 to thousands of
/// values (one cube walks a row however long), channels per group of 1 and many, a
/// channels-last and strided inputs. The kernel must launch (the pipelines test runs alongside:
/// launch counts are lower bounds).
fn check_norm_kernel() {
    use burn::tensor::{Distribution, Tensor};
    use tgate::nn::{GroupNorm, LayerNorm};
    use tgate::weights::Weights;
    use tgate::wuerstchen_common::ChannelNorm;
    let device = gpu();
    let compare_paths = |label: String, run: &dyn Fn() -> Tensor<4>, dtype: DType| {
        let tol = if dtype == DType::F16 { 4e-3 } else { 4e-6 };
        let host = || {
            let out = run();
            assert_eq!(out.dtype(), dtype, "{label}");
            host_f32(out)
        };
        custom_kernel_matches_burn(&label, "TgateNorm", tol, &host);
    };
    for dtype in kernel_dtypes(&device) {
        // (batch, channels, groups, h, w)
        for (b, c, groups, h, w) in [
            (2, 64, 32, 8, 8),
            (1, 6, 3, 7, 5),
            (2, 32, 32, 1, 1),
            (1, 8, 1, 40, 30),
            // Groups over 4096 values take the cube-per-row kernel, shorter ones a unit each.
            (2, 64, 4, 16, 20),
            (1, 12, 3, 33, 40),
        ] {
            let norm = GroupNorm::load(
                &Weights::random(c as u64, &device).with_dtype(dtype),
                groups,
                c,
                1e-5,
            )
            .unwrap();
            // Every other case channels last (what cubecl's convolutions produce).
            let x = if (c + h) % 2 == 0 {
                Tensor::<4>::random([b, h, w, c], Distribution::Normal(0.5, 2.0), &device)
                    .cast(dtype)
                    .permute([0, 3, 1, 2])
            } else {
                Tensor::<4>::random([b, c, h, w], Distribution::Normal(0.5, 2.0), &device)
                    .cast(dtype)
            };
            for silu in [false, true] {
                let run = || {
                    if silu {
                        norm.forward_silu(x.clone())
                    } else {
                        norm.forward(x.clone())
                    }
                };
                compare_paths(
                    format!(
                        "group norm {dtype:?} {:?} silu {silu}",
                        (b, c, groups, h, w)
                    ),
                    &run,
                    dtype,
                );
            }
        }
        for dim in [3usize, 320, 1000] {
            let norm = LayerNorm::load(
                &Weights::random(dim as u64, &device).with_dtype(dtype),
                dim,
                1e-5,
            )
            .unwrap();
            // [2, dim, 5] swapped to [2, 5, dim]: the kernel gets a strided input.
            let x = Tensor::<3>::random([2, dim, 5], Distribution::Normal(-0.3, 1.5), &device)
                .cast(dtype)
                .swap_dims(1, 2);
            compare_paths(
                format!("layer norm {dtype:?} dim {dim}"),
                &|| norm.forward(x.clone()).unsqueeze::<4>(),
                dtype,
            );
        }
        // Würstchen's channel norm (no affine) over each pixel's channels: channels-last maps
        // (what the convolutions produce) and contiguous ones; the layer is made inside the
        // run, as it picks the kernel when it loads.
        let w = Weights::random(0, &device);
        for (b, c, h, w_, channels_last) in [
            (2, 256, 12, 12, true),
            (1, 7, 5, 3, false),
            (2, 1536, 3, 2, true),
            (1, 33, 4, 9, false),
        ] {
            let x = if channels_last {
                Tensor::<4>::random([b, h, w_, c], Distribution::Normal(0.7, 3.0), &device)
                    .cast(dtype)
                    .permute([0, 3, 1, 2])
            } else {
                Tensor::<4>::random([b, c, h, w_], Distribution::Normal(0.7, 3.0), &device)
                    .cast(dtype)
            };
            compare_paths(
                format!("channel norm {dtype:?} {:?}", (b, c, h, w_, channels_last)),
                &|| ChannelNorm::load(&w, c).forward(x.clone()),
                dtype,
            );
        }
    }
}

/// The native loops enqueue one step ahead of the one they wait for. On wgpu the readback they
/// wait with is eager (still on its way when more work is queued behind it: a lazy read would be
/// "ready" at once and never wait); a
/// generation run one step ahead equals the same generation waiting after each step, bit for
/// bit; its steps come in order with their own times, enqueue times and MACs; a cancel answers
/// while a step is in flight, and the device then runs the next generation unharmed.
#[test]
fn native_loops_run_one_step_ahead() {
    use burn::tensor::{Distribution, Tensor};
    use tgate::error::Error;
    use tgate::stage::{set_one_ahead, Readback};
    use tgate::text_to_image::{read_f32, NoiseSource, Request};
    let device = gpu();

    // About half a second of work on lavapipe, then a read of its result. The other tests of
    // this binary share the device, and their waits also wait for this work: a read may find
    // it done by them, so a few tries are allowed (a lazy read is ready every time).
    let on_its_way = (0..5).any(|_| {
        let mut x = Tensor::<2>::random([384, 384], Distribution::Default, &device);
        for _ in 0..8 {
            x = x.clone().matmul(x) * 1e-3;
        }
        let read = Readback::issue(x.clone().slice([0..1, 0..1]));
        let was_ready = read.was_ready();
        let got = read.wait().expect("the read completes");
        let expected = x.slice([0..1, 0..1]).into_data();
        assert_eq!(
            got.try_to_vec::<f32>().unwrap(),
            expected.try_to_vec::<f32>().unwrap()
        );
        !was_ready
    });
    assert!(
        on_its_way,
        "a read issued behind unfinished work must be on its way, not ready (a lazy read)"
    );

    let model = load_pipeline(&source("sd1"), &device);
    let mut request = Request::new("a red fox", NoiseSource::Seed(7));
    request.steps = Some(4);
    let run = |ahead: bool| {
        set_one_ahead(ahead);
        let mut seen = Vec::new();
        let out = model.generate(&request, &mut |s| {
            seen.push(s.index);
            ControlFlow::Continue(())
        });
        set_one_ahead(true);
        let out = out.expect("generates");
        // PNDM: 4 steps are 5 UNet iterations.
        let total = out.steps[0].total;
        assert!(total >= 4);
        assert_eq!(
            seen,
            (0..total).collect::<Vec<_>>(),
            "steps reported once each, in order"
        );
        for s in &out.steps {
            assert!(
                s.seconds > 0.0 && s.enqueue_seconds > 0.0 && s.macs > 0,
                "{s:?}"
            );
        }
        read_f32(out.latents[0].1.clone(), "latents").unwrap()
    };
    let ahead = run(true);
    let lockstep = run(false);
    assert_eq!(ahead, lockstep, "one step ahead computes the same latents");

    let cancelled = model.generate(&request, &mut |s| {
        if s.index == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(
        matches!(cancelled, Err(Error::Cancelled)),
        "{:?}",
        cancelled.err()
    );
    assert_eq!(
        run(true),
        ahead,
        "the device is unharmed by the cancelled run"
    );
}

/// The first generation at a size sizes the device's memory pages for its largest map before
/// its text is encoded, so no pool of a larger page size appears later (a growth holds the old
/// pages that still carry live maps beside the new ones: the first generation's transient).
/// The tiny SD at 384²: the decoder's 16×384×384 f32 maps (9 MiB) outgrow every page the text
/// encoder and the UNet ask for and the 8 MiB pages of the pool for small allocations, and the
/// other tests of this binary never allocate that much.
#[test]
fn first_generation_sizes_pages_at_start() {
    use tgate::text_to_image::{NoiseSource, Request};
    let device = gpu();
    let model = load_pipeline(&source("sd1"), &device);
    let mut request = Request::new("a red fox", NoiseSource::Seed(3));
    request.steps = Some(2);
    request.width = Some(384);
    request.height = Some(384);
    let plan = model.plan(&request).expect("plans");
    let largest = model.largest_activation(&plan);
    assert_eq!(largest.bytes, 16 * 384 * 384 * 4, "{}", largest.what);
    // Every allocation fits the pages of its pool: the largest page bounds them all.
    let largest_page = |device: &Device| {
        let report = device.memory_pool_report().expect("wgpu reports its pools");
        report.iter().map(|p| p.page_size).max().unwrap_or(0)
    };
    let mut generation = model.start(plan);
    let first = generation
        .advance()
        .expect("encodes")
        .expect("a first piece");
    let sized = largest_page(&device);
    assert!(
        sized >= largest.bytes,
        "after the text encoding the pages are {sized} bytes, under the generation's largest map ({} bytes)",
        largest.bytes
    );
    let mut probe = first.probe;
    while let Some(advance) = generation.advance().expect("advances") {
        probe = advance.probe;
        assert_eq!(
            largest_page(&device),
            sized,
            "a pool of larger pages appeared during the generation"
        );
    }
    let _ = probe.into_data();
    assert_eq!(
        largest_page(&device),
        sized,
        "a pool of larger pages appeared at the end"
    );
}
