//! Sample-quality metrics in a classifier's feature space (design §8): Fréchet distance (FD; the
//! paper's FID uses InceptionV3, unavailable here, so this is *not* FID), classifier Inception
//! Score, k-NN precision and recall (Kynkäänniemi et al., k = 3), and class accuracy.
//!
//! # Shapes
//! features (N, F) row-major f64/f32 slices; probabilities (N, C).

use faer::{Mat, Side};

use super::{EvalError, Result};

/// Mean (F) and covariance (F × F, unbiased) of row-major features (n × f).
pub fn mean_cov(features: &[f32], f: usize) -> Result<(Vec<f64>, Mat<f64>)> {
    let n = features.len() / f.max(1);
    if n < 2 || features.len() != n * f {
        return Err(EvalError::Bad(format!(
            "need at least 2 feature rows of width {f}, got {} values",
            features.len()
        )));
    }
    let mut mean = vec![0f64; f];
    for row in features.chunks(f) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let centered = Mat::<f64>::from_fn(n, f, |i, j| features[i * f + j] as f64 - mean[j]);
    let cov = (centered.transpose() * &centered) * faer::Scale(1.0 / (n - 1) as f64);
    Ok((mean, cov))
}

/// Symmetric positive semi-definite square root via the eigendecomposition (negative
/// eigenvalues from rounding are clamped to 0).
pub fn sqrtm_psd(a: &Mat<f64>) -> Result<Mat<f64>> {
    let evd =
        a.self_adjoint_eigen(Side::Lower).map_err(|e| EvalError::Bad(format!("eigendecomposition failed: {e:?}")))?;
    let u = evd.U();
    let s = evd.S().column_vector();
    let n = a.nrows();
    let scaled = Mat::<f64>::from_fn(n, n, |i, j| u[(i, j)] * s[j].max(0.0).sqrt());
    Ok(&scaled * u.transpose())
}

/// Fréchet distance between Gaussians N(μ1, Σ1) and N(μ2, Σ2):
/// |μ1 − μ2|² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½).
pub fn frechet_distance(mu1: &[f64], s1: &Mat<f64>, mu2: &[f64], s2: &Mat<f64>) -> Result<f64> {
    let diff: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b).powi(2)).sum();
    let r1 = sqrtm_psd(s1)?;
    let m = &r1 * s2 * &r1;
    let evals =
        m.self_adjoint_eigenvalues(Side::Lower).map_err(|e| EvalError::Bad(format!("eigenvalues failed: {e:?}")))?;
    let tr_sqrt: f64 = evals.iter().map(|&e| e.max(0.0).sqrt()).sum();
    let tr = |s: &Mat<f64>| (0..s.nrows()).map(|i| s[(i, i)]).sum::<f64>();
    Ok(diff + tr(s1) + tr(s2) - 2.0 * tr_sqrt)
}

/// FD between two feature sets.
pub fn frechet_distance_of(a: &[f32], b: &[f32], f: usize) -> Result<f64> {
    let (m1, s1) = mean_cov(a, f)?;
    let (m2, s2) = mean_cov(b, f)?;
    frechet_distance(&m1, &s1, &m2, &s2)
}

/// Inception Score: exp(E_x KL(p(y|x) ‖ p(y))), the mean and standard deviation over `splits`
/// equal parts (the usual protocol).
///
/// The parts are not taken in input order: a set written class by class would put one class in
/// each part, and every part's marginal p(y) would then be that class, scoring ≈ 1. The rows are
/// first put in a canonical order (by their values) and then shuffled with a fixed seed, so the
/// parts mix the classes and the score does not depend on how the input was ordered (design §8).
pub fn inception_score(probs: &[f32], classes: usize, splits: usize) -> Result<(f64, f64)> {
    let n = probs.len() / classes.max(1);
    if n == 0 || splits == 0 || n < splits {
        return Err(EvalError::Bad(format!("inception score needs ≥ {splits} samples, got {n}")));
    }
    let row = |i: usize| &probs[i * classes..(i + 1) * classes];
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        row(a).iter().zip(row(b)).map(|(x, y)| x.total_cmp(y)).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)
    });
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut crate::util::rng_for(0, "inception-score-splits", 0));
    let per = n / splits;
    let mut scores = Vec::with_capacity(splits);
    for part in order.chunks_exact(per).take(splits) {
        let mut marginal = vec![0f64; classes];
        for &i in part {
            for (m, &p) in marginal.iter_mut().zip(row(i)) {
                *m += p as f64 / per as f64;
            }
        }
        let kl: f64 = part
            .iter()
            .map(|&i| {
                row(i)
                    .iter()
                    .zip(&marginal)
                    .map(|(&p, &m)| if p > 0.0 { p as f64 * ((p as f64).ln() - m.max(1e-30).ln()) } else { 0.0 })
                    .sum::<f64>()
            })
            .sum::<f64>()
            / per as f64;
        scores.push(kl.exp());
    }
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / splits as f64).sqrt();
    Ok((mean, std))
}

