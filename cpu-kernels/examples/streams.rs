//! How fast do different read patterns stream from DRAM on this machine? The same bf16 dot
//! product arithmetic (one AND, one shift, two FMAs per 64 bytes) over 1 GiB on huge pages,
//! split into 1 MiB items across the compute team, read as: one stream; four rows of 2 KiB
//! at once (the old one-token matvec tile); two rows; one row at a time; plus the plain
//! read probe of the roofline (`bandwidth::parallel_read_sum`). Every variant prefetches
//! 8 KiB ahead. The numbers behind the one-token tile shapes (`docs/benchmarks.md`).
//!
//! `cargo run --release -p hetmoe-cpu-kernels --example streams [rounds]` (AVX-512 only;
//! it says so and exits elsewhere).
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use hetmoe_cpu_kernels::bandwidth::parallel_read_sum;
use hetmoe_cpu_kernels::memory::HugeBuf;
use hetmoe_cpu_kernels::parallel::{for_each, Team};

const BYTES: usize = 1 << 30;
const ITEM: usize = 1 << 20;
const ROW: usize = 2048;
const PREFETCH: usize = 8192;

#[cfg(target_arch = "x86_64")]
mod pattern {
    use std::arch::x86_64::*;

    use super::{PREFETCH, ROW};

    /// The sum of `bytes` bytes at `p` read as bf16 weights against x = 0.5, as `rows` rows of
    /// `ROW` bytes read side by side (`rows == 0`: one stream, eight accumulators).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW; `p` points to `bytes` readable bytes, `bytes` a multiple of
    /// 4 · `ROW`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot(p: *const u8, bytes: usize, rows: usize) -> f32 {
        let x = _mm512_set1_ps(0.5);
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // SAFETY: every load is inside [p, p + bytes) (caller); prefetches never fault.
        unsafe {
            let line = |q: *const u8, acc: __m512| {
                _mm_prefetch::<_MM_HINT_T1>(q.wrapping_add(PREFETCH) as *const i8);
                let v = _mm512_loadu_si512(q as *const __m512i);
                let odd = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                _mm512_fmadd_ps(x, even, _mm512_fmadd_ps(x, odd, acc))
            };
            let mut acc = [_mm512_setzero_ps(); 8];
            if rows == 0 {
                for i in (0..bytes).step_by(512) {
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = line(p.add(i + 64 * k), *a);
                    }
                }
            } else {
                for t in (0..bytes).step_by(rows * ROW) {
                    for c in (0..ROW).step_by(64) {
                        for (r, a) in acc.iter_mut().enumerate().take(rows) {
                            *a = line(p.add(t + r * ROW + c), *a);
                        }
                    }
                }
            }
            _mm512_reduce_add_ps(acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a)))
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    if !avx512 {
        println!("streams: needs AVX-512 F/BW; not run on this CPU");
        return;
    }
    let rounds: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(4);
    let team = Team::new(rayon::current_num_threads()).unwrap();
    let mut buf = HugeBuf::<u8>::zeroed(BYTES);
    buf.fill(0x3f);
    // Written once, like every buffer measured here (untouched pages would all read the
    // kernel's shared zero page).
    let mut probe = HugeBuf::<f32>::zeroed(BYTES / 4);
    probe.fill(1.0);
    let base = buf.as_ptr() as usize;
    let rate = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        BYTES as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    team.install(|| {
        for round in 0..rounds {
            let mut line = format!(
                "round {round}: probe {:5.1} GB/s |",
                rate(&|| {
                    std::hint::black_box(parallel_read_sum(&probe));
                })
            );
            for (name, rows) in [("one stream", 0), ("4 rows", 4), ("2 rows", 2), ("1 row", 1)] {
                let g = rate(&|| {
                    for_each(BYTES / ITEM, |i| {
                        // SAFETY: AVX-512 F/BW checked above; item i is ITEM bytes inside buf,
                        // a multiple of 4 · ROW.
                        #[cfg(target_arch = "x86_64")]
                        std::hint::black_box(unsafe {
                            pattern::dot((base + i * ITEM) as *const u8, ITEM, rows)
                        });
                    });
                });
                line += &format!(" {name} {g:5.1}");
            }
            println!("{line}");
        }
    });
}
