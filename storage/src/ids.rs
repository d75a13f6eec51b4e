//! Newtypes for the ids every tier talks about.

use std::fmt;

/// Index of a decoder layer, `0..n_layers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LayerId(pub u16);

/// Index of a routed expert within its layer, `0..n_experts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertId(pub u16);

/// One routed expert of one layer: the unit that is cached, loaded and placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExpertKey {
    pub layer: LayerId,
    pub expert: ExpertId,
}

impl ExpertKey {
    pub fn new(layer: usize, expert: usize) -> Self {
        // Layer and expert counts are validated against u16 when the spec is built.
        Self { layer: LayerId(layer as u16), expert: ExpertId(expert as u16) }
    }
}

impl fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layer {} expert {}", self.layer.0, self.expert.0)
    }
}
