//! Expert store: repack, open/validate, readers, faults.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use hetmoe_cpu_kernels::matmul::MatRef;
use hetmoe_cpu_kernels::moe::{expert_swiglu, ExpertRef};
use hetmoe_cpu_kernels::quant::{quantize_q4, quantize_q8, BlockQ4, BlockQ8, QK};
use hetmoe_cpu_kernels::row_groups::{group_q4_rows, group_q8_rows};
use hetmoe_cpu_kernels::WeightsRef;
use hetmoe_storage::expert_store::{
    probe, repack, AlignedBuf, Encoding, ExpertReader, ExpertStore, Fault, FaultInjectingReader, FaultyFile,
    PreadReader, ReadRequest, ReaderChoice, ReaderOptions, RepackControl, UringReader,
};
use hetmoe_storage::{open_model_dir, ExpertKey, ModelSpec, StorageError, WeightKey};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
fn mixtral() -> PathBuf {
    repo().join("tests/fixtures/mixtral/model")
}
fn tiny() -> PathBuf {
    repo().join("models/tiny-mixtral-trained")
}
fn fixture(arch: &str) -> PathBuf {
    repo().join("tests/fixtures").join(arch).join("model")
}

fn opts(choice: ReaderChoice) -> ReaderOptions {
    // Small chunks so that extents are split into several reads in flight.
    ReaderOptions { choice, queue_depth: 8, chunk_bytes: 8192, direct: true }
}

fn build(model: &Path, enc: Encoding) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("experts.hmstore");
    let mut last = None;
    let s = repack(model, &out, enc, &mut |p| {
        last = Some(*p);
        RepackControl::Continue
    })
    .unwrap();
    let last = last.unwrap();
    assert_eq!(last.experts_done, last.experts_total);
    assert_eq!(last.bytes_done, s.file_bytes);
    (dir, out)
}

/// The expected bundle of an expert as f32 rows: `[ffn][gate_j, up_j, down[:, j]]`.
fn expected_rows(model: &Path, spec: &ModelSpec, key: ExpertKey) -> Vec<Vec<f32>> {
    let (_, ck) = open_model_dir(model).unwrap();
    let (l, e) = (key.layer.0 as usize, key.expert.0 as usize);
    let g = ck.tensor(&WeightKey::ExpertGate(l, e).name(spec.arch)).unwrap().to_f32_vec();
    let u = ck.tensor(&WeightKey::ExpertUp(l, e).name(spec.arch)).unwrap().to_f32_vec();
    let d = ck.tensor(&WeightKey::ExpertDown(l, e).name(spec.arch)).unwrap().to_f32_vec();
    let (h, f) = (spec.hidden, spec.moe.expert_ffn);
    let mut rows = Vec::new();
    for j in 0..f {
        rows.push(g[j * h..(j + 1) * h].to_vec());
        rows.push(u[j * h..(j + 1) * h].to_vec());
        rows.push((0..h).map(|i| d[i * f + j]).collect());
    }
    rows
}

fn expected_bytes(rows: &[Vec<f32>], enc: Encoding) -> Vec<u8> {
    let mut out = Vec::new();
    // q8/q4: gate and up rows in bundles, then downᵀ (every third row) in groups of four.
    let (mut d8, mut d4) = (Vec::new(), Vec::new());
    for (i, r) in rows.iter().enumerate() {
        let down = i % 3 == 2;
        match enc {
            Encoding::Bf16 => r.iter().for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
            Encoding::F32 => r.iter().for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
            Encoding::Q8 => {
                let mut b = vec![BlockQ8 { d: f16::ZERO, qs: [0; QK] }; r.len() / QK];
                quantize_q8(r, &mut b);
                if down {
                    d8.extend(b);
                    continue;
                }
                for b in b {
                    out.extend_from_slice(&b.d.to_le_bytes());
                    out.extend(b.qs.iter().map(|&q| q as u8));
                }
            }
            Encoding::Q4 => {
                let mut b = vec![BlockQ4 { d: f16::ZERO, qs: [0; QK / 2] }; r.len() / QK];
                quantize_q4(r, &mut b);
                if down {
                    d4.extend(b);
                    continue;
                }
                for b in b {
                    out.extend_from_slice(&b.d.to_le_bytes());
                    out.extend_from_slice(&b.qs);
                }
            }
        }
    }
    let (ffn, hidden) = (rows.len() / 3, rows.first().map_or(0, Vec::len));
    if let Some(kind) = enc.down_groups() {
        let start = out.len();
        out.resize(start + kind.matrix_bytes(ffn, hidden), 0);
        if enc == Encoding::Q8 {
            group_q8_rows(&d8, ffn, hidden, &mut out[start..]);
        } else {
            group_q4_rows(&d4, ffn, hidden, &mut out[start..]);
        }
    }
    out
}

