//! Architecture specs: what a weights file describes, inferred from tensor names and shapes.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The backbone families fastdet runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Segresnetv2,
    Dynunet,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Segresnetv2 => "segresnetv2",
            Arch::Dynunet => "dynunet",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "segresnetv2" | "segresnet" => Ok(Arch::Segresnetv2),
            "dynunet" => Ok(Arch::Dynunet),
            _ => bail!("unknown architecture {s:?} (expected segresnetv2 or dynunet)"),
        }
    }
}

/// Every width of a detection model. Serialised into the weights metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub arch: Arch,
    pub in_channels: usize,
    /// SegResNetV2: `init_filters`; channels of level i are `init_filters << i`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_filters: Option<usize>,
    /// SegResNetV2: residual blocks per encoder level.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks_down: Vec<usize>,
    /// SegResNetV2: residual blocks per decoder level (the live ones only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks_up: Vec<usize>,
    /// SegResNetV2: GroupNorm groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_groups: Option<usize>,
    /// DynUNet: channels per level, input block first, bottleneck last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<usize>,
    /// DynUNet: output width of the deep-supervision head that feeds the detector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deep_supervision_width: Option<usize>,
    /// Channels of the feature map `fm2` that feeds the head.
    pub head_in: usize,
    /// Class-stem width.
    pub cls_width: usize,
    /// Offset-stem width.
    pub offset_width: usize,
    pub num_classes: usize,
    /// Output stride of the detection head.
    pub stride: usize,
}

impl ModelSpec {
    /// Input sizes must be multiples of this in every axis.
    pub fn size_multiple(&self) -> usize {
        match self.arch {
            Arch::Segresnetv2 => 1 << (self.blocks_down.len() - 1),
            Arch::Dynunet => 1 << (self.filters.len() - 1),
        }
    }

    /// A one-line description of the widths.
    pub fn widths_summary(&self) -> String {
        let backbone = match self.arch {
            Arch::Segresnetv2 => format!(
                "init_filters {} blocks_down {:?} blocks_up {:?} groups {}",
                self.init_filters.unwrap_or(0),
                self.blocks_down,
                self.blocks_up,
                self.norm_groups.unwrap_or(0)
            ),
            Arch::Dynunet => format!(
                "filters {:?} deep-supervision width {}",
                self.filters,
                self.deep_supervision_width.unwrap_or(0)
            ),
        };
        format!(
            "{backbone}; head {}→{}/{} (cls/offset), {} classes, stride {}",
            self.head_in, self.cls_width, self.offset_width, self.num_classes, self.stride
        )
    }

    /// The seed's SegResNetV2 (init_filters 32) or DynUNet (32,64,128,256,320,320; width 64).
    pub fn seed(arch: Arch) -> Self {
        match arch {
            Arch::Segresnetv2 => Self::segresnet(32, 48, 16),
            Arch::Dynunet => Self::dynunet(&[32, 64, 128, 256, 320, 320], 64, 48, 16),
        }
    }

    pub fn segresnet(init_filters: usize, cls_width: usize, offset_width: usize) -> Self {
        ModelSpec {
            arch: Arch::Segresnetv2,
            in_channels: 1,
            init_filters: Some(init_filters),
            blocks_down: vec![1, 2, 2, 4],
            blocks_up: vec![1, 1],
            norm_groups: Some(8),
            filters: vec![],
            deep_supervision_width: None,
            head_in: 2 * init_filters,
            cls_width,
            offset_width,
            num_classes: 6,
            stride: 2,
        }
    }

    pub fn dynunet(filters: &[usize], ds_width: usize, cls_width: usize, offset_width: usize) -> Self {
        ModelSpec {
            arch: Arch::Dynunet,
            in_channels: 1,
            init_filters: None,
            blocks_down: vec![],
            blocks_up: vec![],
            norm_groups: None,
            filters: filters.to_vec(),
            deep_supervision_width: Some(ds_width),
            head_in: ds_width,
            cls_width,
            offset_width,
            num_classes: 6,
            stride: 2,
        }
    }

