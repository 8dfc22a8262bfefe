//! The CPU reference engine: f32 arithmetic on fp16-stored weights, NCDHW activations, rayon over
//! output blocks. It is the oracle every GPU kernel is checked against.

pub mod conv;
pub mod simd;
pub mod norm;
pub(crate) mod par;
pub mod pool;
pub mod resample;
pub mod selftest;

use super::{Outputs, TileEngine};
use crate::model::graph::{op_in_place, Graph, OpKind};
use crate::weights::Weights;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;

pub struct CpuEngine {
    pub graph: Graph,
    params: HashMap<String, Vec<f32>>,
    /// Conv weights re-laid once for the AVX-512 kernels, by tensor name (empty on CPUs without).
    packed: HashMap<String, conv::PackedWeights>,
    name: String,
}

impl CpuEngine {
    pub fn new(weights: &Weights) -> Result<Self> {
        let graph = Graph::build(&weights.spec)?;
        let mut params = HashMap::new();
        for (name, _) in weights.spec.required_tensors() {
            params.insert(name.clone(), weights.f32(&name)?);
        }
        let packed = pack_convs(&graph, &params);
        Ok(Self { graph, params, packed, name: weights.name.clone() })
    }

    /// How many conv weight tensors are packed for the SIMD kernels (0 on the portable path).
    pub fn simd_convs(&self) -> usize {
        self.packed.len()
    }

    /// The engine without the SIMD kernels: every conv on the portable path (the self-test's
    /// reference for the kernels at network scale).
    pub fn portable(weights: &Weights) -> Result<Self> {
        let mut e = Self::new(weights)?;
        e.packed.clear();
        Ok(e)
    }

    /// An engine over f32 parameters as they are (no fp16 rounding): cross-checks against
    /// references computed from the original float32 checkpoint.
    pub fn from_f32_params(spec: &crate::model::spec::ModelSpec, params: HashMap<String, Vec<f32>>, name: &str) -> Result<Self> {
        let graph = Graph::build(spec)?;
        for (t, shape) in spec.required_tensors() {
            let p = params.get(&t).with_context(|| format!("missing tensor {t}"))?;
            if p.len() != shape.iter().product::<usize>() {
                bail!("tensor {t} holds {} values, expected shape {shape:?}", p.len());
            }
        }
        let packed = pack_convs(&graph, &params);
        Ok(Self { graph, params, packed, name: name.to_string() })
    }

    fn param(&self, name: &str) -> Result<&[f32]> {
        self.params.get(name).map(Vec::as_slice).with_context(|| format!("weights lack tensor {name}"))
    }