/// Squared Euclidean distances between rows of `a` (n × f) and `b` (m × f), blocked through
/// GEMM: ‖x‖² + ‖y‖² − 2 x·y.
fn sq_distances(a: &[f32], b: &[f32], f: usize) -> Vec<f32> {
    let (n, m) = (a.len() / f, b.len() / f);
    let mut dots = vec![0f32; n * m];
    crate::kernels::matmul::faer_gemm(&mut dots, n, m, f, a, false, b, true, false);
    let norms = |x: &[f32]| -> Vec<f32> { x.chunks(f).map(|r| r.iter().map(|v| v * v).sum()).collect() };
    let (na, nb) = (norms(a), norms(b));
    for i in 0..n {
        for j in 0..m {
            dots[i * m + j] = (na[i] + nb[j] - 2.0 * dots[i * m + j]).max(0.0);
        }
    }
    dots
}

/// The distance of every row of `x` to its k-th nearest neighbour within `x` (itself excluded).
fn kth_radii(x: &[f32], f: usize, k: usize) -> Vec<f32> {
    let n = x.len() / f;
    let mut radii = Vec::with_capacity(n);
    for start in (0..n).step_by(1024) {
        let rows = &x[start * f..(start + 1024).min(n) * f];
        let d = sq_distances(rows, x, f);
        for (i, row) in d.chunks(n).enumerate() {
            let mut r: Vec<f32> = row.iter().enumerate().filter(|&(j, _)| j != start + i).map(|(_, &v)| v).collect();
            let kk = (k - 1).min(r.len().saturating_sub(1));
            let (_, kth, _) = r.select_nth_unstable_by(kk, |a, b| a.total_cmp(b));
            radii.push(*kth);
        }
    }
    radii
}

/// Fraction of `queries` that fall inside at least one ball (centre `x_i`, squared radius r_i).
fn coverage(queries: &[f32], centres: &[f32], radii: &[f32], f: usize) -> f64 {
    let q = queries.len() / f;
    let mut inside = 0usize;
    for start in (0..q).step_by(1024) {
        let rows = &queries[start * f..(start + 1024).min(q) * f];
        let d = sq_distances(rows, centres, f);
        let m = centres.len() / f;
        inside += d.chunks(m).filter(|row| row.iter().zip(radii).any(|(dist, r)| dist <= r)).count();
    }
    inside as f64 / q.max(1) as f64
}

