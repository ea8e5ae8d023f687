//! The package's typed errors: JS `Error`s whose `name` is one of the error codes
//! (`webgpu_unsupported`, `device_lost`, `out_of_memory`, `bad_weights`, `invalid_parameter`,
//! `cancelled`, `internal`), and the panic record that survives a trap.

use std::cell::RefCell;

use wasm_bindgen::prelude::*;

pub fn js_error(code: &str, message: impl std::fmt::Display) -> JsValue {
    let e = js_sys::Error::new(&message.to_string());
    e.set_name(code);
    e.into()
}

/// The package's error code of a model-crate error.
pub fn code(e: &tgate::Error) -> &'static str {
    use tgate::Error::*;
    match e {
        Config { .. }
        | MissingFile(_)
        | CorruptWeights { .. }
        | MissingTensor { .. }
        | ShapeMismatch { .. }
        | DtypeMismatch { .. }
        | Tokenizer(_) => "bad_weights",
        TensorTooLarge { .. } | ActivationTooLarge { .. } | MemoryTooLarge { .. } => {
            "out_of_memory"
        }
        InvalidParameter { .. } | Input { .. } => "invalid_parameter",
        Device(msg) => device_code(msg, false),
        Cancelled => "cancelled",
    }
}

pub fn is_out_of_memory(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory") || m.contains("outofmemory") || m.contains("allocation")
}

/// A device failure's code: `out_of_memory`, `device_lost` only when the device is gone (the
/// worker is then replaced), else `internal` (the model stays loaded).
pub fn device_code(msg: &str, poisoned: bool) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if is_out_of_memory(msg) {
        "out_of_memory"
    } else if poisoned || m.contains("lost") || m.contains("destroyed") || m.contains("poisoned") {
        "device_lost"
    } else {
        "internal"
    }
}

/// A failed readback (burn's `ExecutionError`, whose poisoned-device variant reads "The
/// device is poisoned") as a typed error.
pub fn readback_error(e: impl std::fmt::Display) -> JsValue {
    let msg = format!("reading a result back failed: {e}");
    js_error(device_code(&msg, false), msg)
}

pub fn to_js(e: tgate::Error) -> JsValue {
    js_error(code(&e), e)
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records panics (the worker turns the resulting trap into a typed error).
pub fn record_panics() {
    std::panic::set_hook(Box::new(|info| {
        let msg = format!("tgate panicked: {info}");
        web_sys::console::error_1(&msg.clone().into());
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
    }));
}

/// The message of the panic that trapped the module, if one did (read by the worker after a
/// `RuntimeError`), with the error code it maps to.
#[wasm_bindgen(js_name = lastPanic)]
pub fn last_panic() -> JsValue {
    match LAST_PANIC.with(|p| p.borrow().clone()) {
        Some(msg) => {
            let code = if is_out_of_memory(&msg) {
                "out_of_memory"
            } else {
                "device_lost"
            };
            js_error(code, msg)
        }
        None => JsValue::NULL,
    }
}
