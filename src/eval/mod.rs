//! Evaluation (design §8): a frozen classifier's feature space and the sample-quality metrics
//! computed in it. For MNIST the metric is a Fréchet distance in *the small classifier's*
//! features — FD, never FID. FID is the same distance in InceptionV3 pool features with
//! pytorch-fid's FID weights ([`fid`]), and is named FID only with those weights.
//!
//! - [`classifier`]: the small CNN, its training and loading (with its weights' hash).
//! - [`fid`]: FID (and IS, precision/recall) of `.npz` or image-folder sample sets against ADM
//!   reference batches, statistics or images, for the ImageNet protocol.
//! - [`inception`]: pytorch-fid's InceptionV3 (pool3 features and logits) for FID and IS with
//!   the standard weights, loaded by their key names.
//! - [`metrics`]: FD (faer for the matrix square root), classifier Inception Score, k-NN
//!   precision/recall, and their tests against worked cases.
//! - [`quality()`]: one call from images (and requested labels) to a [`QualityReport`].

pub mod classifier;
pub mod fid;
pub mod inception;
pub mod metrics;

use candle_core::Tensor;

/// Errors of evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad input or settings.
    #[error("eval: {0}")]
    Bad(String),
    /// A weight the network needs is absent.
    #[error("weights: missing tensor `{key}`")]
    MissingWeight { key: String },
    /// A weight has another shape than the network needs.
    #[error("weights: `{key}` has shape {got:?}, expected {want:?}")]
    WeightShape { key: String, want: Vec<usize>, got: Vec<usize> },
    /// A weights file does not fit the network.
    #[error("{path}: {source}")]
    WeightsFile {
        path: std::path::PathBuf,
        #[source]
        source: Box<EvalError>,
    },
    #[error(transparent)]
    Params(#[from] crate::params::ParamError),
    #[error(transparent)]
    TensorIo(#[from] crate::tensor_io::TensorIoError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Nn(#[from] crate::nn::NnError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// The metrics of one sample set against a reference set.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QualityReport {
    pub samples: usize,
    pub reference_samples: usize,
    /// Fréchet distance in the classifier's 128-d feature space (not FID).
    pub fd: f64,
    /// Classifier Inception Score, mean and std over 10 splits.
    pub is_mean: f64,
    pub is_std: f64,
    /// k = 3 nearest-neighbour precision and recall.
    pub precision: f64,
    pub recall: f64,
    /// Share of samples the classifier assigns to the class they were generated for.
    pub accuracy: Option<f64>,
    pub classifier_sha256: String,
}

/// Metrics of `images` (B, C, S, S in [−1, 1]) against reference features, with the requested
/// `labels` for class accuracy.
pub fn quality(
    model: &classifier::Classifier,
    classifier_sha256: &str,
    images: &Tensor,
    labels: Option<&[u32]>,
    reference: &[f32],
) -> Result<QualityReport> {
    let (feats, probs) = model.features_and_probs(images)?;
    quality_from_features(&feats, &probs, model.config().num_classes, classifier_sha256, labels, reference)
}

/// [`quality`] from precomputed features and probabilities.
pub fn quality_from_features(
    feats: &[f32],
    probs: &[f32],
    classes: usize,
    classifier_sha256: &str,
    labels: Option<&[u32]>,
    reference: &[f32],
) -> Result<QualityReport> {
    let f = classifier::FEATURES;
    let n = feats.len() / f;
    let fd = metrics::frechet_distance_of(feats, reference, f)?;
    let splits = if n >= 100 { 10 } else { 1 };
    let (is_mean, is_std) = metrics::inception_score(probs, classes, splits)?;
    let (precision, recall) = metrics::precision_recall(reference, feats, f, 3)?;
    let accuracy = labels.map(|labels| {
        let correct = probs
            .chunks(classes)
            .zip(labels)
            .filter(|(row, &y)| {
                row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32) == Some(y)
            })
            .count();
        correct as f64 / n.max(1) as f64
    });
    Ok(QualityReport {
        samples: n,
        reference_samples: reference.len() / f,
        fd,
        is_mean,
        is_std,
        precision,
        recall,
        accuracy,
        classifier_sha256: classifier_sha256.to_string(),
    })
}