fn read_all(store: &ExpertStore, reader: &mut dyn ExpertReader) -> Vec<(ExpertKey, AlignedBuf)> {
    let keys: Vec<ExpertKey> = store.layout().keys().collect();
    let mut bufs: Vec<AlignedBuf> = keys.iter().map(|_| store.alloc_buf()).collect();
    let mut reqs: Vec<ReadRequest<'_>> =
        keys.iter().zip(bufs.iter_mut()).map(|(&k, b)| ReadRequest::new(k, b)).collect();
    for (r, k) in reader.read_batch(&mut reqs).into_iter().zip(&keys) {
        r.unwrap_or_else(|e| panic!("{k}: {e}"));
    }
    keys.into_iter().zip(bufs).collect()
}

#[test]
fn round_trip_every_arch_and_encoding_both_readers() {
    let models = [mixtral(), tiny(), fixture("qwen2_moe"), fixture("qwen3_moe"), fixture("olmoe")];
    for model in &models {
        let (spec, _) = open_model_dir(model).unwrap();
        for enc in Encoding::ALL {
            let (_dir, path) = build(model, enc);
            let store = ExpertStore::open(&path).unwrap();
            store.check_source(model).unwrap();
            assert_eq!(store.moe_layers(), spec.moe_layers());
            assert_eq!(
                (store.hidden(), store.ffn(), store.n_experts()),
                (spec.hidden, spec.moe.expert_ffn, spec.moe.n_experts)
            );
            let mut uring = UringReader::open(store.layout().clone(), &opts(ReaderChoice::Uring)).unwrap();
            assert!(uring.is_direct(), "tests expect O_DIRECT to work in the temp dir");
            let mut pread = PreadReader::open(store.layout().clone(), &opts(ReaderChoice::Pread)).unwrap();
            let a = read_all(&store, &mut uring);
            let b = read_all(&store, &mut pread);
            assert_eq!(a.len(), spec.moe_layers().len() * spec.moe.n_experts);
            for ((key, ba), (_, bb)) in a.iter().zip(&b) {
                let n = store.extent_len();
                assert_eq!(&ba[..], &bb[..], "{model:?} {enc} {key}: readers disagree");
                let want = expected_bytes(&expected_rows(model, &spec, *key), enc);
                assert_eq!(&ba[..n], &want[..], "{model:?} {enc} {key}");
                assert!(ba[n..].iter().all(|&v| v == 0), "padding is zero");
                let w = store.as_weights(ba).unwrap();
                let ffn = spec.moe.expert_ffn;
                let rows = if enc.down_groups().is_some() { 2 * ffn + ffn.div_ceil(4) * 4 } else { 3 * ffn };
                assert_eq!(w.len(), rows * spec.hidden);
                store.expert_ref(ba).unwrap();
            }
        }
    }
}

