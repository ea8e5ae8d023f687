//! A GPU device lost under a loaded model, natively, during a generation (the loop has the next
//! step enqueued ahead) and before one: each generation fails with the typed `Error::Device` (its
//! message says the GPU work did not complete), within a bounded time, without a panic.
//! Its own test binary: the device is destroyed, and wgpu can be initialised once per process.
#![cfg(feature = "wgpu")]

mod common;

use std::ops::ControlFlow;
use std::sync::mpsc;
use std::time::Duration;

use burn::tensor::Device;
use common::*;
use tgate::error::Error;
use tgate::text_to_image::{NoiseSource, Request};

#[test]
fn a_lost_device_is_a_typed_device_error() {
    let (device, setup) = Device::wgpu_options()
        .init_with_setup()
        .expect("a wgpu adapter (install mesa-vulkan-drivers)");
    let model = load_pipeline(&source("sd1"), &device);
    let mut request = Request::new("a red fox", NoiseSource::Seed(1));
    request.steps = Some(4);
    // A healthy run first (the kernels are compiled); then the device goes away *during* a
    // generation (after its second step, while the loop has the next one enqueued ahead), and
    // the generations after that meet a device already lost.
    model
        .generate(&request, &mut |_| ControlFlow::Continue(()))
        .expect("generates before the loss");
    let (tx, rx) = mpsc::channel();
    let gpu = setup.device.clone();
    std::thread::spawn(move || {
        // The model stays usable as a value (every call answers), the device does not.
        for attempt in 0..3 {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                model
                    .generate(&request, &mut |s| {
                        if attempt == 0 && s.index == 1 {
                            gpu.destroy();
                        }
                        ControlFlow::Continue(())
                    })
                    .and_then(|o| o.latents_finite())
            }));
            let _ = tx.send(out.map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            }));
        }
    });
    for attempt in 1..=3 {
        let out = rx.recv_timeout(Duration::from_secs(300)).unwrap_or_else(|_| {
            panic!("generation {attempt} on a lost device neither returned nor panicked within 300 s")
        });
        match out {
            Ok(Err(e @ Error::Device(_))) => {
                let message = e.to_string();
                eprintln!("generation {attempt} on a lost device: {message}");
                assert!(
                    message.starts_with("device: the GPU work did not complete"),
                    "{message}"
                );
            }
            Ok(other) => panic!(
                "generation {attempt}: expected Error::Device, got {:?}",
                other.map(|finite| format!("a result (finite: {finite})"))
            ),
            Err(panic) => panic!("generation {attempt} panicked on a lost device: {panic}"),
        }
    }
}
