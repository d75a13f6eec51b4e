//! Reusable buffers of the forward pass. They only grow, so once a sequence has run a
//! step of a given size, further steps of that size allocate nothing.

use hetmoe_storage::{ExpertId, ExpertKey};

use crate::forward::{PhaseTimes, Routing};

/// Zero-filled `&mut buf[..n]`, growing `buf` if needed.
pub(crate) fn zeroed(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.clear();
    buf.resize(n, 0.0);
    &mut buf[..n]
}

#[derive(Debug, Default, Clone)]
pub(crate) struct AttnScratch {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub ctx: Vec<f32>,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct MoeScratch {
    pub routing: Routing,
    pub probs: Vec<f32>,
    /// `[n, top_k, hidden]`: weighted output of each (token, rank).
    pub slots: Vec<f32>,
    /// Slot indices grouped by expert (counting sort), and each expert's start in it.
    pub order: Vec<usize>,
    pub offsets: Vec<usize>,
    /// Fill cursors of the counting sort, and the experts used by the step.
    pub fill: Vec<usize>,
    pub active: Vec<usize>,
    /// `active` as expert ids and as keys of this layer (what an expert cache is asked for).
    pub active_ids: Vec<ExpertId>,
    pub active_keys: Vec<ExpertKey>,
    /// `[n · top_k, hidden]`: each slot's token in expert order (`order`), and its expert's
    /// output.
    pub xe: Vec<f32>,
    pub ye: Vec<f32>,
    /// The experts' activation scratch.
    pub act: Vec<f32>,
    pub shared_y: Vec<f32>,
    pub gate: Vec<f32>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct Scratch {
    pub x: Vec<f32>,
    pub xn: Vec<f32>,
    pub y: Vec<f32>,
    pub attn: AttnScratch,
    pub moe: MoeScratch,
    pub mlp_act: Vec<f32>,
    /// Phase times, when the sequence profiles its steps.
    pub profile: Option<PhaseTimes>,
}