    /// Every tensor the pruned inference graph reads, with its shape.
    pub fn required_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut t: Vec<(String, Vec<usize>)> = Vec::new();
        let k3 = |co: usize, ci: usize| vec![co, ci, 3, 3, 3];
        let k1 = |co: usize, ci: usize| vec![co, ci, 1, 1, 1];
        match self.arch {
            Arch::Segresnetv2 => {
                let f = self.init_filters.unwrap();
                let b = "backbone";
                t.push((format!("{b}.convInit.conv.weight"), k3(f, self.in_channels)));
                let resblock = |t: &mut Vec<(String, Vec<usize>)>, p: String, c: usize| {
                    for n in ["norm1", "norm2"] {
                        t.push((format!("{p}.{n}.weight"), vec![c]));
                        t.push((format!("{p}.{n}.bias"), vec![c]));
                    }
                    t.push((format!("{p}.conv1.conv.weight"), k3(c, c)));
                    t.push((format!("{p}.conv2.conv.weight"), k3(c, c)));
                };
                for (i, &nb) in self.blocks_down.iter().enumerate() {
                    let c = f << i;
                    if i > 0 {
                        t.push((format!("{b}.down_layers.{i}.0.conv.weight"), k3(c, c / 2)));
                    }
                    for j in 0..nb {
                        resblock(&mut t, format!("{b}.down_layers.{i}.{}", j + 1), c);
                    }
                }
                let levels = self.blocks_down.len();
                for (j, &nb) in self.blocks_up.iter().enumerate() {
                    let c = f << (levels - 2 - j);
                    t.push((format!("{b}.up_samples.{j}.0.conv.weight"), k1(c, 2 * c)));
                    for k in 0..nb {
                        resblock(&mut t, format!("{b}.up_layers.{j}.{k}"), c);
                    }
                }
            }
            Arch::Dynunet => {
                let f = &self.filters;
                let n = f.len();
                let b = "backbone";
                let block = |t: &mut Vec<(String, Vec<usize>)>, p: String, co: usize, ci: usize| {
                    t.push((format!("{p}.conv1.conv.weight"), k3(co, ci)));
                    t.push((format!("{p}.conv2.conv.weight"), k3(co, co)));
                };
                block(&mut t, format!("{b}.input_block"), f[0], self.in_channels);
                for i in 0..n - 2 {
                    block(&mut t, format!("{b}.downsamples.{i}"), f[i + 1], f[i]);
                }
                block(&mut t, format!("{b}.bottleneck"), f[n - 1], f[n - 2]);
                // upsamples.k: f[n-1-k] → f[n-2-k]; the last (full resolution) one is dead.
                for k in 0..n - 2 {
                    let (ci, co) = (f[n - 1 - k], f[n - 2 - k]);
                    t.push((format!("{b}.upsamples.{k}.transp_conv.conv.weight"), vec![ci, co, 2, 2, 2]));
                    block(&mut t, format!("{b}.upsamples.{k}.conv_block"), co, 2 * co);
                }
                let w = self.deep_supervision_width.unwrap();
                t.push((format!("{b}.deep_supervision_heads.0.conv.conv.weight"), k1(w, f[1])));
                t.push((format!("{b}.deep_supervision_heads.0.conv.conv.bias"), vec![w]));
            }
        }
        let (ci, m, o) = (self.head_in, self.cls_width, self.offset_width);
        for (stem, width) in [("cls_stem", m), ("offset_stem", o)] {
            t.push((format!("head2.{stem}.0.weight"), k3(width, ci)));
            t.push((format!("head2.{stem}.0.bias"), vec![width]));
            t.push((format!("head2.{stem}.3.weight"), k3(width, width)));
            t.push((format!("head2.{stem}.3.bias"), vec![width]));
        }
        t.push(("head2.cls_head.weight".into(), k1(self.num_classes, m)));
        t.push(("head2.cls_head.bias".into(), vec![self.num_classes]));
        t.push(("head2.offset_head.weight".into(), k1(3, o)));
        t.push(("head2.offset_head.bias".into(), vec![3]));
        t
    }

    pub fn param_count(&self) -> usize {
        self.required_tensors().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

/// Architecture from tensor names (never from a file name).
pub fn detect_arch<'a>(mut names: impl Iterator<Item = &'a str>) -> Option<Arch> {
    let mut found = None;
    for n in &mut names {
        if n.starts_with("backbone.convInit.") {
            found = Some(Arch::Segresnetv2);
            break;
        }
        if n.starts_with("backbone.input_block.") || n.starts_with("backbone.skip_layers.") {
            found = Some(Arch::Dynunet);
            break;
        }
    }
    found
}

