//! The one place that decides which instruction set the kernels use.
//!
//! Detected once (`is_x86_feature_detected!`); `HETMOE_ISA=scalar|avx2|avx512` or
//! [`force_isa`] override it for tests and bug reports (never to an ISA the CPU lacks).

use std::sync::atomic::{AtomicU8, Ordering};

use crate::KernelError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL (plus AVX2 features).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Result<Isa, KernelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            other => Err(KernelError::UnknownIsa(other.into())),
        }
    }

    /// Columns per odd/even chunk of the bf16 matmul kernel (two vectors of f32 lanes), or
    /// `None` where bf16 columns are read in order (scalar).
    pub(crate) fn bf16_chunk(self) -> Option<usize> {
        match self {
            Isa::Scalar => None,
            Isa::Avx2 => Some(16),
            Isa::Avx512 => Some(32),
        }
    }

    /// Whether this CPU can run the ISA.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => detect_avx2(),
            Isa::Avx512 => detect_avx512(),
        }
    }

    /// Every ISA this CPU can run, scalar first.
    pub fn all_supported() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_supported()).collect()
    }

    fn best() -> Isa {
        if detect_avx512() {
            Isa::Avx512
        } else if detect_avx2() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}
#[cfg(not(target_arch = "x86_64"))]
fn detect_avx2() -> bool {
    false
}
#[cfg(target_arch = "x86_64")]
fn detect_avx512() -> bool {
    detect_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}
#[cfg(not(target_arch = "x86_64"))]
fn detect_avx512() -> bool {
    false
}

const UNSET: u8 = u8::MAX;
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);

fn encode(i: Isa) -> u8 {
    i as u8
}
fn decode(v: u8) -> Isa {
    match v {
        0 => Isa::Scalar,
        1 => Isa::Avx2,
        _ => Isa::Avx512,
    }
}

/// The ISA kernels use now: forced, else from `HETMOE_ISA`, else the best the CPU has.
/// An unusable `HETMOE_ISA` value falls back to detection (with a warning on stderr).
pub fn active_isa() -> Isa {
    let v = ACTIVE.load(Ordering::Relaxed);
    if v != UNSET {
        return decode(v);
    }
    let isa = match std::env::var("HETMOE_ISA") {
        Ok(s) => match Isa::parse(&s) {
            Ok(i) if i.is_supported() => i,
            Ok(i) => {
                eprintln!("hetmoe: HETMOE_ISA={} is not supported by this CPU; detecting", i.name());
                Isa::best()
            }
            Err(e) => {
                eprintln!("hetmoe: {e}; detecting");
                Isa::best()
            }
        },
        Err(_) => Isa::best(),
    };
    ACTIVE.store(encode(isa), Ordering::Relaxed);
    isa
}

/// Forces every kernel onto `isa` (process-wide). Errors if the CPU cannot run it.
pub fn force_isa(isa: Isa) -> Result<(), KernelError> {
    if !isa.is_supported() {
        return Err(KernelError::IsaUnavailable(isa.name()));
    }
    ACTIVE.store(encode(isa), Ordering::Relaxed);
    Ok(())
}

static STREAMING: AtomicU8 = AtomicU8::new(UNSET);

/// How one-token kernels stream their weights from DRAM: a property of the CPU's hardware
/// prefetchers, measured, that changes speed only (kernels give the same bits either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Streaming {
    /// Software prefetches ahead of every walk, and row-major matrices two rows side by side
    /// (q8 four). The Intel Xeon VM the kernels were first tuned on gained 15–20% from the
    /// prefetches and 5–10% from two rows over four.
    Prefetched,
    /// One sequential stream per thread: dense row-major matrices one row at a time
    /// (software prefetches 8 KiB ahead kept), q8 / q4 [row tiles](crate::row_tiles) and
    /// [row groups](crate::row_groups) without software prefetches. On the AMD Zen 4 dev VM
    /// (`kbench`, 1.5 GB sets, 2 threads): tiled q4 matvec 79–90% of the read probe →
    /// 90–100%, bf16 matvec 79–88% → 89%. Its L2 stream prefetcher keeps one sequential
    /// stream ahead by itself; interleaved rows or software requests only get in its way.
    Sequential,
}

impl Streaming {
    pub fn name(self) -> &'static str {
        match self {
            Streaming::Prefetched => "prefetched",
            Streaming::Sequential => "sequential",
        }
    }

    /// Sequential on AMD CPUs, prefetched elsewhere.
    pub fn detect() -> Streaming {
        if cpu_is_amd() {
            Streaming::Sequential
        } else {
            Streaming::Prefetched
        }
    }
}

/// The [`Streaming`] kernels use now: forced by [`force_streaming`], else
/// `HETMOE_STREAMING=prefetched|sequential`, else [`Streaming::detect`].
pub fn streaming() -> Streaming {
    match STREAMING.load(Ordering::Relaxed) {
        0 => Streaming::Prefetched,
        1 => Streaming::Sequential,
        _ => {
            let s = match std::env::var("HETMOE_STREAMING").as_deref() {
                Ok("prefetched") => Streaming::Prefetched,
                Ok("sequential") => Streaming::Sequential,
                Ok(other) => {
                    eprintln!("hetmoe: HETMOE_STREAMING={other} is not prefetched or sequential; detecting");
                    Streaming::detect()
                }
                Err(_) => Streaming::detect(),
            };
            force_streaming(s);
            s
        }
    }
}

/// Sets [`streaming`] (process-wide), for tests and measurements.
pub fn force_streaming(s: Streaming) {
    STREAMING.store(s as u8, Ordering::Relaxed);
}

/// Whether CPUID's vendor string is AMD's.
#[cfg(target_arch = "x86_64")]
fn cpu_is_amd() -> bool {
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = [0u8; 12];
    v[..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..].copy_from_slice(&r.ecx.to_le_bytes());
    &v == b"AuthenticAMD"
}
#[cfg(not(target_arch = "x86_64"))]
fn cpu_is_amd() -> bool {
    false
}
