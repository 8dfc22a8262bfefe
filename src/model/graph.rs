//! A model lowered to a flat list of ops over named values, dead branches already pruned.
//! Engines walk this list; `inspect --graph` prints it; FLOPs and activation memory come from it.

use super::spec::{Arch, ModelSpec};
use anyhow::{bail, Result};
use std::fmt;

pub type ValueId = usize;

/// Activation fused after an op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    None,
    Relu,
    LeakyRelu(f32),
    Silu,
    Sigmoid,
    /// `tanh(x) * scale` (the offset head).
    TanhScale(f32),
}

impl Act {
    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Act::None => x,
            Act::Relu => x.max(0.0),
            Act::LeakyRelu(s) => {
                if x >= 0.0 {
                    x
                } else {
                    x * s
                }
            }
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::TanhScale(s) => x.tanh() * s,
        }
    }
}

impl fmt::Display for Act {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Act::None => Ok(()),
            Act::Relu => write!(f, "+relu"),
            Act::LeakyRelu(s) => write!(f, "+lrelu({s})"),
            Act::Silu => write!(f, "+silu"),
            Act::Sigmoid => write!(f, "+sigmoid"),
            Act::TanhScale(s) => write!(f, "+tanh*{s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OpKind {
    /// Cubic kernel `k` (1 or 3), stride 1 or 2, zero padding, optional bias, fused activation.
    Conv { weight: String, bias: Option<String>, cin: usize, cout: usize, k: usize, stride: usize, pad: usize, act: Act },
    /// Transposed conv, kernel 2 stride 2, no bias; weight `[cin, cout, 2, 2, 2]`.
    ConvTranspose2 { weight: String, cin: usize, cout: usize },
    /// GroupNorm (affine) then activation.
    GroupNorm { groups: usize, weight: String, bias: String, act: Act },
    /// InstanceNorm (no affine) then activation.
    InstanceNorm { act: Act },
    /// Elementwise sum of two values.
    Add,
    /// Channel concatenation `[inputs[0], inputs[1]]`.
    Concat,
    /// Trilinear x2 upsampling, align_corners = False.
    Upsample2x,
}

#[derive(Debug, Clone)]
pub struct Op {
    pub kind: OpKind,
    pub inputs: Vec<ValueId>,
    pub output: ValueId,
}

/// A value: `channels` at `level` (spatial size = tile size >> level).
#[derive(Debug, Clone)]
pub struct ValueInfo {
    pub name: String,
    pub channels: usize,
    pub level: u32,
}

#[derive(Debug, Clone)]
pub struct Graph {
    pub spec: ModelSpec,
    pub values: Vec<ValueInfo>,
    pub ops: Vec<Op>,
    pub input: ValueId,
    pub fm2: ValueId,
    pub scores: ValueId,
    pub offsets: ValueId,
}

struct Builder {
    values: Vec<ValueInfo>,
    ops: Vec<Op>,
}

impl Builder {
    fn value(&mut self, name: String, channels: usize, level: u32) -> ValueId {
        self.values.push(ValueInfo { name, channels, level });
        self.values.len() - 1
    }
    fn op(&mut self, kind: OpKind, inputs: Vec<ValueId>, name: String, channels: usize, level: u32) -> ValueId {
        let output = self.value(name, channels, level);
        self.ops.push(Op { kind, inputs, output });
        output
    }
    fn ch(&self, v: ValueId) -> usize {
        self.values[v].channels
    }
    fn lvl(&self, v: ValueId) -> u32 {
        self.values[v].level
    }
    #[allow(clippy::too_many_arguments)]
    fn conv(&mut self, x: ValueId, weight: &str, bias: bool, cout: usize, k: usize, stride: usize, act: Act) -> ValueId {
        let level = self.lvl(x) + (stride == 2) as u32;
        let kind = OpKind::Conv {
            weight: format!("{weight}.weight"),
            bias: bias.then(|| format!("{weight}.bias")),
            cin: self.ch(x),
            cout,
            k,
            stride,
            pad: k / 2,
            act,
        };
        self.op(kind, vec![x], weight.to_string(), cout, level)
    }
    fn group_norm(&mut self, x: ValueId, p: &str, groups: usize, act: Act) -> ValueId {
        let kind = OpKind::GroupNorm { groups, weight: format!("{p}.weight"), bias: format!("{p}.bias"), act };
        let (c, l) = (self.ch(x), self.lvl(x));
        self.op(kind, vec![x], p.to_string(), c, l)
    }
    fn instance_norm(&mut self, x: ValueId, name: String, act: Act) -> ValueId {
        let (c, l) = (self.ch(x), self.lvl(x));
        self.op(OpKind::InstanceNorm { act }, vec![x], name, c, l)
    }
    fn add(&mut self, a: ValueId, b: ValueId, name: String) -> ValueId {
        let (c, l) = (self.ch(a), self.lvl(a));
        self.op(OpKind::Add, vec![a, b], name, c, l)
    }

