//! Interleaved kernel-vs-bandwidth timing (ratios per round; robust on a shared machine).
//! `cargo run --release -p hetmoe-cpu-kernels --example kbench [rounds]`
//!
//! Weights and the probe buffer live on huge pages (as the engine's do), and each weight
//! set is 1.5 GB, several times this machine's 480 MiB last-level cache, so every pass
//! streams from DRAM. The probe buffer is written once, before the rounds: a freshly
//! written buffer would leave dirty cache lines whose write-back slows the next kernel.
#![allow(clippy::unwrap_used)]
use std::time::Instant;

use half::bf16;
use hetmoe_cpu_kernels::bandwidth::parallel_read_sum;
use hetmoe_cpu_kernels::matmul::{axpy_rows, matmul, MatRef, WeightsRef};
use hetmoe_cpu_kernels::memory::HugeBuf;
use hetmoe_cpu_kernels::moe::{expert_swiglu, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows, pair_groups, GroupKind, GroupedRef};
use hetmoe_cpu_kernels::row_tiles::{self, TileKind};

const H: usize = 1024;
const F: usize = 3584;
/// Bytes of each weight set; `KB_SET_MB` overrides it (e.g. `KB_SET_MB=1`: one matrix per
/// format, which this machine's last-level cache holds: the kernels' speed without DRAM).
const SET: usize = 1536 << 20;
const PROBE: usize = 1 << 30;

/// Run time of all threads of this process, from /proc (ns resolution), in seconds.
fn cpu_time() -> f64 {
    let mut ns = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
                ns += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    ns as f64 * 1e-9
}

/// GB/s from wall time, or from CPU time divided by the thread count when `KB_CPU` is set
/// (robust when other processes share the cores: it measures speed while running).
fn rate(bytes: usize, f: impl FnOnce()) -> f64 {
    let threads = rayon::current_num_threads() as f64;
    let (t, c) = (Instant::now(), cpu_time());
    f();
    let (wall, cpu) = (t.elapsed().as_secs_f64(), cpu_time() - c);
    let secs = if std::env::var("KB_CPU").is_ok() { cpu / threads } else { wall };
    bytes as f64 / secs / 1e9
}

