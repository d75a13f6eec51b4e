//! Top-k selection for routers.

/// Writes the indices of the `out.len()` largest scores into `out`, by descending score,
/// ties broken by ascending index. NaN scores are never chosen over numbers.
pub fn top_k(scores: &[f32], out: &mut [usize]) {
    let k = out.len();
    assert!(k <= scores.len(), "top_k: k {k} > {} scores", scores.len());
    let better = |a: usize, b: usize| {
        let (x, y) = (scores[a], scores[b]);
        match (x.is_nan(), y.is_nan()) {
            (false, true) => true,
            (true, _) => false,
            _ => x > y || (x == y && a < b),
        }
    };
    let mut n = 0;
    for i in 0..scores.len() {
        // Insertion into the sorted prefix: k is small (≤ 16 in practice).
        let mut pos = n;
        while pos > 0 && better(i, out[pos - 1]) {
            pos -= 1;
        }
        if pos < k {
            let end = n.min(k - 1);
            for j in (pos..end).rev() {
                out[j + 1] = out[j];
            }
            out[pos] = i;
            n = (n + 1).min(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_largest_in_order_with_ties_by_index() {
        let s = [0.1f32, 0.5, 0.3, 0.5, f32::NAN, 0.2];
        let mut out = [0usize; 3];
        top_k(&s, &mut out);
        assert_eq!(out, [1, 3, 2]);
        let mut all = [0usize; 6];
        top_k(&s, &mut all);
        assert_eq!(all, [1, 3, 2, 5, 0, 4]);
        let mut none: [usize; 0] = [];
        top_k(&s, &mut none);
    }
}