    /// MONAI SegResNet ResBlock: x + conv2(relu(GN2(conv1(relu(GN1(x)))))).
    fn res_block(&mut self, x: ValueId, p: &str, groups: usize) -> ValueId {
        let c = self.ch(x);
        let t = self.group_norm(x, &format!("{p}.norm1"), groups, Act::Relu);
        let t = self.conv(t, &format!("{p}.conv1.conv"), false, c, 3, 1, Act::None);
        let t = self.group_norm(t, &format!("{p}.norm2"), groups, Act::Relu);
        let t = self.conv(t, &format!("{p}.conv2.conv"), false, c, 3, 1, Act::None);
        self.add(t, x, format!("{p}.out"))
    }

    /// MONAI UnetBasicBlock: lrelu(IN(conv2(lrelu(IN(conv1(x)))))), conv1 carries the stride.
    fn basic_block(&mut self, x: ValueId, p: &str, cout: usize, stride: usize) -> ValueId {
        let act = Act::LeakyRelu(0.01);
        let t = self.conv(x, &format!("{p}.conv1.conv"), false, cout, 3, stride, Act::None);
        let t = self.instance_norm(t, format!("{p}.norm1"), act);
        let t = self.conv(t, &format!("{p}.conv2.conv"), false, cout, 3, 1, Act::None);
        self.instance_norm(t, format!("{p}.norm2"), act)
    }
}

/// Weights of a convolution (`cout * cin * k^3`; 8 taps for the transposed 2x2x2 one); 0 for
/// the ops without any.
pub fn op_weight_elems(op: &Op) -> usize {
    match &op.kind {
        OpKind::Conv { cin, cout, k, .. } => cin * cout * k * k * k,
        OpKind::ConvTranspose2 { cin, cout, .. } => cin * cout * 8,
        _ => 0,
    }
}

impl Graph {
    pub fn build(spec: &ModelSpec) -> Result<Graph> {
        if spec.stride != 2 {
            bail!("only the stride-2 detection head is supported, the spec says stride {}", spec.stride);
        }
        let mut b = Builder { values: Vec::new(), ops: Vec::new() };
        let input = b.value("input".into(), spec.in_channels, 0);
        let fm2 = match spec.arch {
            Arch::Segresnetv2 => {
                let f = spec.init_filters.unwrap_or(0);
                let groups = spec.norm_groups.unwrap_or(8);
                let levels = spec.blocks_down.len();
                if f == 0 || groups == 0 || !f.is_multiple_of(groups) || levels < 3 {
                    bail!("invalid SegResNet spec: {}", spec.widths_summary());
                }
                let mut x = b.conv(input, "backbone.convInit.conv", false, f, 3, 1, Act::None);
                let mut skips = Vec::new();
                for (i, &nb) in spec.blocks_down.iter().enumerate() {
                    if i > 0 {
                        x = b.conv(x, &format!("backbone.down_layers.{i}.0.conv"), false, f << i, 3, 2, Act::None);
                    }
                    for j in 0..nb {
                        x = b.res_block(x, &format!("backbone.down_layers.{i}.{}", j + 1), groups);
                    }
                    skips.push(x);
                }
                for (j, &nb) in spec.blocks_up.iter().enumerate() {
                    let c = f << (levels - 2 - j);
                    x = b.conv(x, &format!("backbone.up_samples.{j}.0.conv"), false, c, 1, 1, Act::None);
                    let l = b.lvl(x) - 1;
                    x = b.op(OpKind::Upsample2x, vec![x], format!("backbone.up_samples.{j}.1"), c, l);
                    x = b.add(x, skips[levels - 2 - j], format!("backbone.up_samples.{j}.skip"));
                    for k in 0..nb {
                        x = b.res_block(x, &format!("backbone.up_layers.{j}.{k}"), groups);
                    }
                }
                x
            }
            Arch::Dynunet => {
                let fl = &spec.filters;
                let n = fl.len();
                let mut x = b.basic_block(input, "backbone.input_block", fl[0], 1);
                let mut skips = vec![x];
                for i in 0..n - 2 {
                    x = b.basic_block(x, &format!("backbone.downsamples.{i}"), fl[i + 1], 2);
                    skips.push(x);
                }
                x = b.basic_block(x, "backbone.bottleneck", fl[n - 1], 2);
                for k in 0..n - 2 {
                    let co = fl[n - 2 - k];
                    let p = format!("backbone.upsamples.{k}");
                    let kind = OpKind::ConvTranspose2 { weight: format!("{p}.transp_conv.conv.weight"), cin: b.ch(x), cout: co };
                    let l = b.lvl(x) - 1;
                    let up = b.op(kind, vec![x], format!("{p}.transp_conv"), co, l);
                    let skip = skips[n - 2 - k];
                    let cat = b.op(OpKind::Concat, vec![up, skip], format!("{p}.cat"), co + b.ch(skip), l);
                    x = b.basic_block(cat, &format!("{p}.conv_block"), co, 1);
                }
                let w = spec.deep_supervision_width.unwrap_or(0);
                b.conv(x, "backbone.deep_supervision_heads.0.conv.conv", true, w, 1, 1, Act::None)
            }
        };
        if b.values[fm2].level != 1 || b.ch(fm2) != spec.head_in {
            bail!("internal error: fm2 is at level {} with {} channels", b.values[fm2].level, b.ch(fm2));
        }
        let mut heads = Vec::new();
        for (stem, width, head, cout, act) in [
            ("cls", spec.cls_width, "cls_head", spec.num_classes, Act::Sigmoid),
            ("offset", spec.offset_width, "offset_head", 3, Act::TanhScale(spec.stride as f32)),
        ] {
            // The head's order is act → norm (the opposite of SegResNet's norm → act).
            let p = format!("head2.{stem}_stem");
            let t = b.conv(fm2, &format!("{p}.0"), true, width, 3, 1, Act::Silu);
            let t = b.instance_norm(t, format!("{p}.2"), Act::None);
            let t = b.conv(t, &format!("{p}.3"), true, width, 3, 1, Act::Silu);
            let t = b.instance_norm(t, format!("{p}.5"), Act::None);
            heads.push(b.conv(t, &format!("head2.{head}"), true, cout, 1, 1, act));
        }
        Ok(Graph { spec: spec.clone(), values: b.values, ops: b.ops, input, fm2, scores: heads[0], offsets: heads[1] })
    }