#[test]
fn bundled_bf16_expert_computes_the_same_as_separate_matrices() {
    let model = tiny();
    let (spec, ck) = open_model_dir(&model).unwrap();
    let (_dir, path) = build(&model, Encoding::Bf16);
    let store = ExpertStore::open(&path).unwrap();
    let key = ExpertKey::new(2, 5);
    let mut buf = store.alloc_buf();
    store.read_expert(key, &mut buf).unwrap();
    let (h, f) = (spec.hidden, spec.moe.expert_ffn);
    let t = |k: WeightKey| ck.tensor(&k.name(spec.arch)).unwrap().to_f32_vec();
    let bf = |v: Vec<f32>| v.into_iter().map(bf16::from_f32).collect::<Vec<_>>();
    let g = bf(t(WeightKey::ExpertGate(2, 5)));
    let u = bf(t(WeightKey::ExpertUp(2, 5)));
    let d = t(WeightKey::ExpertDown(2, 5));
    let dt = bf((0..f * h).map(|i| d[(i % h) * f + i / h]).collect());
    fn m(w: &[bf16], f: usize, h: usize) -> MatRef<'_> {
        MatRef::new(WeightsRef::Bf16(w), f, h).unwrap()
    }
    let sep = ExpertRef::new(m(&g, f, h), m(&u, f, h), m(&dt, f, h)).unwrap();
    let x: Vec<f32> = (0..3 * h).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let mut act = vec![0f32; 2 * 3 * f];
    let (mut y1, mut y2) = (vec![0f32; 3 * h], vec![0f32; 3 * h]);
    expert_swiglu(&x, sep, &mut act, &mut y1);
    expert_swiglu(&x, store.expert_ref(&buf).unwrap(), &mut act, &mut y2);
    assert_eq!(y1, y2);
}

#[test]
fn store_api_reads_single_batched_and_unaligned() {
    let (_dir, path) = build(&mixtral(), Encoding::Q8);
    let store = ExpertStore::open(&path).unwrap();
    let keys: Vec<ExpertKey> = store.layout().keys().collect();
    let mut one = store.alloc_buf();
    store.read_expert(keys[3], &mut one).unwrap();
    // Unaligned destination goes through a bounce buffer.
    let mut v = vec![0u8; store.extent_len() + 1];
    store.read_into(keys[3], &mut v[1..]).unwrap();
    assert_eq!(&v[1..], &one[..store.extent_len()]);
    // Misaligned / short destinations are typed errors, not panics.
    let mut big = AlignedBuf::zeroed(store.buf_len() + 4096);
    let e = store.read_expert(keys[0], &mut big[1..]).unwrap_err();
    assert!(matches!(e, StorageError::BadDestination { layer: 0, expert: 0, .. }), "{e}");
    let e = store.read_expert(keys[0], &mut big[..4096]).unwrap_err();
    assert!(matches!(e, StorageError::BadDestination { .. }), "{e}");
    let e = store.read_expert(ExpertKey::new(9, 0), &mut one).unwrap_err();
    assert!(matches!(e, StorageError::UnknownExpert { layer: 9, expert: 0 }), "{e}");
    // Concurrent callers each get a reader from the pool.
    let store = Arc::new(store);
    std::thread::scope(|s| {
        for t in 0..3 {
            let store = store.clone();
            let keys = keys.clone();
            s.spawn(move || {
                let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| store.alloc_buf()).collect();
                let mut reqs: Vec<_> = keys[t * 4..t * 4 + 4]
                    .iter()
                    .zip(bufs.iter_mut())
                    .map(|(&k, b)| ReadRequest::new(k, b))
                    .collect();
                assert!(store.read_experts(&mut reqs).iter().all(|r| r.is_ok()));
            });
        }
    });
}

