//! RMSNorm: `w * x / sqrt(mean(x²) + eps)`, in f32 with an f64 sum of squares.

/// Normalizes `x` into `out` (same length as `w`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    assert!(x.len() == w.len() && out.len() == w.len(), "rms_norm length mismatch");
    let inv = inv_rms(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (v * inv);
    }
}

/// In-place variant, for q/k norms.
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    assert_eq!(x.len(), w.len(), "rms_norm length mismatch");
    let inv = inv_rms(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mean = (ss / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &[1.0; 4], 0.0, &mut out);
        let rms: f32 = (out.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
        assert!((out[0] / out[1] + 0.75).abs() < 1e-6);
    }
}