    /// Checks that a tile shape fits the network.
    pub fn check_tile(&self, tile: [usize; 3]) -> Result<()> {
        let m = self.spec.size_multiple();
        if tile.iter().any(|&s| s == 0 || s % m != 0) {
            bail!(
                "tile {}x{}x{} cannot go through {}: every axis must be a positive multiple of {m}",
                tile[0],
                tile[1],
                tile[2],
                self.spec.arch.name()
            );
        }
        Ok(())
    }

    pub fn dims(&self, v: ValueId, tile: [usize; 3]) -> [usize; 3] {
        let l = self.values[v].level;
        [tile[0] >> l, tile[1] >> l, tile[2] >> l]
    }

    pub fn numel(&self, v: ValueId, tile: [usize; 3]) -> usize {
        self.values[v].channels * self.dims(v, tile).iter().product::<usize>()
    }

    /// Floating-point operations of one tile (2 per multiply-add of the convolutions; norms,
    /// activations and resampling are memory-bound and not counted).
    pub fn flops(&self, tile: [usize; 3]) -> u64 {
        self.ops.iter().map(|op| self.op_flops(op, tile)).sum()
    }

    pub fn op_flops(&self, op: &Op, tile: [usize; 3]) -> u64 {
        let vox = |v: ValueId| self.dims(v, tile).iter().product::<usize>() as u64;
        let w = op_weight_elems(op) as u64;
        match &op.kind {
            OpKind::Conv { .. } => 2 * w * vox(op.output),
            // Each input voxel meets every weight once (kernel 2, stride 2).
            OpKind::ConvTranspose2 { .. } => 2 * w * vox(op.inputs[0]),
            _ => 0,
        }
    }

