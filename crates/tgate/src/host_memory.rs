//! The host allocator under the CPU backend.
//!
//! Every CPU operation allocates its output, and a UNet step's feature maps and attention scores
//! are megabytes each. glibc's malloc serves blocks that large with `mmap` and returns them to the
//! kernel on `free`, so each operation pays fresh page faults and zeroed pages (about a tenth of
//! an SD-1.5 step at 256×256 on two cores, seen with `perf`). [`keep_large_allocations`] makes it
//! keep freed memory for reuse instead: a process-wide setting, so the library never applies it
//! by itself; the CLI and the benchmarks call it at start.

/// Makes glibc's malloc serve blocks up to 32 MiB from its heap and never give freed heap
/// memory back to the kernel (the process keeps its high-water mark). Returns whether the
/// settings were applied: `false` off glibc (other allocators, wasm) or if malloc refused them.
pub fn keep_large_allocations() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's tuning parameters; it is called before the
        // allocations it affects and is safe to call at any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_TOP_PAD, 256 << 20) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
