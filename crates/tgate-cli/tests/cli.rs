//! The `tgate` binary as other tools drive it, against the fixtures' references.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tgate::safetensors::{write_f32, SafeTensors};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tgate"))
        .args(args)
        .output()
        .expect("runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tgate-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn reference() -> SafeTensors {
    let path = fixtures().join("sd1/reference.safetensors");
    SafeTensors::parse("reference", std::fs::read(path).unwrap()).unwrap()
}

/// Writes the reference noise (and step noise) as the CLI's `--noise` file.
fn noise_file(r: &SafeTensors) -> PathBuf {
    let noise = r.read_f32_any("pipe.noise").unwrap();
    let steps = r.read_f32_any("pipe.step_noise").unwrap();
    let path = scratch("noise.safetensors");
    std::fs::write(
        &path,
        write_f32(&[
            ("noise", &noise.shape, &noise.data),
            ("step_noise", &steps.shape, &steps.data),
        ]),
    )
    .unwrap();
    path
}

fn latents(path: &Path) -> Vec<f32> {
    let st = SafeTensors::parse("latents", std::fs::read(path).unwrap()).unwrap();
    st.read_f32("latents", &[1, 4, 8, 8]).unwrap().data
}

fn max_err(a: &[f32], b: &[f32]) -> (f32, f32) {
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    (
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())),
        scale,
    )
}

#[test]
fn generate_matches_diffusers_and_tgate() {
    let r = reference();
    let noise = noise_file(&r);
    let model = fixtures().join("sd1");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("sd1/reference.json")).unwrap())
            .unwrap();
    let cases: [(&str, &[&str], &str); 4] = [
        ("pndm", &["--no-gate"], "pipe.pndm.full"),
        ("pndm", &["--gate-step", "3"], "pipe.pndm.tgate"),
        // Half precision: the same reference within 1% (see crates/tgate/tests/half.rs).
        (
            "pndm",
            &["--gate-step", "3", "--dtype", "f16"],
            "pipe.pndm.tgate",
        ),
        (
            "euler-a",
            &[
                "--gate-step",
                "4",
                "--sp-interval",
                "2",
                "--fi-interval",
                "2",
                "--warm-up",
                "1",
            ],
            "pipe.euler-a.tgate_sa",
        ),
    ];
    for (i, (sched, gate_args, key)) in cases.into_iter().enumerate() {
        let out_latents = scratch(&format!("{key}.{i}.safetensors"));
        let png = scratch(&format!("{key}.{i}.png"));
        let rel = if gate_args.contains(&"f16") {
            1e-2
        } else {
            1e-3
        };
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            json["prompt"].as_str().unwrap(),
            "--negative-prompt",
            json["negative_prompt"].as_str().unwrap(),
            "--steps",
            "8",
            "--guidance",
            "7.5",
            "--scheduler",
            sched,
            "--noise",
            noise.to_str().unwrap(),
            "--save-latents",
            out_latents.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(gate_args);
        let out = tgate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{key}: {stderr}");
        assert!(stderr.contains("total"), "summary printed: {stderr}");
        let expected = r.read_f32_any(key).unwrap().data;
        let (err, scale) = max_err(&latents(&out_latents), &expected);
        assert!(
            err <= rel * scale,
            "{key} {gate_args:?}: max abs err {err} (scale {scale})"
        );
        let png = std::fs::read(&png).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}

#[test]
fn defaults_and_seed_run() {
    let png = scratch("default.png");
    let model = fixtures().join("sd1");
    let out = tgate(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--steps",
        "5",
        "--seed",
        "3",
        "--out",
        png.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Defaults: the folder's scheduler, the paper's gate step (round(0.4 × 5) = 2), 64 px.
    assert!(stderr.contains("scheduler pndm"), "{stderr}");
    assert!(stderr.contains("gate_step 2"), "{stderr}");
    assert!(stderr.contains("64x64"), "{stderr}");
    assert!(stderr.contains("fidelity-improving"), "{stderr}");
}

#[test]
fn tokenize_prints_the_reference_ids() {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("sd1/reference.json")).unwrap())
            .unwrap();
    let case = &json["tokenizer_cases"][0];
    let model = fixtures().join("sd1");
    let out = tgate(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
    ]);
    assert!(out.status.success());
    let ids: Vec<u64> = serde_json::from_slice(&out.stdout).unwrap();
    let expected: Vec<u64> = case["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(ids, expected);
}