    /// The least device memory traffic of ops `first..first + used` run as one step on `n`
    /// tiles, in bytes: each value they read from outside the span once, each value they produce
    /// that is read after it (or is a score or offset map) written once, and the weights of their
    /// convolutions once; activations and weights in fp16, the score and offset maps in f32 (as
    /// the CUDA engine stores them; the few weights it keeps in f32, of the first conv and the
    /// heads', count as fp16). What a step's time compares with at the card's bandwidth.
    pub fn span_min_bytes(&self, first: usize, used: usize, tile: [usize; 3], n: usize) -> u64 {
        let span = first..first + used;
        let mut read: Vec<ValueId> = Vec::new();
        let mut weights = 0usize;
        for op in &self.ops[span.clone()] {
            for &v in &op.inputs {
                let produced_inside = self.ops[span.clone()].iter().any(|o| o.output == v);
                if !produced_inside && !read.contains(&v) {
                    read.push(v);
                }
            }
            weights += op_weight_elems(op);
        }
        let read_later = |v: ValueId| self.ops[span.end..].iter().any(|o| o.inputs.contains(&v));
        let mut bytes: usize = read.iter().map(|&v| self.numel(v, tile) * 2 * n).sum();
        for op in &self.ops[span.clone()] {
            let v = op.output;
            if v == self.scores || v == self.offsets {
                bytes += self.numel(v, tile) * 4 * n;
            } else if read_later(v) {
                bytes += self.numel(v, tile) * 2 * n;
            }
        }
        (bytes + weights * 2) as u64
    }

    /// The least memory traffic of `n` tiles with every op a step of its own (no fusion).
    pub fn min_bytes_op_by_op(&self, tile: [usize; 3], n: usize) -> u64 {
        (0..self.ops.len()).map(|i| self.span_min_bytes(i, 1, tile, n)).sum()
    }

    /// For each value, the index of the last op that reads it (outputs live to the end).
    pub fn last_use(&self) -> Vec<usize> {
        let mut last = vec![0usize; self.values.len()];
        for (i, op) in self.ops.iter().enumerate() {
            for &v in &op.inputs {
                last[v] = i;
            }
        }
        for v in [self.scores, self.offsets, self.fm2] {
            last[v] = usize::MAX;
        }
        last
    }

    /// Peak bytes of live f32 activations for one tile when every value is freed after its last
    /// reader and ops that allow it (norms, add) work in place.
    pub fn peak_activation_bytes(&self, tile: [usize; 3], bytes_per_elem: usize) -> usize {
        let last = self.last_use();
        let mut live: usize = self.numel(self.input, tile);
        let mut peak = live;
        for (i, op) in self.ops.iter().enumerate() {
            let out = self.numel(op.output, tile);
            let in_place = op_in_place(&op.kind) && last[op.inputs[0]] == i;
            if !in_place {
                live += out;
            }
            peak = peak.max(live);
            for &v in &op.inputs {
                if last[v] == i && !(in_place && v == op.inputs[0]) {
                    live -= self.numel(v, tile);
                }
            }
        }
        peak * bytes_per_elem
    }

