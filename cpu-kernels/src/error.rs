/// Misuse of a kernel: slice lengths that do not match the declared shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("weight buffer holds {actual} elements, shape {rows}x{cols} needs {expected}")]
    WeightLength { rows: usize, cols: usize, expected: usize, actual: usize },
    #[error("grouped quantized matrix {rows}x{cols} needs {expected} bytes, got {actual}")]
    GroupedLength { rows: usize, cols: usize, expected: usize, actual: usize },
    #[error("quantized rows need cols ({cols}) and stride ({stride}) to be multiples of 32")]
    QuantizedShape { cols: usize, stride: usize },
    #[error("unknown ISA {0:?} (expected scalar, avx2 or avx512)")]
    UnknownIsa(String),
    #[error("ISA {0} is not supported by this CPU")]
    IsaUnavailable(&'static str),
}