#[test]
fn registered_buffers_read_the_same_bytes() {
    let (_dir, path) = build(&tiny(), Encoding::Q4);
    let store = ExpertStore::open(&path).unwrap();
    let mut plain = PreadReader::open(store.layout().clone(), &opts(ReaderChoice::Pread)).unwrap();
    let want = read_all(&store, &mut plain);
    let mut uring = UringReader::open(store.layout().clone(), &opts(ReaderChoice::Uring)).unwrap();
    // One arena holding 8 slots, registered once; slots carved from it.
    let slot = store.buf_len();
    let mut arena = AlignedBuf::zeroed(8 * slot);
    // SAFETY: `arena` outlives `uring` (declared before it is used, unregistered below).
    unsafe { uring.register_buffers(&[&arena[..]]) }.unwrap();
    for group in want.chunks(8) {
        let mut reqs: Vec<ReadRequest<'_>> =
            arena.chunks_mut(slot).zip(group).map(|(b, (k, _))| ReadRequest::new(*k, b)).collect();
        assert!(uring.read_batch(&mut reqs).iter().all(|r| r.is_ok()));
        for (b, (_, w)) in arena.chunks(slot).zip(group) {
            assert_eq!(b, &w[..]);
        }
    }
    uring.unregister_buffers().unwrap();
}

