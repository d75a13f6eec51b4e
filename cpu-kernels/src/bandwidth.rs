//! A STREAM-like memory read-bandwidth probe: the roofline the matmul kernels are judged
//! against (benches and `bench-decode` measure it in the same run as the kernels).
//!
//! [`parallel_read_sum`] reads a buffer once with wide loads (AVX-512 or AVX2 where the CPU
//! has them, several independent accumulators), one contiguous slice per rayon thread, so
//! it issues the same kind of streaming reads as the matvec kernels. [`measure_read_bandwidth`]
//! times it on a buffer much larger than the caches.

use std::time::Instant;

use rayon::prelude::*;

use crate::dispatch::{active_isa, Isa};

/// Sum of `buf` (its value is irrelevant; it keeps the reads from being optimized away).
/// Reads every element once, on the calling thread.
pub fn read_sum(buf: &[f32]) -> f32 {
    read_sum_with(active_isa(), buf)
}

/// [`read_sum`] on a given ISA (panics if the CPU cannot run it).
pub fn read_sum_with(isa: Isa, buf: &[f32]) -> f32 {
    assert!(isa.is_supported(), "ISA {} is not supported by this CPU", isa.name());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: AVX2 is supported (asserted; AVX-512 implies it here).
            unsafe { simd::read_sum_avx2(buf) }
        }
        _ => buf.chunks(8).fold(0.0, |s, c| s + c.iter().sum::<f32>()),
    }
}

/// [`read_sum`] over `buf` split into one contiguous slice per thread of the current rayon
/// pool.
pub fn parallel_read_sum(buf: &[f32]) -> f32 {
    // Contiguous pieces of at least 1 MiB, several per thread, scheduled like the kernels'
    // tasks (work stealing), so a briefly descheduled thread does not idle the other.
    let threads = rayon::current_num_threads().max(1);
    let chunk = buf.len().div_ceil(8 * threads).max(1 << 18);
    buf.par_chunks(chunk).with_max_len(1).map(read_sum).sum()
}

/// Measured read bandwidth in GB/s (1e9 bytes per second) with `threads` threads over a
/// buffer of `bytes` bytes (choose it much larger than the last-level cache, e.g. 1 GiB):
/// [`ReadProbe::measure`] on a fresh probe.
pub fn measure_read_bandwidth(bytes: usize, threads: usize) -> f64 {
    ReadProbe::new(bytes).measure(threads)
}

/// A read-bandwidth probe that keeps its buffer between measurements. A benchmark that
/// probes before and after its timed runs should hold one: freeing a 1 GiB buffer just
/// before timing disturbed the runs about two seconds later on the dev VM (decode steps of
/// 50 ms instead of 14 for a third of a second), which matches the guest kernel's free page
/// reporting to its host (virtio-balloon, `page_reporting.page_reporting_order=11` on that
/// VM's command line; it reports freed pages two seconds after they are freed).
#[derive(Debug)]
pub struct ReadProbe {
    buf: crate::memory::HugeBuf<f32>,
}

impl ReadProbe {
    /// A buffer of `bytes` bytes (at least 4 KiB), written once: on huge pages, like the
    /// engine's weights, so the roofline is the best the machine reads.
    pub fn new(bytes: usize) -> Self {
        let mut buf = crate::memory::HugeBuf::<f32>::zeroed((bytes / 4).max(1024));
        buf.fill(1.0);
        Self { buf }
    }

    /// GB/s with `threads` threads: the best of several passes (at least 3, up to 20 within
    /// about a second), after one untimed pass. NaN if no thread pool can be built.
    pub fn measure(&self, threads: usize) -> f64 {
        let pool = match rayon::ThreadPoolBuilder::new().num_threads(threads.max(1)).build() {
            Ok(p) => p,
            Err(_) => return f64::NAN,
        };
        let buf = &self.buf;
        pool.install(|| {
            std::hint::black_box(parallel_read_sum(buf));
            let start = Instant::now();
            let mut best = f64::INFINITY;
            let mut passes = 0;
            while passes < 3 || (passes < 20 && start.elapsed().as_secs_f64() < 1.0) {
                let t = Instant::now();
                std::hint::black_box(parallel_read_sum(std::hint::black_box(buf)));
                best = best.min(t.elapsed().as_secs_f64());
                passes += 1;
            }
            std::mem::size_of_val(&buf[..]) as f64 / best / 1e9
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn read_sum_avx2(buf: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let chunks = buf.chunks_exact(64);
        let rest = chunks.remainder();
        for c in chunks {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: c holds 64 f32, so 8 at 8·k are in bounds; unaligned load.
                *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(c.as_ptr().add(8 * k)) });
            }
        }
        let s = acc.iter().fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        let mut lanes = [0f32; 8];
        // SAFETY: lanes holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        lanes.iter().sum::<f32>() + rest.iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_agree_and_bandwidth_is_positive() {
        let v: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        let want: f32 = v.iter().sum();
        for isa in Isa::all_supported() {
            let got = read_sum_with(isa, &v);
            assert!((got - want).abs() < 1e-3, "{isa:?}: {got} vs {want}");
        }
        let bw = measure_read_bandwidth(1 << 20, 2);
        assert!(bw.is_finite() && bw > 0.0);
    }
}
