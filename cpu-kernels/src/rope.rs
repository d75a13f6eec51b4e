//! Rotary position embedding, rotate-half pairing (dimension i with i + d/2), as in
//! `transformers`' `apply_rotary_pos_emb`.

/// Inverse frequencies `1 / theta^(2i/d)` computed in f32, `d/2` of them.
pub fn inv_freq(theta: f32, rotary_dim: usize) -> Vec<f32> {
    (0..rotary_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / rotary_dim as f32)).collect()
}

/// cos and sin of `position * inv_freq`, each `d/2` long.
pub fn cos_sin(position: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    let p = position as f32;
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = p * f;
        *c = a.cos();
        *s = a.sin();
    }
}

/// Rotates the first `2 * cos.len()` dimensions of one head vector in place.
pub fn apply_rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    assert!(x.len() >= 2 * half && sin.len() == half, "rope length mismatch");
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_norm_is_kept() {
        let f = inv_freq(10000.0, 8);
        let (mut c, mut s) = (vec![0.0; 4], vec![0.0; 4]);
        let x0 = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        cos_sin(0, &f, &mut c, &mut s);
        let mut x = x0;
        apply_rotate_half(&mut x, &c, &s);
        assert_eq!(x, x0);
        cos_sin(37, &f, &mut c, &mut s);
        apply_rotate_half(&mut x, &c, &s);
        let n0: f32 = x0.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }
}