fn corrupt_at(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn corrupted_extent_is_a_checksum_error_naming_the_expert() {
    let (_dir, path) = build(&mixtral(), Encoding::Bf16);
    let store = ExpertStore::open(&path).unwrap();
    let key = ExpertKey::new(1, 6);
    let x = *store.layout().extent(key).unwrap();
    corrupt_at(&path, x.offset + 1234);
    for choice in [ReaderChoice::Uring, ReaderChoice::Pread] {
        let store = ExpertStore::open_with(&path, opts(choice)).unwrap();
        let mut reader = store.new_reader().unwrap();
        let mut bufs: Vec<AlignedBuf> = (0..3).map(|_| store.alloc_buf()).collect();
        let keys = [ExpertKey::new(1, 5), key, ExpertKey::new(1, 7)];
        let mut reqs: Vec<_> =
            keys.iter().zip(bufs.iter_mut()).map(|(&k, b)| ReadRequest::new(k, b)).collect();
        let res = reader.read_batch(&mut reqs);
        assert!(res[0].is_ok() && res[2].is_ok(), "{choice:?}");
        let e = res[1].as_ref().unwrap_err();
        assert!(
            matches!(e, StorageError::ExtentChecksum { layer: 1, expert: 6, offset, .. } if *offset == x.offset),
            "{choice:?}: {e}"
        );
        assert!(e.to_string().contains("layer 1 expert 6"));
    }
}

#[test]
fn truncated_store_fails_to_open() {
    let (_dir, path) = build(&mixtral(), Encoding::Q4);
    let len = std::fs::metadata(&path).unwrap().len();
    for cut in [len - 1, len - 4096, len / 2, 200, 10] {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(cut).unwrap();
        let e = ExpertStore::open(&path).unwrap_err();
        assert!(matches!(e, StorageError::StoreTruncated { .. }), "cut {cut}: {e}");
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let (_dir, path) = build(&mixtral(), Encoding::Q4);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len + 4096).unwrap();
    let e = ExpertStore::open(&path).unwrap_err();
    assert!(matches!(e, StorageError::StoreHeader { .. }), "{e}");
}

#[test]
fn bad_header_checksum_magic_and_version_are_rejected() {
    let (_dir, path) = build(&mixtral(), Encoding::Q8);
    let store = ExpertStore::open(&path).unwrap();
    // Fixed header 120 bytes, "mixtral" padded to 8, 3 MoE layers (12 bytes padded to 16),
    // then the extent table: byte 16 of entry 10 is its length field.
    assert_eq!(store.layout().moe_layers.len(), 3);
    let table_entry = 120 + 8 + 16 + 32 * 10 + 16;
    drop(store);
    let orig = std::fs::read(&path).unwrap();
    // A flipped byte anywhere in the header: the extent table, the shapes.
    for at in [table_entry, 60, 120] {
        std::fs::write(&path, &orig).unwrap();
        corrupt_at(&path, at);
        let e = ExpertStore::open(&path).unwrap_err();
        assert!(matches!(e, StorageError::StoreHeaderChecksum { .. }), "byte {at}: {e}");
    }
    std::fs::write(&path, &orig).unwrap();
    corrupt_at(&path, 0);
    assert!(matches!(ExpertStore::open(&path).unwrap_err(), StorageError::StoreBadMagic { .. }));
    std::fs::write(&path, &orig).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().write_all_at(&7u32.to_le_bytes(), 8).unwrap();
    assert!(matches!(ExpertStore::open(&path).unwrap_err(), StorageError::StoreVersion { found: 7, .. }));
    // What a crash before the header write leaves behind: extents, zero header.
    std::fs::write(&path, &orig).unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().write_all_at(&[0u8; 4096], 0).unwrap();
    assert!(matches!(ExpertStore::open(&path).unwrap_err(), StorageError::StoreBadMagic { .. }));
    // Not a store at all.
    let e = ExpertStore::open(mixtral().join("model.safetensors")).unwrap_err();
    assert!(matches!(e, StorageError::StoreBadMagic { .. }), "{e}");
}

#[test]
fn interrupted_repack_leaves_no_valid_store() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("experts.hmstore");
    let e = repack(&mixtral(), &out, Encoding::Bf16, &mut |p| {
        if p.experts_done == 5 {
            RepackControl::Cancel
        } else {
            RepackControl::Continue
        }
    })
    .unwrap_err();
    assert!(matches!(e, StorageError::RepackCancelled { .. }), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "partial file left behind");
    // A store already there survives a cancelled re-repack unchanged.
    repack(&mixtral(), &out, Encoding::Bf16, &mut |_| RepackControl::Continue).unwrap();
    let before = std::fs::read(&out).unwrap();
    let _ = repack(&mixtral(), &out, Encoding::Q8, &mut |_| RepackControl::Cancel).unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), before);
    ExpertStore::open(&out).unwrap();
    // A panic in the middle (e.g. the process unwinding on Ctrl-C handling) cleans up too.
    let out2 = dir.path().join("other.hmstore");
    let r = std::panic::catch_unwind(|| {
        let _ = repack(&mixtral(), &out2, Encoding::Bf16, &mut |p| {
            assert!(p.experts_done < 3, "boom");
            RepackControl::Continue
        });
    });
    assert!(r.is_err());
    assert!(!out2.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn injected_read_error_surfaces_and_other_buffers_are_intact() {
    let (_dir, path) = build(&tiny(), Encoding::Bf16);
    let store = ExpertStore::open(&path).unwrap();
    let mut good = PreadReader::open(store.layout().clone(), &opts(ReaderChoice::Pread)).unwrap();
    let want = read_all(&store, &mut good);
    let bad_key = ExpertKey::new(2, 3);
    let x = *store.layout().extent(bad_key).unwrap();

    // 1. Raw I/O fault under the pread reader: EIO in the middle of the extent.
    let file = std::fs::File::open(&path).unwrap();
    let bad_range = x.offset + 20_000..x.offset + 20_001;
    let faulty = FaultyFile { inner: file, fail: std::iter::once(bad_range).collect() };
    let mut r =
        PreadReader::with_source(store.layout().clone(), Box::new(faulty), &opts(ReaderChoice::Pread));
    check_fault(
        &store,
        &mut r,
        &want,
        bad_key,
        |e| matches!(e, StorageError::ExtentIo { layer: 2, expert: 3, offset, .. } if *offset > x.offset),
    );

    // 2. Reader-level injection over io_uring (what the cache's tests use).
    let inner = UringReader::open(store.layout().clone(), &opts(ReaderChoice::Uring)).unwrap();
    let mut r = FaultInjectingReader::new(inner);
    r.inject(bad_key, Fault::IoError);
    check_fault(&store, &mut r, &want, bad_key, |e| {
        matches!(e, StorageError::ExtentIo { layer: 2, expert: 3, .. })
    });
    r.inject(bad_key, Fault::Corrupt);
    check_fault(&store, &mut r, &want, bad_key, |e| {
        matches!(e, StorageError::ExtentChecksum { layer: 2, expert: 3, .. })
    });

    // 3. The file shrinks under an open io_uring reader: short read at EOF.
    let last = *store.layout().extents.last().unwrap();
    let mut r = UringReader::open(store.layout().clone(), &opts(ReaderChoice::Uring)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(last.offset + 8192 + 100).unwrap();
    check_fault(&store, &mut r, &want, last.key, |e| {
        matches!(e, StorageError::ExtentShortRead { .. } | StorageError::ExtentIo { .. })
            && e.to_string().contains(&last.key.to_string())
    });
    let mut r = PreadReader::open(store.layout().clone(), &opts(ReaderChoice::Pread)).unwrap();
    check_fault(&store, &mut r, &want, last.key, |e| {
        matches!(e, StorageError::ExtentShortRead { .. } | StorageError::ExtentIo { .. })
            && e.to_string().contains(&last.key.to_string())
    });
}

fn check_fault(
    store: &ExpertStore,
    reader: &mut dyn ExpertReader,
    want: &[(ExpertKey, AlignedBuf)],
    bad: ExpertKey,
    is_expected: impl Fn(&StorageError) -> bool,
) {
    let mut bufs: Vec<AlignedBuf> = want.iter().map(|_| store.alloc_buf()).collect();
    let mut reqs: Vec<_> =
        want.iter().zip(bufs.iter_mut()).map(|((k, _), b)| ReadRequest::new(*k, b)).collect();
    let res = reader.read_batch(&mut reqs);
    for ((r, (k, w)), b) in res.iter().zip(want).zip(&bufs) {
        if *k == bad {
            let e = r.as_ref().expect_err("the faulty read must fail");
            assert!(is_expected(e), "unexpected error for {k}: {e}");
        } else {
            assert!(r.is_ok(), "{k}: {:?}", r);
            assert_eq!(&b[..], &w[..], "{k} corrupted by another request's fault");
        }
    }
}

#[test]
fn stale_store_is_detected() {
    let src = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(mixtral().join(f), src.path().join(f)).unwrap();
    }
    let (_dir, path) = build(src.path(), Encoding::Q8);
    let store = ExpertStore::open(&path).unwrap();
    store.check_source(src.path()).unwrap();
    assert!(matches!(store.check_source(tiny()).unwrap_err(), StorageError::StoreStale { .. }));
    let cfg = std::fs::read_to_string(src.path().join("config.json")).unwrap();
    std::fs::write(src.path().join("config.json"), cfg.replace("1e-05", "1e-06")).unwrap();
    assert!(matches!(store.check_source(src.path()).unwrap_err(), StorageError::StoreStale { .. }));
}

#[test]
fn quantized_encodings_need_whole_blocks() {
    assert!(matches!(Encoding::Q8.row_bytes(48).unwrap_err(), StorageError::StoreEncoding { .. }));
    assert_eq!(Encoding::Q4.row_bytes(64).unwrap(), 36);
    assert_eq!(Encoding::Bf16.extent_len(128, 192).unwrap(), 3 * 192 * 256);
    assert_eq!("Q8".parse::<Encoding>().unwrap(), Encoding::Q8);
}

#[test]
fn probes_run_on_a_small_store() {
    let (_dir, path) = build(&tiny(), Encoding::Bf16);
    let t = probe::direct_read(&path, 4, 64 << 10, u64::MAX).unwrap();
    assert!(t.bytes > 0);
    let store = ExpertStore::open(&path).unwrap();
    let mut r = store.new_reader().unwrap();
    let mut bufs = probe::prefaulted_bufs(5, store.buf_len());
    let t = probe::read_all_extents(r.as_mut(), &mut bufs).unwrap();
    assert_eq!(t.bytes, (store.layout().extents.len() * store.buf_len()) as u64);
}
