//! CPU engine throughput: one tile per architecture at the seed's widths (random weights), and the
//! dominant op (3x3x3 conv) alone. Throughput is reported in FLOP/s from the graph's FLOP count.
//!
//! `cargo bench --bench cpu_tile` (set FASTDET_BENCH_TILE=z,y,x to change the 64x64x64 tile).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastdet::engine::cpu::conv::{conv3d, ConvShape};
use fastdet::engine::{cpu::CpuEngine, TileEngine};
use fastdet::model::graph::{Act, Graph};
use fastdet::model::spec::{Arch, ModelSpec};
use fastdet::util::SplitMix64;
use fastdet::weights::Weights;
use std::time::Duration;

fn tile() -> [usize; 3] {
    std::env::var("FASTDET_BENCH_TILE")
        .ok()
        .and_then(|s| {
            let v: Vec<usize> = s.split(',').filter_map(|x| x.parse().ok()).collect();
            v.try_into().ok()
        })
        .unwrap_or([64, 64, 64])
}

fn per_tile(c: &mut Criterion) {
    let t = tile();
    let mut g = c.benchmark_group("cpu_tile");
    g.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(2));
    for arch in [Arch::Segresnetv2, Arch::Dynunet] {
        let spec = ModelSpec::seed(arch);
        let w = Weights::random(&spec, 1);
        let mut e = CpuEngine::new(&w).unwrap();
        let flops = Graph::build(&spec).unwrap().flops(t);
        let mut input = vec![0.0f32; t.iter().product()];
        SplitMix64::new(2).fill_uniform(&mut input, 0.0, 1.0);
        g.throughput(Throughput::Elements(flops));
        g.bench_function(format!("{}_{}x{}x{}", arch.name(), t[0], t[1], t[2]), |b| {
            b.iter(|| e.forward(&input, 1, t, false).unwrap())
        });
    }
    g.finish();
}

fn conv_op(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_conv3x3x3");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (ch, dim) in [(32usize, 64usize), (64, 32), (256, 8)] {
        let s = ConvShape { cin: ch, cout: ch, k: 3, stride: 1, pad: 1, dims: [dim; 3] };
        let mut r = SplitMix64::new(3);
        let mut x = vec![0.0f32; ch * dim * dim * dim];
        let mut w = vec![0.0f32; ch * ch * 27];
        r.fill_uniform(&mut x, -1.0, 1.0);
        r.fill_uniform(&mut w, -0.1, 0.1);
        let mut out = vec![0.0f32; x.len()];
        g.throughput(Throughput::Elements(2 * (ch * ch * 27 * dim * dim * dim) as u64));
        g.bench_function(format!("c{ch}_{dim}cubed"), |b| b.iter(|| conv3d(&x, 1, s, &w, None, Act::None, &mut out)));
    }
    g.finish();
}

criterion_group!(benches, per_tile, conv_op);
criterion_main!(benches);
