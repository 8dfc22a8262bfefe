//! The six particle classes of the CZII challenge, in network output order, and the pick record.

/// Voxel size of the competition tomograms, in Å.
pub const ANGSTROM_PER_VOXEL: f64 = 10.012;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParticleClass {
    pub name: &'static str,
    /// Particle radius in Å.
    pub radius_a: f64,
    /// Weight in the Kaggle F-beta.
    pub metric_weight: f64,
}

/// Classes in network output order.
pub const CLASSES: [ParticleClass; 6] = [
    ParticleClass { name: "apo-ferritin", radius_a: 60.0, metric_weight: 1.0 },
    ParticleClass { name: "beta-galactosidase", radius_a: 90.0, metric_weight: 2.0 },
    ParticleClass { name: "ribosome", radius_a: 150.0, metric_weight: 1.0 },
    ParticleClass { name: "thyroglobulin", radius_a: 130.0, metric_weight: 2.0 },
    ParticleClass { name: "virus-like-particle", radius_a: 135.0, metric_weight: 1.0 },
    ParticleClass { name: "beta-amylase", radius_a: 65.0, metric_weight: 0.0 },
];

/// Seed per-class score thresholds, in class order.
pub const SEED_THRESHOLDS: [f32; 6] = [0.255, 0.235, 0.16, 0.205, 0.225, 0.5];

/// Index of a class by name.
pub fn class_index(name: &str) -> Option<usize> {
    CLASSES.iter().position(|c| c.name == name)
}

/// One detected (or ground-truth) particle. Coordinates in Å, as in the Kaggle CSV and copick.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub run: String,
    pub class: usize,
    /// Detection score; 1.0 for ground truth.
    pub score: f32,
    pub x: f64,
    pub y: f64,
    pub z: f64,
}