    /// Human-readable op list with shapes for a tile.
    pub fn describe(&self, tile: [usize; 3]) -> String {
        let mut s = String::new();
        let shape = |v: ValueId| {
            let d = self.dims(v, tile);
            format!("[{},{},{},{}]", self.values[v].channels, d[0], d[1], d[2])
        };
        for (i, op) in self.ops.iter().enumerate() {
            let what = match &op.kind {
                OpKind::Conv { k, stride, bias, act, .. } => {
                    format!("conv{k}x{k}x{k}/s{stride}{}{act}", if bias.is_some() { "+bias" } else { "" })
                }
                OpKind::ConvTranspose2 { .. } => "convT2x2x2/s2".to_string(),
                OpKind::GroupNorm { groups, act, .. } => format!("groupnorm({groups}){act}"),
                OpKind::InstanceNorm { act } => format!("instancenorm{act}"),
                OpKind::Add => "add".to_string(),
                OpKind::Concat => "concat".to_string(),
                OpKind::Upsample2x => "upsample2x(trilinear)".to_string(),
            };
            let ins: Vec<String> = op.inputs.iter().map(|&v| format!("%{v}{}", shape(v))).collect();
            let flops = self.op_flops(op, tile);
            s.push_str(&format!(
                "{i:3}  %{:<3} {:<26} {:<48} <- {}{}\n",
                op.output,
                shape(op.output),
                format!("{what} {}", self.values[op.output].name),
                ins.join(", "),
                if flops > 0 { format!("  {:.2} GFLOP", flops as f64 / 1e9) } else { String::new() }
            ));
        }
        s
    }
}

/// Ops whose output may overwrite their (dead) first input.
pub fn op_in_place(kind: &OpKind) -> bool {
    matches!(kind, OpKind::GroupNorm { .. } | OpKind::InstanceNorm { .. } | OpKind::Add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_graphs_have_expected_structure() {
        let s = Graph::build(&ModelSpec::seed(Arch::Segresnetv2)).unwrap();
        let convs = s.ops.iter().filter(|o| matches!(o.kind, OpKind::Conv { .. })).count();
        // convInit + 3 stride convs + 2*(1+2+2+4) + 2 up 1x1 + 2*2 up resblock convs + head 2*(2+1)
        assert_eq!(convs, 1 + 3 + 18 + 2 + 4 + 6);
        let d = Graph::build(&ModelSpec::seed(Arch::Dynunet)).unwrap();
        let convts = d.ops.iter().filter(|o| matches!(o.kind, OpKind::ConvTranspose2 { .. })).count();
        assert_eq!(convts, 4);
        assert_eq!(d.values[d.fm2].channels, 64);
        assert_eq!(d.values[d.scores].channels, 6);
        // A 192x128x128 tile: tens to hundreds of GFLOP, not more.
        for g in [&s, &d] {
            let f = g.flops([192, 128, 128]) as f64 / 1e9;
            assert!(f > 50.0 && f < 5000.0, "{f}");
        }
    }

    #[test]
    fn a_steps_least_traffic_counts_what_crosses_its_edges_once() {
        let g = Graph::build(&ModelSpec::seed(Arch::Segresnetv2)).unwrap();
        let tile = [32, 32, 32];
        let bytes = |v: ValueId| g.numel(v, tile) as u64 * 2;
        let conv_weights = |op: &Op| op_weight_elems(op) as u64 * 2;
        // An add alone: two reads and a write; twice that for two tiles.
        let i = g.ops.iter().position(|o| matches!(o.kind, OpKind::Add)).unwrap();
        let add = &g.ops[i];
        let one = bytes(add.inputs[0]) + bytes(add.inputs[1]) + bytes(add.output);
        assert_eq!(g.span_min_bytes(i, 1, tile, 1), one);
        assert_eq!(g.span_min_bytes(i, 1, tile, 2), 2 * one);
        // The first conv: the input tile, its weights, its output (read by the next op).
        let c = &g.ops[0];
        assert_eq!(g.span_min_bytes(0, 1, tile, 1), bytes(c.inputs[0]) + conv_weights(c) + bytes(c.output));
        // The first two ops as one step: the value between them never leaves it.
        let (a, b) = (&g.ops[0], &g.ops[1]);
        assert_eq!(b.inputs[0], a.output);
        let later = g.ops[2..].iter().any(|o| o.inputs.contains(&a.output));
        let between = if later { bytes(a.output) } else { 0 };
        assert_eq!(g.span_min_bytes(0, 2, tile, 1), bytes(a.inputs[0]) + conv_weights(a) + conv_weights(b) + between + bytes(b.output));
        // The whole network: the tile in, every weight, the maps out (f32).
        let all = g.span_min_bytes(0, g.ops.len(), tile, 1);
        let weights: u64 = g.ops.iter().map(conv_weights).sum();
        let maps = (g.numel(g.scores, tile) + g.numel(g.offsets, tile)) as u64 * 4;
        assert_eq!(all, bytes(g.input) + weights + maps);
        // Op by op, every value between two ops goes out and comes back: more than any fusion.
        let op_by_op = g.min_bytes_op_by_op(tile, 1);
        assert!(op_by_op > g.span_min_bytes(0, 2, tile, 1) + g.span_min_bytes(2, g.ops.len() - 2, tile, 1));
        assert!(g.span_min_bytes(0, 2, tile, 1) + g.span_min_bytes(2, g.ops.len() - 2, tile, 1) > all);
        assert_eq!(g.min_bytes_op_by_op(tile, 3), 3 * op_by_op - 2 * weights);
    }

    #[test]
    fn specs_that_cannot_be_built_are_errors() {
        let mut s = ModelSpec::seed(Arch::Segresnetv2);
        s.norm_groups = Some(0);
        assert!(Graph::build(&s).is_err());
        let mut s = ModelSpec::seed(Arch::Dynunet);
        s.stride = 0;
        assert!(Graph::build(&s).unwrap_err().to_string().contains("stride"));
    }

    #[test]
    fn tile_shape_checks() {
        let d = Graph::build(&ModelSpec::seed(Arch::Dynunet)).unwrap();
        assert!(d.check_tile([192, 128, 128]).is_ok());
        assert!(d.check_tile([184, 128, 128]).unwrap_err().to_string().contains("multiple of 32"));
        let s = Graph::build(&ModelSpec::seed(Arch::Segresnetv2)).unwrap();
        assert!(s.check_tile([16, 32, 24]).is_ok());
        assert!(s.check_tile([12, 32, 24]).is_err());
    }
}