    /// Runs the graph; returns every value that is still alive at the end (scores, offsets, fm2).
    fn run(&self, input: &[f32], n: usize, tile: [usize; 3]) -> Result<Vec<Option<Vec<f32>>>> {
        let g = &self.graph;
        g.check_tile(tile)?;
        if input.len() != n * g.numel(g.input, tile) {
            bail!("input holds {} values, expected {} for {n} tile(s) of {tile:?}", input.len(), n * g.numel(g.input, tile));
        }
        let last = g.last_use();
        let mut vals: Vec<Option<Vec<f32>>> = vec![None; g.values.len()];
        vals[g.input] = Some({
            let mut b = pool::with_capacity(input.len());
            b.extend_from_slice(input);
            b
        });
        // FASTDET_PROFILE=1: seconds per op kind on stderr (where does a tile's time go).
        let profile = std::env::var_os("FASTDET_PROFILE").is_some();
        let mut spent: Vec<(String, f64, f64)> = Vec::new();
        for (i, op) in g.ops.iter().enumerate() {
            let t0 = std::time::Instant::now();
            let in_dims = g.dims(op.inputs[0], tile);
            let vol_in: usize = in_dims.iter().product();
            let cin = g.values[op.inputs[0]].channels;
            let out_len = n * g.numel(op.output, tile);
            let take_first = op_in_place(&op.kind) && last[op.inputs[0]] == i;
            let out = if take_first {
                let mut buf = vals[op.inputs[0]].take().expect("value computed");
                match &op.kind {
                    OpKind::GroupNorm { groups, weight, bias, act } => {
                        norm::group_norm(&mut buf, n, cin, vol_in, *groups, Some(self.param(weight)?), Some(self.param(bias)?), *act)
                    }
                    OpKind::InstanceNorm { act } => norm::instance_norm(&mut buf, n, cin, vol_in, *act),
                    OpKind::Add => {
                        let other = vals[op.inputs[1]].as_ref().expect("value computed");
                        for (a, b) in buf.iter_mut().zip(other) {
                            *a += *b;
                        }
                    }
                    _ => unreachable!(),
                }
                buf
            } else {
                let x = vals[op.inputs[0]].as_ref().expect("value computed");
                match &op.kind {
                    OpKind::Conv { weight, bias, cin, cout, k, stride, pad, act } => {
                        let mut out = pool::for_overwrite(out_len);
                        let shape = conv::ConvShape { cin: *cin, cout: *cout, k: *k, stride: *stride, pad: *pad, dims: in_dims };
                        let b = match bias {
                            Some(b) => Some(self.param(b)?),
                            None => None,
                        };
                        conv::conv3d_with(x, n, shape, self.param(weight)?, self.packed.get(weight), b, *act, &mut out);
                        out
                    }
                    OpKind::ConvTranspose2 { weight, cin, cout } => {
                        let mut out = pool::for_overwrite(out_len);
                        conv::conv_transpose2(x, n, *cin, *cout, in_dims, self.param(weight)?, &mut out);
                        out
                    }
                    OpKind::GroupNorm { groups, weight, bias, act } => {
                        let mut buf = pool::for_overwrite(x.len());
                        norm::group_norm_to(x, &mut buf, n, cin, vol_in, *groups, Some(self.param(weight)?), Some(self.param(bias)?), *act);
                        buf
                    }
                    OpKind::InstanceNorm { act } => {
                        let mut buf = pool::for_overwrite(x.len());
                        norm::instance_norm_to(x, &mut buf, n, cin, vol_in, *act);
                        buf
                    }
                    OpKind::Add => {
                        let other = vals[op.inputs[1]].as_ref().expect("value computed");
                        let mut out = pool::with_capacity(x.len());
                        out.extend(x.iter().zip(other).map(|(a, b)| a + b));
                        out
                    }
                    OpKind::Concat => {
                        let y = vals[op.inputs[1]].as_ref().expect("value computed");
                        let (ca, cb) = (cin, g.values[op.inputs[1]].channels);
                        let mut out = pool::with_capacity(out_len);
                        for b in 0..n {
                            out.extend_from_slice(&x[b * ca * vol_in..(b + 1) * ca * vol_in]);
                            out.extend_from_slice(&y[b * cb * vol_in..(b + 1) * cb * vol_in]);
                        }
                        out
                    }
                    OpKind::Upsample2x => resample::upsample2x(x, n * cin, in_dims),
                }
            };
            debug_assert_eq!(out.len(), out_len);
            if profile {
                let key = match &op.kind {
                    OpKind::Conv { k, stride, cin, cout, .. } => format!("conv k{k} s{stride} {cin}->{cout} @{}", in_dims[0]),
                    other => format!("{other:?}").split([' ', '{', '(']).next().unwrap_or("?").to_string(),
                };
                let dt = t0.elapsed().as_secs_f64();
                let flops = n as f64 * g.op_flops(op, tile) as f64;
                match spent.iter_mut().find(|(k, _, _)| *k == key) {
                    Some((_, t, f)) => {
                        *t += dt;
                        *f += flops;
                    }
                    None => spent.push((key, dt, flops)),
                }
            }
            vals[op.output] = Some(out);
            for &v in &op.inputs {
                if last[v] == i {
                    if let Some(b) = vals[v].take() {
                        pool::release(b);
                    }
                }
            }
        }
        if profile {
            spent.sort_by(|a, b| b.1.total_cmp(&a.1));
            for (k, t, f) in spent {
                crate::errln!("profile {:<32} {:8.1} ms {:7.1} GFLOP/s", k, t * 1e3, f * 1e-9 / t);
            }
        }
        Ok(vals)
    }
}

impl TileEngine for CpuEngine {
    fn forward(&mut self, input: &[f32], n: usize, tile: [usize; 3], want_fm2: bool) -> Result<Outputs> {
        let mut vals = self.run(input, n, tile)?;
        let g = &self.graph;
        let out = Outputs {
            scores: vals[g.scores].take().expect("scores computed"),
            offsets: vals[g.offsets].take().expect("offsets computed"),
            fm2: if want_fm2 { vals[g.fm2].take() } else { None },
        };
        vals.into_iter().flatten().for_each(pool::release);
        Ok(out)
    }

    fn name(&self) -> String {
        format!("cpu:{}", self.name)
    }
}

/// Packs the weights of every conv that takes the AVX-512 kernels on this CPU.
fn pack_convs(graph: &Graph, params: &HashMap<String, Vec<f32>>) -> HashMap<String, conv::PackedWeights> {
    let mut packed = HashMap::new();
    for op in &graph.ops {
        if let OpKind::Conv { weight, cin, cout, k, stride, pad, .. } = &op.kind {
            if conv::may_want_panels(*k, *stride, *pad) {
                if let Some(w) = params.get(weight) {
                    packed.entry(weight.clone()).or_insert_with(|| conv::PackedWeights::new(w, *cout, cin * k * k * k));
                }
            }
        }
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::{Arch, ModelSpec};

    /// Kept buffers are handed out with old contents to ops that overwrite them: filled with NaN
    /// between two forward passes, they leave the outputs bit for bit as they were.
    #[test]
    fn reused_buffers_are_overwritten_whole() {
        for arch in [Arch::Segresnetv2, Arch::Dynunet] {
            let w = Weights::random(&ModelSpec::seed(arch), 3);
            for mut e in [CpuEngine::new(&w).unwrap(), CpuEngine::portable(&w).unwrap()] {
                let tile = [32, 32, 32];
                let mut rng = crate::util::SplitMix64::new(5);
                let x: Vec<f32> = (0..2 * 32 * 32 * 32).map(|_| rng.normal() as f32).collect();
                let first = e.forward(&x, 2, tile, true).unwrap();
                pool::poison_idle();
                let second = e.forward(&x, 2, tile, true).unwrap();
                assert!(first.scores.iter().chain(&first.offsets).all(|v| v.is_finite()));
                assert!(first.scores == second.scores && first.offsets == second.offsets && first.fm2 == second.fm2, "{arch:?}");
            }
        }
    }
}