/// Infers every width from tensor shapes. `shape(name)` returns a tensor's shape if present.
pub fn infer_spec(arch: Arch, shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<ModelSpec> {
    let need = |name: &str| shape(name).with_context(|| format!("missing tensor {name} (needed to infer the {} widths)", arch.name()));
    let head_cls = need("head2.cls_stem.0.weight")?;
    let head_off = need("head2.offset_stem.0.weight")?;
    let cls_head = need("head2.cls_head.weight")?;
    let (cls_width, head_in, offset_width, num_classes) = (head_cls[0], head_cls[1], head_off[0], cls_head[0]);
    let mut spec = match arch {
        Arch::Segresnetv2 => {
            let init = need("backbone.convInit.conv.weight")?;
            let count = |prefix: &str| -> Vec<usize> {
                let mut v = Vec::new();
                for i in 0.. {
                    let mut nb = 0;
                    let first = if prefix == "down_layers" { 1 } else { 0 };
                    while shape(&format!("backbone.{prefix}.{i}.{}.conv1.conv.weight", first + nb)).is_some() {
                        nb += 1;
                    }
                    if nb == 0 {
                        break;
                    }
                    v.push(nb);
                }
                v
            };
            // A level is counted by its first block's conv1: name the tensor that ended the count.
            let first_block = |prefix: &str, level: usize| format!("backbone.{prefix}.{level}.{}.conv1.conv.weight", usize::from(prefix == "down_layers"));
            let blocks_down = count("down_layers");
            if blocks_down.len() < 3 {
                bail!(
                    "SegResNet checkpoint has {} encoder levels; at least 3 are needed (missing tensor {})",
                    blocks_down.len(),
                    first_block("down_layers", blocks_down.len())
                );
            }
            let mut blocks_up = count("up_layers");
            // Only the decoder steps down to stride 2 are live.
            let live = blocks_down.len() - 2;
            if blocks_up.len() < live {
                bail!(
                    "SegResNet checkpoint has {} decoder levels; {live} are needed for the stride-2 head (missing tensor {})",
                    blocks_up.len(),
                    first_block("up_layers", blocks_up.len())
                );
            }
            blocks_up.truncate(live);
            let mut s = ModelSpec::segresnet(init[0], cls_width, offset_width);
            s.in_channels = init[1];
            s.blocks_down = blocks_down;
            s.blocks_up = blocks_up;
            s.norm_groups = Some(8);
            s
        }
        Arch::Dynunet => {
            let mut filters = vec![need("backbone.input_block.conv1.conv.weight")?[0]];
            let in_channels = need("backbone.input_block.conv1.conv.weight")?[1];
            let mut i = 0;
            while let Some(s) = shape(&format!("backbone.downsamples.{i}.conv1.conv.weight")) {
                filters.push(s[0]);
                i += 1;
            }
            filters.push(need("backbone.bottleneck.conv1.conv.weight")?[0]);
            if filters.len() < 3 {
                bail!("DynUNet checkpoint has {} levels; at least 3 are needed", filters.len());
            }
            let ds = need("backbone.deep_supervision_heads.0.conv.conv.weight")?;
            let mut s = ModelSpec::dynunet(&filters, ds[0], cls_width, offset_width);
            s.in_channels = in_channels;
            s
        }
    };
    spec.head_in = head_in;
    spec.num_classes = num_classes;
    spec.stride = 2;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_parameter_counts_are_plausible() {
        // The w16 fixture checkpoint's live tensors hold 4,731,617 parameters; convolutions scale
        // with the width squared, so the seed's f=32 model has about four times as many.
        let w16 = ModelSpec::segresnet(16, 24, 8);
        assert_eq!(w16.param_count(), 4_731_617);
        let s = ModelSpec::seed(Arch::Segresnetv2);
        let ratio = s.param_count() as f64 / w16.param_count() as f64;
        assert!(ratio > 3.9 && ratio < 4.01, "{ratio}");
        let d = ModelSpec::seed(Arch::Dynunet);
        assert!(d.param_count() > 20_000_000 && d.param_count() < 40_000_000, "{}", d.param_count());
        assert_eq!(s.size_multiple(), 8);
        assert_eq!(d.size_multiple(), 32);
    }

    #[test]
    fn spec_round_trips_through_json() {
        for arch in [Arch::Segresnetv2, Arch::Dynunet] {
            let s = ModelSpec::seed(arch);
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<ModelSpec>(&j).unwrap(), s);
        }
    }
}