/// Improved precision and recall (Kynkäänniemi et al. 2019) with k nearest neighbours:
/// precision = share of generated samples inside the real manifold, recall = share of real
/// samples inside the generated manifold.
pub fn precision_recall(real: &[f32], fake: &[f32], f: usize, k: usize) -> Result<(f64, f64)> {
    if real.len() < (k + 1) * f || fake.len() < (k + 1) * f {
        return Err(EvalError::Bad(format!("precision/recall need more than k = {k} samples per set")));
    }
    let real_radii = kth_radii(real, f, k);
    let fake_radii = kth_radii(fake, f, k);
    Ok((coverage(fake, real, &real_radii, f), coverage(real, fake, &fake_radii, f)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::{Distribution, Normal};

    fn gaussian(n: usize, means: &[f64], stds: &[f64], seed: u64) -> Vec<f32> {
        let mut rng = crate::util::rng_for(seed, "gauss", 0);
        let normal = Normal::new(0.0, 1.0).unwrap();
        (0..n)
            .flat_map(|_| {
                means.iter().zip(stds).map(|(m, s)| (m + s * normal.sample(&mut rng)) as f32).collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn frechet_distance_of_a_set_with_itself_is_zero() {
        let x = gaussian(500, &[0.0, 1.0, -2.0, 0.5], &[1.0, 2.0, 0.5, 1.0], 1);
        let fd = frechet_distance_of(&x, &x, 4).unwrap();
        assert!(fd.abs() < 1e-8, "{fd}");
    }

    /// Closed form for diagonal covariances: |Δμ|² + Σ_i (σ1_i − σ2_i)².
    #[test]
    fn frechet_distance_matches_the_closed_form_for_known_gaussians() {
        let (m1, s1) = (vec![0.0, 1.0, 2.0], vec![1.0, 2.0, 0.5]);
        let (m2, s2) = (vec![1.0, 1.0, 0.0], vec![2.0, 1.0, 0.5]);
        let want: f64 = m1.iter().zip(&m2).map(|(a, b): (&f64, &f64)| (a - b).powi(2)).sum::<f64>()
            + s1.iter().zip(&s2).map(|(a, b): (&f64, &f64)| (a - b).powi(2)).sum::<f64>();
        let diag = |s: &[f64]| Mat::<f64>::from_fn(3, 3, |i, j| if i == j { s[i] * s[i] } else { 0.0 });
        let exact = frechet_distance(&m1, &diag(&s1), &m2, &diag(&s2)).unwrap();
        assert!((exact - want).abs() < 1e-9, "{exact} vs {want}");
        // A non-diagonal case: rotate both covariances by the same orthogonal matrix (FD is
        // invariant), and estimate from samples.
        let x = gaussian(20000, &m1, &s1, 2);
        let y = gaussian(20000, &m2, &s2, 3);
        let sampled = frechet_distance_of(&x, &y, 3).unwrap();
        assert!((sampled - want).abs() < 0.1, "{sampled} vs {want}");
        let r = Mat::<f64>::from_fn(3, 3, |i, j| [[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]][i][j]);
        let rot = |s: &[f64]| &r * diag(s) * r.transpose();
        let rotated = frechet_distance(&m1, &rot(&s1), &m2, &rot(&s2)).unwrap();
        assert!((rotated - want).abs() < 1e-8, "{rotated} vs {want}");
    }

    #[test]
    fn inception_score_of_confident_uniform_classes_is_the_class_count() {
        let classes = 4;
        let mut probs = Vec::new();
        for i in 0..400 {
            let mut row = vec![0f32; classes];
            row[i % classes] = 1.0;
            probs.extend(row);
        }
        // The splits are random draws of 100, so their class counts are only about equal.
        let (mean, std) = inception_score(&probs, classes, 4).unwrap();
        assert!((mean - 4.0).abs() < 0.1 && std < 0.1, "{mean} {std}");
        let (one, _) = inception_score(&probs, classes, 1).unwrap();
        assert!((one - 4.0).abs() < 1e-9, "{one}");
        let uniform = vec![0.25f32; 400 * classes];
        assert!((inception_score(&uniform, classes, 4).unwrap().0 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn inception_score_does_not_depend_on_the_order_of_the_samples() {
        // Confident, slightly noisy predictions of 10 classes, 50 samples each: written class by
        // class (as `dpar sample` writes them), the in-order splits of the usual protocol would
        // each hold one class and score ≈ 1.
        let classes = 10;
        let mut rng = crate::util::rng_for(3, "is-order", 0);
        let mut sorted = Vec::new();
        for c in 0..classes {
            for _ in 0..50 {
                let mut row: Vec<f32> = (0..classes).map(|_| rng.random_range(0.0f32..0.02)).collect();
                row[c] = 1.0;
                let sum: f32 = row.iter().sum();
                sorted.extend(row.iter().map(|p| p / sum));
            }
        }
        let mut rows: Vec<&[f32]> = sorted.chunks(classes).collect();
        rand::seq::SliceRandom::shuffle(rows.as_mut_slice(), &mut rng);
        let shuffled: Vec<f32> = rows.concat();
        let (a, a_std) = inception_score(&sorted, classes, 10).unwrap();
        let (b, b_std) = inception_score(&shuffled, classes, 10).unwrap();
        assert_eq!((a, a_std), (b, b_std));
        // And the value is that of mixed splits (about 6 for these 92%-confident rows over ten
        // classes), far from the ≈ 1 of one class per split.
        assert!(a > 5.0, "{a}");
    }

    #[test]
    fn precision_and_recall_are_one_for_identical_sets_and_zero_for_far_apart_sets() {
        let x = gaussian(300, &[0.0; 5], &[1.0; 5], 4);
        let (p, r) = precision_recall(&x, &x, 5, 3).unwrap();
        assert_eq!((p, r), (1.0, 1.0));
        let far = gaussian(300, &[100.0; 5], &[1.0; 5], 5);
        let (p, r) = precision_recall(&x, &far, 5, 3).unwrap();
        assert_eq!((p, r), (0.0, 0.0));
        // A generator covering half the real modes: high precision, lower recall.
        let mut rng = crate::util::rng_for(6, "pr", 0);
        let modes: Vec<f32> = (0..600)
            .flat_map(|i| {
                let c = if i % 2 == 0 { 0.0 } else { 20.0 };
                (0..5).map(move |_| c).collect::<Vec<f32>>()
            })
            .map(|c| c + rng.random_range(-1.0f32..1.0))
            .collect();
        let half: Vec<f32> =
            (0..300).flat_map(|_| (0..5).map(|_| 0.0f32)).map(|c| c + rng.random_range(-1.0f32..1.0)).collect();
        let (p, r) = precision_recall(&modes, &half, 5, 3).unwrap();
        assert!(p > 0.9 && r < 0.6, "{p} {r}");
    }
}
