//! Disk bandwidth with the page cache bypassed (`O_DIRECT`): raw sequential reads of a
//! file with io_uring (the fio equivalent), then the expert reader reading every extent
//! of a store, at the same queue depth and block (chunk) size.
//!
//! ```text
//! cargo run --release --example disk-probe -- --store /tmp/bench.hmstore --qd 8 --bs 1M --repeat 3
//! ```

use std::path::PathBuf;

use clap::Parser;
use hetmoe_storage::expert_store::{
    probe, ExpertReader, ExpertStore, ReaderChoice, ReaderOptions, UringReader,
};

#[derive(Parser, Debug)]
struct Args {
    /// Expert store to read (the raw probe reads the same file).
    #[arg(long)]
    store: PathBuf,
    /// Reads in flight.
    #[arg(long, default_value_t = 8)]
    qd: u32,
    /// Block size (raw probe) and chunk size (reader), e.g. 1M, 256K.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    bs: usize,
    /// Experts per read_batch call of the reader.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Reader: uring or pread.
    #[arg(long, default_value = "uring")]
    reader: String,
    /// Register the reader's buffers with io_uring (READ_FIXED), as a cache's slots would be.
    #[arg(long)]
    register: bool,
    /// Measurements of each kind, alternated.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        _ => (s, 1),
    };
    num.parse::<usize>().map(|n| n * mul).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let a = Args::parse();
    let choice = match a.reader.as_str() {
        "pread" => ReaderChoice::Pread,
        _ => ReaderChoice::Uring,
    };
    let opts = ReaderOptions { choice, queue_depth: a.qd, chunk_bytes: a.bs, direct: true };
    let store = ExpertStore::open_with(&a.store, opts)?;
    let mut bufs = probe::prefaulted_bufs(a.batch, store.buf_len());
    let mut reader: Box<dyn ExpertReader> = if a.register && choice == ReaderChoice::Uring {
        let mut r = UringReader::open(store.layout().clone(), &opts)?;
        let views: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
        // SAFETY: `bufs` is declared before `reader`, so it is dropped after it, and it is
        // never reallocated: the registered buffers stay valid while the reader lives.
        unsafe { r.register_buffers(&views) }?;
        Box::new(r)
    } else {
        store.new_reader()?
    };
    let (mut raw, mut rd, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.repeat {
        let t = probe::direct_read(&a.store, a.qd, a.bs, u64::MAX)?;
        raw.push(t.gbs());
        let r = probe::read_all_extents(reader.as_mut(), &mut bufs)?;
        rd.push(r.gbs());
        ratio.push(r.gbs() / t.gbs());
        println!(
            "run {i}: raw O_DIRECT {:.3} GB/s ({} B in {:.2?}, cpu {:.2?}) | {:?} reader {:.3} GB/s ({} B in {:.2?}, cpu {:.2?}) | {:.1}%",
            t.gbs(),
            t.bytes,
            t.elapsed,
            t.cpu,
            reader.kind(),
            r.gbs(),
            r.bytes,
            r.elapsed,
            r.cpu,
            100.0 * r.gbs() / t.gbs()
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m_raw, m_rd, m_ratio) = (med(&mut raw), med(&mut rd), med(&mut ratio));
    println!(
        "{}",
        serde_json::json!({"qd": a.qd, "bs": a.bs, "raw_gbs": m_raw, "reader_gbs": m_rd,
            "ratio_of_medians": m_rd / m_raw, "median_paired_ratio": m_ratio, "reader": format!("{:?}", reader.kind()), "registered": a.register,
            "batch": a.batch})
    );
    Ok(())
}