#[test]
fn impossible_parameters_fail_with_a_message() {
    let model = fixtures().join("sd1");
    let m = model.to_str().unwrap();
    let cases: [(&[&str], &str); 15] = [
        // Output paths are checked before anything is loaded or generated.
        (
            &["--out", "/nonexistent/dir/x.png"],
            "cannot write /nonexistent/dir/x.png: no folder",
        ),
        (
            &["--save-latents", "/nonexistent/l.safetensors"],
            "save-latents",
        ),
        (&["--variant", "fp8"], "variant"),
        (&["--steps", "0"], "steps"),
        (&["--steps", "100000"], "steps"),
        (&["--decoder-steps", "3"], "decoder_steps"),
        (&["--steps", "8", "--gate-step", "9"], "gate_step"),
        (&["--width", "60"], "width"),
        (&["--scheduler", "lms"], "lms"),
        (&["--sp-interval", "0"], "sp_interval"),
        (&["--dtype", "bf16"], "dtype"),
        // A buffer cap under CLIP's token embedding (193792 bytes), then one that holds every
        // weight but not the VAE's last feature map at 64×64 (262144 bytes).
        (&["--max-tensor-bytes", "193791"], "token_embedding"),
        // The VAE's last feature map at 4096² is 1 GiB (16 channels, f32): held three times,
        // over a 1 GB budget.
        (
            &[
                "--width",
                "4096",
                "--height",
                "4096",
                "--max-memory-bytes",
                "1000000000",
            ],
            "bytes of memory at once",
        ),
        (&["--max-tensor-bytes", "193792"], "VAE decoder feature map"),
        (
            &["--noise", "/nonexistent/noise.safetensors"],
            "nonexistent",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", m, "--prompt", "x"];
        args.extend_from_slice(extra);
        let out = tgate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(
            stderr.contains("error") && stderr.contains(needle),
            "{extra:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
        if extra[0] == "--out" || extra[0] == "--save-latents" {
            assert!(
                !stderr.contains("loading"),
                "{extra:?}: refused only after loading: {stderr}"
            );
        }
    }
    // A noise file whose shape does not fit the requested size.
    let r = reference();
    let noise = noise_file(&r);
    let out = tgate(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--noise",
        noise.to_str().unwrap(),
        "--width",
        "128",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("noise") && stderr.contains("expected"),
        "{stderr}"
    );
    let out = tgate(&["generate", "--model", "/nonexistent", "--prompt", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

/// Würstchen through the CLI: the reference noise as a `--noise` file, the latents compared with
/// diffusers (ungated) and with the gated-prior definition.
/// The Würstchen reference noise as the CLI's `--noise` file.
fn wuerstchen_noise_file(r: &SafeTensors) -> PathBuf {
    let noise = scratch("wuerstchen-noise.safetensors");
    let tensors: Vec<(&str, tgate::safetensors::HostTensor)> = [
        "prior_noise",
        "prior_step_noise",
        "decoder_noise",
        "decoder_step_noise",
    ]
    .iter()
    .map(|k| (*k, r.read_f32_any(&format!("pipe.{k}")).unwrap()))
    .collect();
    let views: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(k, t)| (*k, &t.shape[..], &t.data[..]))
        .collect();
    std::fs::write(&noise, write_f32(&views)).unwrap();
    noise
}

#[test]
fn wuerstchen_generate_matches_references() {
    let dir = fixtures().join("wuerstchen");
    let r = SafeTensors::parse(
        "reference",
        std::fs::read(dir.join("reference.safetensors")).unwrap(),
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let noise = wuerstchen_noise_file(&r);

    for (gate_args, prior_key, decoder_key) in [
        (
            &["--no-gate"][..],
            "pipe.prior_latents",
            "pipe.decoder_latents",
        ),
        (
            &["--gate-step", "2"][..],
            "gate2.prior_latents",
            "gate2.decoder_latents",
        ),
    ] {
        let saved = scratch(&format!("{prior_key}.safetensors"));
        let png = scratch(&format!("{prior_key}.png"));
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            json["prompt"].as_str().unwrap(),
            "--negative-prompt",
            json["negative_prompt"].as_str().unwrap(),
            "--width",
            "128",
            "--height",
            "256",
            "--steps",
            "6",
            "--guidance",
            "4",
            "--decoder-steps",
            "4",
            "--noise",
            noise.to_str().unwrap(),
            "--save-latents",
            saved.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
        ];
        args.extend_from_slice(gate_args);
        let out = tgate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{prior_key}: {stderr}");
        assert!(stderr.contains("prior semantics-planning"), "{stderr}");
        let st = SafeTensors::parse("saved", std::fs::read(&saved).unwrap()).unwrap();
        for (name, key, tol) in [
            ("prior_latents", prior_key, 1e-5),
            ("decoder_latents", decoder_key, 1e-4),
        ] {
            let got = st.read_f32_any(name).unwrap();
            let want = r.read_f32_any(key).unwrap();
            assert_eq!(got.shape, want.shape, "{name}");
            let (err, scale) = max_err(&got.data, &want.data);
            assert!(err <= tol * scale, "{key}: {err} (scale {scale})");
        }
        let png = std::fs::read(&png).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // IHDR: width then height, big-endian, at bytes 16..24.
        assert_eq!(&png[16..24], &[0, 0, 0, 128, 0, 0, 1, 0]);
    }
}

#[test]
fn wuerstchen_refuses_flags_and_sizes_it_cannot_take() {
    let dir = fixtures().join("wuerstchen");
    let r = SafeTensors::parse(
        "reference",
        std::fs::read(dir.join("reference.safetensors")).unwrap(),
    )
    .unwrap();
    let noise = wuerstchen_noise_file(&r);
    // Flags that make no sense for Würstchen, and sizes Stage B cannot take, are refused.
    for (extra, needle) in [
        (&["--scheduler", "ddim"][..], "scheduler"),
        (&["--sp-interval", "2"][..], "sp_interval"),
        (&["--width", "200", "--height", "256"][..], "width/height"),
        (&["--gate-step", "9"][..], "gate_step"),
        (
            &["--noise", "/nonexistent/noise.safetensors"][..],
            "noise.safetensors",
        ),
        // The reference noise is for 128x256, and for 6 prior steps.
        (
            &["--noise", noise.to_str().unwrap(), "--width", "512"][..],
            "prior_noise",
        ),
    ] {
        let mut args = vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "x",
            "--decoder-steps",
            "1",
            "--steps",
            "2",
        ];
        args.extend_from_slice(extra);
        let out = tgate(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} accepted");
        assert!(
            stderr.contains("error:") && stderr.contains(needle),
            "{extra:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// `--width 16384 --height 16384` on the tiny model needs at least 3 × 17.2 GB at once (the
/// VAE's last feature map, 16 channels at 16384², f32): with the host's own budget it is
/// refused at once, before any denoising, instead of running for minutes toward a failed
/// allocation. (Skipped on hosts with that much memory free.)
#[test]
fn a_size_that_cannot_fit_in_memory_is_refused_up_front() {
    let need = 3 * 16 * 16384u64 * 16384 * 4;
    let free = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024);
    if free.is_none_or(|f| f >= need) {
        eprintln!("skipped: {free:?} bytes free");
        return;
    }
    let model = fixtures().join("sd1");
    let out = tgate(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "16384",
        "--height",
        "16384",
        "--backend",
        "cpu",
        "--out",
        std::env::temp_dir().join("never.png").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("16384×16384") && stderr.contains(&need.to_string()),
        "{stderr}"
    );
    assert!(
        !stderr.contains("steps, mean"),
        "refused before denoising: {stderr}"
    );
}

/// A copy of the sd1 fixture whose UNet `conv_in` weights are scaled by `factor` (activations
/// past f16's range of 65504, well inside f32's).
fn overflowing_fixture(factor: f32) -> PathBuf {
    let dir = scratch("overflow");
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        for entry in std::fs::read_dir(fixtures().join("sd1").join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(sub).join(entry.file_name())).unwrap();
        }
    }
    let path = dir.join("unet/diffusion_pytorch_model.safetensors");
    let st = SafeTensors::parse("unet", std::fs::read(&path).unwrap()).unwrap();
    let names: Vec<String> = st.names().map(String::from).collect();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = names
        .iter()
        .map(|n| {
            let t = st.read_f32_any(n).unwrap();
            let data = if n == "conv_in.weight" {
                t.data.iter().map(|v| v * factor).collect()
            } else {
                t.data
            };
            (n.clone(), t.shape, data)
        })
        .collect();
    let refs: Vec<(&str, &[usize], &[f32])> = tensors
        .iter()
        .map(|(n, s, d)| (n.as_str(), &s[..], &d[..]))
        .collect();
    std::fs::write(&path, write_f32(&refs)).unwrap();
    dir
}

/// An f16 generation that overflows (NaN latents, a black image) is run again in f32, with the
/// same seed, and says so; the saved latents are finite.
#[test]
fn an_f16_overflow_is_generated_again_in_f32() {
    let dir = overflowing_fixture(1e7);
    let out_png = scratch("overflow.png");
    let lat = scratch("overflow.safetensors");
    let run = |dtype: &str| {
        tgate(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--scheduler",
            "ddim",
            "--seed",
            "3",
            "--dtype",
            dtype,
            "--out",
            out_png.to_str().unwrap(),
            "--save-latents",
            lat.to_str().unwrap(),
        ])
    };
    let out = run("f16");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("generating again"), "{stderr}");
    let f16_retry = latents(&lat);
    assert!(f16_retry.iter().all(|v| v.is_finite()));
    // The retry is the f32 generation of the same seed.
    let out = run("f32");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("generating again"),
        "{stderr}"
    );
    assert_eq!(latents(&lat), f16_retry);
}