fn main() {
    let rounds: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(5);
    let w: Vec<f32> = (0..3 * F * H).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
    let wb: Vec<bf16> = w.iter().map(|&a| bf16::from_f32(a)).collect();
    let mut q8 = vec![BlockQ8 { d: half::f16::ZERO, qs: [0; QK] }; w.len() / QK];
    quantize_q8(&w, &mut q8);
    let mut q4 = vec![BlockQ4 { d: half::f16::ZERO, qs: [0; QK / 2] }; w.len() / QK];
    quantize_q4(&w, &mut q4);
    let set =
        std::env::var("KB_SET_MB").ok().and_then(|v| v.parse::<usize>().ok()).map_or(SET, |mb| mb << 20);
    let nb = (set / (wb.len() * 2)).max(1);
    let nq8 = (set / (q8.len() * 34)).max(1);
    let nq4 = (set / (q4.len() * 18)).max(1);
    let bsets: Vec<HugeBuf<bf16>> = (0..nb).map(|_| HugeBuf::from_slice(&wb)).collect();
    let q8sets: Vec<HugeBuf<BlockQ8>> = (0..nq8).map(|_| HugeBuf::from_slice(&q8)).collect();
    let q4sets: Vec<HugeBuf<BlockQ4>> = (0..nq4).map(|_| HugeBuf::from_slice(&q4)).collect();
    let which: Vec<String> =
        std::env::var("KB").unwrap_or("mv,ex".into()).split(',').map(String::from).collect();
    // The same quantized sets in groups of four rows (the engine's layout for `downᵀ`), for
    // `ag` (grouped axpy) and `eg` (expert with grouped `downᵀ`); allocated only for them.
    let want_grouped = which.iter().any(|k| ["ag", "eg", "ei", "et"].contains(&k.as_str()));
    // Paired groups (the engine's in-memory downᵀ) for `ap` (axpy) and `ep` (expert: tiled
    // gate/up, paired downᵀ: the engine's layout with AVX-512 VNNI).
    let want_paired = which.iter().any(|k| k == "ap" || k == "ep");
    let grouped = |kind: GroupKind, n: usize| -> Vec<HugeBuf<u8>> {
        if !want_grouped {
            return Vec::new();
        }
        let mut g = vec![0u8; kind.matrix_bytes(3 * F, H)];
        match kind {
            GroupKind::Q8 => group_q8_rows(&q8, 3 * F, H, &mut g),
            GroupKind::Q4 => group_q4_rows(&q4, 3 * F, H, &mut g),
        }
        (0..n).map(|_| HugeBuf::from_slice(&g)).collect()
    };
    let paired = |kind: GroupKind, n: usize| -> Vec<HugeBuf<u8>> {
        if !want_paired {
            return Vec::new();
        }
        let mut g = vec![0u8; kind.matrix_bytes(3 * F, H)];
        match kind {
            GroupKind::Q8 => group_q8_rows(&q8, 3 * F, H, &mut g),
            GroupKind::Q4 => group_q4_rows(&q4, 3 * F, H, &mut g),
        }
        let mut p = vec![0u8; g.len()];
        pair_groups(kind, 3 * F, H, &g, &mut p);
        (0..n).map(|_| HugeBuf::from_slice(&p)).collect()
    };
    let (g8sets, g4sets) = (grouped(GroupKind::Q8, nq8), grouped(GroupKind::Q4, nq4));
    let (p8sets, p4sets) = (paired(GroupKind::Q8, nq8), paired(GroupKind::Q4, nq4));
    let pv8: Vec<GroupedRef<'_>> =
        p8sets.iter().map(|g| GroupedRef::paired(GroupKind::Q8, g, 3 * F, H).unwrap()).collect();
    let pv4: Vec<GroupedRef<'_>> =
        p4sets.iter().map(|g| GroupedRef::paired(GroupKind::Q4, g, 3 * F, H).unwrap()).collect();
    let gv8: Vec<GroupedRef<'_>> =
        g8sets.iter().map(|g| GroupedRef::new(GroupKind::Q8, g, 3 * F, H).unwrap()).collect();
    let gv4: Vec<GroupedRef<'_>> =
        g4sets.iter().map(|g| GroupedRef::new(GroupKind::Q4, g, 3 * F, H).unwrap()).collect();
    // The quantized sets in row tiles (the engine's q8 / q4 matvec layout with AVX-512
    // VNNI), for `mt` (matvec) and `et` (expert: gate/up interleaved in tiles, downᵀ grouped).
    let want_tiles = which.iter().any(|k| k == "mt" || k == "et" || k == "ep");
    let tiled = |kind: TileKind, n: usize| -> Vec<HugeBuf<u8>> {
        if !want_tiles {
            return Vec::new();
        }
        let mut t = vec![0u8; kind.matrix_bytes(3 * F, H)];
        match kind {
            TileKind::Q8 => row_tiles::tile_q8_rows(&q8, 3 * F, H, &mut t),
            TileKind::Q4 => row_tiles::tile_q4_rows(&q4, 3 * F, H, &mut t),
        }
        (0..n).map(|_| HugeBuf::from_slice(&t)).collect()
    };
    let (t8sets, t4sets) = (tiled(TileKind::Q8, nq8), tiled(TileKind::Q4, nq4));
    let vt8 = vw(t8sets.iter().map(|v| WeightsRef::Q8Tiles(v)).collect());
    let vt4 = vw(t4sets.iter().map(|v| WeightsRef::Q4Tiles(v)).collect());
    let mut probe = HugeBuf::<f32>::zeroed(PROBE / 4);
    probe.fill(1.0);
    let vb = vw(bsets.iter().map(|v| WeightsRef::Bf16(v)).collect());
    let v8 = vw(q8sets.iter().map(|v| WeightsRef::Q8(v)).collect());
    let v4 = vw(q4sets.iter().map(|v| WeightsRef::Q4(v)).collect());
    let x = vec![0.5f32; 32 * H];
    let mut y = vec![0f32; 32 * 3 * F];
    let mut out = vec![0f32; 32 * H];
    let mut act = vec![0f32; 2 * 32 * F];
    let mut best: Vec<(String, f64)> = Vec::new();
    let mut note = |k: String, g: f64| match best.iter_mut().find(|(n, _)| *n == k) {
        Some(e) => e.1 = e.1.max(g),
        None => best.push((k, g)),
    };
    // The engine's compute threads: a spinning team of the rayon pool's size.
    let team = hetmoe_cpu_kernels::parallel::Team::new(rayon::current_num_threads()).unwrap();
    team.install(|| {
        for r in 0..rounds {
            let bw = rate(PROBE, || {
                std::hint::black_box(parallel_read_sum(&probe));
            });
            let mut line = format!("round {r}: probe {bw:5.1} GB/s |");
            note("probe".into(), bw);
            for (name, set, gset, tset) in [
                ("bf16", &vb, None, None),
                ("q8", &v8, Some(&gv8), Some(&vt8)),
                ("q4", &v4, Some(&gv4), Some(&vt4)),
            ] {
                let pset = match name {
                    "q8" => Some(&pv8),
                    "q4" => Some(&pv4),
                    _ => None,
                };
                let bytes: usize = set.iter().map(|m| m.size_bytes()).sum();
                for n in [1usize, 8] {
                    if which.contains(&"mv".to_string()) {
                        let g = rate(bytes, || {
                            for m in set {
                                matmul(&x[..n * H], *m, &mut y[..n * 3 * F]);
                            }
                        });
                        line += &format!(" mv {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("mv {name} n{n}"), g);
                    }
                    if let (true, Some(tset)) = (which.contains(&"mt".to_string()), tset) {
                        let g = rate(bytes, || {
                            for m in tset.iter() {
                                matmul(&x[..n * H], *m, &mut y[..n * 3 * F]);
                            }
                        });
                        line += &format!(" mt {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("mt {name} n{n}"), g);
                    }
                    if let (true, 1, Some(tset), Some(gset)) =
                        (which.contains(&"et".to_string()), n, tset, gset)
                    {
                        let g = rate(bytes, || {
                            for (m, gm) in tset.iter().zip(gset.iter()) {
                                let e =
                                    ExpertRef::interleaved(m.row_range(0, 2 * F), gm.row_range(2 * F, 3 * F));
                                expert_swiglu(&x[..n * H], e.unwrap(), &mut act, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" et {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("et {name} n{n}"), g);
                    }
                    if which.contains(&"ax".to_string()) && n == 1 {
                        let g = rate(bytes, || {
                            for m in set {
                                axpy_rows(&y[..n * 3 * F], *m, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" ax {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("ax {name} n{n}"), g);
                    }
                    if let (true, 1, Some(pset)) = (which.contains(&"ap".to_string()), n, pset) {
                        let g = rate(bytes, || {
                            for m in pset.iter() {
                                axpy_rows(&y[..n * 3 * F], *m, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" ap {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("ap {name} n{n}"), g);
                    }
                    if let (true, 1, Some(tset), Some(pset)) =
                        (which.contains(&"ep".to_string()), n, tset, pset)
                    {
                        let g = rate(bytes, || {
                            for (m, pm) in tset.iter().zip(pset.iter()) {
                                let e =
                                    ExpertRef::interleaved(m.row_range(0, 2 * F), pm.row_range(2 * F, 3 * F));
                                expert_swiglu(&x[..n * H], e.unwrap(), &mut act, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" ep {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("ep {name} n{n}"), g);
                    }
                    if let (true, 1, Some(gset)) = (which.contains(&"ag".to_string()), n, gset) {
                        let g = rate(bytes, || {
                            for m in gset.iter() {
                                axpy_rows(&y[..n * 3 * F], *m, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" ag {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("ag {name} n{n}"), g);
                    }
                    if let (true, 1, Some(gset)) = (which.contains(&"eg".to_string()), n, gset) {
                        // The engine's in-memory layout for quantized experts: downᵀ grouped.
                        let g = rate(bytes, || {
                            for (m, gm) in set.iter().zip(gset.iter()) {
                                let part = |i: usize| m.row_range(i * F, (i + 1) * F);
                                let e = ExpertRef::new(part(0), part(1), gm.row_range(2 * F, 3 * F)).unwrap();
                                expert_swiglu(&x[..n * H], e, &mut act, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" eg {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("eg {name} n{n}"), g);
                    }
                    if which.contains(&"ei".to_string()) && n == 1 {
                        // Gate and up interleaved row by row, downᵀ apart (grouped when quantized).
                        let g = rate(bytes, || {
                            for (i, m) in set.iter().enumerate() {
                                let gu = m.row_range(0, 2 * F);
                                let e = match gset {
                                    Some(gs) => ExpertRef::interleaved(gu, gs[i].row_range(2 * F, 3 * F)),
                                    None => ExpertRef::interleaved(gu, m.row_range(2 * F, 3 * F)),
                                }
                                .unwrap();
                                expert_swiglu(&x[..n * H], e, &mut act, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" ei {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("ei {name} n{n}"), g);
                    }
                    if which.contains(&"es".to_string()) && n == 1 {
                        // The engine's in-memory layout: gate, up and downᵀ as separate matrices.
                        let g = rate(bytes, || {
                            for m in set {
                                let part = |i: usize| m.row_range(i * F, (i + 1) * F);
                                let e = ExpertRef::new(part(0), part(1), part(2)).unwrap();
                                expert_swiglu(&x[..n * H], e, &mut act, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" es {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("es {name} n{n}"), g);
                    }
                    if which.contains(&"ex".to_string()) && n == 1 {
                        let g = rate(bytes, || {
                            for m in set {
                                let e = ExpertRef::bundled(m.data(), F, H).unwrap();
                                expert_swiglu(&x[..n * H], e, &mut act, &mut out[..n * H]);
                            }
                        });
                        line += &format!(" ex {name} n{n} {g:5.1} ({:3.0}%)", 100.0 * g / bw);
                        note(format!("ex {name} n{n}"), g);
                    }
                }
            }
            println!("{line}");
        }
    });
    let p = best[0].1;
    let mut line = format!("best of {rounds}: probe {p:5.1} GB/s |");
    for (k, g) in &best[1..] {
        line += &format!(" {k} {g:5.1} ({:3.0}%)", 100.0 * g / p);
    }
    println!("{line}");
}

fn vw(d: Vec<WeightsRef<'_>>) -> Vec<MatRef<'_>> {
    d.into_iter().map(|v| MatRef::new(v, 3 * F, H).unwrap()).collect()
}
